"""Quality of CHIAR against the full-attention model of the same shape: same data, seed and steps.

Language modelling (`--task wikitext`, default): WikiText-2 from ../shared/data/wikitext-2 (or
--data_dir), one byte-level BPE trained on its training split, v1 shape (4 layers, d=256, 4 heads,
FFN 1024), blocks of 256 tokens. Variants: the baseline, CHIAR with the threshold router, the learned
router, the random router at the same 25% attention share (the control), and the 3-operator CHIAR.
Each trains for the same steps from the same seed; the script reports validation and test
perplexity, the attention query / FLOP fractions executed on validation, training wall-clock time
and per-layer routing shares, and plots validation perplexity against step and against attention
FLOPs. With `--seeds 0 1 2` every variant trains once per seed (the seed sets the initial weights
and the batch order, the same for every variant within a seed; for classification also the
validation split and the sampled subsets), and the JSON adds a summary: each variant's mean and
range over seeds, and its per-seed differences from the baseline and from the random control,
which say whether a gap is larger than the seeds' own spread.

Classification (`--task imdb` / `--task listops`): run_classification.py for the bidirectional
CHIAR and the baseline, model selection on validation, accuracy on test.

    python benchmarks/quality.py                          # quick CPU profile, seed 0 (about 12 min on 2 cores)
    python benchmarks/quality.py --seeds 0 1 2            # the same, three seeds (about 35 min; docs/benchmarks.md)
    python benchmarks/quality.py --profile full           # GPU profile (full epochs)
    python benchmarks/quality.py --task imdb              # IMDB, quick profile
    python benchmarks/quality.py --task listops           # ListOps, quick profile

Writes benchmarks/results/quality-<task>-<profile>.json and PNG plots next to it.
"""

import argparse
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from chiar.evaluation import RoutingAccumulator
from chiar.training import train_tokenizer
from common import RESULTS, default_device, describe_device
from modeling_chiar import ChiarConfig, ChiarForCausalLM

ROOT = Path(__file__).resolve().parents[1]
LM_VARIANTS = {
    "baseline": dict(layer_schedule=["attention"] * 4),
    "chiar-threshold": dict(),
    "chiar-learned": dict(router_type="learned"),
    "chiar-learned-explore": dict(router_type="learned", router_explore=True),
    "chiar-random": dict(router_type="random"),
    "chiar-3op": dict(routed_operators=["dct", "rbf", "attention"]),
}
PROFILES = {
    "quick": dict(steps=200, batch=8, eval_every=50, eval_blocks=32, final_blocks=96, vocab=8192, lr=1e-3),
    "full": dict(steps=None, epochs=6, batch=32, eval_every=250, eval_blocks=None, final_blocks=None, vocab=16384, lr=1e-3),
}
BLOCK = 256


def blocks(tokenizer, path, limit=None):
    ids = torch.tensor(tokenizer(path.read_text(encoding="utf-8"))["input_ids"])
    data = ids[: len(ids) // BLOCK * BLOCK].view(-1, BLOCK)
    return data[:limit] if limit else data


@torch.no_grad()
def evaluate(model, data, batch, device, routing=False):
    """Perplexity of `data` (the task loss, without the router's auxiliary loss) and routing metrics."""
    model.eval()
    accumulator = RoutingAccumulator(model.config) if routing else None
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(data), batch):
        ids = data[start : start + batch].to(device)
        out = model(ids, labels=ids, output_routing=routing)
        loss = out.loss - (model.config.router_aux_loss_coef * out.aux_loss if out.aux_loss is not None else 0.0)
        tokens = ids.numel() - ids.shape[0]
        total_loss += float(loss) * tokens
        total_tokens += tokens
        if routing:
            accumulator.add(out.routing)
    model.train()
    return math.exp(total_loss / total_tokens), (accumulator.metrics() if routing else {})


def train_lm(name, settings, train, valid, test, vocab_size, pad_id, device, dtype, seed=0, probe=None, extra=None):
    """Train one variant, its config changed further by `extra` if given; `probe(step, model, output)`, if
    given, sees each step's output before backward."""
    torch.manual_seed(seed)
    overrides = dict(LM_VARIANTS[name], **(extra or {}))
    config = ChiarConfig(vocab_size=vocab_size, pad_token_id=pad_id, max_position_embeddings=BLOCK, **overrides)
    model = ChiarForCausalLM._from_config(config, attn_implementation="sdpa").to(device)
    steps = settings["steps"] or settings["epochs"] * (len(train) // settings["batch"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed)  # same batches for every variant
    curve, train_seconds = [], 0.0
    model.train()
    for step in range(1, steps + 1):
        batch = train[torch.randint(0, len(train), (settings["batch"],), generator=generator)].to(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            output = model(batch, labels=batch)
        if probe is not None:
            probe(step, model, output)
        loss = output.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - start
        if step % settings["eval_every"] == 0 or step == steps:
            ppl, _ = evaluate(model, valid[: settings["eval_blocks"]] if settings["eval_blocks"] else valid, 16, device)
            curve.append({"step": step, "valid_perplexity": ppl, "train_loss": loss.item()})
            print(f"  {name:16} seed {seed}  step {step:>6}/{steps}  train loss {loss.item():.3f}  valid ppl {ppl:8.2f}", flush=True)
    final = settings["final_blocks"]
    valid_ppl, routing = evaluate(model, valid[:final] if final else valid, 16, device, routing=True)
    test_ppl, _ = evaluate(model, test[:final] if final else test, 16, device)
    return {
        "model": name, "config_overrides": overrides, "seed": seed, "steps": steps, "train_seconds": train_seconds,
        "valid_perplexity": valid_ppl, "test_perplexity": test_ppl, "curve": curve,
        "attention_query_fraction": routing.get("attention_query_fraction"),
        "attention_flops_fraction": routing.get("attention_flops_fraction"),
        "routing": {k: v for k, v in routing.items() if k.startswith(("routing_layer", "entropy_layer"))},
        "parameters": sum(p.numel() for p in model.parameters()),
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


def load_wikitext(data_dir, vocab):
    """(train, valid, test, tokenizer): WikiText-2 in blocks of 256 tokens of a BPE trained on its training split."""
    folder = Path(data_dir or ROOT.parent / "shared" / "data") / "wikitext-2"
    if not folder.is_dir():
        raise SystemExit(f"WikiText-2 not found at {folder}: pass --data_dir (the folder holding wikitext-2/).")
    train_text = (folder / "wiki.train.tokens").read_text(encoding="utf-8")
    tokenizer = train_tokenizer((line for line in train_text.splitlines() if line.strip()), vocab)
    train, valid, test = (blocks(tokenizer, folder / f"wiki.{s}.tokens") for s in ("train", "valid", "test"))
    print(f"WikiText-2: {len(train)} / {len(valid)} / {len(test)} blocks of {BLOCK}; vocabulary {len(tokenizer)}")
    return train, valid, test, tokenizer


def wikitext(args, settings, device, dtype, save):
    train, valid, test, tokenizer = load_wikitext(args.data_dir, settings["vocab"])
    learned = None if args.router_aux_loss_coef is None else {"router_aux_loss_coef": args.router_aux_loss_coef}
    results = []
    for seed in args.seeds:  # seed by seed: a run stopped early leaves whole seeds to compare
        for name in args.variants or list(LM_VARIANTS):
            results.append(train_lm(name, settings, train, valid, test, len(tokenizer), tokenizer.pad_token_id, device, dtype,
                                    seed, extra=learned if name == "chiar-learned" else None))
            print(json.dumps({k: v for k, v in results[-1].items() if k not in ("curve", "routing")}), flush=True)
            save(results, complete=False)
    return results


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
    import sys

    sys.path.insert(0, str(ROOT))  # run_classification.py lives at the repository root
    import run_classification

    results = []
    quick = args.profile == "quick"
    runs = [(seed, name, overrides) for seed in args.seeds
            for name, overrides in (("baseline", 'layer_schedule=["attention","attention","attention","attention"]'), ("chiar", ""))]
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
        run_classification.main(argv)
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
    parser.add_argument("--variants", nargs="+", choices=list(LM_VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="train every variant once per seed; the JSON summarises them (default: 0)")
    parser.add_argument("--router_aux_loss_coef", type=float,
                        help="the learned router's auxiliary-loss weight (default: the config's, 5.0); recorded in the JSON")
    parser.add_argument("--data_dir", help="folder holding wikitext-2/ and imdb/ (default ../shared/data)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--tag", default="", help="suffix for the result files (keeps an earlier run's files)")
    parser.add_argument("--results_dir", type=Path, default=RESULTS, help="where the JSON, plots and runs go (default benchmarks/results)")
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    if args.task != "wikitext" and args.router_aux_loss_coef is not None:
        parser.error("--router_aux_loss_coef applies to --task wikitext (the classification runs use the threshold router)")
    settings = dict(PROFILES[args.profile])
    if args.steps:
        settings["steps"] = args.steps
    if args.epochs:
        settings["epochs"] = args.epochs
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    args.results_dir = args.results_dir.resolve()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.results_dir / f"quality-{args.task}-{args.profile}{'-' + args.tag if args.tag else ''}"
    machine = describe_device(device)

    def save(results, complete):  # after every variant, so a run stopped early still leaves its results
        plots = []
        if complete and args.task == "wikitext":
            length = f"{settings['steps']} steps" if settings["steps"] else f"{settings['epochs']} epochs"
            plots = plot(results, prefix, f"WikiText-2, v1 shape, {length}")
        record = {"benchmark": "quality", "task": args.task, "profile": args.profile, "settings": settings, "device": machine,
                  "torch": torch.__version__, "wall_seconds": time.perf_counter() - started, "complete": complete,
                  "plots": plots, "results": results}
        if len(args.seeds) > 1:
            record["summary"] = seed_summary(results, "perplexity" if args.task == "wikitext" else "accuracy")
        Path(f"{prefix}.json").write_text(json.dumps(record, indent=2) + "\n")

    if args.task == "wikitext":
        results = wikitext(args, settings, device, dtype, save)
    else:
        results = classification(args, settings, args.task, save, args.results_dir)
    save(results, complete=True)
    print(f"wrote {prefix}.json")


if __name__ == "__main__":
    main()
