"""Attention work and overflow of the default CHIAR model against the same-shape full-attention model.

Runs the v1 shape (4 layers, d=256, 4 heads) with the threshold router calibrated to 25% attention
on random tokens, then reports, from the model's own accounting (`routing_report`), for each sequence
length and budget capacity factor: the share of attention queries, the share of attention FLOPs
actually executed, the share of the whole body's FLOPs (token operators, routing, FFNs), and per
routed layer the attention share, the overflow (real tokens that asked for attention and took DCT)
and the share of the budget's slots left unused.

    python benchmarks/flops_fraction.py --lengths 256 1024 2048 4096 --capacity_factors 1.0 1.125 1.25 \
        --output benchmarks/results/flops_fraction.json
"""

import argparse
import json
from pathlib import Path

import torch

from common import provenance
from chiar.variants import variant_config
from modeling_chiar import ChiarModel, routing_report


def measure(length, implementation, capacity_factor, sequences, calibration_batches=8, seed=0):
    torch.manual_seed(seed)
    config = variant_config("chiar-threshold", vocab_size=8192, hidden_dropout=0.0, max_position_embeddings=max(length, 2048),
                            router_capacity_factor=capacity_factor)
    model = ChiarModel._from_config(config, attn_implementation=implementation)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(calibration_batches):
            model(torch.randint(0, 8192, (2, length), generator=generator))
        model.eval()
        out = model(torch.randint(0, 8192, (sequences, length), generator=generator), output_routing=True)
    report = routing_report(out.routing, model.config)
    routed = [layer for layer in report["layers"] if len(layer["operators"]) > 1]
    return {
        "length": length,
        "attn_implementation": implementation,
        "capacity_factor": capacity_factor,
        "attention_query_fraction": round(report["attention_query_fraction"], 4),
        "attention_flops_fraction": round(report["attention_flops_fraction"], 4),
        "total_flops_fraction": round(report["total_flops_fraction"], 4),
        "attention_shares": [round(layer["shares"].get("attention", 0.0), 4) for layer in report["layers"]],
        "overflow": [round(layer["overflow"]["attention"], 4) for layer in routed],
        "unused_slots": [round(layer["unused_slots"]["attention"], 4) for layer in routed],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--implementations", nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--capacity_factors", type=float, nargs="+", default=[1.0])
    parser.add_argument("--sequences", type=int, default=4, help="held-out sequences measured per row")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    rows = [
        measure(length, impl, factor, args.sequences)
        for factor in args.capacity_factors
        for impl in args.implementations
        for length in args.lengths
    ]
    print(f"{'factor':>6} {'impl':6} {'T':>6} {'queries':>8} {'attn FLOPs':>11} {'body FLOPs':>11}  attention share / overflow per layer")
    for row in rows:
        print(f"{row['capacity_factor']:>6} {row['attn_implementation']:6} {row['length']:>6} {row['attention_query_fraction']:>8.3f} "
              f"{row['attention_flops_fraction']:>11.3f} {row['total_flops_fraction']:>11.3f}  {row['attention_shares']} / {row['overflow']}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        result = {"benchmark": "flops_fraction", **provenance(), "torch": torch.__version__, "sequences": args.sequences, "rows": rows}
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
