"""Multi-head softmax attention with RoPE, where only the tokens routed to attention are queries.

Keys and values are projected for every token (any later attention query may look at them); queries
and the output projection only for the routed tokens. Queries are processed in position order, in
blocks that each see only the keys visible to the block's last query, so a 25% query share does not
pay for the masked-out upper triangle that a causal kernel would skip anyway.
"""

import math
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .flops import attention_kernel_flops, linear_flops
from .fp32_buffers import KeepsFP32Buffers


class RotaryEmbedding(KeepsFP32Buffers):
    """RoPE tables (cos, sin) for given positions; one instance shared by all layers."""

    fp32_buffers = ("inv_freq",)

    def __init__(self, head_dim, theta):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.inv_freq = nn.Buffer(self.compute_inv_freq(), persistent=False)

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


def query_blocks(num_queries, block=256):
    """Split `num_queries` position-sorted queries into contiguous blocks of equal size, at most `block`
    each: [(start, end), ...].

    A block computes the keys up to its last query, so more blocks skip more masked-out keys, but each
    block is one more masked kernel call with its own mask, and small calls run inefficiently. On CPU,
    forward+backward of the masked kernel over 25% of the queries took 0.40-0.41 of the causal
    kernel's time at 4,096 tokens in blocks of 256 and 0.51 in blocks of 64, although those compute
    fewer scores; at 256 tokens one block took 0.50, blocks of at most 32 (the size used before) 0.65;
    at 1,024, 0.47 and 0.48 in blocks of 64 (`benchmarks/breakdown.py`, docs/benchmarks.md). Splitting
    the work otherwise over torch's CPU flash kernel saved at most 9% of the kernel's time
    (`benchmarks/split_kernel.py`). Fewer calls also suit a launch-bound GPU.
    """
    if block < 1:
        raise ValueError(f"query blocks hold at least one query, got a block size of {block}")
    if num_queries == 0:
        return []
    size = math.ceil(num_queries / math.ceil(num_queries / block))
    return [(start, min(start + size, num_queries)) for start in range(0, num_queries, size)]


class RoutedAttention(nn.Module):
    """Attention operator of one layer; `forward` attends only the selected query tokens."""

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

    def forward(self, x, rope, query_index=None, key_mask=None, output_attentions=False, cache=None, query_valid=None):
        """Attend the tokens `query_index` (B, M) of x, sorted by position, or every token when None.

        x: (B, n, d) operator input of the new tokens; rope: (cos, sin), each (B, n, hd);
        key_mask: (B, past + n) bool, True for real tokens, or None when nothing is padded;
        cache: a `ChiarCache` holding the keys and values of earlier tokens (updated in place);
        query_valid: (B, M) bool, False for filler slots of a gathered batch (their rows stay empty).
        Returns (output (B, M, d), attention weights (B, h, n, past + n) or None, executed FLOPs).
        """
        batch, length, d = x.shape
        cos, sin = rope
        keys = apply_rotary(self._heads(self.k_proj(x)), cos, sin)
        values = self._heads(self.v_proj(x))
        flops = 2 * linear_flops(batch * length, d, d)
        if cache is not None:
            keys, values = cache.update_attention(self.layer_idx, keys, values)
        total = keys.shape[2]
        offset = total - length

        implementation = self.config._attn_implementation or "eager"
        if implementation == "eager":
            attention_fn = eager_attention_forward
        else:
            attention_fn = ALL_ATTENTION_FUNCTIONS[implementation]
        dropout = self.config.attention_dropout if self.training else 0.0

        fused = self.is_causal and key_mask is None and offset == 0 and implementation == "sdpa"
        if query_index is None and fused and not output_attentions:
            # Every token is a query and nothing is padded: the fused causal kernel is the cheapest path.
            queries = apply_rotary(self._heads(self.q_proj(x)), cos, sin)
            output, _ = attention_fn(
                self, queries, keys, values, None, dropout=dropout, scaling=self.scaling, is_causal=True
            )
            flops += 2 * linear_flops(batch * length, d, d) + attention_kernel_flops(batch, length, length, d, causal=True)
            return self.o_proj(output.reshape(batch, length, d)), None, flops

        if query_index is None:
            query_index = torch.arange(length, device=x.device).expand(batch, length)
        num_queries = query_index.shape[1]
        if num_queries == 0:  # only the cache needed this token's keys and values
            return x.new_zeros(batch, 0, d), None, flops
        gather = query_index[..., None].expand(-1, -1, cos.shape[-1])
        q_cos, q_sin = cos.gather(1, gather), sin.gather(1, gather)
        q_in = x.gather(1, query_index[..., None].expand(-1, -1, d))
        queries = apply_rotary(self._heads(self.q_proj(q_in)), q_cos, q_sin)
        flops += 2 * linear_flops(batch * num_queries, d, d)
        if output_attentions:
            output, attentions, kernel_flops = self._attend_returning_weights(
                queries, keys, values, query_index + offset, query_valid, key_mask, length, dropout
            )
            output = self.o_proj(output.transpose(1, 2).reshape(batch, num_queries, d))
            return output, attentions, flops + kernel_flops

        key_positions = torch.arange(total, device=x.device)
        blocks = query_blocks(num_queries)
        # Causal: no query of a block sees past the block's last position, so later keys are never
        # computed. The blocks' key counts are read in one device sync, not one per block.
        if self.is_causal:
            last = query_index.cummax(dim=1).values[:, [end - 1 for _, end in blocks]].amax(dim=0)
            key_counts = (last + offset + 1).tolist()
        else:
            key_counts = [total] * len(blocks)
        outputs = []
        block_queries = queries.split([end - start for start, end in blocks], dim=2)
        block_keys_values = PrefixViews.apply(key_counts, keys, values)
        with masked_sdpa_kernels(implementation, x.device):
            for i, ((start, end), num_keys) in enumerate(zip(blocks, key_counts)):
                block_index = query_index[:, start:end] + offset
                allowed = self._mask(block_index, key_positions[:num_keys], key_mask)
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
                flops += attention_kernel_flops(batch, end - start, num_keys, d, causal=False)
                outputs.append(output)
        output = self.o_proj(torch.cat(outputs, dim=1).reshape(batch, num_queries, d))
        return output, None, flops

    def _attend_returning_weights(self, queries, keys, values, global_index, query_valid, key_mask, length, dropout):
        """Analysis path (output_attentions): one eager pass over every key that returns the (B, h, n, keys)
        map the output is computed from, so gradients reach it. Rows of tokens that did not run
        attention are zero."""
        batch, heads, _, head_dim = queries.shape
        total = keys.shape[2]
        allowed = self._mask(global_index, torch.arange(total, device=keys.device), key_mask)
        _, weights = eager_attention_forward(self, queries, keys, values, allowed, self.scaling, dropout)
        if query_valid is not None:
            weights = weights * query_valid[:, None, :, None].to(weights.dtype)
        local = global_index - (total - length)
        rows = local[:, None, :, None].expand(-1, heads, -1, total)
        attentions = weights.new_zeros(batch, heads, length, total).scatter(2, rows, weights)
        output = torch.matmul(attentions, values)  # (B, h, n, hd): zero rows where nobody attended
        output = output.gather(2, local[:, None, :, None].expand(-1, heads, -1, head_dim))
        d = heads * head_dim
        flops = attention_kernel_flops(batch, global_index.shape[1], total, d, False) / 2
        flops += attention_kernel_flops(batch, length, total, d, False) / 2
        return output, attentions, flops

    def _mask(self, query_index, key_positions, key_mask):
        """(B, 1, Mq, K) bool: causally visible real keys, every query always seeing itself (no empty rows);
        None when every key is visible (not causal, nothing padded)."""
        keys = key_positions[None, None, :]
        queries = query_index[..., None]
        if key_mask is None:
            return (keys <= queries)[:, None] if self.is_causal else None  # causal: a query sees itself
        allowed = key_mask[:, None, : key_positions.shape[0]].to(queries.device)
        if self.is_causal:
            allowed = allowed & (keys <= queries)
        return (allowed | (keys == queries))[:, None]
