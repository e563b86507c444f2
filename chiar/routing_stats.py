"""Routing statistics over a dataset: which operator each layer used, how the entropy is spread
around the thresholds, and which kinds of tokens the model sends to attention.

    report = routing_statistics(model, tokenizer, read_documents(["valid.txt"]))  # chiar.data
    write_report(report, "routing_stats/")     # report.json + PNG charts

Every number is counted from the model's own records (`outputs.routing`) over real tokens only
(padding excluded), so per-layer shares agree exactly with `LayerRouting.shares()` and with the
`eval_routing_layer{i}_{op}` metrics of the Trainer on the same sequences.

The paper says function words are "smooth" and go to the cheap DCT path. We do not assume it: the
report gives the attention share of function words, punctuation and other tokens as measured,
next to the overall share that any routing (random included) would give them on average.
"""

import json
import math
import string
import unicodedata
from pathlib import Path

import torch

from chiar.batching import default_length, encode_documents, make_batches, pad_id_for
from chiar.evaluation import routed_passes
from chiar.loading import eval_mode, load_model
from chiar.routing_viz import OPERATOR_COLORS

# Common English function words (articles, prepositions, conjunctions, pronouns, auxiliaries).
FUNCTION_WORDS = frozenset(
    """the a an of and or but nor so yet to in on at by for with from into onto upon about as than
    that this these those which who whom whose what there here is are was were be been being am
    do does did have has had will would shall should can could may might must not no it its he she
    they them his her their we our you your i me my him us if then when while because""".split()
)
CATEGORIES = ("function_word", "punctuation", "other")
ENTROPY_BINS = 2000  # fine bins over [0, 1]: routing thresholds sit within 1e-3 of each other


# --------------------------------------------------------------------------------------------
# accumulation


def token_category(piece):
    """'function_word', 'punctuation' or 'other' for a token's decoded text."""
    word = piece.strip()
    if not word:
        return "other"
    if word.lower() in FUNCTION_WORDS:
        return "function_word"
    if all(unicodedata.category(ch).startswith("P") or ch in string.punctuation for ch in word):
        return "punctuation"
    return "other"


class RoutingStatistics:
    """Counts over real tokens of every forward pass added: per layer and operator, per token id,
    and a fine entropy histogram per layer and operator."""

    def __init__(self, config):
        self.config = config
        self.layer_operators = [list(config.layer_operators(i)) for i in range(config.num_hidden_layers)]
        # Layers where attention is one choice among several: where "sent to attention" means something.
        self.attention_layers = [i for i, ops in enumerate(self.layer_operators) if len(ops) > 1 and "attention" in ops]
        vocab, layers = config.vocab_size, config.num_hidden_layers
        self.tokens = 0
        self.sequences = 0
        self.counts = [[0] * len(ops) for ops in self.layer_operators]
        self.entropy_sum = [0.0] * layers
        self.histograms = [torch.zeros(len(ops), ENTROPY_BINS, dtype=torch.long) for ops in self.layer_operators]
        self.occurrences = torch.zeros(vocab, dtype=torch.long)
        self.attention = torch.zeros(layers, vocab, dtype=torch.long)
        self.thresholds = [None] * layers

    @torch.no_grad()
    def add(self, input_ids, attention_mask, routing):
        """Add one forward pass: its input ids (B, T), mask (B, T) and `outputs.routing`."""
        real = attention_mask.to(torch.bool).cpu()
        ids = input_ids.cpu()[real]
        self.tokens += int(real.sum())
        self.sequences += int(real.any(dim=1).sum())
        self.occurrences += torch.bincount(ids, minlength=self.config.vocab_size)
        for i, record in enumerate(routing):
            chosen = record.operator_ids.cpu()[real]
            self.counts[i] = [total + n for total, n in zip(self.counts[i], record.counts()[0])]
            if record.entropy is not None:
                entropy = record.entropy.float().cpu()[real]
                self.entropy_sum[i] += float(entropy.double().sum())
                bins = (entropy * ENTROPY_BINS).long().clamp(0, ENTROPY_BINS - 1)
                self.histograms[i] += torch.bincount(chosen * ENTROPY_BINS + bins, minlength=len(record.operators) * ENTROPY_BINS).view(
                    len(record.operators), ENTROPY_BINS
                )
            if "attention" in record.operators:
                picked = ids[chosen == record.operators.index("attention")]
                self.attention[i] += torch.bincount(picked, minlength=self.config.vocab_size)
            if record.thresholds is not None and self.thresholds[i] is None:
                self.thresholds[i] = [float(t) for t in record.thresholds.tolist()]

    # ---- the report -------------------------------------------------------------------------

    def report(self, tokenizer, min_count=5, top_k=20):
        """Everything as a JSON-ready dict (see docs/routing.md for the fields)."""
        if not self.tokens:
            raise ValueError("No tokens were analysed: the input is empty.")
        layers = [self._layer_report(i) for i in range(len(self.layer_operators))]
        report = {
            "tokens": self.tokens,
            "sequences": self.sequences,
            "model": {
                "name": getattr(self.config, "_name_or_path", ""),
                "layer_schedule": list(self.config.layer_schedule),
                "routed_operators": list(self.config.routed_operators),
                "router_type": self.config.router_type,
            },
            "layers": layers,
            "attention_layers": self.attention_layers,
        }
        if self.attention_layers:
            pieces = self._pieces(tokenizer)
            report["attention_share"] = self._share(self.occurrences.sum(), self.attention.sum(dim=1))
            report["attention_tokens"] = self._token_ranking(pieces, min_count, top_k)
            report["frequency_buckets"] = self._frequency_buckets()
            report["categories"] = self._categories(pieces)
        return report

    def _layer_report(self, i):
        ops = self.layer_operators[i]
        return {
            "layer": i,
            "kind": self.config.layer_schedule[i],
            "operators": ops,
            "counts": dict(zip(ops, self.counts[i])),
            "shares": {op: count / self.tokens for op, count in zip(ops, self.counts[i])},
            "mean_entropy": self.entropy_sum[i] / self.tokens,
            "thresholds": self.thresholds[i],
            "entropy_histogram": self._histogram(i),
        }

    def _histogram(self, i):
        """The fine histogram cropped to the bins that hold data (first bin's low edge, bin width)."""
        hist = self.histograms[i]
        filled = hist.sum(dim=0).nonzero().flatten()
        if not len(filled):
            return None
        lo, hi = int(filled[0]), int(filled[-1]) + 1
        return {
            "low": lo / ENTROPY_BINS,
            "bin_width": 1.0 / ENTROPY_BINS,
            "counts": {op: hist[k, lo:hi].tolist() for k, op in enumerate(self.layer_operators[i])},
        }

    def _share(self, occurrences, attention_per_layer):
        """Attention share over the attention layers: (tokens sent) / (occurrences x layers), overall and per layer."""
        occurrences = int(occurrences)
        layers = self.attention_layers
        per_layer = {str(i): int(attention_per_layer[i]) / occurrences if occurrences else None for i in layers}
        total = sum(int(attention_per_layer[i]) for i in layers)
        return {"overall": total / (occurrences * len(layers)) if occurrences else None, "per_layer": per_layer}

    def _pieces(self, tokenizer):
        seen = self.occurrences.nonzero().flatten().tolist()
        return {v: tokenizer.decode([v], clean_up_tokenization_spaces=False) for v in seen}

    def _token_ranking(self, pieces, min_count, top_k):
        """Tokens seen at least `min_count` times, most and least often sent to attention."""
        layers = self.attention_layers
        sent = self.attention[layers].sum(dim=0)
        rows = []
        for v, piece in pieces.items():
            count = int(self.occurrences[v])
            if count >= min_count:
                share = int(sent[v]) / (count * len(layers))
                rows.append({"token": piece, "id": v, "count": count, "attention": int(sent[v]), "share": share})
        rows.sort(key=lambda r: (-r["share"], -r["count"], r["id"]))
        most = rows[:top_k]
        least = sorted(rows, key=lambda r: (r["share"], -r["count"], r["id"]))[:top_k]
        return {"min_count": min_count, "eligible_tokens": len(rows), "most": most, "least": least}

    def _frequency_buckets(self):
        """Attention share by how often a token occurs in the analysed data, log-spaced buckets
        [1, 3), [3, 10), [10, 30), ...: do rare tokens get more attention than frequent ones?"""
        occ = self.occurrences
        top = int(occ.max())
        edges = [1]
        while edges[-1] <= top:
            edges.append(edges[-1] * 3 if str(edges[-1]).startswith("1") else edges[-1] * 10 // 3)
        buckets = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            members = (occ >= lo) & (occ < hi)
            if not bool(members.any()):
                continue
            occurrences = occ[members].sum()
            buckets.append({
                "min_count": lo, "max_count": hi - 1, "distinct_tokens": int(members.sum()), "occurrences": int(occurrences),
                "attention_share": self._share(occurrences, self.attention[:, members].sum(dim=1)),
            })
        return buckets

    def _categories(self, pieces):
        """Attention share of function words, punctuation and other tokens (decoded, stripped, lower-cased)."""
        out = {}
        for category in CATEGORIES:
            members = torch.zeros_like(self.occurrences, dtype=torch.bool)
            for v, piece in pieces.items():
                members[v] = token_category(piece) == category
            occurrences = self.occurrences[members].sum()
            out[category] = {
                "distinct_tokens": int(members.sum()),
                "occurrences": int(occurrences),
                "attention_share": self._share(occurrences, self.attention[:, members].sum(dim=1)),
            }
        return out


def routing_statistics(model, tokenizer, documents, max_length=None, batch_size=8, min_count=5, top_k=20, progress=False):
    """Route every document through the model and return the report dict (see RoutingStatistics)."""
    model, tokenizer = load_model(model, tokenizer)
    length = default_length(model.config, max_length)
    sequences = encode_documents(tokenizer, documents, length)
    stats = RoutingStatistics(model.config)
    batches = make_batches(sequences, batch_size, pad_id_for(model, tokenizer))
    with eval_mode(model):
        for input_ids, mask, outputs in routed_passes(model, batches, progress=progress, desc="routing statistics"):
            stats.add(input_ids, mask, outputs.routing)
    report = stats.report(tokenizer, min_count=min_count, top_k=top_k)
    report["max_length"] = length
    report["function_words"] = sorted(FUNCTION_WORDS)
    return report


# --------------------------------------------------------------------------------------------
# output: JSON and charts


def write_report(report, out_dir):
    """report.json plus shares.png, entropy.png and (with attention layers) attention_by_token.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = [plot_shares(report, out_dir / "shares.png"), plot_entropy(report, out_dir / "entropy.png")]
    if report.get("attention_layers"):
        charts.append(plot_attention_by_token(report, out_dir / "attention_by_token.png"))
    report = {**report, "charts": [p.name for p in charts]}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    return out_dir / "report.json"


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_shares(report, path):
    """Stacked bars: each layer's operator shares of real tokens."""
    layers = report["layers"]
    fig = _figure(7, 0.5 * len(layers) + 1.4)
    ax = fig.add_subplot()
    for i, layer in enumerate(layers):
        left = 0.0
        for op in layer["operators"]:
            share = layer["shares"][op]
            ax.barh(i, share, left=left, color=OPERATOR_COLORS[op], edgecolor="#555555", linewidth=0.5,
                    label=op if i == next(j for j, l in enumerate(layers) if op in l["operators"]) else None)
            if share >= 0.06:
                ax.text(left + share / 2, i, f"{share:.0%}", ha="center", va="center", fontsize=8,
                        color="white" if op == "dct" else "black")
            left += share
    ax.set_yticks(range(len(layers)), [f"L{l['layer']} {l['kind']}" for l in layers])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of real tokens")
    ax.set_title(f"Operator shares per layer ({report['tokens']} tokens)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, frameon=False)
    fig.savefig(path)
    return Path(path)


def plot_entropy(report, path, num_bins=60):
    """Per layer: the entropy histogram, stacked by the operator each token took, thresholds marked."""
    layers = [l for l in report["layers"] if l["entropy_histogram"]]
    cols = 2 if len(layers) > 1 else 1
    rows = math.ceil(len(layers) / cols)
    fig = _figure(5.5 * cols, 2.6 * rows + 0.6)
    for n, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, n + 1)
        hist = layer["entropy_histogram"]
        counts = {op: torch.tensor(c, dtype=torch.float64) for op, c in hist["counts"].items()}
        width = len(next(iter(counts.values())))
        group = max(1, math.ceil(width / num_bins))  # merge fine bins into about num_bins bars
        bottom = None
        for op, c in counts.items():
            padded = torch.nn.functional.pad(c, (0, (-width) % group)).view(-1, group).sum(dim=1)
            x = hist["low"] + (torch.arange(len(padded)) * group + group / 2) * hist["bin_width"]
            ax.bar(x.tolist(), padded.tolist(), width=group * hist["bin_width"], bottom=None if bottom is None else bottom.tolist(),
                   color=OPERATOR_COLORS[op], edgecolor="#555555", linewidth=0.3, label=op)
            bottom = padded if bottom is None else bottom + padded
        for t in layer["thresholds"] or []:
            ax.axvline(t, color="#d62728", linestyle="--", linewidth=1.2)
        title = f"L{layer['layer']} {layer['kind']}"
        if layer["thresholds"]:
            title += "  τ " + ", ".join(f"{t:.4f}" for t in layer["thresholds"])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("spectral entropy", fontsize=8)
        ax.tick_params(labelsize=7)
        if n == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Entropy per layer (red dashes: eval thresholds)", fontsize=10)
    fig.savefig(path)
    return Path(path)


def plot_attention_by_token(report, path):
    """Attention share by token frequency bucket and by token category, against the overall share."""
    overall = report["attention_share"]["overall"]
    fig = _figure(10, 3.6)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    buckets = report["frequency_buckets"]
    names = [f"{b['min_count']}-{b['max_count']}" for b in buckets]
    left.bar(names, [b["attention_share"]["overall"] for b in buckets], color=OPERATOR_COLORS["attention"], edgecolor="#555555")
    for i, b in enumerate(buckets):
        left.text(i, 0, f"n={b['occurrences']}", ha="center", va="bottom", fontsize=7, rotation=90)
    left.set_xlabel("occurrences of the token in the analysed data")
    left.tick_params(axis="x", rotation=30)
    left.set_title("Attention share by token frequency", fontsize=10)
    categories = report["categories"]
    labels = [c.replace("_", " ") for c in categories]
    right.bar(labels, [c["attention_share"]["overall"] or 0 for c in categories.values()], color=OPERATOR_COLORS["attention"],
              edgecolor="#555555")
    for i, c in enumerate(categories.values()):
        right.text(i, 0, f"n={c['occurrences']}", ha="center", va="bottom", fontsize=8)
    right.set_title("Attention share by token type", fontsize=10)
    for ax in (left, right):
        ax.axhline(overall, color="#d62728", linestyle="--", linewidth=1, label=f"all tokens {overall:.3f}")
        ax.set_ylabel("share sent to attention")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)
    fig.savefig(path)
    return Path(path)


__all__ = ["FUNCTION_WORDS", "RoutingStatistics", "routing_statistics", "token_category", "write_report"]
