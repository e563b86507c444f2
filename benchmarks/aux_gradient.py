"""How much of the gradient the learned router's auxiliary loss makes, against the language-model loss.

Trains the learned-router CHIAR of the WikiText-2 quick profile (`quality.py`: same data, optimiser,
schedule and global gradient clipping at 1.0) and, every `--every` steps, takes the gradient of the
task loss and of the weighted auxiliary loss separately (before the step's backward, which is
unchanged). Clipping scales the whole gradient by min(1, 1 / its norm), so when the auxiliary part
dominates the norm it also shrinks every language-model update. One run per `--coefs` value.

    python benchmarks/aux_gradient.py --coefs 5 2.5 1 --steps 200

Writes benchmarks/results/aux-gradient-<device>.json (or --output).
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import quality
from common import RESULTS, default_device, describe_device


def norm(grads):
    return math.sqrt(sum(float(g.float().square().sum()) for g in grads if g is not None))


def summarise(probes, early):
    """What clipping did to the probed steps: how often it scaled the gradient down, and by how much on
    average (1 = never), over all of them and over the first `early` steps (peak learning rate)."""
    first = [p for p in probes if p["step"] <= early] or probes
    return {
        "probed_steps": len(probes),
        "share_of_probed_steps_clipped": sum(p["clip_factor"] < 1 for p in probes) / len(probes),
        "mean_clip_factor": statistics.mean(p["clip_factor"] for p in probes),
        f"mean_clip_factor_first_{early}_steps": statistics.mean(p["clip_factor"] for p in first),
        "min_clip_factor": min(p["clip_factor"] for p in probes),
        "median_aux_over_task_grad_norm": statistics.median(p["aux_grad_norm"] / p["task_grad_norm"] for p in probes),
        "max_aux_over_task_grad_norm": max(p["aux_grad_norm"] / p["task_grad_norm"] for p in probes),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coefs", type=float, nargs="+", default=[5.0, 2.5, 1.0], help="router_aux_loss_coef values")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=5, help="probe every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--early", type=int, default=60, help="the summary's early window, in steps (warm-up and peak learning rate)")
    parser.add_argument("--data_dir", help="folder holding wikitext-2/ (default ../shared/data)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = dict(quality.PROFILES["quick"], steps=args.steps)
    train, valid, test, tokenizer = quality.load_wikitext(args.data_dir, settings["vocab"])
    started, runs = time.perf_counter(), []
    for coef in args.coefs:
        probes = []

        def probe(step, model, output):
            if step % args.every and step != 1:
                return
            params = [p for p in model.parameters() if p.requires_grad]
            gate = {id(p) for name, p in model.named_parameters() if ".router." in name}
            aux = coef * output.aux_loss
            lm_grads = torch.autograd.grad(output.loss - aux, params, retain_graph=True, allow_unused=True)
            aux_grads = torch.autograd.grad(aux, params, retain_graph=True, allow_unused=True)
            total = norm([a if b is None else (b if a is None else a + b) for a, b in zip(lm_grads, aux_grads)])
            probes.append({
                "step": step, "task_loss": float(output.loss - aux), "weighted_aux_loss": float(aux),
                "task_grad_norm": norm(lm_grads), "aux_grad_norm": norm(aux_grads),
                "aux_grad_norm_on_gates": norm([g for p, g in zip(params, aux_grads) if id(p) in gate]),
                "total_grad_norm": total, "clip_factor": min(1.0, 1.0 / total),
            })

        row = quality.train_lm("chiar-learned", settings, train, valid, test, len(tokenizer), tokenizer.pad_token_id,
                               device, dtype, args.seed, probe=probe, extra={"router_aux_loss_coef": coef})
        summary = dict(summarise(probes, args.early), router_aux_loss_coef=coef,
                       valid_perplexity=row["valid_perplexity"], test_perplexity=row["test_perplexity"],
                       eval_attention_share_per_layer=[row["routing"].get(f"routing_layer{i}_attention", 0.0) for i in range(4)])
        print(json.dumps(summary), flush=True)
        runs.append(dict(summary, probes=probes))
    output = args.output or RESULTS / f"aux-gradient-{device.type}.json"
    output.write_text(json.dumps({"benchmark": "aux_gradient", "device": describe_device(device), "torch": torch.__version__,
                                  "seed": args.seed, "steps": args.steps, "wall_seconds": time.perf_counter() - started,
                                  "runs": runs}, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
