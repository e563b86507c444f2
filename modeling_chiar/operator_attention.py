"""Multi-head softmax attention with RoPE, where only the tokens granted attention are queries.

Keys and values are projected for every token (any later attention query may look at them); queries
and the output projection only for the operator's query slots (`routing.QuerySlots`), whose number
is fixed by the budget. Slots are in position order and run in kernel calls that each see only the
keys up to their last block, so a 25% query share does not pay for the masked-out upper triangle
that a causal kernel would skip anyway.
"""

import math
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .flops import attention_flops, attention_map_flops, dense_calls, uses_fused_causal_kernel
from .fp32_buffers import KeepsFP32Buffers
from .operators import OperatorOutput, gather_rows, masked, scatter_slots


class RotaryEmbedding(KeepsFP32Buffers):
    """RoPE tables (cos, sin) for given positions; one instance shared by all layers."""

    fp32_buffers = ("inv_freq",)

    def __init__(self, head_dim, theta):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.inv_freq = nn.Buffer(self.compute_inv_freq(), persistent=False)

    def reset_from_config(self, config):
        from transformers import initialization

        initialization.copy_(self.inv_freq, self.compute_inv_freq(device=self.inv_freq.device))

    def compute_inv_freq(self, device=None):
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def forward(self, positions, dtype):
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x: (B, h, N, hd); cos, sin: (B, N, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention: explicit scores, boolean mask (True = may attend), fp32 softmax."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def masked_sdpa_kernels(implementation, device):
    """Kernels for SDPA calls with an explicit mask (routed query blocks): any but cuDNN on CUDA.

    Since torch 2.11, cuDNN is SDPA's first choice on H100/H200. With a mask it returns NaN query
    gradients when the key count is 64 mod 128 (pytorch/pytorch#196678): CHIAR training went NaN
    within 5 steps on an H200. Its calls were also slow to plan for shapes it had not seen, and a
    calibrating threshold router changes the block shapes at every step: 0.5 s training steps at
    4,096 tokens against 0.04 s with the random router (docs/benchmarks.md, GPU section).
    """
    if implementation == "sdpa" and device.type == "cuda":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    return nullcontext()


class PrefixViews(torch.autograd.Function):
    """Views `x[:, :, :n]` of keys and values for each block's key count n; one gradient buffer in backward.

    Autograd's slice backward makes a full-size zero tensor per slice, copies the slice's gradient in
    and adds the results up: three full-length passes per block over the keys' and over the values'
    gradients. Here the longest prefix's gradient is copied into one buffer, whose remainder is zeroed,
    and each other block adds its gradient into its own prefix.
    """

    @staticmethod
    def forward(counts, keys, values):
        return tuple(x[:, :, :n] for n in counts for x in (keys, values))

    @staticmethod
    def setup_context(ctx, inputs, output):
        counts, keys, values = inputs
        ctx.counts, ctx.shapes = counts, (keys.shape, values.shape)
        ctx.set_materialize_grads(False)  # a block whose output is unused sends None, not zeros

    @staticmethod
    def backward(ctx, *grads):
        sums = []
        for which, shape in enumerate(ctx.shapes):  # 0: keys, 1: values; outputs alternate
            given = [(n, grad) for n, grad in zip(ctx.counts, grads[which::2]) if grad is not None]
            given.sort(key=lambda item: -item[0])
            if not given:
                sums.append(None)
                continue
            longest, grad = given[0]
            if longest == shape[2] and len(given) == 1:
                sums.append(grad)  # one block over every key: its gradient is the whole gradient
                continue
            total = grad.new_empty(shape)
            total[:, :, :longest] = grad
            total[:, :, longest:] = 0
            for n, grad in given[1:]:
                total[:, :, :n] += grad
            sums.append(total)
        return None, *sums


class RoutedAttention(nn.Module):
    """Attention operator of one layer: every token's keys and values, queries for the selected slots."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.is_causal = config.is_causal
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _heads(self, x):
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, ctx, selection):
        """The operator contract (operators.py). With a cache, earlier tokens' keys and values are read
        from it and this pass's are appended; `output_attentions` returns the (B, h, n, past + n) map."""
        batch, length, d = x.shape
        cos, sin = ctx.rope
        keys = apply_rotary(self._heads(self.k_proj(x)), cos, sin)
        values = self._heads(self.v_proj(x))
        if ctx.token_mask is not None:  # a masked key has weight 0, and 0 x NaN is NaN: padding holds no value
            values = torch.where(ctx.token_mask[:, None, :, None], values, 0)
        if ctx.cache is not None:
            keys, values = ctx.cache.update_attention(self.layer_idx, keys, values)
        total = keys.shape[2]
        past = total - length
        implementation = self.config._attn_implementation or "eager"
        attention_fn = eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        dropout = self.config.attention_dropout if ctx.training else 0.0
        slots = selection.slots

        fused = slots is None and uses_fused_causal_kernel(implementation, self.is_causal, past, ctx.output_attentions)
        if fused:  # every token a query, causal, nothing before: the fused kernel is the cheapest path
            queries = apply_rotary(self._heads(self.q_proj(x)), cos, sin)
            output, _ = attention_fn(self, queries, keys, values, None, dropout=dropout, scaling=self.scaling, is_causal=True)
            output = self.o_proj(output.reshape(batch, length, d))
            return OperatorOutput(masked(output, selection), attention_flops(batch, length, length, (), d, fused=True))

        if slots is None:
            query_index = torch.arange(length, device=x.device).expand(batch, length)
            calls = dense_calls(length, past, self.is_causal)
            q_in, q_cos, q_sin = x, cos, sin
        else:
            query_index, calls = slots.index, slots.calls
            q_in, q_cos, q_sin = gather_rows(x, query_index), gather_rows(cos, query_index), gather_rows(sin, query_index)
        num_queries = query_index.shape[1]
        queries = apply_rotary(self._heads(self.q_proj(q_in)), q_cos, q_sin)
        attentions = None
        if ctx.output_attentions:
            valid = None if slots is None else slots.valid
            output, attentions = self._attend_returning_weights(
                queries, keys, values, query_index, valid, ctx.key_mask, past, dropout, ctx.caller_order
            )
            flops = attention_flops(batch, length, num_queries, (), d, fused=False)
            flops += attention_map_flops(batch, num_queries, length, total, d)
        else:
            outputs = []
            block_queries = queries.split([end - first for first, end, _ in calls], dim=2)
            block_keys_values = PrefixViews.apply(tuple(keys_seen for _, _, keys_seen in calls), keys, values)
            with masked_sdpa_kernels(implementation, x.device):
                for i, (first, end, keys_seen) in enumerate(calls):
                    allowed = self._mask(query_index[:, first:end] + past, keys_seen, ctx.key_mask)
                    output, _ = attention_fn(
                        self,
                        block_queries[i],
                        block_keys_values[2 * i],
                        block_keys_values[2 * i + 1],
                        allowed,
                        dropout=dropout,
                        scaling=self.scaling,
                        is_causal=False,
                    )
                    outputs.append(output)
            output = torch.cat(outputs, dim=1) if outputs else queries.new_zeros(batch, 0, self.num_heads, self.head_dim)
            flops = attention_flops(batch, length, num_queries, calls, d, fused=False)
        output = self.o_proj(output.reshape(batch, num_queries, d))
        output = masked(output, selection) if slots is None else scatter_slots(output, slots, length)
        return OperatorOutput(output, flops, attentions)

    def _attend_returning_weights(self, queries, keys, values, query_index, valid, key_mask, past, dropout, caller_order=None):
        """Analysis path (output_attentions): one eager pass over every key that returns the (B, h, n, keys)
        map the output is computed from, so gradients reach it, in the caller's order of rows and keys
        (`caller_order`, see MixContext). Rows of tokens that did not run attention are zero.
        Returns (output (B, M, h, hd), map)."""
        batch, heads, _, head_dim = queries.shape
        total = keys.shape[2]
        length = total - past
        allowed = self._mask(query_index + past, total, key_mask)
        _, weights = eager_attention_forward(self, queries, keys, values, allowed, self.scaling, dropout)
        if valid is not None:
            weights = torch.where(valid[:, None, :, None], weights, 0)
        rows = query_index[:, None, :, None].expand(-1, heads, -1, total)
        attentions = weights.new_zeros(batch, heads, length, total).scatter_add(2, rows, weights)
        stored = attentions
        if caller_order is not None:  # the returned map in the caller's order; the output computed from it
            restore, key_order = caller_order
            if restore is not None:
                attentions = attentions.gather(2, restore[:, None, :, None].expand(-1, heads, -1, total))
            attentions = attentions.gather(3, key_order.argsort(dim=1)[:, None, None, :].expand(-1, heads, length, -1))
            stored = attentions.gather(3, key_order[:, None, None, :].expand(-1, heads, length, -1))
            if restore is not None:
                stored = stored.gather(2, restore.argsort(dim=1)[:, None, :, None].expand(-1, heads, -1, total))
        output = torch.matmul(stored, values)  # (B, h, n, hd): zero rows where nobody attended
        output = output.gather(2, query_index[:, None, :, None].expand(-1, heads, -1, head_dim))
        return output.transpose(1, 2), attentions

    def _mask(self, query_positions, num_keys, key_mask):
        """(B, 1, Mq, K) bool: causally visible real keys, every query always seeing itself (no empty rows);
        None when every key is visible (not causal, nothing padded). query_positions index the keys."""
        keys = torch.arange(num_keys, device=query_positions.device)[None, None, :]
        queries = query_positions[..., None]
        if key_mask is None:
            return (keys <= queries)[:, None] if self.is_causal else None  # causal: a query sees itself
        allowed = key_mask[:, None, :num_keys].to(queries.device)
        if self.is_causal:
            allowed = allowed & (keys <= queries)
        return (allowed | (keys == queries))[:, None]
