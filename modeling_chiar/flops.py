"""FLOP accounting: the only place where executed work is turned into numbers.

Operators call these formulas with the shapes they actually launched, so the counts follow the code
(query slots, key prefixes, every position of a chunked read) rather than what a design promises.
Shapes depend only on (batch, length) and the config, so every count is a Python number known
before the pass runs. A multiply-add is two FLOPs, as in `torch.utils.flop_counter`.
"""

import math

QUERY_BLOCK = 256  # queries per attention kernel call when every token is a query (see `dense_calls`)


def linear_flops(num_tokens, in_features, out_features):
    return 2 * num_tokens * in_features * out_features


def entropy_flops(num_tokens, hidden_size):
    """The DCT coefficients the spectral entropy is computed from (the rest is elementwise)."""
    return linear_flops(num_tokens, hidden_size, hidden_size)


def gate_flops(num_tokens, hidden_size, num_operators):
    """The learned / soft router's gate: one logit per operator from the hidden vector."""
    return linear_flops(num_tokens, hidden_size, num_operators)


def dct_mixing_flops(num_tokens, hidden_size):
    """DCT mixing: below d tokens transform, gain and inverse (4 d^2 per token); from d tokens on, the
    (d x d) operator matrix is built once (2 d^3) and applied (2 d^2 per token)."""
    d = hidden_size
    if num_tokens < d:
        return 2 * linear_flops(num_tokens, d, d)
    return linear_flops(d, d, d) + linear_flops(num_tokens, d, d)


def attention_kernel_flops(batch, num_queries, num_keys, hidden_size, causal):
    """Q K^T plus A V over all heads. A fused causal kernel (square, no mask) skips the upper triangle."""
    pairs = num_queries * (num_keys + 1) / 2 if causal else num_queries * num_keys
    return 2 * 2 * batch * pairs * hidden_size


def uses_fused_causal_kernel(implementation, is_causal, past_keys, output_attentions=False):
    """Whether an attention layer whose every token is a query runs SDPA's fused causal kernel (no mask).

    It can when the kernel is sdpa, the layer is causal and nothing was seen before: rows are compacted
    (real tokens first), so causality alone keeps padding out of every real token's keys.
    """
    return implementation == "sdpa" and is_causal and past_keys == 0 and not output_attentions


def dense_calls(length, past_keys, is_causal, block=QUERY_BLOCK):
    """Kernel calls when every token is a query and the fused kernel cannot run: equal runs of at
    most `block` queries, (first query, end query, keys visible), each seeing the keys up to its last
    query when causal (so the masked-out upper triangle is mostly skipped)."""
    if length == 0:
        return ()
    size = math.ceil(length / math.ceil(length / block))
    calls = []
    for first in range(0, length, size):
        end = min(first + size, length)
        calls.append((first, end, past_keys + (end if is_causal else length)))
    return tuple(calls)


def attention_flops(batch, length, num_queries, calls, hidden_size, fused):
    """One attention operator: keys and values of every token, queries and output of `num_queries`
    slots, and the kernel over each call's (queries x visible keys), or the fused causal kernel."""
    d = hidden_size
    flops = 2 * linear_flops(batch * length, d, d) + 2 * linear_flops(batch * num_queries, d, d)
    if fused:
        return flops + attention_kernel_flops(batch, length, length, d, causal=True)
    return flops + sum(attention_kernel_flops(batch, end - first, keys, d, causal=False) for first, end, keys in calls)


def attention_map_flops(batch, num_queries, length, total_keys, hidden_size):
    """The analysis path (`output_attentions`): scores of the queries against every key, then the
    scattered (B, h, n, keys) map times the values."""
    return (
        attention_kernel_flops(batch, num_queries, total_keys, hidden_size, False) / 2
        + attention_kernel_flops(batch, length, total_keys, hidden_size, False) / 2
    )


def rbf_flops(batch, length, num_queries, hidden_size, num_heads, num_features, mode, chunk=None):
    """RBF mixing: key and value projections and key features of every token; query projection,
    query features and output projection of `num_queries` slots; and the read, by `mode`:
    - "causal": chunk states and a read at every position of the padded chunks (2 B P h (R hd) for
      the states, 2 B P h (R hd + R + chunk (R + hd)) for the read, P the padded length);
    - "step": one new token added to the cached state, then read by the slots;
    - "bidirectional": one state from every key, read by the slots.
    """
    d, h, r = hidden_size, num_heads, num_features
    hd = d // h
    flops = 2 * linear_flops(batch * length, d, d) + 2 * batch * length * d * r  # keys, values, key features
    flops += 2 * linear_flops(batch * num_queries, d, d) + 2 * batch * num_queries * d * r  # q, o, query features
    if mode == "causal":
        padded = math.ceil(length / chunk) * chunk
        flops += 2 * batch * padded * h * r * hd
        flops += 2 * batch * padded * h * (r * hd + r + chunk * (r + hd))
    elif mode == "step":
        flops += 2 * batch * h * r * hd + 2 * batch * num_queries * h * r * (hd + 1)
    else:
        flops += 2 * batch * length * h * r * hd + 2 * batch * num_queries * h * r * (hd + 1)
    return flops


def full_attention_layer_flops(batch, length, hidden_size, is_causal, implementation):
    """What one attention layer of the full-attention baseline executes on a (batch, length) input
    without a cache: the same code with every token a query."""
    fused = uses_fused_causal_kernel(implementation, is_causal, 0)
    calls = () if fused else dense_calls(length, 0, is_causal)
    return attention_flops(batch, length, length, calls, hidden_size, fused)


def ffn_flops(num_tokens, hidden_size, intermediate_size):
    return 2 * linear_flops(num_tokens, hidden_size, intermediate_size)


def routing_report(routing, config):
    """Summarise `outputs.routing` of one uncached forward pass against the same-shape full-attention model.

    - attention_query_fraction: share of (real token, layer) pairs that ran attention as a query
      (0.375 for the default schedule at 25% routing: the paper's "62.5% fewer attention FLOPs").
    - attention_flops_fraction: attention FLOPs executed (Q/K/V/O projections, Q K^T, A V) over what the
      baseline executes on the same batch with the same attention implementation.
    - total_flops_fraction: the same for the whole body (every operator, routing, FFNs).
    Per layer: the executed and requested shares, the overflow (share of real tokens that asked for
    a budgeted operator and took the cheapest one) and each budgeted operator's unused slots.
    """
    first = routing[0]
    batch, length = first.operator_ids.shape
    real_tokens = batch * length if first.token_mask is None else int(first.token_mask.sum())
    implementation = config._attn_implementation or "eager"
    baseline = len(routing) * full_attention_layer_flops(batch, length, config.hidden_size, config.is_causal, implementation)
    executed = sum(record.attention_flops for record in routing)
    # Whole body: each layer's token-operator sub-layer (routing included) plus its FFN, against the
    # baseline's attention layer plus the same FFN. Embeddings and any head are left out.
    ffn = ffn_flops(batch * length, config.hidden_size, config.intermediate_size)
    body = sum(record.operator_flops for record in routing) + len(routing) * ffn
    body_baseline = baseline + len(routing) * ffn
    layers = []
    for record in routing:
        layers.append(
            {
                "operators": list(record.operators),
                "shares": record.shares(),
                "requested_shares": record.requested_shares(),
                "overflow": record.overflow(),
                "unused_slots": record.unused_slots(),
                "mean_entropy": record.mean_entropy(),
            }
        )
    queries = sum(float(record.attention_queries) for record in routing)
    return {
        "attention_query_fraction": queries / (len(routing) * max(real_tokens, 1)),
        "attention_flops_fraction": executed / baseline,
        "total_flops_fraction": body / body_baseline,
        "attention_flops": executed,
        "baseline_attention_flops": baseline,
        "layers": layers,
    }
