"""RBF kernel mixing: linear-time kernel attention with k(q, k) = exp(-gamma ||q - k||^2).

The kernel is estimated with R positive random features (Performer-style):
    exp(-g||q - k||^2) = E_w[phi(q) phi(k)],   phi(u) = exp(sqrt(2g) w.u - 2g||u||^2) / sqrt(R),
so the normaliser sum_s phi(q).phi(k_s) is a sum of positive terms and never changes sign.
Queries and keys are L2-normalised per head: the kernel lives on the unit sphere, where the
exponent stays within a few units and nothing overflows in fp32 (features are computed in fp32).

Causal mode keeps prefix sums of phi(k) v^T and phi(k): a fixed-size state per head, O(T R d) in
all. Every token contributes keys to the state; queries are projected for the operator's query slots
only (or every token outside a routed layer), though the chunked read runs over every position
(see `_causal`: cheaper than a state per query).
"""

import math

import torch
from torch import nn

from .flops import rbf_flops
from .fp32_buffers import KeepsFP32Buffers
from .operators import OperatorOutput, gather_rows, masked, scatter_slots

CHUNK = 32  # prefix states are materialised once per chunk; queries add their chunk's earlier keys


def rbf_features(num_heads, head_dim, num_features, layer_idx, device=None):
    """Fixed Gaussian projections, seeded by layer so `_init_weights` can rebuild them exactly."""
    generator = torch.Generator().manual_seed(1_000_003 + layer_idx)
    return torch.randn(num_heads, head_dim, num_features, generator=generator).to(device)


class RBFMixing(KeepsFP32Buffers):
    fp32_buffers = ("projection",)

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.num_features = config.rbf_num_features
        self.gamma = config.rbf_gamma
        self.is_causal = config.is_causal
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.projection = nn.Buffer(rbf_features(self.num_heads, self.head_dim, self.num_features, layer_idx))

    def reset_from_config(self, config):
        from transformers import initialization

        features = rbf_features(self.num_heads, self.head_dim, self.num_features, self.layer_idx)
        initialization.copy_(self.projection, features.to(self.projection.device))

    def feature_map(self, x):
        """(..., d) -> positive features (..., h, R) in fp32."""
        u = x.float().view(*x.shape[:-1], self.num_heads, self.head_dim)
        u = nn.functional.normalize(u, dim=-1)
        proj = torch.einsum("...hd,hdr->...hr", u, self.projection.float())
        return torch.exp(math.sqrt(2 * self.gamma) * proj - 2 * self.gamma) / math.sqrt(self.num_features)

    def forward(self, x, ctx, selection):
        """The operator contract (operators.py). Padding contributes no key; with a cache, the prefix
        sums over earlier tokens are read and then extended with this pass's keys."""
        batch, length, d = x.shape
        h, hd = self.num_heads, self.head_dim
        slots = selection.slots
        key_features = self.feature_map(self.k_proj(x))  # (B, n, h, R)
        values = self.v_proj(x).float().view(batch, length, h, hd)
        if ctx.token_mask is not None:  # padding adds nothing to any state, whatever it holds
            real = ctx.token_mask[:, :, None, None]
            key_features, values = torch.where(real, key_features, 0), torch.where(real, values, 0)
        query_index = None if slots is None else slots.index
        query_features = self.feature_map(self.q_proj(x if slots is None else gather_rows(x, query_index)))
        if slots is not None:  # filler slots read nothing and place nothing
            query_features = torch.where(slots.valid[:, :, None, None], query_features, 0)
        num_queries = query_features.shape[1]

        cache = ctx.cache
        if not self.is_causal:
            if cache is not None:
                raise ValueError("Bidirectional RBF mixing (is_causal=False) has no incremental decoding cache.")
            state = torch.einsum("bthr,bthe->bhre", key_features, values)
            normaliser = key_features.sum(dim=1)  # (B, h, R)
            numerator = torch.einsum("bmhr,bhre->bmhe", query_features, state)
            denominator = torch.einsum("bmhr,bhr->bmh", query_features, normaliser)
            mode = "bidirectional"
        else:
            initial = None
            if cache is not None and cache.rbf_state[self.layer_idx] is not None:
                initial = (cache.rbf_state[self.layer_idx], cache.rbf_norm[self.layer_idx])
            if length == 1:
                numerator, denominator, final = self._decoding_step(key_features, values, query_features, initial)
                mode = "step"
            else:
                numerator, denominator, final = self._causal(key_features, values, query_features, query_index, initial)
                mode = "causal"
            if cache is not None:
                cache.rbf_state[self.layer_idx], cache.rbf_norm[self.layer_idx] = final
        mixed = numerator / denominator.clamp_min(1e-6)[..., None]
        output = self.o_proj(mixed.reshape(batch, num_queries, d).to(x.dtype))
        output = masked(output, selection) if slots is None else scatter_slots(output, slots, length)
        flops = rbf_flops(batch, length, num_queries, d, h, self.num_features, mode, chunk=min(CHUNK, length))
        return OperatorOutput(output, flops)

    def _causal(self, key_features, values, query_features, query_index, initial=None):
        """Prefix sums over chunks (plus `initial`, the state before this input); returns the queries'
        numerators and denominators and the state after the input.

        The queries' features are placed at their positions in a zero tensor, and every chunk then
        multiplies its prefix state and its own causal key block once (batched matmuls over every
        position). The earlier read gathered a (h, R, hd) state per query, R x hd values per query
        and head with an accumulating index_put as its backward; the 3-operator model trained 1.8-2.4x
        faster with this one (commit b83f4bc, docs/benchmarks.md).
        """
        batch, length, h, r = key_features.shape
        hd = values.shape[-1]
        chunk_size = min(CHUNK, length)
        num_chunks = math.ceil(length / chunk_size)
        padded = num_chunks * chunk_size
        kf = nn.functional.pad(key_features, (0, 0, 0, 0, 0, padded - length)).view(batch, num_chunks, chunk_size, h, r)
        vv = nn.functional.pad(values, (0, 0, 0, 0, 0, padded - length)).view(batch, num_chunks, chunk_size, h, hd)
        # State before each chunk: exclusive prefix sums of per-chunk sums.
        chunk_state = torch.einsum("bcthr,bcthe->bchre", kf, vv)
        chunk_norm = kf.sum(dim=2)
        prefix_state = torch.cumsum(chunk_state, dim=1) - chunk_state
        prefix_norm = torch.cumsum(chunk_norm, dim=1) - chunk_norm
        final_state, final_norm = chunk_state.sum(dim=1), chunk_norm.sum(dim=1)
        if initial is not None:
            prefix_state = prefix_state + initial[0][:, None]
            prefix_norm = prefix_norm + initial[1][:, None]
            final_state, final_norm = final_state + initial[0], final_norm + initial[1]

        if query_index is None:  # every position is a query
            qf = nn.functional.pad(query_features, (0, 0, 0, 0, 0, padded - length))
        else:  # valid slots hold distinct positions; filler slots carry zero features
            slots = query_index[..., None, None].expand(-1, -1, h, r)
            qf = query_features.new_zeros(batch, padded, h, r).scatter_add(1, slots, query_features)
        qf = qf.view(batch, num_chunks, chunk_size, h, r)
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=qf.device).tril()
        scores = torch.einsum("bcthr,bcshr->bchts", qf, kf) * causal  # a query sees its chunk's keys up to itself
        numerator = torch.einsum("bcthr,bchre->bcthe", qf, prefix_state) + torch.einsum("bchts,bcshe->bcthe", scores, vv)
        denominator = torch.einsum("bcthr,bchr->bcth", qf, prefix_norm) + scores.sum(dim=-1).transpose(2, 3)
        numerator = numerator.reshape(batch, padded, h, hd)
        denominator = denominator.reshape(batch, padded, h)
        if query_index is None:
            numerator, denominator = numerator[:, :length], denominator[:, :length]
        else:
            numerator, denominator = gather_rows(numerator, query_index), gather_rows(denominator, query_index)
        return numerator, denominator, (final_state, final_norm)

    @staticmethod
    def _decoding_step(key_features, values, query_features, initial):
        """`_causal` for one new token (a decoding step): add its key to the state, then read it.

        The chunked path gives the same values, but for one token its ~30 small operations (padding,
        chunk sums, a causal mask, scatter and gather) cost several times the arithmetic (decoding
        speed in docs/benchmarks.md). Every query slot of a one-token input is that token.
        """
        keys, vals = key_features[:, 0], values[:, 0]  # (B, h, R), (B, h, hd)
        state, norm = keys[..., :, None] @ vals[..., None, :], keys  # (B, h, R, hd), (B, h, R)
        if initial is not None:
            state, norm = initial[0] + state, initial[1] + norm
        numerator = torch.einsum("bmhr,bhre->bmhe", query_features, state)
        denominator = torch.einsum("bmhr,bhr->bmh", query_features, norm)
        return numerator, denominator, (state, norm)
