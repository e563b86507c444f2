"""The model's invariants on an accelerator: every variant of the test harness, run on `--device`.

The test suite runs on the CPU; this script runs the properties that could break on a GPU (other
kernels, other reduction orders, bf16) over the same variants (chiar/variants.py, on the tests' shape):

- causality: changing future tokens leaves earlier logits unchanged (eval and train mode);
- cached greedy decoding produces the same tokens as uncached decoding;
- the device agrees with the CPU: same routing decisions, same logits (fp32);
- bf16 autocast forward+backward of the LM and the bidirectional classifier is finite;
- SDPA's kernels give the gradients of the eager reference (fp32), at lengths that put routed key
  blocks on both sides of 64 mod 128 (pytorch#196678: cuDNN's masked backward returns NaN there);
- 60 bf16 training steps of the v1 shape (threshold router, 320 tokens) stay finite: the run that
  went NaN within 5 steps on an H200 before masked calls stopped using cuDNN.

    python benchmarks/device_check.py                 # on cuda when there is one
    python benchmarks/device_check.py --output check.json

Exits non-zero when a check fails; writes every check's result as JSON.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from chiar.variants import VARIANTS, build, random_ids, variant_config
from common import default_device, describe_device
from modeling_chiar import ChiarForCausalLM, ChiarForSequenceClassification


def causality(model, device, mode):
    """Largest change of the first 30 positions' logits when positions 30.. change (dropout is off)."""
    getattr(model, mode)()
    ids = random_ids(1, 48, seed=1)
    changed = ids.clone()
    changed[:, 30:] = random_ids(1, 18, seed=2)
    # One forward over both rows: train-mode threshold calibration cannot differ between them.
    with torch.no_grad():
        out = model(torch.cat([ids, changed]).to(device)).logits[:, :30]
    return (out[0] - out[1]).abs().max().item()


def cache_agreement(model, device):
    model.eval()
    prompt = random_ids(2, 20, seed=3).to(device)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    return bool(torch.equal(cached, uncached))


def cpu_agreement(model, device):
    model.eval()
    ids = random_ids(2, 64, seed=4)
    with torch.no_grad():
        here = model(ids.to(device), output_routing=True)
        there = model.to("cpu")(ids, output_routing=True)
    model.to(device)
    same, total = 0, 0
    for a, b in zip(here.routing, there.routing):
        same += int((a.operator_ids.cpu() == b.operator_ids).sum())
        total += a.operator_ids.numel()
    return (same / total if total else 1.0), (here.logits.cpu() - there.logits).abs().max().item()


def bf16_step(model_class, variant, device, **overrides):
    model = build(model_class, variant, attn_implementation="sdpa", **overrides).to(device).train()
    ids = random_ids(4, 64, seed=5).to(device)
    labels = ids if model_class is ChiarForCausalLM else torch.tensor([0, 1, 0, 1], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(ids, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.isfinite(loss).item() and all(torch.isfinite(g).all().item() for g in grads))


def sdpa_gradient_gap(variant, device):
    """Largest relative difference of parameter gradients, sdpa against eager, fp32."""
    ids = random_ids(2, 200, seed=6).to(device)
    grads = []
    for implementation in ("sdpa", "eager"):
        model = build(ChiarForCausalLM, variant, attn_implementation=implementation).to(device).eval()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    return ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item()


def bf16_training_stays_finite(device, steps=60):
    torch.manual_seed(0)
    config = variant_config("chiar-threshold", vocab_size=512, max_position_embeddings=320)  # v1 shape
    model = ChiarForCausalLM._from_config(config, attn_implementation="sdpa").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, 513).float()
    for step in range(1, steps + 1):
        ids = torch.multinomial(zipf, 16 * 320, replacement=True, generator=generator).view(16, 320).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            return step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--training_steps", type=int, default=60, help="bf16 training steps of the v1 shape")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows, failures = [], []
    for variant in args.variants:
        model = build(ChiarForCausalLM, variant, attn_implementation="sdpa").to(device)
        agreement, logit_gap = cpu_agreement(model, device)
        row = {
            "variant": variant,
            "causality_eval": causality(model, device, "eval"),
            "causality_train": causality(model, device, "train"),
            "cache_equals_no_cache": cache_agreement(model, device),
            "routing_agreement_with_cpu": agreement,
            "max_logit_gap_to_cpu": logit_gap,
            "bf16_lm_step_finite": bf16_step(ChiarForCausalLM, variant, device),
            "bf16_classifier_step_finite": bf16_step(ChiarForSequenceClassification, variant, device, is_causal=False, num_labels=2),
            "sdpa_vs_eager_gradient_gap": sdpa_gradient_gap(variant, device),
        }
        problems = [name for name, bad in (
            ("causality_eval", row["causality_eval"] > 1e-4),
            ("causality_train", row["causality_train"] > 1e-4),
            ("cache_equals_no_cache", not row["cache_equals_no_cache"]),
            ("routing_agreement_with_cpu", agreement < 0.99),
            ("max_logit_gap_to_cpu", agreement == 1.0 and logit_gap > 1e-3),
            ("bf16_lm_step_finite", not row["bf16_lm_step_finite"]),
            ("bf16_classifier_step_finite", not row["bf16_classifier_step_finite"]),
            ("sdpa_vs_eager_gradient_gap", not row["sdpa_vs_eager_gradient_gap"] < 1e-3),
        ) if bad]
        row["failed"] = problems
        failures += [f"{variant}: {p}" for p in problems]
        rows.append(row)
        print(json.dumps(row), flush=True)
    non_finite_step = bf16_training_stays_finite(device, args.training_steps)
    print(f"bf16 training, v1 shape, {args.training_steps} steps: " + ("finite" if non_finite_step is None else f"NOT finite at step {non_finite_step}"))
    if non_finite_step is not None:
        failures.append(f"bf16 training went non-finite at step {non_finite_step}")
    device_name = describe_device(device)
    record = {"benchmark": "device_check", "device": device_name, "torch": torch.__version__, "failures": failures,
              "bf16_training_steps": args.training_steps, "bf16_training_non_finite_step": non_finite_step, "rows": rows}
    if args.output:
        args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{len(rows)} variants on {device_name}: " + ("all checks passed" if not failures else f"FAILED: {failures}"))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
