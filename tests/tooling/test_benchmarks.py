"""The benchmark scripts run end to end at toy sizes and write the JSON docs/benchmarks.md is made from.

Timings at these sizes mean nothing; what is checked is that every script still runs, writes a
complete result, compares against the baseline measured in the same run, and renders as a table.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_script(script, *args, output):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--output", str(output)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(output.read_text())


def test_speed_compares_every_variant_with_the_baseline_and_renders(tmp_path):
    output = tmp_path / "speed.json"
    result = run_script("speed.py", "--lengths", "64", "--rounds", "1", "--targets", "body", output=output)
    assert result["complete"]
    models = {row["model"] for row in result["rows"]}
    assert models == {"baseline", "chiar-threshold", "chiar-random", "chiar-3op"}
    for row in result["rows"]:
        assert math.isfinite(row["speedup_vs_baseline"]) and row["speedup_vs_baseline"] > 0
        assert len(row["seconds_all_rounds"]) == 1
        if row["model"] == "baseline":
            assert row["speedup_vs_baseline"] == 1.0 and row["attention_flops_fraction"] == 1.0
        else:
            assert row["attention_query_fraction"] < 1.0
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), str(output)],
                           capture_output=True, text=True, check=True).stdout
    assert "| body | 64 |" in table and "chiar-3op" in table
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_speed.py"), str(output)], check=True, capture_output=True)
    assert output.with_suffix(".png").stat().st_size > 0


def test_speed_times_compiled_models_against_the_compiled_baseline(tmp_path):
    output = tmp_path / "speed.json"
    result = run_script("speed.py", "--lengths", "64", "--rounds", "1", "--targets", "body", "--modes", "eager", "compiled",
                        "--compile_backend", "aot_eager", "--variants", "baseline", "chiar-threshold", output=output)
    compiled = [row for row in result["rows"] if row["compiled"]]
    assert {(row["model"], row["mode"]) for row in compiled} == {(m, mode) for m in ("baseline", "chiar-threshold") for mode in ("fwd", "fwd+bwd")}
    assert all(row["compile_seconds"] is not None and row["memory_bytes"] is None for row in compiled)
    assert result["command"].startswith("python benchmarks/speed.py") and result["commit"]
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), str(output)],
                           capture_output=True, text=True, check=True).stdout
    assert "| yes (" in table


def test_flops_fraction_reports_overflow_per_capacity_factor(tmp_path):
    output = tmp_path / "flops.json"
    result = run_script("flops_fraction.py", "--lengths", "256", "--capacity_factors", "1.0", "4.0", "--sequences", "1",
                        "--implementations", "sdpa", output=output)
    tight, loose = result["rows"]
    assert loose["overflow"] == [0.0, 0.0] and tight["attention_flops_fraction"] < loose["attention_flops_fraction"]
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), str(output)],
                           capture_output=True, text=True, check=True).stdout
    assert "| 4.0 | 256 |" in table


def test_decoding_benchmark_runs_cached_and_uncached(tmp_path):
    output = tmp_path / "generation.json"
    result = run_script("generation.py", "--lengths", "32", "--rounds", "1", output=output)
    assert result["complete"]
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_speed.py"), str(output)], check=True, capture_output=True)
    assert output.with_suffix(".png").stat().st_size > 0
    assert {row["cached"] for row in result["rows"]} == {True, False}
    assert all(row["tokens_per_s"] > 0 for row in result["rows"])


def tiny_wikitext(folder, words=(12000, 2000, 2000)):
    """A WikiText-2-shaped folder of seeded random sentences: enough blocks of 256 tokens for a batch of 32."""
    import random

    rng = random.Random(0)
    lexicon = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    (folder / "wikitext-2").mkdir(parents=True)
    for split, count in zip(("train", "valid", "test"), words):
        lines = [" ".join(rng.choice(lexicon) for _ in range(12)) + " ." for _ in range(count // 12)]
        (folder / "wikitext-2" / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


# The GPU profile's code path (epochs), on the CPU; the quick profile's (steps) is the seeds test below.
# Slow (23 s): the epochs path differs from the steps path by one flag of run_clm.py.
@pytest.mark.slow
@pytest.mark.parametrize("profile, args", [("full", ["--epochs", "1", "--variants", "baseline", "chiar-learned", "chiar-3op"])])
def test_quality_trains_every_variant_on_the_same_data_and_plots(tmp_path, profile, args):
    data = tiny_wikitext(tmp_path / "data")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--profile", profile, "--data_dir", str(data),
                           "--results_dir", str(tmp_path / "out"), "--device", "cpu", "--seeds", "0", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / f"quality-wikitext-{profile}-cpu.json").read_text())
    assert result["complete"] and [row["model"] for row in result["results"]] == args[args.index("--variants") + 1 :]
    steps = {row["steps"] for row in result["results"]}
    assert len(steps) == 1 and steps.pop() >= 1  # same steps for every variant
    for row in result["results"]:
        assert math.isfinite(row["valid_perplexity"]) and math.isfinite(row["test_perplexity"])
        assert (row["attention_flops_fraction"] == 1.0) == (row["model"] == "baseline")
    for plot in result["plots"]:
        assert Path(plot).is_file()
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_speed.py"),
                              str(tmp_path / "out" / f"quality-wikitext-{profile}-cpu.json")], capture_output=True, text=True)
    assert refused.returncode != 0 and "not a speed.py or generation.py result" in refused.stderr


def test_quality_seeds_are_paired_and_summarised(tmp_path):
    data = tiny_wikitext(tmp_path / "data")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--data_dir", str(data), "--results_dir", str(tmp_path / "out"),
              "--device", "cpu", "--steps", "2"]
    refused = subprocess.run([*script, "--seeds", "0", "0"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--seeds must be distinct" in refused.stderr
    refused = subprocess.run([*script, "--task", "listops", "--router_aux_loss_coef", "1"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--router_aux_loss_coef applies to --task wikitext" in refused.stderr
    refused = subprocess.run([*script, "--task", "imdb", "--profile", "epoch"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--profile epoch applies to --task wikitext" in refused.stderr
    refused = subprocess.run([*script, "--task", "imdb", "--capacity_factor", "1.25"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--capacity_factor applies to --task wikitext" in refused.stderr
    refused = subprocess.run([*script, "--task", "imdb", "--layer_schedule", "dct", "routed"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--layer_schedule applies to --task wikitext" in refused.stderr
    refused = subprocess.run([*script, "--layer_schedule", "dct", "routed"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "the chiar-v1-2op shape has 4, got 2" in refused.stderr
    schedule = ["dct", "routed", "routed", "routed"]  # no fixed attention layer: the routed variants' only attention is routed
    variants = ["baseline", "chiar-learned", "chiar-random"]
    done = subprocess.run([*script, "--seeds", "0", "1", "--variants", *variants, "--router_aux_loss_coef", "0.5", "--capacity_factor", "1.25",
                           "--layer_schedule", *schedule],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    path = tmp_path / "out" / "quality-wikitext-quick-cpu.json"
    result = json.loads(path.read_text())
    assert [(row["seed"], row["model"]) for row in result["results"]] == [(seed, name) for seed in (0, 1) for name in variants]
    assert result["commit"] and "quality.py" in result["command"]
    overrides = {row["model"]: row["config_overrides"] for row in result["results"]}
    assert 'router_type="learned"' in overrides["chiar-learned"] and "router_aux_loss_coef=0.5" in overrides["chiar-learned"]
    assert "router_aux_loss_coef" not in overrides["chiar-random"]  # the weight goes to the learned router only
    assert result["settings"]["router_capacity_factor"] == 1.25 and result["settings"]["layer_schedule"] == schedule
    for row in result["results"]:  # each trained by run_clm.py: its Trainer's files are there
        run = ROOT / row["run"] if not Path(row["run"]).is_absolute() else Path(row["run"])
        saved = json.loads((run / "config.json").read_text())
        assert saved["router_type"] == {"baseline": "threshold", "chiar-learned": "learned", "chiar-random": "random"}[row["model"]]
        assert saved["router_capacity_factor"] == (1.0 if row["model"] == "baseline" else 1.25)  # routed variants only
        assert saved["layer_schedule"] == (["attention"] * 4 if row["model"] == "baseline" else schedule)
        assert (run / "trainer_state.json").is_file() and (run / "eval_results.json").is_file()
        shares = row["train_routing"]  # the training logs' shares: routed layers 1 to 3 of the schedule
        if row["model"] == "baseline":
            assert shares == {}
        else:
            assert set(shares) == {f"train_{kind}_layer{i}_{op}" for kind in ("asked", "routing") for i in (1, 2, 3) for op in ("dct", "attention")}
            assert shares["train_routing_layer1_attention"] + shares["train_routing_layer1_dct"] == pytest.approx(1.0)
    ppl = {(row["model"], row["seed"]): row["valid_perplexity"] for row in result["results"]}
    for name in variants:
        assert ppl[name, 0] != ppl[name, 1]  # the seed changes the initial weights and batches
    summary = result["summary"]
    assert "valid_perplexity_minus_baseline" not in summary["baseline"]
    assert "valid_perplexity_minus_chiar-random" not in summary["chiar-random"]
    paired = summary["chiar-learned"]["valid_perplexity_minus_chiar-random"]
    assert paired["per_seed"] == [ppl["chiar-learned", s] - ppl["chiar-random", s] for s in (0, 1)]
    assert paired["min"] <= paired["mean"] <= paired["max"]
    assert summary["chiar-random"]["valid_perplexity"]["mean"] == (ppl["chiar-random", 0] + ppl["chiar-random", 1]) / 2
    for plot in result["plots"]:
        assert Path(plot).is_file()
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), str(path)], capture_output=True, text=True)
    assert table.returncode == 0 and "valid ppl minus random control's" in table.stdout, table.stderr
    assert "layer 2 train run / asked" in table.stdout
    reference = tmp_path / "baseline.json"  # the baseline of another run of the profile, seed by seed
    reference.write_text(json.dumps({**result, "results": [row for row in result["results"] if row["model"] == "baseline"]}))
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), str(path), "--baseline", str(reference)],
                           capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("| chiar-learned |") and line.count("|") == 5)
    relative = [100 * (ppl["chiar-learned", s] / ppl["baseline", s] - 1) for s in (0, 1)]
    closed = [(ppl["chiar-random", s] - ppl["chiar-learned", s]) / (ppl["chiar-random", s] - ppl["baseline", s]) for s in (0, 1)]
    assert row.split(" | ")[1] == ", ".join(f"{v:+.2f}" for v in relative)
    assert row.split(" | ")[3].rstrip(" |") == ", ".join(f"{c:.2f}" for c in closed)
    # a baseline that trained otherwise is refused; the routed-only settings may differ
    settings = {**result["settings"], "lr": 0.5, "layer_schedule": None, "router_capacity_factor": None}
    reference.write_text(json.dumps({**result, "settings": settings}))
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), str(path), "--baseline", str(reference)],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "did not train like" in refused.stderr and "lr 0.001 vs 0.5" in refused.stderr
    assert "layer_schedule" not in refused.stderr and "capacity" not in refused.stderr


def test_device_check_passes_on_the_cpu(tmp_path):
    # The GPU session's first script, on the CPU against itself: two variants, two bf16 training steps.
    result = run_script("device_check.py", "--device", "cpu", "--variants", "chiar-3op", "chiar-learned",
                        "--training_steps", "2", output=tmp_path / "check.json")
    assert result["failures"] == [] and result["bf16_training_non_finite_step"] is None
    assert [row["variant"] for row in result["rows"]] == ["chiar-3op", "chiar-learned"]
    for row in result["rows"]:
        assert row["cache_equals_no_cache"] and row["routing_agreement_with_cpu"] == 1.0 and row["failed"] == []


def test_routing_signal_scores_routers_against_the_tokens_that_need_attention(tmp_path):
    """The oracle sends exactly the marked tokens (recall = precision = 1, its share the marked share);
    the random control's recall is about its share; the baseline has no routing figures."""
    output = tmp_path / "signal.json"
    run_script("routing_signal.py", "--tasks", "lookback", "distractors", "--variants", "baseline", "oracle", "chiar-random",
               "chiar-learned-bias", "--seeds", "0", "--steps", "6", "--eval_size", "64", output=output)
    result = json.loads(output.read_text())
    assert result["commit"] and "routing_signal.py" in result["command"]
    rows = {(row["task"], row["variant"]): row for row in result["runs"]}
    assert len(rows) == 8 and "recall" not in rows["lookback", "baseline"]
    for task in ("lookback", "distractors"):  # what ran is what was asked, less the overflow
        for variant in ("oracle", "chiar-random", "chiar-learned-bias"):
            row = rows[task, variant]
            assert row["eval_asked_share"] >= row["eval_attention_share"] and row["train_asked_share"] >= row["train_attention_share"]
    for task in ("lookback", "distractors"):
        oracle, random = rows[task, "oracle"], rows[task, "chiar-random"]
        assert oracle["recall"] == oracle["precision"] == 1.0 and oracle["eval_attention_share"] == oracle["marked_share"]
        assert 0.05 < oracle["marked_share"] < 0.12 and 0.15 < random["recall"] < 0.35
        # capacity factor 1.25: 20 slots per 64 tokens, room for its 16 asks, so all of them run
        assert random["slot_share"] == 20 / 64 and random["eval_attention_share"] == random["eval_asked_share"] == 16 / 64  # exactly its share of each 64-token block
    assert set(result["summary"]) == {"lookback", "distractors"}


def test_routing_collapse_follows_the_shares_over_training_for_each_share_control(tmp_path):
    """Two controls, one seed, an evaluation per step: each run's asked and run shares per routed layer
    and step (asked sums to 1; what ran of a budgeted operator never exceeds what was asked), the
    control's config (no auxiliary loss for `off`, the share bias for `bias`), the summary and the plot."""
    data = tiny_wikitext(tmp_path / "data")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "routing_collapse.py"), "--data_dir", str(data),
                           "--results_dir", str(tmp_path / "out"), "--device", "cpu", "--seeds", "0", "--steps", "2",
                           "--eval_every", "1", "--controls", "bias", "off"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "routing_collapse-cpu.json").read_text())
    assert result["commit"] and "routing_collapse.py" in result["command"]
    assert [(run["control"], run["seed"]) for run in result["runs"]] == [("bias", 0), ("off", 0)]
    for run in result["runs"]:
        assert [point["step"] for point in run["shares"]] == [1, 2]
        for point in run["shares"]:
            assert sorted(point["asked"]) == ["1", "2"]  # the v1 schedule's routed layers
            for layer, asked in point["asked"].items():
                assert math.isclose(sum(asked.values()), 1.0, abs_tol=1e-6)
                assert all(point["ran"][layer][op] <= asked[op] + 1e-9 for op in ("rbf", "attention"))
        saved = json.loads((ROOT / run["run"] / "config.json").read_text() if not Path(run["run"]).is_absolute()
                           else (Path(run["run"]) / "config.json").read_text())
        assert saved["routed_operators"] == ["dct", "rbf", "attention"] and saved["router_type"] == "learned"
        assert (saved["router_share_control"], saved["router_aux_loss_coef"]) == {"bias": ("bias", 5.0), "off": ("aux_loss", 0.0)}[run["control"]]
        evaluation = json.loads((ROOT / run["run"] / "eval_results.json").read_text())
        assert ("eval_aux_loss" in evaluation) == (run["control"] == "off")  # the bias has no loss to report
    summary = result["summary"]
    assert set(summary) == {"bias", "off"} and 0 <= summary["off"]["min_rbf_share_asked"] <= 1
    assert Path(result["plot"]).is_file()
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), str(tmp_path / "out" / "routing_collapse-cpu.json")],
                           capture_output=True, text=True)
    assert table.returncode == 0 and "| bias | 0 |" in table.stdout and "lowest RBF share asked" in table.stdout, table.stderr


def test_gradient_groups_splits_a_saved_runs_gradient_and_shows_the_share_biases(tmp_path, tokenizer):
    """The groups' norms make up the total (squares add), and a share-bias gate's biases are printed."""
    from harness import build
    from modeling_chiar import ChiarForCausalLM

    model = build(ChiarForCausalLM, "chiar-learned-bias", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp_path / "run")
    tokenizer.save_pretrained(tmp_path / "run")
    text = tmp_path / "text.txt"
    text.write_text("the light falls where detail is needed and nowhere else . " * 40)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gradient_groups.py"), str(tmp_path / "run"), "--text_file", str(text),
                           "--rows", "2", "--length", "16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    total = float(lines[0].rsplit(" ", 1)[1])
    groups = {line.strip().rsplit(" ", 1)[0].strip(): float(line.rsplit(" ", 1)[1]) for line in lines[1:] if "share_bias" not in line}
    assert {"embed_tokens", "layer 1 router", "layer 2 router"} <= set(groups)
    assert math.isclose(total, sum(v * v for v in groups.values()) ** 0.5, rel_tol=0.01)
    assert sum("train_share_bias" in line for line in lines) == 2
