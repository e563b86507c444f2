"""Where CHIAR's training step spends its time, layer by layer, and what a speed-up target would need.

Forward+backward timings at one sequence length (4,096 tokens per batch), interleaved rounds,
medians, first round warm-up, all against the full-attention baseline measured in the same run
(ratios: medians of per-round ratios, `common.paired_speedup`):

- body: the baseline, CHIAR (threshold router at 25%) and the *floor*: CHIAR with its two routed
  layers replaced by DCT layers (`["dct", "dct", "dct", "attention"]`), what CHIAR would cost if
  routing and its 25% of attention were free;
- one layer's token mixer, fed the same hidden states (CHIAR's layer-1 input): full attention
  (the baseline's), routed (CHIAR's) and DCT;
- the attention kernel alone: causal SDPA over every token against CHIAR's blocked, masked SDPA
  over the routed queries (the same positions, the same `query_blocks`), and the same with the
  smaller blocks of 64 queries the model used before.

    python benchmarks/breakdown.py --length 4096 --output benchmarks/results/breakdown-4096-cpu.json
    python benchmarks/breakdown.py --length 256 --target 1.15 --output benchmarks/results/breakdown-256-cpu.json
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from common import calibrated_model, describe_device, default_device, interleaved_rounds, paired_speedup
from modeling_chiar import ChiarConfig, ChiarModel
from modeling_chiar.operator_attention import masked_sdpa_kernels, query_blocks

SCHEDULES = {
    "baseline": ["attention"] * 4,
    "chiar-threshold": None,  # the default schedule: dct, routed, routed, attention
    "floor (routed layers as DCT)": ["dct", "dct", "dct", "attention"],
}
VOCAB = 8192


def build(schedule, length, device):
    extra = {} if schedule is None else {"layer_schedule": schedule}
    config = ChiarConfig(vocab_size=VOCAB, hidden_dropout=0.0, max_position_embeddings=max(length, 2048), **extra)
    return calibrated_model(ChiarModel, config, device)


def capture_mixer_input(model, ids, layer=1):
    """(normalised input, MixContext) that `model.layers[layer].mixer` sees on `ids`."""
    seen = {}
    mixer = model.layers[layer].mixer
    original = mixer.forward

    def record(x, ctx):
        seen["x"], seen["ctx"] = x.detach(), ctx
        return original(x, ctx)

    mixer.forward = record
    try:
        with torch.no_grad():
            model(ids)
    finally:
        mixer.forward = original
    return seen["x"], seen["ctx"]


def backward_of(fn):
    def step():
        fn().float().square().mean().backward()

    return step


def kernel_steps(routed_positions, length, heads, head_dim, device, block=256):
    """Causal SDPA over every token, and the routed queries' blocked masked SDPA, on random q, k, v.

    `block`: the query block size given to `query_blocks` (the model's own is 256; 64 was the old one).
    """
    batch = routed_positions.shape[0]
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, requires_grad=True) for _ in range(3))
    positions = routed_positions.to(device)
    num_queries = positions.shape[1]
    blocks = [(start, end, int(positions[:, end - 1].max()) + 1) for start, end in query_blocks(num_queries, block=block)]
    queries = q[:, :, :num_queries]  # which rows do not matter for the cost; their positions do

    def causal():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def routed():
        outputs = []
        with masked_sdpa_kernels("sdpa", device):  # the kernels the model's masked calls may use
            for start, end, keys in blocks:
                mask = torch.arange(keys, device=device)[None, None, :] <= positions[:, start:end, None]
                outputs.append(F.scaled_dot_product_attention(
                    queries[:, :, start:end], k[:, :, :keys], v[:, :, :keys], attn_mask=mask[:, None]
                ))
            torch.cat(outputs, dim=2).sum().backward()

    return causal, routed


def medians(times):
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--target", type=float, default=1.7, help="speed-up over the baseline to budget for")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    ids = torch.randint(0, VOCAB, (max(1, args.tokens // args.length), args.length), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)

    models = {name: build(schedule, args.length, device) for name, schedule in SCHEDULES.items()}
    body_rounds = interleaved_rounds({name: backward_of(lambda m=m: m(ids).last_hidden_state) for name, m in models.items()}, args.rounds, device)
    body = medians(body_rounds)

    chiar, baseline = models["chiar-threshold"], models["baseline"]
    x, ctx = capture_mixer_input(chiar, ids)
    x = x.clone().requires_grad_(True)
    routed_mixer, dct_mixer, full_mixer = chiar.layers[1].mixer, chiar.layers[0].mixer, baseline.layers[1].mixer
    mixer_rounds = interleaved_rounds({
        "full attention (baseline)": backward_of(lambda: full_mixer(x, ctx)[0]),
        "routed (CHIAR)": backward_of(lambda: routed_mixer(x, ctx)[0]),
        "dct": backward_of(lambda: dct_mixer(x, ctx)[0]),
    }, args.rounds, device)
    mixers = medians(mixer_rounds)

    with torch.no_grad():
        routing = chiar(ids, output_routing=True).routing[1]
    attention_id = routing.operators.index("attention")
    selected = routing.operator_ids == attention_id
    count = int(selected.sum(dim=1).min())  # same count per row, for a rectangular batch
    positions = torch.stack([row.nonzero().squeeze(1)[:count] for row in selected])
    shape = (positions, args.length, chiar.config.num_attention_heads, chiar.config.head_dim, device)
    causal, routed = kernel_steps(*shape)
    _, routed_small_blocks = kernel_steps(*shape, block=64)
    kernel_rounds = interleaved_rounds({"causal, every token": causal, "blocked masked, routed 25%": routed,
                           "same, 64-query blocks": routed_small_blocks}, args.rounds, device)
    kernels = medians(kernel_rounds)

    needed = body["baseline"] / args.target
    floor = body["floor (routed layers as DCT)"]
    result = {
        "benchmark": "breakdown",
        "device": describe_device(device),
        "torch": torch.__version__,
        "length": args.length,
        "batch": ids.shape[0],
        "rounds": args.rounds,
        "seconds": {"body": body, "mixer": mixers, "kernel": kernels},
        "seconds_all_rounds": {"body": body_rounds, "mixer": mixer_rounds, "kernel": kernel_rounds},
        "ratios": {
            "chiar vs baseline": paired_speedup(body_rounds["baseline"], body_rounds["chiar-threshold"]),
            "floor vs baseline": paired_speedup(body_rounds["baseline"], body_rounds["floor (routed layers as DCT)"]),
            "routed layer above a DCT layer (s, in the body)": (body["chiar-threshold"] - floor) / 2,
            f"routed layer above a DCT layer for {args.target}x (s)": (needed - floor) / 2,
            "routed mixer / full attention mixer": 1 / paired_speedup(mixer_rounds["full attention (baseline)"], mixer_rounds["routed (CHIAR)"]),
            "routed kernel / causal kernel": 1 / paired_speedup(kernel_rounds["causal, every token"], kernel_rounds["blocked masked, routed 25%"]),
            "routed kernel, 64-query blocks / causal kernel": 1 / paired_speedup(kernel_rounds["causal, every token"], kernel_rounds["same, 64-query blocks"]),
        },
    }
    for group, values in result["seconds"].items():
        for name, seconds in values.items():
            print(f"{group:7} {name:32} {seconds * 1000:8.1f} ms")
    for name, value in result["ratios"].items():
        print(f"{name:48} {value:.3f}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
