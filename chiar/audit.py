"""Signal audit: does spectral entropy carry information, or would any routing at the same shares do?

On a validation set we evaluate three models that share every weight and differ only in routing:

- `trained`:  the model as trained (its own router).
- `random`:   each routed layer's router replaced by the spec's random router (a fixed hash of
              (layer, position)), its bands set so that each operator gets exactly the share the
              trained router gave it on this set, layer by layer.
- `inverted`: the entropy order reversed: the tokens with the *lowest* entropy go to attention and
              the highest to DCT, again at the measured per-layer shares.

If `trained` is not clearly better than `random`, the entropy is not telling the router anything
the position hash does not; if `inverted` is as good as `trained`, the direction of the rule
("high entropy needs attention") is not what matters. The audit compares routers, not budgets: it
lifts the attention budget for all three (every request granted), so each runs its own choices at
the measured shares; the trained model's usual overflow is reported beside them. The metric is perplexity for a causal LM
and accuracy for a classifier. Routers are swapped in place on `layer.mixer.router` and restored
afterwards; the replacements follow the router interface of `modeling_chiar/routing.py`.
"""

import contextlib
from pathlib import Path

import torch
from torch import nn

from chiar.batching import classification_examples, default_length, lm_blocks, make_batches, pad_id_for
from chiar.evaluation import perplexity, routed_passes
from chiar.loading import eval_mode, load_model
from modeling_chiar.fp32_buffers import KeepsFP32Buffers
from modeling_chiar.routing import GateRouter, RoutingDecision, break_ties, position_hash, unlimited_capacity_factor
from modeling_chiar.spectral import spectral_entropy

VARIANTS = ("trained", "random", "inverted")


# --------------------------------------------------------------------------------------------
# replacement routers


class BandRouter(KeepsFP32Buffers):
    """Operator k for scores in the k-th band between `boundaries` (cheapest operator first).

    Subclasses define the score; the boundaries are fitted on a validation set (`fit_boundaries`)
    so that each operator receives a chosen share of the tokens.
    """

    fp32_buffers = ("boundaries",)

    def __init__(self, layer_idx, boundaries):
        super().__init__()
        self.layer_idx = layer_idx
        self.boundaries = nn.Buffer(torch.as_tensor(boundaries, dtype=torch.float32))

    def score(self, x, entropy, positions):
        raise NotImplementedError

    def forward(self, x, entropy, positions, token_mask, state=None, training=None):
        score = self.score(x, entropy, positions)
        return RoutingDecision(operator_ids=torch.bucketize(score, self.boundaries.to(score.device)))


class MatchedRandomRouter(BandRouter):
    """The spec's random router (a hash of layer and position), with bands at measured shares."""

    def score(self, x, entropy, positions):
        return position_hash(positions, self.layer_idx).to(x.device)


class InvertedEntropyRouter(BandRouter):
    """Lowest entropy to the most expensive operator: the threshold rule upside down.

    Ties are broken by the same position hash as the threshold router, so mass points (every "the"
    before the first attention layer has one entropy) split the same way.
    """

    def score(self, x, entropy, positions):
        if entropy is None:  # the mixer computes entropy only for routers it knows
            entropy = spectral_entropy(x)
        return inverted_score(entropy, positions, self.layer_idx)


def inverted_score(entropy, positions, layer_idx):
    """Minus the threshold router's score (entropy plus its position tie-break)."""
    return -break_ties(entropy.float(), positions, layer_idx)


def fit_boundaries(scores, shares):
    """Boundaries that put exactly round(share * N) of `scores` in each band, cheapest first.

    Each boundary sits halfway between the last score of one band and the first of the next, so a
    recomputation of the same scores lands on the same side. Equal scores cannot be split: with
    ties (several tokens at one position for the random router) the share is off by at most the
    size of the tie.
    """
    ordered = scores.double().flatten().sort().values
    total = len(ordered)
    boundaries, cumulative = [], 0.0
    for share in shares[:-1]:
        cumulative += share
        n = min(max(round(cumulative * total), 0), total)
        if n == 0:
            boundaries.append(float(ordered[0]) - 1.0)
        elif n == total:
            boundaries.append(float(ordered[-1]) + 1.0)
        else:
            boundaries.append(float((ordered[n - 1] + ordered[n]) / 2))
    return boundaries


@contextlib.contextmanager
def swapped_routers(model, routers):
    """Temporarily replace `layer.mixer.router` for the layers in `routers` ({layer: module})."""
    layers = _layers(model)
    saved = {i: layers[i].mixer.router for i in routers}
    try:
        for i, router in routers.items():
            layers[i].mixer.router = router.to(next(model.parameters()).device)
        yield model
    finally:
        for i, router in saved.items():
            layers[i].mixer.router = router


@contextlib.contextmanager
def unbudgeted(model):
    """Temporarily grant every routing request (see the module docstring)."""
    config = model.config
    saved = config.router_capacity_factor
    config.router_capacity_factor = unlimited_capacity_factor(config)
    try:
        yield model
    finally:
        config.router_capacity_factor = saved


def _layers(model):
    return getattr(model, "model", model).layers


def routed_layers(model):
    return [i for i, layer in enumerate(_layers(model)) if layer.mixer.router is not None]


# --------------------------------------------------------------------------------------------
# evaluation


def is_classifier(model):
    return type(model).__name__.endswith("ForSequenceClassification")


class Evaluation:
    """Metric and realised shares accumulated over the passes of one variant."""

    def __init__(self, model):
        self.model = model
        self.counts = {i: [0] * len(_layers(model)[i].mixer.operators) for i in routed_layers(model)}
        self.requested = {i: [0] * len(counts) for i, counts in self.counts.items()}
        self.tokens = 0
        self.nll, self.predicted, self.correct, self.examples = 0.0, 0, 0, 0

    def add(self, input_ids, mask, outputs, labels=None):
        real = mask.to(torch.bool).to(outputs.logits.device)
        self.tokens += int(real.sum())
        for i in self.counts:
            ran, asked = outputs.routing[i].counts()[0], outputs.routing[i].counts(requested=True)[0]
            self.counts[i] = [total + n for total, n in zip(self.counts[i], ran)]
            self.requested[i] = [total + n for total, n in zip(self.requested[i], asked)]
        if labels is None:  # causal LM: next-token NLL over real positions
            ids = input_ids.to(outputs.logits.device)
            logits = outputs.logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(~real[:, 1:], -100)
            self.nll += float(nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum"))
            self.predicted += int((target != -100).sum())
        else:
            predicted = outputs.logits.argmax(dim=-1).cpu()
            self.correct += int((predicted == labels).sum())
            self.examples += len(labels)

    def result(self):
        shares, requested = {}, {}
        for i, counts in self.counts.items():
            ops = _layers(self.model)[i].mixer.operators
            shares[str(i)] = {op: c / self.tokens for op, c in zip(ops, counts)}
            requested[str(i)] = {op: c / self.tokens for op, c in zip(ops, self.requested[i])}
        if self.examples:
            return {"accuracy": self.correct / self.examples, "examples": self.examples, "shares": shares, "requested": requested}
        loss = self.nll / max(self.predicted, 1)
        return {"perplexity": perplexity(loss), "loss": loss, "predicted_tokens": self.predicted, "shares": shares,
                "requested": requested}


def evaluate(model, batches, progress=False, desc="evaluating"):
    """Metric and per-layer realised shares of `model` over `batches` ((ids, mask) or (ids, mask, labels))."""
    evaluation = Evaluation(model)
    for batch in _tqdm(batches, progress, desc):
        input_ids, mask = batch[0], batch[1]
        with torch.no_grad():
            device = next(model.parameters()).device
            outputs = model(input_ids.to(device), attention_mask=mask.to(device), output_routing=True)
        evaluation.add(input_ids, mask, outputs, batch[2] if len(batch) > 2 else None)
    return evaluation.result()


def _tqdm(items, progress, desc):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch", disable=not progress, leave=False)


def _positions(mask):
    """Positions as the model counts them: real tokens only (right padding: 0, 1, 2, ...)."""
    return (mask.long().cumsum(dim=1) - 1).clamp_min(0)


def random_routers(model, batches, shares):
    """Matched random routers: bands of the position hash fitted to the real tokens' positions."""
    positions = torch.cat([_positions(b[1])[b[1].bool()] for b in batches])
    routers = {}
    for i in routed_layers(model):
        ops = _layers(model)[i].mixer.operators
        scores = position_hash(positions, i)
        routers[i] = MatchedRandomRouter(i, fit_boundaries(scores, [shares[str(i)][op] for op in ops]))
    return routers


def inverted_routers(model, batches, shares, progress=False):
    """Inverted-entropy routers, fitted layer by layer: a layer's entropies depend on how the layers
    below it routed, so layer i is fitted on a pass where layers < i already use their inverted routers."""
    routers = {}
    for i in routed_layers(model):
        ops = _layers(model)[i].mixer.operators
        scores = []
        with swapped_routers(model, routers):
            for input_ids, mask, outputs in routed_passes(model, ((b[0], b[1]) for b in batches), progress, f"fitting layer {i}"):
                record = outputs.routing[i]
                real = mask.bool().to(record.entropy.device)
                scores.append(inverted_score(record.entropy, _positions(mask).to(real.device), i)[real].cpu())
        routers[i] = InvertedEntropyRouter(i, fit_boundaries(torch.cat(scores), [shares[str(i)][op] for op in ops]))
    return routers


def audit(model, tokenizer, records, max_length=None, batch_size=8, variants=VARIANTS, progress=False):
    """Evaluate the model and its share-matched routing controls on `records` (dicts with "text",
    and "label" for a classifier). Returns a JSON-ready dict: per variant the metric and the
    realised per-layer shares, plus the shares measured on the trained model."""
    model, tokenizer = load_model(model, tokenizer)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"Unknown audit variants {sorted(unknown)}; choose from {list(VARIANTS)}.")
    layers = routed_layers(model)
    if not layers:
        raise ValueError("The model has no routed layer: there is no routing to audit.")
    if any(isinstance(_layers(model)[i].mixer.router, GateRouter) and not _layers(model)[i].mixer.router.hard for i in layers):
        raise ValueError("The soft router blends every operator for every token; the audit compares hard routings.")
    batches = _batches(model, tokenizer, records, max_length, batch_size)
    if not batches:
        raise ValueError("The validation set is empty (no tokens after tokenization).")

    with eval_mode(model):
        budgeted = evaluate(model, batches, progress, "trained, as configured")
        overflow = {layer: {op: budgeted["requested"][layer][op] - budgeted["shares"][layer][op] for op in budgeted["shares"][layer]}
                    for layer in budgeted["shares"]}
    with eval_mode(model), unbudgeted(model):
        trained = evaluate(model, batches, progress, "trained")
        shares = trained["shares"]
        results = {"trained": trained}
        if "random" in variants:
            with swapped_routers(model, random_routers(model, batches, shares)):
                results["random"] = evaluate(model, batches, progress, "random")
        if "inverted" in variants:
            with swapped_routers(model, inverted_routers(model, batches, shares, progress)):
                results["inverted"] = evaluate(model, batches, progress, "inverted")
    metric = "accuracy" if is_classifier(model) else "perplexity"
    for result in results.values():
        result["max_share_deviation"] = max(
            abs(result["shares"][layer][op] - shares[layer][op]) for layer in shares for op in shares[layer]
        )
    return {
        "metric": metric,
        "tokens": sum(int(b[1].sum()) for b in batches),
        "sequences": sum(len(b[0]) for b in batches),
        "routed_layers": layers,
        "router_type": model.config.router_type,
        "measured_shares": shares,
        "budget": {"capacity_factor": model.config.router_capacity_factor, "block_size": model.config.router_block_size,
                   metric: budgeted[metric], "overflow": overflow},
        "variants": {name: results[name] for name in VARIANTS if name in results},
    }


def _batches(model, tokenizer, records, max_length, batch_size):
    """Materialised batches (every variant and fitting pass sees exactly the same ones)."""
    pad = pad_id_for(model, tokenizer)
    if is_classifier(model):
        length = default_length(model.config, max_length)
        examples = classification_examples(tokenizer, records, model.config, length)
        out = []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            input_ids, mask = next(make_batches([ids for ids, _ in chunk], len(chunk), pad))
            out.append((input_ids, mask, torch.tensor([label for _, label in chunk])))
        return out
    length = max_length or min(256, model.config.max_position_embeddings)
    length = default_length(model.config, length)
    return list(make_batches(lm_blocks(tokenizer, (r["text"] for r in records), length), batch_size, pad))


def format_audit(report):
    """A short plain-text table of the audit."""
    metric = report["metric"]
    lines = [f"{'variant':<10} {metric:>12}  max |share - measured|  attention share per routed layer"]
    for name, result in report["variants"].items():
        attention = ", ".join(f"L{layer} {s.get('attention', 0.0):.3f}" for layer, s in result["shares"].items())
        lines.append(f"{name:<10} {result[metric]:>12.4f}  {result['max_share_deviation']:>21.4f}  {attention}")
    return "\n".join(lines)


def write_audit(report, path):
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return path


__all__ = ["audit", "evaluate", "fit_boundaries", "swapped_routers", "MatchedRandomRouter", "InvertedEntropyRouter",
           "BandRouter", "format_audit", "write_audit", "VARIANTS"]
