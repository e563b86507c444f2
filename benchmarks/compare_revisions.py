"""Training-step speed of the model code at another git revision against the working tree's, with the baseline.

Extracts `modeling_chiar/` at REV into a temporary folder (imported as its own package), builds the
same CHIAR model from both (default: threshold router calibrated to 25%; `--variant` picks another
of speed.py's variants), and times forward+backward of the body in interleaved rounds with the
full-attention baseline (working tree) in the same process: what a change to the model code gained
or lost, measured on this machine's current speed (each CHIAR row also gets its per-round speed-up
over the old code, `vs_old`). It also loads the working tree's weights into the old code and
reports whether both compute the same outputs and routing (eval mode) on the timed batch.

    python benchmarks/compare_revisions.py --old 10e6f9b --lengths 256 1024 4096
"""

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import torch

from common import calibrated_model, describe_device, interleaved_rounds, paired_speedup
from speed import VARIANTS

REPO = Path(__file__).resolve().parent.parent
VOCAB = 8192


def package_at(revision, folder):
    """Import modeling_chiar as it was at `revision`, under the name modeling_chiar_at_rev."""
    done = subprocess.run(["git", "archive", revision, "modeling_chiar"], cwd=REPO, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"cannot read modeling_chiar/ at revision {revision!r}: {done.stderr.decode().strip()}")
    archive = done.stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (Path(folder) / "modeling_chiar").rename(Path(folder) / "modeling_chiar_at_rev")
    sys.path.insert(0, str(folder))
    return importlib.import_module("modeling_chiar_at_rev")


def build(package, length, **options):
    config = package.ChiarConfig(vocab_size=VOCAB, hidden_dropout=0.0, max_position_embeddings=max(length, 2048), **options)
    return calibrated_model(package.ChiarModel, config)


def same_outputs(model, old_model, ids):
    """Load `model`'s weights and router buffers into `old_model`; compare their eval outputs and routing."""
    old_model.load_state_dict(model.state_dict())
    model.eval(), old_model.eval()
    with torch.no_grad():
        new, old = model(ids, output_routing=True), old_model(ids, output_routing=True)
    model.train(), old_model.train()
    return {
        "max_abs_output_difference": (new.last_hidden_state - old.last_hidden_state).abs().max().item(),
        "same_routing": all(torch.equal(a.operator_ids, b.operator_ids) for a, b in zip(new.routing, old.routing)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="git revision to compare against")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--variant", default="chiar-threshold", choices=[name for name in VARIANTS if name != "baseline"],
                        help="the CHIAR model built from both revisions (benchmarks/speed.py's variants)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    import modeling_chiar as current

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        old = package_at(args.old, folder)
        for length in args.lengths:
            ids = torch.randint(0, VOCAB, (max(1, args.tokens // length), length), generator=torch.Generator().manual_seed(2))
            models = {
                "baseline": build(current, length, **VARIANTS["baseline"]),
                "chiar (working tree)": build(current, length, **VARIANTS[args.variant]),
                f"chiar ({args.old})": build(old, length, **VARIANTS[args.variant]),
            }
            difference = same_outputs(models["chiar (working tree)"], models[f"chiar ({args.old})"], ids)
            steps = {name: (lambda m=model: m(ids).last_hidden_state.square().mean().backward()) for name, model in models.items()}
            times = interleaved_rounds(steps, args.rounds, torch.device("cpu"))
            old_times = times[f"chiar ({args.old})"]
            for name, values in times.items():
                row = {"length": length, "model": name, "seconds": statistics.median(values),
                       "vs_baseline": paired_speedup(times["baseline"], values), "seconds_all_rounds": values}
                if name.startswith("chiar"):
                    row.update(difference, vs_old=paired_speedup(old_times, values))
                rows.append(row)
                versus_old = f", x{row['vs_old']:.3f} vs {args.old}" if "vs_old" in row else ""
                print(f"T={length:5} {name:28} {row['seconds'] * 1000:8.1f} ms  x{row['vs_baseline']:.2f} vs baseline{versus_old}")
            print(f"T={length:5} same weights, eval: max |output difference| {difference['max_abs_output_difference']:.3g}, "
                  f"same routing: {difference['same_routing']}")
    if args.output:
        result = {"benchmark": "compare_revisions", "old": args.old, "variant": args.variant, "device": describe_device(torch.device("cpu")),
                  "torch": torch.__version__, "tokens_per_batch": args.tokens, "rounds": args.rounds, "rows": rows}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
