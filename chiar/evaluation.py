"""Routing statistics accumulated over an evaluation set, as flat metrics for logs and JSON files.

Per routed quantity the keys are (prefix omitted): `attention_query_fraction`,
`attention_flops_fraction`, `routing_layer{i}_{operator}` (share of real tokens), and
`entropy_layer{i}` (mean spectral entropy of real tokens). Everything comes from the model's own
records (`outputs.routing`) and FLOP accounting (`modeling_chiar.flops`).
"""

from collections import defaultdict

import torch

from modeling_chiar.flops import full_attention_layer_flops


class RoutingAccumulator:
    def __init__(self, config):
        self.config = config
        self.counts = defaultdict(float)  # (layer, operator) -> real tokens
        self.entropy_sum = defaultdict(float)
        self.real_tokens = 0.0
        self.attention_queries = 0.0
        self.attention_flops = 0.0
        self.baseline_flops = 0.0

    @torch.no_grad()
    def add(self, routing):
        """Add the records of one forward pass (an uncached pass over whole sequences)."""
        first = routing[0]
        batch, length = first.operator_ids.shape
        mask = first.token_mask
        real = batch * length if mask is None else int(mask.sum())
        self.real_tokens += real
        fused = (self.config._attn_implementation or "eager") == "sdpa" and self.config.is_causal and mask is None
        for i, record in enumerate(routing):
            ids = record.operator_ids if mask is None else record.operator_ids[mask]
            for k, op in enumerate(record.operators):
                self.counts[(i, op)] += float((ids == k).sum())
            if record.entropy is not None:
                values = record.entropy if mask is None else record.entropy[mask]
                self.entropy_sum[i] += float(values.float().sum())
            self.attention_queries += record.attention_queries
            self.attention_flops += record.attention_flops
            self.baseline_flops += full_attention_layer_flops(
                batch, length, self.config.hidden_size, self.config.is_causal, fused
            )

    def metrics(self):
        if not self.real_tokens:
            return {}
        layers = self.config.num_hidden_layers
        out = {
            "attention_query_fraction": self.attention_queries / (layers * self.real_tokens),
            "attention_flops_fraction": self.attention_flops / self.baseline_flops if self.baseline_flops else 0.0,
        }
        for (i, op), count in sorted(self.counts.items()):
            out[f"routing_layer{i}_{op}"] = count / self.real_tokens
        for i, total in sorted(self.entropy_sum.items()):
            out[f"entropy_layer{i}"] = total / self.real_tokens
        return out


def routing_shares_from_metrics(metrics, num_layers):
    """{layer: {operator: share}} back from flat metrics (with or without an `eval_`/`test_` prefix)."""
    shares = defaultdict(dict)
    for key, value in metrics.items():
        name = key.split("_", 1)[1] if key.startswith(("eval_", "test_")) else key
        if name.startswith("routing_layer"):
            layer, op = name[len("routing_layer") :].split("_", 1)
            if int(layer) < num_layers:
                shares[int(layer)][op] = value
    return dict(shares)
