"""Where CHIAR's training step spends its time, layer by layer, and what a speed-up target would need.

Forward+backward timings at one sequence length (4,096 tokens per batch), interleaved rounds,
medians, first round warm-up, all against the full-attention baseline measured in the same run
(ratios: medians of per-round ratios, `common.paired_speedup`):

- body: the baseline, CHIAR (threshold router at 25%) and the *floor*: CHIAR with its two routed
  layers replaced by DCT layers (`["dct", "dct", "dct", "attention"]`), what CHIAR would cost if
  routing and its 25% of attention were free;
- one layer's token mixer, fed the same hidden states (CHIAR's layer-1 input): full attention
  (the baseline's), routed (CHIAR's) and DCT; and the keys and values a routed layer must make for
  every token (k and v projections, RoPE on k), which no kernel can save;
- the attention kernel alone: causal SDPA over every token against CHIAR's blocked, masked SDPA
  over the routed queries (the same positions, the same `query_blocks` and `PrefixViews`), and the
  same with smaller blocks (`--other_block`, default 64);
- arithmetic on those: the share of the causal kernel's scores the routed queries can see, and the
  speed-up CHIAR's body would have if its two routed layers' kernels computed exactly those scores
  at the causal kernel's speed per score (the best a block-sparse kernel could do): each body
  round's CHIAR time less, per routed layer, the kernel time that would save; and a bound: the
  floor plus, per routed layer, only its keys and values and those scores at that speed.

    python benchmarks/breakdown.py --length 4096 --rounds 20 --output benchmarks/results/breakdown-4096-cpu.json
    python benchmarks/breakdown.py --length 256 --rounds 20 --target 1.15 --other_block 32 --output benchmarks/results/breakdown-256-cpu.json
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from common import calibrated_model, describe_device, default_device, interleaved_rounds, paired_speedup
from modeling_chiar import ChiarConfig, ChiarModel
from modeling_chiar.modeling_chiar import gather_selected
from modeling_chiar.operator_attention import PrefixViews, apply_rotary, masked_sdpa_kernels, query_blocks

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

    `block`: the largest query block given to `query_blocks` (the model's own is 256).
    """
    batch = routed_positions.shape[0]
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, requires_grad=True) for _ in range(3))
    positions = routed_positions.to(device)
    num_queries = positions.shape[1]
    # A block sees the keys up to the latest position among its slots (fillers included), as in the model.
    blocks = [(start, end, int(positions[:, :end].max()) + 1) for start, end in query_blocks(num_queries, block=block)]
    queries = q[:, :, :num_queries]  # which rows do not matter for the cost; their positions do

    def causal():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def routed():
        # As the model: key and value prefixes through PrefixViews (one gradient buffer in backward).
        prefixes = PrefixViews.apply([keys for _, _, keys in blocks], k, v)
        block_queries = queries.split([end - start for start, end, _ in blocks], dim=2)
        outputs = []
        with masked_sdpa_kernels("sdpa", device):  # the kernels the model's masked calls may use
            for i, (start, end, keys) in enumerate(blocks):
                mask = torch.arange(keys, device=device)[None, None, :] <= positions[:, start:end, None]
                outputs.append(F.scaled_dot_product_attention(
                    block_queries[i], prefixes[2 * i], prefixes[2 * i + 1], attn_mask=mask[:, None]
                ))
            torch.cat(outputs, dim=2).sum().backward()

    return causal, routed


def keys_and_values(attention, x, rope):
    """The part of a routed layer the spec fixes whatever the kernel: k and v projected (k rotated)
    for every token, forward and backward (from fixed output gradients: no loss ops timed)."""
    with torch.no_grad():
        shape = attention._heads(attention.k_proj(x)).shape
    grads = [torch.randn(shape, device=x.device, dtype=x.dtype) for _ in range(2)]

    def step():
        keys = apply_rotary(attention._heads(attention.k_proj(x)), *rope)
        values = attention._heads(attention.v_proj(x))
        torch.autograd.backward([keys, values], grads)

    return step


def medians(times):
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--target", type=float, default=1.7, help="speed-up over the baseline to budget for")
    parser.add_argument("--other_block", type=int, default=64, help="the smaller query blocks the kernel is also timed with")
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
    routed_layers = chiar.config.layer_schedule.count("routed")
    x, ctx = capture_mixer_input(chiar, ids)
    x = x.clone().requires_grad_(True)
    routed_mixer, dct_mixer, full_mixer = chiar.layers[1].mixer, chiar.layers[0].mixer, baseline.layers[1].mixer
    mixer_rounds = interleaved_rounds({
        "full attention (baseline)": backward_of(lambda: full_mixer(x, ctx)[0]),
        "routed (CHIAR)": backward_of(lambda: routed_mixer(x, ctx)[0]),
        "dct": backward_of(lambda: dct_mixer(x, ctx)[0]),
        "keys and values of every token": keys_and_values(routed_mixer.attention, x, ctx.rope),
    }, args.rounds, device)
    mixers = medians(mixer_rounds)

    with torch.no_grad():
        routing = chiar(ids, output_routing=True).routing[1]
    attention_id = routing.operators.index("attention")
    selected = routing.operator_ids == attention_id
    # The query slots the model itself runs: rows padded with filler positions to the longest row.
    positions, valid, _ = gather_selected(selected)
    shape = (positions, args.length, chiar.config.num_attention_heads, chiar.config.head_dim, device)
    causal, routed = kernel_steps(*shape)
    _, routed_small_blocks = kernel_steps(*shape, block=args.other_block)
    small = f"same, blocks of at most {args.other_block}"
    kernel_rounds = interleaved_rounds({"causal, every token": causal, "blocked masked, routed 25%": routed,
                                        small: routed_small_blocks}, args.rounds, device)
    kernels = medians(kernel_rounds)
    # Scores a routed query at position p can see: p + 1; the causal kernel computes T (T + 1) / 2 per row.
    visible = float(((positions + 1) * valid).sum()) / positions.shape[0] / (args.length * (args.length + 1) / 2)
    # What such a kernel would save per routed layer (paired by kernel round), taken off each body round.
    saving = statistics.median(r - visible * c for r, c in zip(kernel_rounds["blocked masked, routed 25%"],
                                                               kernel_rounds["causal, every token"]))
    ideal = statistics.median(b / (c - routed_layers * saving) for b, c in zip(body_rounds["baseline"], body_rounds["chiar-threshold"]))

    # Upper bound: routed layers that cost a DCT layer plus only what no kernel can save (keys and
    # values for every token) and the visible scores at the causal kernel's speed.
    bound = statistics.median(
        b / (f + routed_layers * (visible * c + kv)) for b, f, c, kv in zip(
            body_rounds["baseline"], body_rounds["floor (routed layers as DCT)"],
            kernel_rounds["causal, every token"], mixer_rounds["keys and values of every token"]))

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
            "routed layer above a DCT layer (s, in the body)": (body["chiar-threshold"] - floor) / routed_layers,
            "visible scores of the routed queries / causal kernel's scores": visible,
            "chiar vs baseline with a kernel computing only those, at the causal kernel's speed (estimate)": ideal,
            "chiar vs baseline if a routed layer cost a DCT layer, its keys and values and those scores (bound)": bound,
            f"routed layer above a DCT layer for {args.target}x (s)": (needed - floor) / routed_layers,
            "routed mixer / full attention mixer": 1 / paired_speedup(mixer_rounds["full attention (baseline)"], mixer_rounds["routed (CHIAR)"]),
            "routed kernel / causal kernel": 1 / paired_speedup(kernel_rounds["causal, every token"], kernel_rounds["blocked masked, routed 25%"]),
            f"routed kernel, blocks of at most {args.other_block} / causal kernel":
                1 / paired_speedup(kernel_rounds["causal, every token"], kernel_rounds[small]),
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
