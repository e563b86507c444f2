"""The routing-collapse study (the paper's v1 headline): does a learned 3-operator router abandon RBF
for DCT and attention? Learned routing over ["dct", "rbf", "attention"] (targets 0.375 / 0.375 / 0.25)
on WikiText-2, every routed layer's eval share of each operator over training, three seeds, with
three kinds of share control: the auxiliary loss (`aux-loss`, router_aux_loss_coef 5, the default),
the share bias (`bias`, router_share_control="bias": no loss) and none (`off`: the auxiliary loss at
weight 0, so the gate goes wherever the task's gradient takes it).

Every run is quality.py's run (run_clm.py through the Trainer, v1 shape, quick profile) with an
evaluation every 25 steps; the shares are the Trainer's eval metrics, read from each run's
trainer_state.json: what ran (`eval_routing_layer{i}_{op}`, after the budget) and what the router
asked for (what ran plus the overflow, `eval_overflow_layer{i}_{op}`): the router's choice, which is
where a collapse would show.

    python benchmarks/routing_collapse.py                      # 3 controls x 3 seeds x 200 steps (about 25 min on 2 cores)
    python benchmarks/routing_collapse.py --seeds 0 --steps 20 # a smoke run

Writes benchmarks/results/routing_collapse-<cpu|cuda>.json and a plot next to it (one panel per
control and routed layer: each operator's share asked against the step, mean and range over seeds).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from common import RESULTS, default_device, describe_device, provenance
from quality import PROFILES, ROOT, train_lm

VARIANT = {"aux-loss": "learned-dct+rbf+attention", "bias": "learned-bias-dct+rbf+attention", "off": "learned-dct+rbf+attention"}
EXTRA = {"aux-loss": None, "bias": None, "off": {"router_aux_loss_coef": 0.0}}
OPERATORS = ["dct", "rbf", "attention"]
TARGETS = {"dct": 0.375, "rbf": 0.375, "attention": 0.25}


def share_history(run_folder):
    """[{step, ran: {layer: {op: share}}, asked: {...}}] from a run's evaluations, routed layers only:
    what ran, and what the router asked for (what ran plus the overflow: asks the budget had no slot
    for, which ran the cheapest operator)."""
    history = json.loads((ROOT / run_folder / "trainer_state.json").read_text())["log_history"]
    rows = []
    for row in history:
        ran, overflow = {}, {}
        for key, value in row.items():
            for prefix, table in (("eval_routing_layer", ran), ("eval_overflow_layer", overflow)):
                if key.startswith(prefix):
                    layer, op = key.removeprefix(prefix).split("_", 1)
                    table.setdefault(int(layer), {})[op] = value
        layers = sorted(layer for layer, ops in ran.items() if len(ops) == len(OPERATORS))
        if not layers:
            continue
        asked = {}
        for layer in layers:
            extra = overflow.get(layer, {})
            asked[layer] = {op: ran[layer][op] + extra.get(op, 0.0) for op in OPERATORS}
            asked[layer][OPERATORS[0]] = ran[layer][OPERATORS[0]] - sum(extra.values())
        rows.append({"step": row["step"], "ran": {layer: ran[layer] for layer in layers}, "asked": asked})
    return rows


def summarise(runs):
    """Per control: the final eval shares per routed layer, asked and run (mean, min, max over seeds),
    the largest distance of each from its target, the smallest RBF share asked, and the validation perplexity."""

    def spread(values):
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}

    summary = {}
    for control in dict.fromkeys(run["control"] for run in runs):
        mine = [run for run in runs if run["control"] == control]
        entry = {"seeds": [run["seed"] for run in mine]}
        for kind in ("asked", "ran"):
            final = [run["shares"][-1][kind] for run in mine]
            layers = list(final[0])
            entry[f"final_{kind}"] = {str(layer): {op: spread([f[layer][op] for f in final]) for op in OPERATORS} for layer in layers}
            entry[f"max_distance_from_target_{kind}"] = max(abs(f[layer][op] - TARGETS[op]) for f in final for layer in layers
                                                              for op in OPERATORS)
        entry["min_rbf_share_asked"] = min(f[layer]["rbf"] for f in (run["shares"][-1]["asked"] for run in mine) for layer in f)
        entry["valid_perplexity"] = spread([run["valid_perplexity"] for run in mine])
        summary[control] = entry
    return summary


def plot(runs, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    controls = list(dict.fromkeys(run["control"] for run in runs))
    layers = list(runs[0]["shares"][0]["asked"])
    figure, axes = plt.subplots(len(controls), len(layers), figsize=(4.5 * len(layers), 3.2 * len(controls)),
                                sharex=True, sharey=True, squeeze=False)
    colours = {"dct": "tab:blue", "rbf": "tab:green", "attention": "tab:red"}
    for row, control in enumerate(controls):
        mine = [run for run in runs if run["control"] == control]
        for column, layer in enumerate(layers):
            axis = axes[row][column]
            steps = [point["step"] for point in mine[0]["shares"]]
            for op in OPERATORS:
                values = [[point["asked"][layer][op] for point in run["shares"]] for run in mine]
                mean = [sum(v) / len(v) for v in zip(*values)]
                axis.plot(steps, mean, color=colours[op], label=op)
                if len(values) > 1:
                    axis.fill_between(steps, [min(v) for v in zip(*values)], [max(v) for v in zip(*values)], color=colours[op], alpha=0.2)
                axis.axhline(TARGETS[op], color=colours[op], linestyle=":", linewidth=1)
            axis.set_title(f"{control}, layer {layer}")
            axis.set_ylim(0, 1)
            if column == 0:
                axis.set_ylabel("eval share asked")
            if row == len(controls) - 1:
                axis.set_xlabel("training step")
    axes[0][0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close("all")
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def main():
    parser = argparse.ArgumentParser(description="Does a learned 3-operator router abandon RBF? Shares over training, by share control.")
    parser.add_argument("--controls", nargs="+", choices=list(VARIANT), default=list(VARIANT))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=PROFILES["quick"]["steps"])
    parser.add_argument("--eval_every", type=int, default=25)
    parser.add_argument("--data_dir", help="folder holding wikitext-2/ (default ../shared/data)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--results_dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    data = Path(args.data_dir or ROOT.parent / "shared" / "data") / "wikitext-2"
    if not data.is_dir():
        raise SystemExit(f"WikiText-2 not found at {data}: pass --data_dir (the folder holding wikitext-2/).")
    settings = {**PROFILES["quick"], "steps": args.steps, "eval_every": args.eval_every}
    device = torch.device(args.device)
    results_dir = args.results_dir.resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    prefix = results_dir / f"routing_collapse-{device.type}"
    started, runs, tokenizer = time.perf_counter(), [], None
    for seed in args.seeds:
        for control in args.controls:
            out = results_dir / f"runs-collapse-{control}-seed{seed}"
            row = train_lm(VARIANT[control], settings, data, out, tokenizer, seed, EXTRA[control], args.device)
            tokenizer = tokenizer or out / "tokenizer"
            runs.append({"control": control, "seed": seed, "valid_perplexity": row["valid_perplexity"],
                         "test_perplexity": row["test_perplexity"], "config_overrides": row["config_overrides"],
                         "extra": EXTRA[control], "train_seconds": row["train_seconds"], "run": row["run"],
                         "shares": share_history(row["run"])})
            final = runs[-1]["shares"][-1]["asked"]
            print(json.dumps({"control": control, "seed": seed, "valid_perplexity": row["valid_perplexity"], "final_shares": final}), flush=True)
    record = {"benchmark": "routing_collapse", "settings": settings, "targets": TARGETS, "device": describe_device(device),
              **provenance(), "torch": torch.__version__, "wall_seconds": time.perf_counter() - started, "runs": runs,
              "summary": summarise(runs)}
    record["plot"] = plot(runs, Path(f"{prefix}.png"), f"Learned 3-operator routing, WikiText-2, {args.steps} steps")
    Path(f"{prefix}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {prefix}.json")


if __name__ == "__main__":
    main()
