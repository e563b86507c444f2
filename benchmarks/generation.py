"""Decoding speed of CHIAR against the full-attention model of the same shape, cached and uncached.

For each context length, every model is prefilled with a random prompt of that length (not timed)
and then decodes `--steps` tokens greedily, one forward per token:
- cached: each step feeds one token and the model's `ChiarCache` (attention layers read the keys of
  the whole context, DCT and RBF tokens read nothing or a fixed-size state);
- uncached: each step recomputes the whole sequence (the cost a model without a cache pays).
Models are timed in interleaved rounds (A B A B ...), warm-up excluded; the table shows the median
tokens/s over rounds and the speed-up over the baseline as the median of the per-round ratios
(`common.paired_speedup`).

    python benchmarks/generation.py                       # quick CPU profile
    python benchmarks/generation.py --profile full        # GPU profile (longer contexts, more steps)

Writes JSON (and prints a table) to benchmarks/results/generation-<device>.json unless --output is given.
"""

import json
import statistics
import time

import torch

from chiar.variants import variant_config
from common import RESULTS, calibrated_model, describe_device, paired_speedup, provenance, sync, timing_parser, timing_settings
from modeling_chiar import ChiarForCausalLM

PROFILES = {
    "quick": dict(lengths=[256, 1024, 2048], steps=32, uncached_steps=4, rounds=5, batch=1),
    "full": dict(lengths=[1024, 4096, 16384], steps=128, uncached_steps=8, rounds=5, batch=8),
}

VARIANTS = ["baseline", "chiar-threshold", "chiar-3op", "chiar-random"]  # names in chiar/variants.py


def build(name, max_length, device, dtype):
    config = variant_config(name, vocab_size=8192, hidden_dropout=0.0, max_position_embeddings=max_length)
    return calibrated_model(ChiarForCausalLM, config, device, dtype).eval()


@torch.inference_mode()
def time_decoding(model, prompt, steps, cached, device):
    """Seconds per generated token (batch rows count as tokens), prefill excluded."""
    if cached:
        out = model(prompt, use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        token = out.logits[:, -1:].argmax(-1)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        sync(device)
    else:
        ids = prompt
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(ids).logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, token], dim=1)
        sync(device)
    return (time.perf_counter() - start) / (steps * prompt.shape[0])


def main():
    args = timing_parser("CHIAR vs full attention: decoding tokens/s, cached and uncached.", PROFILES, VARIANTS).parse_args()
    settings, device, dtype = timing_settings(args, PROFILES)
    max_length = max(settings["lengths"]) + settings["steps"] + 8
    models = {name: build(name, max_length, device, dtype) for name in args.variants}
    machine = describe_device(device)
    output = args.output or RESULTS / f"generation-{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)

    def write(complete):  # after every context length, so a run stopped early still leaves its rows
        result = {
            "benchmark": "generation", **provenance(), "profile": args.profile, "device": machine, "dtype": str(dtype),
            "torch": torch.__version__, "settings": settings, "shape": "4 layers, d=256, 4 heads, FFN 1024, vocab 8192",
            "complete": complete, "rows": rows,
        }
        output.write_text(json.dumps(result, indent=2) + "\n")

    rows = []
    for length in settings["lengths"]:
        prompt = torch.randint(0, 8192, (settings["batch"], length), generator=torch.Generator().manual_seed(length)).to(device)
        for cached in (True, False):
            steps = settings["steps"] if cached else settings["uncached_steps"]
            timings = {name: [] for name in models}
            for round_index in range(settings["rounds"] + 1):  # round 0 is warm-up
                for name, model in models.items():
                    seconds = time_decoding(model, prompt, steps, cached, device)
                    if round_index:
                        timings[name].append(seconds)
            base = timings.get("baseline")
            for name, values in timings.items():
                median = statistics.median(values)
                speedup = paired_speedup(base, values) if base else None
                rows.append({
                    "context": length, "cached": cached, "model": name,
                    "tokens_per_s": 1.0 / median,
                    "speedup_vs_baseline": speedup,
                    "speedup_ratio_of_medians": statistics.median(base) / median if base else None,
                    "seconds_per_token_all_rounds": values,
                })
                print(f"T={length:>6} {'cached  ' if cached else 'uncached'} {name:13} {1.0 / median:9.1f} tok/s"
                      + (f"  x{speedup:.2f} vs baseline" if base else ""), flush=True)
        write(complete=False)
    write(complete=True)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
