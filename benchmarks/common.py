"""What the benchmark scripts share: the device line they record and the timing scripts' options."""

import argparse
import platform
import statistics
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def describe_device(device):
    """The machine a result was measured on, as the JSON files and docs/benchmarks.md name it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


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
