"""Decoding state of a CHIAR model: what each layer must remember so a step does not redo the prefix.

- attention (fixed or routed layers): keys and values of every token, whichever operator the
  token was routed to, since a later token routed to attention may attend to any earlier one;
- RBF mixing: the fixed-size prefix sums sum_s phi(k_s) v_s^T and sum_s phi(k_s);
- the MetaRouter: the running sum and count of the first layer's real inputs;
- the budget of a routed layer: each budgeted operator's asks so far in the current block;
- DCT mixing: nothing.
The mask of real tokens seen so far and their count (positions count real tokens only) are shared.
Keys are stored as each pass computed them: real tokens first within every pass (`ChiarModel`
compacts padded rows); `key_order` maps them back to the caller's positions for attention maps.
The cache also records the shape of the model that filled it, and refuses another model's.

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

    def __init__(self, num_layers, signature=None):
        self.num_layers = num_layers
        self.signature = signature  # the filling model's (layers, width, schedule, operators); see check_model
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.rbf_state = [None] * num_layers  # (B, h, R, hd) fp32
        self.rbf_norm = [None] * num_layers  # (B, h, R) fp32
        self.meta_sum = None  # (B, d) fp32
        self.meta_count = None  # (B,) fp32
        self.budget_state = [None] * num_layers  # (B, K) long per routed layer
        self.token_mask = None  # (B, seen) bool in stored order, None while nothing seen is padding
        self.key_order = None  # (B, seen) long: each stored key's index in the caller's sequence
        self.real_tokens = None  # (B,) long: real tokens seen, i.e. the next position
        self.seen_tokens = 0

    @staticmethod
    def model_signature(config):
        return (config.num_hidden_layers, config.hidden_size, tuple(config.layer_schedule), tuple(config.routed_operators))

    def check_model(self, config):
        """Refuse a cache another model filled: its state would be read as this model's."""
        mine = self.model_signature(config)
        if self.num_layers != config.num_hidden_layers or (self.signature is not None and self.signature != mine):
            theirs = self.signature or (self.num_layers,)
            raise ValueError(
                f"This ChiarCache was made for another model (layers, hidden size, schedule, routed operators = "
                f"{theirs}); this model is {mine}. Start generation with a new cache."
            )
        self.signature = mine

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
        else:  # stored contiguous, as every later step's concatenation is (a compiled step sees one layout)
            keys, values = keys.contiguous(), values.contiguous()
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    def advance(self, token_mask, order, length, batch, device):
        """Record `length` new positions once every layer has run: token_mask (B, n) bool in stored
        order, or None when none is padding; order (B, n): their indices in the caller's input, or None."""
        new = torch.ones(batch, length, dtype=torch.bool, device=device) if token_mask is None else token_mask
        if self.token_mask is not None or token_mask is not None:
            past = self.token_mask
            if past is None:
                past = torch.ones(batch, self.seen_tokens, dtype=torch.bool, device=device)
            self.token_mask = torch.cat([past, new], dim=1)
        if self.key_order is not None or order is not None:
            past = self.key_order
            if past is None:
                past = torch.arange(self.seen_tokens, device=device).expand(batch, -1)
            step = torch.arange(length, device=device).expand(batch, -1) if order is None else order
            self.key_order = torch.cat([past, step + self.seen_tokens], dim=1)
        counts = new.long().sum(dim=1)
        self.real_tokens = counts if self.real_tokens is None else self.real_tokens + counts
        self.seen_tokens += length

    def _tensors(self):
        names = ("meta_sum", "meta_count", "token_mask", "key_order", "real_tokens")
        for name in names:
            yield self, name, None
        for store in (self.keys, self.values, self.rbf_state, self.rbf_norm, self.budget_state):
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
