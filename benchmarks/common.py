"""What the benchmark scripts share: how models are built and timed, the device line they record and
the timing scripts' options."""

import argparse
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def describe_device(device):
    """The machine a result was measured on, as the JSON files and docs/benchmarks.md name it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def provenance():
    """The command that wrote a result and the commit it ran: the code as it was when the script
    started (`+changes` when the model, tooling or benchmark code differed from that commit; results
    files do not count), however long the run takes and whatever changes meanwhile."""
    return dict(_AT_START)


def _provenance_now():
    root = Path(__file__).resolve().parents[1]

    def git(*args):
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    code = ["modeling_chiar", "chiar", "benchmarks", ":(exclude)benchmarks/results", "run_clm.py", "run_classification.py", "configs"]
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", *code):
        commit += "+changes"
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(root) if script.is_relative_to(root) else script
    command = " ".join(shlex.quote(str(arg)) for arg in ["python", script, *sys.argv[1:]])
    return {"command": command, "commit": commit}


_AT_START = _provenance_now()  # imported as a script starts


def calibrated_model(model_class, config, device=torch.device("cpu"), dtype=None, batches=6):
    """`model_class(config)` (seed 0, sdpa) in train mode, threshold routers calibrated to their target.

    Calibration sees `batches` random batches of 4 x min(256, max positions) tokens (seed 1), so every
    script times the same routing for the same config.
    """
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="sdpa").to(device=device, dtype=dtype).train()
    generator = torch.Generator().manual_seed(1)
    length = min(256, config.max_position_embeddings)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randint(0, config.vocab_size, (4, length), generator=generator).to(device))
    return model


def sync(device):
    """Wait for the GPU's queued work, so wall-clock timings cover it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_rounds(steps, rounds, device):
    """Seconds of each step per round, steps interleaved (A B C A B C ...); round 0 is warm-up, dropped."""
    times = {name: [] for name in steps}
    for round_index in range(rounds + 1):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if round_index:
                times[name].append(time.perf_counter() - start)
    return times


def paired_speedup(baseline_seconds, seconds):
    """Median over timed rounds of (baseline's time / model's time) within the same round.

    Rounds interleave the models, so each ratio compares runs made seconds apart. The CPU machines'
    speed drifts by tens of percent over minutes; a ratio of the two medians taken over all rounds
    keeps that drift, a median of per-round ratios cancels most of it.
    """
    return statistics.median(b / s for b, s in zip(baseline_seconds, seconds))


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def timing_parser(description, profiles, variants):
    """Options of the interleaved timing scripts (speed.py, generation.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--profile", choices=sorted(profiles), default="quick")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--variants", nargs="+", default=list(variants))
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--rounds", type=int, help="override the profile's timed rounds")
    parser.add_argument("--output", type=Path)
    return parser


def timing_settings(args, profiles):
    """(settings, device, dtype): the profile with --lengths / --rounds applied, bf16 on GPU unless told."""
    settings = dict(profiles[args.profile])
    if args.lengths:
        settings["lengths"] = args.lengths
    if args.rounds:
        settings["rounds"] = args.rounds
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    return settings, device, dtype
