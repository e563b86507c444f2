"""Where a forward+backward step of the model body spends its time: CHIAR vs the baseline.

Runs torch.profiler over one training step (after two warm-up steps) of the v1 body (4 layers,
d=256, 4 heads, FFN 1024) at one sequence length and groups the CPU time by kind of work: matmuls
(projections, FFN, DCT), the attention kernel, and everything else (elementwise, gathers, masks).

    python benchmarks/profile_step.py --length 4096
"""

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from modeling_chiar import ChiarConfig, ChiarModel

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
    "attention kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                         "aten::_scaled_dot_product_efficient_attention", "aten::_efficient_attention_backward",
                         "aten::_scaled_dot_product_flash_attention", "aten::_flash_attention_backward"),
}


def step_profile(variant, length, tokens):
    torch.manual_seed(0)
    schedule = {"layer_schedule": ["attention"] * 4} if variant == "baseline" else {}
    config = ChiarConfig(vocab_size=8192, hidden_dropout=0.0, max_position_embeddings=max(length, 2048), **schedule)
    model = ChiarModel._from_config(config, attn_implementation="sdpa").train()
    ids = torch.randint(0, 8192, (max(1, tokens // length), length))
    for _ in range(3):  # warm-up, and threshold calibration
        model(ids).last_hidden_state.square().mean().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(ids).last_hidden_state.square().mean().backward()
    totals = {"matmul": 0.0, "attention kernel": 0.0, "other": 0.0}
    for event in prof.key_averages():
        group = next((name for name, ops in GROUPS.items() if event.key in ops), "other")
        totals[group] += event.self_cpu_time_total / 1e6
    totals["total"] = sum(totals.values())
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    rows = {variant: step_profile(variant, args.length, args.tokens) for variant in ("baseline", "chiar")}
    print(f"{'variant':10} " + " ".join(f"{k:>17}" for k in rows["baseline"]))
    for variant, totals in rows.items():
        print(f"{variant:10} " + " ".join(f"{v:16.3f}s" for v in totals.values()))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"length": args.length, "tokens": args.tokens, "seconds": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
