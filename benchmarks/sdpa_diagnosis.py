"""How CHIAR's routed attention met cuDNN's SDPA on an H200: the diagnosis behind `masked_sdpa_kernels`.

The first GPU full profile (benchmarks/results/full-profile-cuda.log) found CHIAR training NaN in
bf16 and the threshold router's forward+backward 100x slower than the random router's. This script
(1) trains for 250 steps under each SDPA kernel choice and reports the first non-finite step, and
(2) times and profiles one forward+backward step. Its output, from the run before the fix, is
benchmarks/results/sdpa-diagnosis-cuda.log: NaN within 5 steps and 0.5 s steps with cuDNN allowed;
finite and fast with the other kernels. Run it again on a GPU to check the fix (the default backend
row now goes through `masked_sdpa_kernels`, so the cuDNN rows should match the others):

    python benchmarks/sdpa_diagnosis.py --data_dir ../shared/data

Training data: the raw bytes of WikiText-2's training split (vocabulary 256, no tokenizer needed).
"""
import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_chiar import ChiarConfig, ChiarForCausalLM, ChiarModel  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = DEVICE.type == "cpu"  # a smoke-sized run when there is no GPU
VARIANTS = {"baseline": dict(layer_schedule=["attention"] * 4), "random": dict(router_type="random"), "threshold": {}}
HUNTS = [  # (model, SDPA kernels allowed or None for the default order, bf16 autocast, attention implementation)
    ("random", None, True, "sdpa"),
    ("random", [SDPBackend.MATH], True, "sdpa"),
    ("random", [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION], True, "sdpa"),
    ("random", None, True, "eager"),
    ("random", None, False, "sdpa"),
    ("threshold", None, True, "sdpa"),
    ("baseline", None, True, "sdpa"),
]
PROFILES = [("threshold", 1024), ("threshold", 4096), ("random", 4096)]


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def nan_hunt(data, variant, kernels, autocast, implementation, steps=250):
    """Train on random windows of `data`; stop at the first non-finite forward output, loss or gradient."""
    torch.manual_seed(0)
    config = ChiarConfig(vocab_size=256, max_position_embeddings=256, **VARIANTS[variant])
    model = ChiarForCausalLM._from_config(config, attn_implementation=implementation).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    first_bad_module = []

    def watch(name):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            if not first_bad_module and torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                first_bad_module.append(name)

        return hook

    for name, module in model.named_modules():
        module.register_forward_hook(watch(name))
    generator = torch.Generator().manual_seed(0)
    batch, length = (4, 64) if SMALL else (32, 256)
    started = time.time()
    for step in range(1, (20 if SMALL else steps) + 1):
        starts = torch.randint(0, len(data) - length, (batch,), generator=generator)
        ids = torch.stack([data[s : s + length] for s in starts]).to(DEVICE)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1, step / 90)
        with sdpa_kernel(kernels) if kernels is not None else torch.autocast("cpu", enabled=False):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not torch.isfinite(loss) or not torch.isfinite(norm) or first_bad_module:
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            return dict(step=step, loss=loss.item(), grad_norm=norm.item(), first_nonfinite_forward=first_bad_module[:1],
                        nonfinite_grads=bad[:6])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return dict(finite_steps=step, loss=loss.item(), seconds=round(time.time() - started, 1))


def profile_step(variant, length):
    """Time a forward+backward and a no-grad train-mode forward of the body (bf16), then profile one step."""
    torch.manual_seed(0)
    config = ChiarConfig(vocab_size=8192, hidden_dropout=0.0, max_position_embeddings=length, **VARIANTS[variant])
    model = ChiarModel._from_config(config, attn_implementation="sdpa").to(DEVICE, torch.bfloat16).train()
    ids = torch.randint(0, 8192, (max(1, (4096 if SMALL else 32768) // length), length), device=DEVICE)

    def forward_backward():
        model(ids).last_hidden_state.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def train_forward():
        with torch.no_grad():
            model(ids)

    for step in (forward_backward, train_forward, forward_backward, train_forward):
        step()
    seconds = {}
    for name, step in (("fwd+bwd", forward_backward), ("train-fwd-nograd", train_forward)):
        sync()
        started = time.perf_counter()
        for _ in range(3):
            step()
        sync()
        seconds[name] = (time.perf_counter() - started) / 3
    print("TIMES", variant, length, json.dumps(seconds), flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        forward_backward()
        sync()
    key = "self_cuda_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60), flush=True)


def main():
    parser = argparse.ArgumentParser(description="SDPA kernels and CHIAR routed attention: NaN hunt and step profile.")
    parser.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()
    text = (Path(args.data_dir) / "wikitext-2" / "wiki.train.tokens").read_bytes()[:4_000_000]
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    print("device", torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", torch.__version__, flush=True)
    for variant, kernels, autocast, implementation in HUNTS:
        try:
            result = nan_hunt(data, variant, kernels, autocast, implementation)
        except Exception as error:
            result = dict(error=repr(error)[:300])
        print("NAN-HUNT", variant, implementation, kernels, "autocast" if autocast else "fp32", json.dumps(result), flush=True)
    for variant, length in PROFILES:
        try:
            profile_step(variant, length)
        except Exception:
            traceback.print_exc()


if __name__ == "__main__":
    main()
