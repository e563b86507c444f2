"""Decoding state of a CHIAR model: what each layer must remember so a step does not redo the prefix.

- attention (fixed or routed layers): keys and values of every token, whichever operator the
  token was routed to, since a later token routed to attention may attend to any earlier one;
- RBF mixing: the fixed-size prefix sums sum_s phi(k_s) v_s^T and sum_s phi(k_s);
- the MetaRouter: the running sum and count of the first layer's real inputs;
- DCT mixing: nothing.
The mask of real tokens seen so far and their count (positions count real tokens only) are shared.

It is a plain object with the methods `generate()` calls on a cache (`get_seq_length`,
`reorder_cache`, ...), not a subclass of transformers' `Cache`: its layer classes assume every
layer keeps keys and values, and their API changed within 5.x.
"""

import torch


class ChiarCache:
    is_compileable = False
    is_croppable = False  # see crop()

    @property
    def is_linear(self):
        # generate() reads this to decide whether a cache passed back in has seen the start of the
        # inputs (and slices them by get_seq_length()); every layer here counts the tokens it has seen.
        return [False] * self.num_layers

    def __init__(self, num_layers):
        self.num_layers = num_layers
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.rbf_state = [None] * num_layers  # (B, h, R, hd) fp32
        self.rbf_norm = [None] * num_layers  # (B, h, R) fp32
        self.meta_sum = None  # (B, d) fp32
        self.meta_count = None  # (B,) fp32
        self.token_mask = None  # (B, seen) bool, None while nothing seen is padding
        self.real_tokens = None  # (B,) long: real tokens seen, i.e. the next position
        self.seen_tokens = 0

    def __len__(self):
        return self.num_layers

    def get_seq_length(self, layer_idx=0):
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx=0):
        return None  # grows without bound, like DynamicCache

    def update_attention(self, layer_idx, keys, values):
        """Append this step's keys and values (B, h, n, hd); return those of every token so far."""
        if self.keys[layer_idx] is not None:
            keys = torch.cat([self.keys[layer_idx], keys], dim=2)
            values = torch.cat([self.values[layer_idx], values], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    def advance(self, token_mask, length, batch, device):
        """Record `length` new positions (token_mask: (B, n) bool or None) once every layer has run."""
        new = torch.ones(batch, length, dtype=torch.bool, device=device) if token_mask is None else token_mask
        if self.token_mask is not None or token_mask is not None:
            past = self.token_mask
            if past is None:
                past = torch.ones(batch, self.seen_tokens, dtype=torch.bool, device=device)
            self.token_mask = torch.cat([past, new], dim=1)
        counts = new.long().sum(dim=1)
        self.real_tokens = counts if self.real_tokens is None else self.real_tokens + counts
        self.seen_tokens += length

    def _tensors(self):
        names = ("meta_sum", "meta_count", "token_mask", "real_tokens")
        for name in names:
            yield self, name, None
        for store in (self.keys, self.values, self.rbf_state, self.rbf_norm):
            for i in range(self.num_layers):
                yield store, None, i

    def _map(self, fn):
        for owner, name, index in self._tensors():
            value = getattr(owner, name) if name is not None else owner[index]
            if value is None:
                continue
            if name is not None:
                setattr(owner, name, fn(value))
            else:
                owner[index] = fn(value)

    def reorder_cache(self, beam_idx):
        """Beam search: keep the rows `beam_idx` selects."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._map(lambda t: t[indices])

    def crop(self, max_length):
        raise ValueError(
            "A CHIAR cache cannot be cropped (RBF layers keep running sums, not per-token state), so "
            "assisted and speculative decoding are not supported."
        )
