"""PNG plots of the timing results: speed-up over the baseline against sequence length (speed.py) and
against context length (generation.py), one line per model, the per-round ratios' quartiles as bars.

    python benchmarks/plot_speed.py benchmarks/results/speed-cpu.json benchmarks/results/generation-cpu.json

Writes each plot next to its JSON (`speed-cpu.png`, `generation-cpu.png`).
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tables import ratio_quartiles  # noqa: E402

# The CPU targets (model body, forward+backward): eager against the eager baseline, compiled against the compiled one.
TARGETS = {("body", False): {256: 1.15, 4096: 1.55}, ("body", True): {1024: 1.3, 4096: 1.5}}


def draw(axis, points, title, xlabel):
    """points: {model: [(x, first quartile, median, third quartile), ...]}"""
    for model, values in points.items():
        values.sort()
        xs = [v[0] for v in values]
        medians = [v[2] for v in values]
        errors = [[v[2] - v[1] for v in values], [v[3] - v[2] for v in values]]
        axis.errorbar(xs, medians, yerr=errors, marker="o", ms=4, capsize=3, label=model)
    axis.axhline(1.0, color="grey", lw=0.8, ls="--")
    axis.set_xscale("log", base=2)
    ticks = sorted({v[0] for values in points.values() for v in values})
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.minorticks_off()
    axis.set_xlabel(xlabel)
    axis.set_ylabel("speed-up over the baseline")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)


def speed_points(result, target, mode, compiled):
    rows = [r for r in result["rows"] if r["target"] == target and r["mode"] == mode and bool(r.get("compiled")) == compiled]
    points = {}
    for row in rows:
        if row["model"] == "baseline":
            continue
        baseline = next(r for r in rows if r["model"] == "baseline" and r["length"] == row["length"])
        points.setdefault(row["model"], []).append((row["length"], *ratio_quartiles(baseline["seconds_all_rounds"], row["seconds_all_rounds"])))
    return points


def plot_speed(result, path):
    columns = sorted({(r["target"], bool(r.get("compiled"))) for r in result["rows"]})
    modes = sorted({r["mode"] for r in result["rows"]}, key=lambda m: m != "fwd+bwd")
    figure, axes = plt.subplots(len(modes), len(columns), figsize=(5.5 * len(columns), 4 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, (target, compiled) in enumerate(columns):
            axis = axes[i][j]
            kind = "compiled, vs compiled baseline" if compiled else "eager"
            draw(axis, speed_points(result, target, mode, compiled), f"{target}, {mode}, {kind}\n({result['device']})", "sequence length")
            if mode == "fwd+bwd":
                goals = TARGETS.get((target, compiled), {})
                if goals:
                    axis.plot(list(goals), list(goals.values()), marker="*", ms=12, color="black", ls="none", label="target")
                    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_generation(result, path):
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for axis, cached in zip(axes[0], (True, False)):
        rows = [r for r in result["rows"] if r["cached"] == cached]
        points = {}
        for row in rows:
            if row["model"] == "baseline":
                continue
            baseline = next(r for r in rows if r["model"] == "baseline" and r["context"] == row["context"])
            points.setdefault(row["model"], []).append(
                (row["context"], *ratio_quartiles(baseline["seconds_per_token_all_rounds"], row["seconds_per_token_all_rounds"])))
        draw(axis, points, f"decoding, {'cached' if cached else 'uncached'}, batch {result['settings']['batch']} ({result['device']})",
             "context length")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(paths):
    for name in paths:
        path = Path(name)
        result = json.loads(path.read_text())
        output = path.with_suffix(".png")
        plotters = {"speed": plot_speed, "generation": plot_generation}
        if result.get("benchmark") not in plotters:
            raise SystemExit(f"{path}: not a speed.py or generation.py result")
        plotters[result["benchmark"]](result, output)
        print(f"wrote {output}")


if __name__ == "__main__":
    main(sys.argv[1:])
