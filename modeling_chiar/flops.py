"""FLOP accounting: the one place where executed work is turned into numbers.

Operators call these formulas with the shapes they actually launched, so the counts follow the code
(gathered queries, key blocks, padded slots) rather than what a design promises. A multiply-add is
two FLOPs, as in `torch.utils.flop_counter`.
"""


def linear_flops(num_tokens, in_features, out_features):
    return 2 * num_tokens * in_features * out_features


def attention_kernel_flops(batch, num_queries, num_keys, hidden_size, causal):
    """Q K^T plus A V over all heads. A fused causal kernel (square, no mask) skips the upper triangle."""
    pairs = num_queries * (num_keys + 1) / 2 if causal else num_queries * num_keys
    return 2 * 2 * batch * pairs * hidden_size


def full_attention_layer_flops(batch, length, hidden_size, is_causal, fused_causal):
    """What one attention layer of the full-attention baseline executes on a (batch, length) input.

    The baseline runs the same code with every token a query: the fused causal kernel when it can
    (sdpa, causal, no padding), otherwise the blocked masked path of `RoutedAttention`.
    """
    from .operator_attention import query_blocks

    flops = 4 * linear_flops(batch * length, hidden_size, hidden_size)
    if fused_causal:
        return flops + attention_kernel_flops(batch, length, length, hidden_size, causal=True)
    for start, end in query_blocks(length):
        num_keys = end if is_causal else length
        flops += attention_kernel_flops(batch, end - start, num_keys, hidden_size, causal=False)
    return flops


def routing_report(routing, config):
    """Summarise `outputs.routing` of one forward pass against the same-shape full-attention model.

    - attention_query_fraction: share of (real token, layer) pairs that ran attention as a query
      (0.375 for the default schedule at 25% routing: the paper's "62.5% fewer attention FLOPs").
    - attention_flops_fraction: attention FLOPs executed (Q/K/V/O projections, Q K^T, A V) over what the
      baseline executes on the same batch with the same attention implementation.
    - total_flops_fraction: the same for the whole body (every operator, routing, FFNs).
    """
    first = routing[0]
    batch, length = first.operator_ids.shape
    token_mask = first.token_mask
    real_tokens = batch * length if token_mask is None else int(token_mask.sum())
    fused = (config._attn_implementation or "eager") == "sdpa" and config.is_causal and token_mask is None
    baseline = len(routing) * full_attention_layer_flops(batch, length, config.hidden_size, config.is_causal, fused)
    executed = sum(record.attention_flops for record in routing)
    # Whole body: each layer's token-operator sub-layer (routing included) plus its FFN, against the
    # baseline's attention layer plus the same FFN. Embeddings and any head are left out.
    ffn = 2 * linear_flops(batch * length, config.hidden_size, config.intermediate_size)
    body = sum(record.operator_flops for record in routing) + len(routing) * ffn
    body_baseline = baseline + len(routing) * ffn
    layers = []
    for record in routing:
        entropy = None
        if record.entropy is not None:
            values = record.entropy if token_mask is None else record.entropy[token_mask]
            entropy = float(values.float().mean()) if values.numel() else None
        layers.append({"operators": list(record.operators), "shares": record.shares(), "mean_entropy": entropy})
    return {
        "attention_query_fraction": sum(r.attention_queries for r in routing) / (len(routing) * max(real_tokens, 1)),
        "attention_flops_fraction": executed / baseline,
        "total_flops_fraction": body / body_baseline,
        "attention_flops": executed,
        "baseline_attention_flops": baseline,
        "layers": layers,
    }
