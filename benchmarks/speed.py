"""Speed, memory and executed FLOPs of CHIAR against the full-attention model of the same shape.

v1 shape: 4 layers, d=256, 4 heads, FFN 1024. For each sequence length, every variant runs the
model body (`ChiarModel`) and the causal LM with an 8,192-token vocabulary (a 50k head would
dominate a 4-layer model and hide the operators), forward only (eval, inference mode) and
forward+backward (train mode, dropout off). Variants are timed in interleaved rounds
(A B C D A B C D ...), the first round is warm-up, and the table reports median tokens/s and the
speed-up over the baseline as the median of the per-round ratios (`common.paired_speedup`). Memory: peak allocated on GPU; on CPU, the bytes of
tensors saved for backward (activation memory), which is what routing changes. FLOP fractions come
from the model's own accounting (`routing_report`) on the same inputs.

    python benchmarks/speed.py                    # quick profile (CPU): T = 256, 1024, 4096
    python benchmarks/speed.py --profile full     # GPU: T = 256, 1024, 4096, 16384, bf16
    python benchmarks/speed.py --modes eager compiled --variants baseline chiar-threshold

`--modes compiled` adds rows for `torch.compile(model, fullgraph=True)` (inductor, one graph per length
and mode), compared with the compiled baseline; each row records its compile time (the first call,
which compiles, minus a timed call). Memory is measured in eager mode only.

Results go to benchmarks/results/speed-<device>.json.
"""

import json
import statistics
import time

import torch

from common import (RESULTS, calibrated_model, describe_device, interleaved_rounds, paired_speedup, provenance, sync, timing_parser,
                    timing_settings)
from chiar.variants import variant_config
from modeling_chiar import ChiarForCausalLM, ChiarModel, routing_report

PROFILES = {
    "quick": dict(lengths=[256, 1024, 4096], tokens_per_batch=4096, rounds=5),
    "full": dict(lengths=[256, 1024, 4096, 16384], tokens_per_batch=32768, rounds=7),
}
VARIANTS = ["baseline", "chiar-threshold", "chiar-random", "chiar-3op"]  # names in chiar/variants.py
VOCAB = 8192


def build(model_class, variant, max_length, device, dtype):
    config = variant_config(variant, vocab_size=VOCAB, hidden_dropout=0.0, max_position_embeddings=max_length)
    return calibrated_model(model_class, config, device, dtype)


def timed(step, device):
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def run_once(model, ids, backward):
    if backward:
        model.train()
        out = model(ids)
        value = out.logits if hasattr(out, "logits") else out.last_hidden_state
        value.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    else:
        model.eval()
        with torch.inference_mode():
            model(ids)


def saved_activation_bytes(model, ids):
    """Bytes of distinct tensor storages autograd saves for the backward pass."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids)
        value = out.logits if hasattr(out, "logits") else out.last_hidden_state
        value.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def peak_memory(model, ids, backward, device):
    if device.type != "cuda":
        return saved_activation_bytes(model, ids) if backward else None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run_once(model, ids, backward)
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def main():
    parser = timing_parser("CHIAR vs full attention: tokens/s, memory and executed FLOPs.", PROFILES, VARIANTS)
    parser.add_argument("--targets", nargs="+", default=["body", "lm"], choices=["body", "lm"])
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"],
                        help="eager, and/or torch.compile(fullgraph=True)")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend of the compiled rows")
    args = parser.parse_args()
    settings, device, dtype = timing_settings(args, PROFILES)
    max_length = max(settings["lengths"])
    machine = describe_device(device)
    output = args.output or RESULTS / f"speed-{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)

    def write(complete):  # after every length, so a run stopped early still leaves its rows
        result = {"benchmark": "speed", **provenance(), "profile": args.profile, "device": machine, "dtype": str(dtype), "torch": torch.__version__,
                  "shape": "4 layers, d=256, 4 heads, FFN 1024; LM vocabulary 8192", "settings": settings,
                  "compile_backend": args.compile_backend if "compiled" in args.modes else None,
                  "complete": complete, "rows": rows}
        output.write_text(json.dumps(result, indent=2) + "\n")

    rows = []
    for target in args.targets:
        model_class = ChiarModel if target == "body" else ChiarForCausalLM
        models = {name: build(model_class, name, max_length, device, dtype) for name in args.variants}
        for length in settings["lengths"]:
            batch = max(1, settings["tokens_per_batch"] // length)
            ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length)).to(device)
            fractions = {}
            for name, model in models.items():
                model.eval()
                with torch.inference_mode():
                    routing = model(ids, output_routing=True).routing
                fractions[name] = routing_report(routing, model.config)
            for mode in args.modes:
                runners = models
                if mode == "compiled":
                    torch._dynamo.reset()
                    runners = {name: torch.compile(model, fullgraph=True, dynamic=False, backend=args.compile_backend)
                               for name, model in models.items()}
                for backward in (False, True):
                    compile_seconds = {}
                    if mode == "compiled":  # the first call compiles; a second one is what a step costs
                        for name, runner in runners.items():
                            first = timed(lambda r=runner: run_once(r, ids, backward), device)
                            compile_seconds[name] = first - timed(lambda r=runner: run_once(r, ids, backward), device)
                    steps = {name: (lambda m=runner: run_once(m, ids, backward)) for name, runner in runners.items()}
                    times = interleaved_rounds(steps, settings["rounds"], device)
                    base = times.get("baseline")
                    measure_memory = mode == "eager"
                    base_memory = peak_memory(models["baseline"], ids, backward, device) if "baseline" in models and measure_memory else None
                    for name, model in models.items():
                        median = statistics.median(times[name])
                        memory = peak_memory(model, ids, backward, device) if measure_memory else None
                        report = fractions[name]
                        row = {
                            "target": target, "length": length, "batch": batch, "mode": "fwd+bwd" if backward else "fwd",
                            "compiled": mode == "compiled", "compile_seconds": compile_seconds.get(name),
                            "model": name, "tokens_per_s": batch * length / median,
                            "speedup_vs_baseline": paired_speedup(base, times[name]) if base else None,
                            "speedup_ratio_of_medians": statistics.median(base) / median if base else None,
                            "memory_bytes": memory, "memory_vs_baseline": (memory / base_memory) if memory and base_memory else None,
                            "attention_query_fraction": report["attention_query_fraction"],
                            "attention_flops_fraction": report["attention_flops_fraction"],
                            "total_flops_fraction": report["total_flops_fraction"],
                            "attention_shares": [layer["shares"].get("attention", 0.0) for layer in report["layers"]],
                            "overflow": [layer["overflow"].get("attention", 0.0) for layer in report["layers"]],
                            "seconds_all_rounds": times[name],
                        }
                        rows.append(row)
                        print(f"{target:4} T={length:>5} {mode:8} {row['mode']:7} {name:16} {row['tokens_per_s']:10.0f} tok/s "
                              f"x{row['speedup_vs_baseline']:.2f}  attn-FLOPs {row['attention_flops_fraction']:.3f} "
                              f"total-FLOPs {row['total_flops_fraction']:.3f}"
                              + (f"  mem x{row['memory_vs_baseline']:.2f}" if row["memory_vs_baseline"] else "")
                              + (f"  compile {row['compile_seconds']:.0f}s" if row["compile_seconds"] is not None else ""), flush=True)
                write(complete=False)
        del models
    write(complete=True)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
