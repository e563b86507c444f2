"""Routing statistics accumulated over an evaluation set, as flat metrics for logs and JSON files.

Per routed quantity the keys are (prefix omitted): `attention_query_fraction`,
`attention_flops_fraction`, `routing_layer{i}_{operator}` (share of real tokens that ran the
operator), `overflow_layer{i}_{operator}` (share of real tokens that asked for a budgeted operator
and took the cheapest one instead), and `entropy_layer{i}` (mean spectral entropy of real tokens). Everything comes from the model's own
records (`outputs.routing`) and FLOP accounting (`modeling_chiar.flops`). Training passes are counted
too (`TrainingShares`): `train_routing_layer{i}_{operator}` (ran) and `train_asked_layer{i}_{operator}`.
"""

import math
import re

import torch

from modeling_chiar.flops import full_attention_layer_flops
from modeling_chiar.routing import operator_counts


def perplexity(loss):
    """exp(mean token loss), clamped where exp overflows a float (a diverged run reads as ~1e304)."""
    return math.exp(min(loss, 700.0))


def routed_passes(model, batches, progress=False, desc="routing"):
    """Yield (input_ids, attention_mask, outputs) for each batch, eval mode, no grad, routing on."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    for input_ids, mask in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        with torch.no_grad():
            outputs = model(input_ids.to(device), attention_mask=mask.to(device), output_routing=True)
        yield input_ids, mask, outputs


class RoutingAccumulator:
    """Sums over evaluation batches; `totals()` is a fixed-order vector that processes can all-reduce."""

    def __init__(self, config):
        self.config = config
        self.keys = ["real_tokens", "attention_queries", "attention_flops", "baseline_flops"]
        for i in range(config.num_hidden_layers):
            operators = config.layer_operators(i)
            self.keys += [f"routing_layer{i}_{op}" for op in operators] + [f"entropy_layer{i}"]
            if len(operators) > 1:
                self.keys += [f"overflow_layer{i}_{op}" for op in operators[1:]]
        self.sums = dict.fromkeys(self.keys, 0.0)

    @torch.no_grad()
    def add(self, routing):
        """Add the records of one forward pass (an uncached pass over whole sequences)."""
        first = routing[0]
        batch, length = first.operator_ids.shape
        mask = first.token_mask
        self.sums["real_tokens"] += first.counts()[1]
        implementation = self.config._attn_implementation or "eager"
        for i, record in enumerate(routing):
            ran, _ = record.counts()
            asked, _ = record.counts(requested=True)
            for k, op in enumerate(record.operators):
                self.sums[f"routing_layer{i}_{op}"] += ran[k]
                if k:  # a token that asked for a budgeted operator and did not get it ran the cheapest
                    self.sums[f"overflow_layer{i}_{op}"] += asked[k] - ran[k]
            if record.entropy is not None:
                values = record.entropy if mask is None else record.entropy[mask]
                self.sums[f"entropy_layer{i}"] += float(values.float().sum())
            self.sums["attention_queries"] += record.attention_queries
            self.sums["attention_flops"] += record.attention_flops
            self.sums["baseline_flops"] += full_attention_layer_flops(
                batch, length, self.config.hidden_size, self.config.is_causal, implementation
            )

    def totals(self):
        return torch.tensor([self.sums[key] for key in self.keys], dtype=torch.float64)

    def metrics(self, totals=None):
        """Shares and fractions from `totals` (e.g. summed over processes) or from this process's sums."""
        sums = dict(zip(self.keys, totals.tolist())) if totals is not None else self.sums
        real = sums["real_tokens"]
        if not real:
            return {}
        out = {
            "attention_query_fraction": sums["attention_queries"] / (self.config.num_hidden_layers * real),
            "attention_flops_fraction": sums["attention_flops"] / sums["baseline_flops"] if sums["baseline_flops"] else 0.0,
        }
        for key in self.keys:
            if key.startswith(("routing_layer", "entropy_layer", "overflow_layer")):
                out[key] = sums[key] / real
        return out


class TrainingShares:
    """Each routed layer's asked and executed operator counts over the training passes since the last read,
    summed on the device, so a training step adds no host sync; read (and reset) when the loss is logged."""

    def __init__(self, config):
        self.layers = [(i, config.layer_operators(i)) for i in range(config.num_hidden_layers) if len(config.layer_operators(i)) > 1]
        self.width = max(len(ops) for _, ops in self.layers)
        self.counts = None  # (layers, 2, width): asked, ran

    @torch.no_grad()
    def add(self, routing):
        counts = torch.stack([torch.stack([
            operator_counts(routing[i].requested_ids if routing[i].requested_ids is not None else routing[i].operator_ids,
                            routing[i].token_mask, self.width),
            operator_counts(routing[i].operator_ids, routing[i].token_mask, self.width)]) for i, _ in self.layers])
        self.counts = counts if self.counts is None else self.counts + counts

    def read(self, reduce=None, device="cpu"):
        """{train_asked_layer{i}_{op}, train_routing_layer{i}_{op}: share} since the last read ({} if no pass),
        the counts first summed over processes by `reduce` when given (a process without a pass since
        the last read takes part with zeros on `device`, so that every process joins the reduction)."""
        if self.counts is None and reduce is None:
            return {}
        counts, self.counts = self.counts, None
        if counts is None:
            counts = torch.zeros(len(self.layers), 2, self.width, device=device)
        counts = (counts if reduce is None else reduce(counts)).cpu()
        if not counts.any():
            return {}
        metrics = {}
        for (i, ops), (asked, ran) in zip(self.layers, counts):
            total = float(ran.sum()) or 1.0
            for k, op in enumerate(ops):
                metrics[f"train_asked_layer{i}_{op}"] = float(asked[k]) / total
                metrics[f"train_routing_layer{i}_{op}"] = float(ran[k]) / total
        return metrics


_METRIC = re.compile(r"^(?:[a-z]+_)?(?:(routing|overflow)_layer(\d+)_(\w+)|entropy_layer(\d+))$")


def routing_metrics(metrics):
    """{layer: {"shares": {op: share}, "overflow": {op: share}, "mean_entropy": h}} from flat eval metrics (any prefix)."""
    layers = {}
    for key, value in (metrics or {}).items():
        match = _METRIC.match(key)
        if not match:
            continue
        if match.group(2) is not None:
            field = "shares" if match.group(1) == "routing" else "overflow"
            layers.setdefault(int(match.group(2)), {}).setdefault(field, {})[match.group(3)] = value
        else:
            layers.setdefault(int(match.group(4)), {})["mean_entropy"] = value
    return dict(sorted(layers.items()))


CLASSIFICATION_METRICS = {"single_label": ("accuracy", "f1", "precision", "recall"), "multi_label": ("f1", "accuracy", "precision", "recall"),
                          "regression": ("mse", "mae")}


def classification_metrics(task, logits, labels):
    """The metrics `run_classification.py` reports, computed here (no downloads). Single-label:
    accuracy and macro-averaged F1 / precision / recall; multi-label (a label is predicted where its
    logit is > 0): micro-averaged F1 / precision / recall and exact-match accuracy; regression: MSE
    and MAE of the one output."""
    import numpy as np

    logits = logits[0] if isinstance(logits, tuple) else logits
    if task == "regression":
        error = np.squeeze(logits, -1) - labels
        return {"mse": float((error**2).mean()), "mae": float(np.abs(error).mean())}
    if task == "multi_label":
        predicted, gold = logits > 0, labels > 0.5
        hits = float((predicted & gold).sum())
        precision, recall = hits / max(float(predicted.sum()), 1.0), hits / max(float(gold.sum()), 1.0)
        return {"f1": 2 * precision * recall / max(precision + recall, 1e-12), "precision": precision, "recall": recall,
                "accuracy": float((predicted == gold).all(-1).mean())}
    predicted = np.argmax(logits, axis=-1)
    scores = []
    for label in range(logits.shape[-1]):
        hits = float(((predicted == label) & (labels == label)).sum())
        precision = hits / max(float((predicted == label).sum()), 1.0)
        recall = hits / max(float((labels == label).sum()), 1.0)
        scores.append((precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)))
    precision, recall, f1 = (float(np.mean(column)) for column in zip(*scores))
    return {"accuracy": float((predicted == labels).mean()), "f1": f1, "precision": precision, "recall": recall}
