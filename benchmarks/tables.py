"""Markdown tables from the JSON results the benchmark scripts write (what docs/benchmarks.md shows).

    python benchmarks/tables.py benchmarks/results/speed-cpu.json benchmarks/results/generation-cpu.json \
        benchmarks/results/quality-wikitext-quick-cpu.json
"""

import argparse
import json
import statistics
from pathlib import Path


def incomplete(result):
    return "" if result.get("complete", True) else " **Incomplete: the run was stopped at its time bound; these are the rows it finished.**"


def ratio_quartiles(baseline_seconds, seconds):
    """(first quartile, median, third quartile) of the per-round baseline/model time ratios."""
    ratios = [b / m for b, m in zip(baseline_seconds, seconds)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1, statistics.median(ratios), q3


def round_ratio_quartiles(result, row):
    """First and third quartiles of the per-round baseline/model time ratios (the spread behind the median)."""
    baseline = next(r for r in result["rows"] if r["model"] == "baseline"
                    and all(r.get(key) == row.get(key) for key in ("target", "length", "mode", "compiled")))
    if row is baseline or len(row["seconds_all_rounds"]) < 2:
        return "n/a"
    q1, _, q3 = ratio_quartiles(baseline["seconds_all_rounds"], row["seconds_all_rounds"])
    return f"{q1:.2f}-{q3:.2f}"


def speed(result):
    lines = [f"Device: {result['device']}, {result['dtype']}, torch {result['torch']}; {result['shape']}; "
             f"{result['settings']['rounds']} timed rounds.{incomplete(result)}", "",
             "| target | T | batch | mode | model | compiled (compile s) | tokens/s | vs baseline | rounds' quartiles | "
             "attention FLOPs | total FLOPs | attention query share | memory vs baseline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        memory = f"{row['memory_vs_baseline']:.2f}" if row.get("memory_vs_baseline") else "n/a"
        compiled = f"yes ({row['compile_seconds']:.0f})" if row.get("compiled") else "no"
        lines.append(
            f"| {row['target']} | {row['length']} | {row['batch']} | {row['mode']} | {row['model']} | {compiled} | {row['tokens_per_s']:,.0f} | "
            f"{row['speedup_vs_baseline']:.2f}x | {round_ratio_quartiles(result, row)} | {row['attention_flops_fraction']:.3f} | "
            f"{row['total_flops_fraction']:.3f} | {row['attention_query_fraction']:.3f} | {memory} |"
        )
    return "\n".join(lines)


def generation(result):
    lines = [f"Device: {result['device']}, {result['dtype']}, torch {result['torch']}; {result['shape']}; "
             f"batch {result['settings']['batch']}.{incomplete(result)}", "",
             "| context | decoding | model | tokens/s | vs baseline |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['context']} | {'cached' if row['cached'] else 'uncached'} | {row['model']} | "
                     f"{row['tokens_per_s']:,.1f} | {row['speedup_vs_baseline']:.2f}x |")
    return "\n".join(lines)


def quality(result):
    seeds = len({row.get("seed", 0) for row in result["results"]}) > 1
    if result["task"] != "wikitext":
        lines = [f"Device: {result['device']}; task {result['task']}, profile {result['profile']}.{incomplete(result)}", "",
                 "| model | " + ("seed | " if seeds else "") + "valid accuracy | test accuracy | test majority class | "
                 "attention FLOPs | attention queries | wall-clock (s) |", "|---" * (8 if seeds else 7) + "|"]
        for row in result["results"]:
            flops = f"{row['attention_flops_fraction']:.3f}" if row.get("attention_flops_fraction") is not None else "n/a"
            queries = f"{row['attention_query_fraction']:.3f}" if row.get("attention_query_fraction") is not None else "n/a"
            majority = f"{row['test_majority_class_accuracy']:.4f}" if "test_majority_class_accuracy" in row else "n/a"
            lines.append(f"| {row['model']} | " + (f"{row['seed']} | " if seeds else "") + f"{row['valid_accuracy']:.4f} | "
                         f"{row['test_accuracy']:.4f} | {majority} | {flops} | {queries} | {row['wall_seconds']:.0f} |")
        if "summary" in result:
            lines += ["", seed_summary(result["summary"], "accuracy", 4)]
        return "\n".join(lines)
    settings = result["settings"]
    epochs = settings.get("epochs")
    length = f"{settings['steps']} steps" if settings["steps"] else f"{epochs} epoch{'s' if epochs != 1 else ''}"
    lines = [f"Device: {result['device']}, torch {result['torch']}; {length} of batch {settings['batch']} x 256 tokens, "
             f"BPE vocabulary {settings['vocab']}; total wall-clock {result['wall_seconds'] / 60:.1f} min.{incomplete(result)}", "",
             "| model | " + ("seed | " if seeds else "") + "valid ppl | test ppl | attention FLOPs | attention queries | "
             "train time (s) | attention share per layer |", "|---" * (8 if seeds else 7) + "|"]
    for row in result["results"]:
        shares = [row["routing"].get(f"routing_layer{i}_attention", 0.0) for i in range(4)]
        lines.append(f"| {row['model']} | " + (f"{row['seed']} | " if seeds else "") + f"{row['valid_perplexity']:.2f} | "
                     f"{row['test_perplexity']:.2f} | {row['attention_flops_fraction']:.3f} | {row['attention_query_fraction']:.3f} | "
                     f"{row['train_seconds']:.0f} | " + ", ".join(f"{s:.2f}" for s in shares) + " |")
    if "summary" in result:
        lines += ["", seed_summary(result["summary"], "perplexity", 2)]
        lines += relative_to_control(result["results"])
    lines += routed_shares(result["results"])
    return "\n".join(lines)


def routed_shares(rows):
    """Each routed layer's attention share, eval (end of training) and train (the second half's training
    logs), as run / as asked, for the runs that logged training shares."""
    rows = [row for row in rows if row.get("train_routing")]
    if not rows:
        return []
    prefix = "train_routing_layer"
    layers = sorted({int(key.removeprefix(prefix).split("_")[0]) for row in rows for key in row["train_routing"]
                     if key.startswith(prefix) and key.endswith("_attention")})
    lines = ["", "| model | seed | " + " | ".join(f"layer {i} eval run / asked | layer {i} train run / asked" for i in layers) + " |",
             "|---|---|" + "---|" * (2 * len(layers))]
    for row in rows:
        cells = []
        for i in layers:
            run = row["routing"].get(f"routing_layer{i}_attention", 0.0)
            cells.append(f"{run:.3f} / {run + row['routing'].get(f'overflow_layer{i}_attention', 0.0):.3f}")
            train = row["train_routing"]
            cells.append(f"{train.get(f'train_routing_layer{i}_attention', 0.0):.3f} / "
                         f"{train.get(f'train_asked_layer{i}_attention', 0.0):.3f}")
        lines.append(f"| {row['model']} | {row['seed']} | " + " | ".join(cells) + " |")
    return lines


def relative_to_control(rows):
    """Each variant's validation perplexity relative to the random control's of the same seed, in percent
    (negative: better than the control)."""
    control = {row["seed"]: row["valid_perplexity"] for row in rows if row["model"] == "chiar-random"}
    by_model = {}
    for row in rows:
        if row["model"] != "chiar-random" and row["seed"] in control:
            by_model.setdefault(row["model"], []).append(100 * (row["valid_perplexity"] / control[row["seed"]] - 1))
    if not by_model:
        return []
    lines = ["", "| model | valid ppl relative to the random control's, per seed (%) | mean (%) |", "|---|---|---|"]
    for model, values in by_model.items():
        lines.append(f"| {model} | " + ", ".join(f"{v:+.2f}" for v in values) + f" | {statistics.mean(values):+.2f} |")
    return lines


def seed_summary(summary, metric, digits):
    """Mean (min to max) over seeds, and the paired differences from the baseline and the random control."""

    def spread(entry, places=digits):
        return "n/a" if entry is None else f"{entry['mean']:.{places}f} ({entry['min']:.{places}f} to {entry['max']:.{places}f})"

    name = {"perplexity": "ppl", "accuracy": "accuracy"}[metric]
    time_key = "train_seconds" if metric == "perplexity" else "wall_seconds"
    references = [ref for ref in ("baseline", "chiar-random") if ref in summary]  # a reference the run lacks has no columns
    labels = {"baseline": "baseline's", "chiar-random": "random control's"}
    differences = [f"{split} {name} minus {labels[ref]}" for ref in references for split in ("valid", "test")]
    header = ["model", "seeds", f"valid {name}", f"test {name}", *differences, "attention FLOPs",
              f"{'train time' if metric == 'perplexity' else 'wall-clock'} (s)"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for model, entry in summary.items():
        cells = [model, str(len(entry["seeds"])), spread(entry[f"valid_{metric}"]), spread(entry[f"test_{metric}"])]
        cells += [spread(entry.get(f"{split}_{metric}_minus_{ref}")) for ref in references for split in ("valid", "test")]
        cells += [spread(entry.get("attention_flops_fraction"), 3), f"{entry[time_key]['mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_check(result):
    lines = [f"Device: {result['device']}, torch {result['torch']}; {len(result['rows'])} variants; "
             + ("all checks passed." if not result["failures"] else f"failures: {result['failures']}."), "",
             "| variant | causality (eval / train) | cache = no cache | routing = CPU's | logits vs CPU | bf16 LM / classifier step |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['variant']} | {row['causality_eval']:.1e} / {row['causality_train']:.1e} | {row['cache_equals_no_cache']} | "
                     f"{row['routing_agreement_with_cpu']:.3f} | {row['max_logit_gap_to_cpu']:.1e} | "
                     f"{row['bf16_lm_step_finite']} / {row['bf16_classifier_step_finite']} |")
    return "\n".join(lines)


def flops_fraction(result):
    """The budget table: per capacity factor and length, attention work and each routed layer's overflow."""
    rows = {(r["capacity_factor"], r["length"], r["attn_implementation"]): r for r in result["rows"]}
    lines = [f"torch {result['torch']}; {result['sequences']} held-out sequences per row.", "",
             "| capacity factor | T | attention queries | attention FLOPs (sdpa) | (eager) | body FLOPs (sdpa) | "
             "attention share, routed layers | overflow, routed layers |", "|---|---|---|---|---|---|---|---|"]
    for (factor, length, implementation), row in sorted(rows.items()):
        if implementation != "sdpa":
            continue
        eager = rows.get((factor, length, "eager"))
        shares = ", ".join(f"{s:.3f}" for s in row["attention_shares"] if 0 < s < 1)
        overflow = ", ".join(f"{o:.4f}" for o in row["overflow"])
        lines.append(f"| {factor} | {length} | {row['attention_query_fraction']:.3f} | {row['attention_flops_fraction']:.3f} | "
                     f"{eager['attention_flops_fraction']:.3f} | {row['total_flops_fraction']:.3f} | {shares} | {overflow} |"
                     if eager else
                     f"| {factor} | {length} | {row['attention_query_fraction']:.3f} | {row['attention_flops_fraction']:.3f} | n/a | "
                     f"{row['total_flops_fraction']:.3f} | {shares} | {overflow} |")
    return "\n".join(lines)


def routing_signal(result):
    """Per task and router, over the seeds: accuracy on the marked tokens, the routed layer's attention
    share, and recall / precision of its attention on the marked tokens (mean, and each seed)."""

    def mean_and_each(rows, key):
        each = ", ".join(f"{row[key]:.2f}" for row in rows)
        return f"{statistics.mean(row[key] for row in rows):.3f} ({each})"

    def train_and_eval(rows, kind):
        return (f"{statistics.mean(r[f'train_{kind}_share'] for r in rows):.3f} / "
                f"{statistics.mean(r[f'eval_{kind}_share'] for r in rows):.3f}")

    asked = any("eval_asked_share" in r for r in result["runs"])  # runs before the asks were recorded have no column
    lines = []
    for task in result["tasks"]:
        rows = [r for r in result["runs"] if r["task"] == task]
        lines += [f"**{task}** ({result['settings']['steps']} steps, seeds {result['settings']['seeds']}):", "",
                  "| router | accuracy (each seed) | attention share run, train / eval |" + (" asked, train / eval |" if asked else "")
                  + " recall (each seed) | precision |", "|---|---|---|---|---|" + ("---|" if asked else "")]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            mine = [r for r in rows if r["variant"] == variant]
            if "recall" not in mine[0]:
                lines.append(f"| {variant} | {mean_and_each(mine, 'accuracy')} | 1 (every token) |" + (" |" if asked else "") + " | |")
                continue
            asks = f" {train_and_eval(mine, 'asked')} |" if asked else ""
            lines.append(f"| {variant} | {mean_and_each(mine, 'accuracy')} | {train_and_eval(mine, 'attention')} |{asks} "
                         f"{mean_and_each(mine, 'recall')} | {statistics.mean(r['precision'] for r in mine):.3f} |")
        lines.append("")
    return "\n".join(lines)


def routing_collapse(result):
    """Per share control and seed: each routed layer's final eval shares asked (dct / rbf / attention),
    the smallest RBF share asked at any evaluation, and validation perplexity."""
    operators = list(result["targets"])
    targets = " / ".join(f"{result['targets'][op]:.3f}" for op in operators)
    layers = list(result["runs"][0]["shares"][-1]["asked"])
    lines = [f"{result['settings']['steps']} steps; shares asked at the last evaluation, {' / '.join(operators)} (targets {targets}):", "",
             "| control | seed | " + " | ".join(f"layer {layer}" for layer in layers) + " | lowest RBF share asked | valid ppl |",
             "|---|---|" + "---|" * len(layers) + "---|---|"]
    for run in result["runs"]:
        final = run["shares"][-1]["asked"]
        cells = [" / ".join(f"{final[layer][op]:.3f}" for op in operators) for layer in layers]
        lowest = min(point["asked"][layer]["rbf"] for point in run["shares"] for layer in layers)
        lines.append(f"| {run['control']} | {run['seed']} | " + " | ".join(cells) + f" | {lowest:.3f} | {run['valid_perplexity']:.1f} |")
    return "\n".join(lines)


def against_baseline(rows, baseline_rows):
    """Each routed variant's validation perplexity relative to the full-attention baseline's of the same
    seed (from another run of the same profile), and the share of the baseline's lead over the random
    control that the variant closed: (control - variant) / (control - baseline), per seed."""
    baseline = {row["seed"]: row["valid_perplexity"] for row in baseline_rows if row["model"] == "baseline"}
    control = {row["seed"]: row["valid_perplexity"] for row in rows if row["model"] == "chiar-random"}
    by_model = {}
    for row in rows:
        if row["model"] != "baseline" and row["seed"] in baseline:
            seed, ppl = row["seed"], row["valid_perplexity"]
            closed = (control[seed] - ppl) / (control[seed] - baseline[seed]) if seed in control and control[seed] != baseline[seed] else None
            by_model.setdefault(row["model"], []).append((100 * (ppl / baseline[seed] - 1), closed))
    if not by_model:
        return ""
    lines = ["| model | valid ppl relative to the baseline's, per seed (%) | mean (%) | lead over the random control closed, per seed |",
             "|---|---|---|---|"]
    for model, values in by_model.items():
        closed = ", ".join("n/a" if c is None else f"{c:.2f}" for _, c in values)
        lines.append(f"| {model} | " + ", ".join(f"{v:+.2f}" for v, _ in values) + f" | {statistics.mean(v for v, _ in values):+.2f} | {closed} |")
    return "\n".join(lines)


ROUTED_ONLY = ("router_capacity_factor", "layer_schedule")  # quality.py settings that never reach the baseline


def baseline_settings_differ(result, reference):
    """What differs between two quality files in the settings that shape the baseline ('' if nothing)."""
    ours, theirs = ({key: value for key, value in r["settings"].items() if key not in ROUTED_ONLY} for r in (result, reference))
    differ = [f"{key} {ours.get(key)} vs {theirs.get(key)}" for key in sorted(ours.keys() | theirs.keys()) if ours.get(key) != theirs.get(key)]
    if (result["task"], result["profile"]) != (reference["task"], reference["profile"]):
        differ.insert(0, f"{result['task']}/{result['profile']} vs {reference['task']}/{reference['profile']}")
    return "; ".join(differ)


def main():
    parser = argparse.ArgumentParser(description="Markdown tables of benchmark result files (docs/benchmarks.md).")
    parser.add_argument("files", nargs="+", help="result JSON files of benchmarks/results/")
    parser.add_argument("--baseline", help="a WikiText-2 quality file whose full-attention baseline the quality files are compared with "
                                           "(seed by seed: relative perplexity, and the share of its lead over the random control closed)")
    args = parser.parse_args()
    reference = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    baseline = reference["results"] if reference else None
    for path in args.files:
        result = json.loads(Path(path).read_text())
        if reference is not None and result["benchmark"] == "quality" and (differ := baseline_settings_differ(result, reference)):
            parser.error(f"--baseline {args.baseline} did not train like {path}: {differ}")
        print(f"### {path}\n")
        renderers = {"speed": speed, "generation": generation, "quality": quality, "device_check": device_check,
                     "flops_fraction": flops_fraction, "routing_signal": routing_signal, "routing_collapse": routing_collapse}
        print(renderers[result["benchmark"]](result))
        if baseline is not None and result["benchmark"] == "quality":
            print(f"\nAgainst the baseline of {args.baseline}:\n")
            print(against_baseline(result["results"], baseline) or "(no seed in common)")
        print()


if __name__ == "__main__":
    main()
