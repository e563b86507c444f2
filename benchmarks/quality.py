"""Quality of CHIAR against the full-attention model of the same shape: same data, seed and steps.

Every run is a user's run: run_clm.py / run_classification.py, called with the variant's config
(chiar/variants.py) as --config_overrides, trains and evaluates it through the Trainer, and this
script collects what the run left (eval/test results, trainer_state.json) into one JSON file.

Language modelling (`--task wikitext`, default): WikiText-2 from ../shared/data/wikitext-2 (or
--data_dir), the byte-level BPE that run_clm.py trains on its training split (trained by the first
run, reused by the others), v1 shape (configs/chiar-v1-2op.json: 4 layers, d=256, 4 heads, FFN 1024;
the `epoch` profile: configs/chiar-tiny.json, d=128, FFN 512),
blocks of 256 tokens, AdamW (beta2 0.95), cosine schedule with 5% warm-up. Variants: the baseline,
CHIAR with the threshold router, the learned router (and exploring), the random router at the same
25% attention share (the control), and the 3-operator CHIAR. Each trains for the same steps from
the same seed; the JSON has validation and test perplexity, the attention query / FLOP fractions
executed on validation, per-layer routing shares and the validation curve, and two plots:
validation perplexity against step and against attention FLOPs. Every variant trains once per
seed (the seed sets the initial weights and the batch order, the same for every variant within a
seed; for classification also the validation split and the sampled subsets), and the JSON adds a
summary: each variant's mean and range over seeds, and its per-seed differences from the baseline
and from the random control, which say whether a gap is larger than the seeds' own spread.

Classification (`--task imdb` / `--task listops`): run_classification.py for the bidirectional
CHIAR and the baseline, model selection on validation, accuracy on test.

    python benchmarks/quality.py                          # WikiText-2, quick CPU profile, seeds 0 1 2 (docs/benchmarks.md)
    python benchmarks/quality.py --seeds 0 --steps 20     # a smoke run
    python benchmarks/quality.py --profile epoch --variants chiar-random chiar-threshold chiar-learned-bias --capacity_factor 1.25
                                                          # one epoch of the tiny shape per variant and seed (CPU, about 7 min a run)
    python benchmarks/quality.py --profile epoch --variants chiar-random chiar-learned-bias --capacity_factor 1.25 --layer_schedule dct routed routed routed --tag routed-last
                                                          # the same, no layer where every token attends (the baseline stays full attention)
    python benchmarks/quality.py --profile full           # GPU profile (full epochs)
    python benchmarks/quality.py --task imdb              # IMDB, quick profile
    python benchmarks/quality.py --task listops           # ListOps, quick profile

Writes benchmarks/results/quality-<task>-<profile>-<cpu|cuda>.json (and PNG plots next to it); the
runs' folders go to benchmarks/results/runs-* (not committed).
"""

import argparse
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from chiar.evaluation import perplexity
from chiar.variants import VARIANTS, config_overrides_argument, shape
from common import RESULTS, default_device, describe_device, provenance

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"chiar-v1-2op": "v1 shape", "chiar-tiny": "tiny shape"}  # configs/: the paper's v1 shape, the main job's
CLASSIFICATION_VARIANTS = ["baseline", "chiar-threshold"]  # on configs/chiar-tiny.json, made bidirectional by the script
LM_VARIANTS = ["baseline", "chiar-threshold", "chiar-learned", "chiar-learned-explore", "chiar-random", "chiar-3op"]  # chiar/variants.py
PROFILES = {
    "quick": dict(shape="chiar-v1-2op", steps=200, batch=8, eval_every=50, eval_blocks=96, vocab=8192, lr=1e-3),  # eval_blocks: also test blocks
    # One epoch of the main job's model (configs/chiar-tiny.json), whole validation and test splits: about 7 min a run on 2 cores.
    "epoch": dict(shape="chiar-tiny", steps=None, epochs=1, batch=8, eval_every=500, eval_blocks=None, vocab=8192, lr=1e-3),
    "full": dict(shape="chiar-v1-2op", steps=None, epochs=6, batch=32, eval_every=250, eval_blocks=None, vocab=16384, lr=1e-3),
}
BLOCK = 256


def run_script(module, argv):
    """`module.main(argv)` in this process (the scripts live at the repository root)."""
    import sys

    sys.path.insert(0, str(ROOT))
    return __import__(module).main(argv)


def train_lm(name, settings, data, out, tokenizer, seed=0, extra=None, device="cpu"):
    """Train variant `name` with run_clm.py (the Trainer path a user's run takes) into `out`; its
    config changed further by `extra`; the tokenizer folder `tokenizer` if given, else trained there."""
    shutil.rmtree(out, ignore_errors=True)  # run_clm.py resumes from a checkpoint it finds there
    overrides = config_overrides_argument(name) + f",max_position_embeddings={BLOCK}"
    overrides += "".join(f",{key}={json.dumps(value, separators=(',', ':'))}" for key, value in (extra or {}).items())
    # the training logs (loss, training shares) five times per evaluation interval, so at each evaluation too;
    # at least twice in a run shorter than one interval
    logging = max(1, settings["eval_every"] // 5)
    logging = min(logging, max(1, settings["steps"] // 2)) if settings["steps"] else logging
    argv = ["--output_dir", str(out), "--config_name", settings["shape"], "--config_overrides", overrides, "--block_size", str(BLOCK),
            "--train_file", str(data / "wiki.train.tokens"), "--validation_file", str(data / "wiki.valid.tokens"),
            "--test_file", str(data / "wiki.test.tokens"), "--tokenizer_vocab_size", str(settings["vocab"]),
            "--seed", str(seed), "--per_device_train_batch_size", str(settings["batch"]), "--per_device_eval_batch_size", "16",
            "--learning_rate", str(settings["lr"]), "--lr_scheduler_type", "cosine", "--adam_beta2", "0.95",
            "--eval_strategy", "steps", "--eval_steps", str(settings["eval_every"]), "--logging_steps", str(logging),
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
    argv += ["--max_steps", str(settings["steps"])] if settings["steps"] else ["--num_train_epochs", str(settings["epochs"])]
    if settings["eval_blocks"]:
        argv += ["--max_eval_samples", str(settings["eval_blocks"])]
    if tokenizer:
        argv += ["--tokenizer_name", str(tokenizer)]
    if torch.device(device).type == "cuda":
        argv += ["--bf16", "true"]
    else:
        argv += ["--use_cpu", "true"]
    run_script("run_clm", argv)
    results = {split: json.loads((out / f"{split}_results.json").read_text()) for split in ("train", "eval", "test")}
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = {row["step"]: row["loss"] for row in history if "loss" in row}
    curve = [{"step": row["step"], "valid_perplexity": perplexity(row["eval_loss"]), "train_loss": losses.get(row["step"])}
             for row in history if "eval_loss" in row]
    evaluation, steps = results["eval"], history[-1]["step"]
    late = [row for row in history if "loss" in row and row["step"] > steps / 2]  # training logs of the second half
    train_routing = {key: sum(row[key] for row in late) / len(late) for key in (late[0] if late else {})
                     if key.startswith(("train_routing_layer", "train_asked_layer"))}
    if not curve or curve[-1]["step"] != steps:  # the final evaluation, when the last step was not an eval step
        curve.append({"step": steps, "valid_perplexity": evaluation["eval_perplexity"], "train_loss": losses.get(steps)})
    return {
        "model": name, "config_overrides": overrides, "seed": seed, "steps": steps,
        "train_seconds": results["train"]["train_runtime"], "valid_perplexity": evaluation["eval_perplexity"],
        "test_perplexity": results["test"]["test_perplexity"], "curve": curve,
        "attention_query_fraction": evaluation.get("eval_attention_query_fraction"),
        "attention_flops_fraction": evaluation.get("eval_attention_flops_fraction"),
        "routing": {key.removeprefix("eval_"): value for key, value in evaluation.items()
                    if key.startswith(("eval_routing_layer", "eval_entropy_layer", "eval_overflow_layer"))},
        "train_routing": train_routing,  # shares in training (dropout on), averaged over the second half's logs
        "run": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
    }


def plot(results, path_prefix, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    by_model = {}
    for row in results:
        by_model.setdefault(row["model"], []).append(row)
    seeds = max(len(rows) for rows in by_model.values())
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for model, rows in by_model.items():  # one seed: its curve; several: their mean, shaded from min to max
        steps = [p["step"] for p in rows[0]["curve"]]
        curves = [[p["valid_perplexity"] for p in row["curve"]] for row in rows]
        line = axis.plot(steps, [sum(values) / len(values) for values in zip(*curves)], marker="o", ms=3, label=model)
        if len(curves) > 1:
            axis.fill_between(steps, [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)], color=line[0].get_color(), alpha=0.2)
    axis.set_xlabel("training step")
    axis.set_ylabel("validation perplexity" + (f" (mean and range of {seeds} seeds)" if seeds > 1 else ""))
    axis.set_yscale("log")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    curve_path = Path(f"{path_prefix}-curve.png")
    figure.savefig(curve_path, dpi=120)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for model, rows in by_model.items():
        flops = [row["attention_flops_fraction"] for row in rows]
        ppl = [row["valid_perplexity"] for row in rows]
        x, y = sum(flops) / len(flops), sum(ppl) / len(ppl)
        axis.errorbar(x, y, xerr=[[x - min(flops)], [max(flops) - x]], yerr=[[y - min(ppl)], [max(ppl) - y]], fmt="o", ms=6,
                      capsize=3, label=model)  # a legend, not labels at the points: CHIAR's variants sit on top of each other
    axis.legend()
    axis.set_xlabel("attention FLOPs executed / full attention")
    axis.set_ylabel("validation perplexity" + (f" (mean and range of {seeds} seeds)" if seeds > 1 else ""))
    axis.set_title(title)
    figure.tight_layout()
    flops_path = Path(f"{path_prefix}-flops.png")
    figure.savefig(flops_path, dpi=120)
    plt.close("all")
    return [str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path) for path in (curve_path, flops_path)]


def wikitext(args, settings, save):
    data = Path(args.data_dir or ROOT.parent / "shared" / "data") / "wikitext-2"
    if not data.is_dir():
        raise SystemExit(f"WikiText-2 not found at {data}: pass --data_dir (the folder holding wikitext-2/).")
    results, tokenizer = [], None
    for seed in args.seeds:  # seed by seed: a run stopped early leaves whole seeds to compare
        for name in args.variants or LM_VARIANTS:
            out = args.results_dir / f"runs-wikitext-{args.profile}-{name}-seed{seed}"
            results.append(train_lm(name, settings, data, out, tokenizer, seed, extra_config(name, args), args.device))
            tokenizer = tokenizer or out / "tokenizer"  # the first run trains it (as a user's run would), the others reuse it
            print(json.dumps({k: v for k, v in results[-1].items() if k not in ("curve", "routing")}), flush=True)
            save(results, complete=False)
    return results


def extra_config(name, args):
    """Config entries the command line adds to variant `name`: the auxiliary-loss weight (the learned
    router with that loss only), the budget's capacity factor and the layer schedule (every routed variant)."""
    extra = {}
    if args.router_aux_loss_coef is not None and name == "chiar-learned":
        extra["router_aux_loss_coef"] = args.router_aux_loss_coef
    if args.capacity_factor is not None and name != "baseline":
        extra["router_capacity_factor"] = args.capacity_factor
    if args.layer_schedule is not None and name != "baseline":
        extra["layer_schedule"] = args.layer_schedule
    return extra or None


def seed_summary(results, metric="perplexity"):
    """Per variant over seeds: mean, min and max of each number, and the per-seed differences of the
    valid/test `metric` from the baseline and from the random control (paired: within a seed every
    variant starts from the same draw and sees the same data)."""
    by_model = {}
    for row in results:
        by_model.setdefault(row["model"], {})[row["seed"]] = row

    def spread(values):
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}

    summary = {}
    for model, rows in by_model.items():
        entry = {"seeds": sorted(rows)}
        for key in (f"valid_{metric}", f"test_{metric}", "attention_flops_fraction", "attention_query_fraction",
                    "train_seconds", "wall_seconds"):
            values = [row.get(key) for row in rows.values()]
            if all(isinstance(value, (int, float)) for value in values):  # the baseline's classifier reports no fractions
                entry[key] = spread(values)
        for reference in ("baseline", "chiar-random"):
            if model in (reference, "baseline") or reference not in by_model:  # the baseline is no CHIAR variant
                continue
            paired = sorted(set(rows) & set(by_model[reference]))
            if paired:
                for split in ("valid", "test"):
                    key = f"{split}_{metric}"
                    differences = [rows[s][key] - by_model[reference][s][key] for s in paired]
                    entry[f"{key}_minus_{reference}"] = dict(spread(differences), per_seed=differences)
        summary[model] = entry
    return summary


def classification(args, settings, task, save, results_dir):
    results = []
    quick = args.profile == "quick"
    runs = [(seed, name, overrides) for seed in args.seeds
            for name, overrides in ((name, config_overrides_argument(name)) for name in CLASSIFICATION_VARIANTS)]
    for seed, name, overrides in runs:
        # The seed sets the initial weights, the batch order, the validation split and the sampled subsets.
        out = results_dir / f"runs-{task}-{args.profile}-{name}{f'-seed{seed}' if seed else ''}"
        shutil.rmtree(out, ignore_errors=True)  # run_classification.py resumes from a checkpoint it finds there
        argv = ["--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true", "--seed", str(seed),
                "--per_device_train_batch_size", "16", "--num_train_epochs", "2" if quick else "5"]
        if overrides:
            argv += ["--config_overrides", overrides]
        if task == "imdb":
            data = Path(args.data_dir or ROOT.parent / "shared" / "data") / "imdb"
            argv += ["--train_file", str(data / "train.jsonl.gz"), "--test_file", str(data / "test.jsonl.gz"),
                     "--max_seq_length", "512" if not quick else "256"]
            if quick:
                argv += ["--max_train_samples", "4000", "--max_eval_samples", "1000", "--max_predict_samples", "2000"]
        else:
            argv += ["--dataset_name", "listops", "--listops_dir", str(results_dir / f"listops-{args.profile}")]
            if quick:
                argv += ["--listops_num_train", "4000", "--listops_num_val", "500", "--listops_num_test", "500",
                         "--listops_min_length", "100", "--listops_max_length", "300", "--max_seq_length", "512"]
        start = time.perf_counter()
        run_script("run_classification", argv)
        test = json.loads((out / "test_results.json").read_text())
        evaluation = json.loads((out / "eval_results.json").read_text())
        labels = [json.loads(line)["label"] for line in (out / "test_predictions.jsonl").read_text().splitlines()]
        results.append({"model": name, "seed": seed, "test_accuracy": test["test_accuracy"], "valid_accuracy": evaluation["eval_accuracy"],
                        "test_majority_class_accuracy": max(Counter(labels).values()) / len(labels),
                        "attention_flops_fraction": test.get("test_attention_flops_fraction"),
                        "attention_query_fraction": test.get("test_attention_query_fraction"),
                        "wall_seconds": time.perf_counter() - start})
        print(json.dumps(results[-1]), flush=True)
        save(results, complete=False)
    return results


def main():
    parser = argparse.ArgumentParser(description="CHIAR vs full attention: quality at equal data, seed and steps.")
    parser.add_argument("--task", choices=["wikitext", "imdb", "listops"], default="wikitext")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--steps", type=int, help="override the profile's training steps (wikitext)")
    parser.add_argument("--epochs", type=int, help="override the full profile's epochs (wikitext)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help=f"variants of chiar/variants.py (default: {' '.join(LM_VARIANTS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="train every variant once per seed; the JSON summarises them (default: 0 1 2)")
    parser.add_argument("--router_aux_loss_coef", type=float,
                        help="the learned router's auxiliary-loss weight (default: the config's, 5.0); recorded in the JSON")
    parser.add_argument("--capacity_factor", type=float,
                        help="the budget's router_capacity_factor for every routed variant (default: the config's, 1.0); recorded in the JSON")
    parser.add_argument("--layer_schedule", nargs="+", choices=["dct", "rbf", "attention", "routed"],
                        help="the layer schedule of every routed variant (default: the shape's, dct routed routed attention); "
                             "the baseline stays full attention; recorded in the JSON")
    parser.add_argument("--data_dir", help="folder holding wikitext-2/ and imdb/ (default ../shared/data)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--tag", default="", help="suffix for the result files (keeps an earlier run's files)")
    parser.add_argument("--results_dir", type=Path, default=RESULTS, help="where the JSON, plots and runs go (default benchmarks/results)")
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    if args.task != "wikitext" and args.profile == "epoch":
        parser.error("--profile epoch applies to --task wikitext (classification has quick and full)")
    if args.task != "wikitext" and args.router_aux_loss_coef is not None:
        parser.error("--router_aux_loss_coef applies to --task wikitext (the classification runs use the threshold router)")
    settings = dict(PROFILES[args.profile])
    if args.steps:
        settings["steps"] = args.steps
    if args.epochs:
        settings["epochs"] = args.epochs
    if args.capacity_factor is not None:
        if args.task != "wikitext":
            parser.error("--capacity_factor applies to --task wikitext")
        settings["router_capacity_factor"] = args.capacity_factor
    if args.layer_schedule is not None:
        if args.task != "wikitext":
            parser.error("--layer_schedule applies to --task wikitext")
        layers = shape(settings["shape"])["num_hidden_layers"]
        if len(args.layer_schedule) != layers:
            parser.error(f"--layer_schedule needs one entry per layer: the {settings['shape']} shape has {layers}, got {len(args.layer_schedule)}")
        settings["layer_schedule"] = args.layer_schedule
    device = torch.device(args.device)
    started = time.perf_counter()
    args.results_dir = args.results_dir.resolve()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.results_dir / f"quality-{args.task}-{args.profile}-{device.type}{'-' + args.tag if args.tag else ''}"
    machine = describe_device(device)

    def save(results, complete):  # after every variant, so a run stopped early still leaves its results
        plots = []
        if complete and args.task == "wikitext":
            epochs = settings.get("epochs")
            length = f"{settings['steps']} steps" if settings["steps"] else f"{epochs} epoch{'s' if epochs != 1 else ''}"
            plots = plot(results, prefix, f"WikiText-2, {SHAPES[settings['shape']]}, {length}")
        record = {"benchmark": "quality", "task": args.task, "profile": args.profile, "settings": settings, "device": machine,
                  **provenance(), "torch": torch.__version__, "wall_seconds": time.perf_counter() - started, "complete": complete,
                  "plots": plots, "results": results}
        if len(args.seeds) > 1:
            record["summary"] = seed_summary(results, "perplexity" if args.task == "wikitext" else "accuracy")
        Path(f"{prefix}.json").write_text(json.dumps(record, indent=2) + "\n")

    if args.task == "wikitext":
        results = wikitext(args, settings, save)
    else:
        results = classification(args, settings, args.task, save, args.results_dir)
    save(results, complete=True)
    print(f"wrote {prefix}.json")


if __name__ == "__main__":
    main()
