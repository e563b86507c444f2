"""Attention work of the default CHIAR model relative to the same-shape full-attention model.

Runs the v1 shape (4 layers, d=256, 4 heads) with the threshold router calibrated to 25% attention
on random tokens, then reports, from the model's own accounting (`routing_report`), the share of
attention queries and the share of attention FLOPs actually executed, for each sequence length, and
the share of the whole body's FLOPs (token operators, routing, FFNs).

    python benchmarks/flops_fraction.py --lengths 256 1024 2048 --output benchmarks/results/flops_fraction.json
"""

import argparse
import json
from pathlib import Path

import torch

from modeling_chiar import ChiarConfig, ChiarModel, routing_report


def measure(length, implementation, calibration_batches=8, seed=0):
    torch.manual_seed(seed)
    config = ChiarConfig(vocab_size=8192, hidden_dropout=0.0, max_position_embeddings=max(length, 2048))
    model = ChiarModel._from_config(config, attn_implementation=implementation)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(calibration_batches):
            model(torch.randint(0, 8192, (2, length), generator=generator))
        model.eval()
        out = model(torch.randint(0, 8192, (1, length), generator=generator), output_routing=True)
    report = routing_report(out.routing, model.config)
    return {
        "length": length,
        "attn_implementation": implementation,
        "attention_query_fraction": round(report["attention_query_fraction"], 4),
        "attention_flops_fraction": round(report["attention_flops_fraction"], 4),
        "total_flops_fraction": round(report["total_flops_fraction"], 4),
        "attention_shares": [round(layer["shares"].get("attention", 0.0), 4) for layer in report["layers"]],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--implementations", nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    rows = [measure(length, impl) for impl in args.implementations for length in args.lengths]
    print(f"{'impl':6} {'T':>6} {'query fraction':>15} {'FLOPs fraction':>15} {'body FLOPs':>11}  attention share per layer")
    for row in rows:
        print(f"{row['attn_implementation']:6} {row['length']:>6} {row['attention_query_fraction']:>15.3f} "
              f"{row['attention_flops_fraction']:>15.3f} {row['total_flops_fraction']:>11.3f}  {row['attention_shares']}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
