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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_chiar import ChiarConfig, ChiarForCausalLM, ChiarModel
from torch.nn.attention import sdpa_kernel, SDPBackend
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = dev.type == "cpu"
V = {"baseline": dict(layer_schedule=["attention"] * 4), "random": dict(router_type="random"), "threshold": {}}
parser = argparse.ArgumentParser(description="SDPA kernels and CHIAR routed attention: NaN hunt and step profile.")
parser.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
args = parser.parse_args()
text = (Path(args.data_dir) / "wikitext-2" / "wiki.train.tokens").read_bytes()[:4_000_000]
data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()

def sync():
    if dev.type == "cuda": torch.cuda.synchronize()

def nan_hunt(variant, backend, autocast=True, steps=250, attn="sdpa"):
    torch.manual_seed(0)
    cfg = ChiarConfig(vocab_size=256, max_position_embeddings=256, **V[variant])
    model = ChiarForCausalLM._from_config(cfg, attn_implementation=attn).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    first = []
    def hook(name):
        def f(m, a, out):
            o = out[0] if isinstance(out, tuple) else out
            if not first and torch.is_tensor(o) and o.is_floating_point() and not torch.isfinite(o).all():
                first.append(name)
        return f
    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    g = torch.Generator().manual_seed(0)
    B, T = (4, 64) if SMALL else (32, 256)
    t0 = time.time()
    for step in range(1, (20 if SMALL else steps) + 1):
        starts = torch.randint(0, len(data) - T, (B,), generator=g)
        ids = torch.stack([data[s:s + T] for s in starts]).to(dev)
        for p in opt.param_groups: p["lr"] = 1e-3 * min(1, step / 90)
        ctx = sdpa_kernel(backend) if backend is not None else torch.autocast("cpu", enabled=False)
        with ctx, torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not torch.isfinite(loss) or not torch.isfinite(gn) or first:
            badg = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            return dict(step=step, loss=loss.item(), grad_norm=gn.item(), first_nonfinite_forward=first[:1], nonfinite_grads=badg[:6])
        opt.step(); opt.zero_grad(set_to_none=True)
    return dict(finite_steps=step, loss=loss.item(), seconds=round(time.time() - t0, 1))

print("device", torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch.__version__, flush=True)
for variant, backend, ac, attn in [("random", None, True, "sdpa"), ("random", [SDPBackend.MATH], True, "sdpa"),
                              ("random", [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION], True, "sdpa"),
                              ("random", None, True, "eager"), ("random", None, False, "sdpa"), ("threshold", None, True, "sdpa"), ("baseline", None, True, "sdpa")]:
    try:
        r = nan_hunt(variant, backend, ac, attn=attn)
    except Exception as e:
        r = dict(error=repr(e)[:300])
    print("NAN-HUNT", variant, attn, backend, "autocast" if ac else "fp32", json.dumps(r), flush=True)

def profile(variant, T):
    torch.manual_seed(0)
    cfg = ChiarConfig(vocab_size=8192, hidden_dropout=0.0, max_position_embeddings=T, **V[variant])
    model = ChiarModel._from_config(cfg, attn_implementation="sdpa").to(dev, torch.bfloat16).train()
    B = max(1, (4096 if SMALL else 32768) // T)
    ids = torch.randint(0, 8192, (B, T), device=dev)
    def fb():
        model(ids).last_hidden_state.float().square().mean().backward(); model.zero_grad(set_to_none=True)
    def f_train():
        with torch.no_grad(): model(ids)
    for fn in (fb, f_train): fn(); fn()
    out = {}
    for name, fn in (("fwd+bwd", fb), ("train-fwd-nograd", f_train)):
        sync(); t = time.perf_counter()
        for _ in range(3): fn()
        sync(); out[name] = (time.perf_counter() - t) / 3
    print("TIMES", variant, T, json.dumps(out), flush=True)
    from torch.profiler import profile as prof, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with prof(activities=acts) as p:
        fb(); sync()
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(p.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60), flush=True)

for variant, T in [("threshold", 1024), ("threshold", 4096), ("random", 4096)]:
    try:
        profile(variant, T)
    except Exception:
        traceback.print_exc()
