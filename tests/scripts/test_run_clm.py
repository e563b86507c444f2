"""End-to-end runs of run_clm.py on small generated text (seconds), its bad-argument errors,
resuming, the 2-process launch, and a WikiText-2 run when the shared data is there."""

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_clm
from harness import data_dir_or_skip

ROOT = Path(__file__).resolve().parents[2]
TINY = "hidden_size=32,num_attention_heads=4,intermediate_size=64,max_position_embeddings=128,hidden_dropout=0.1"


def write_corpus(folder, lines=300, seed=0):
    """Sentences from a small grammar, so a tokenizer and a model have something to learn."""
    rng = random.Random(seed)
    nouns, verbs = ["light", "shadow", "token", "layer", "model", "river"], ["falls", "routes", "waits", "turns"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", lines), ("valid", lines // 5), ("test", lines // 5)):
        text = "\n".join(
            " ".join(f"the {rng.choice(nouns)} {rng.choice(verbs)} ." for _ in range(rng.randint(3, 8)))
            for _ in range(count)
        )
        (folder / f"{split}.txt").write_text(text + "\n")
    return folder


def args(tmp_path, corpus, *extra):
    return [
        "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
        "--train_file", str(corpus / "train.txt"), "--validation_file", str(corpus / "valid.txt"),
        "--test_file", str(corpus / "test.txt"), "--config_overrides", TINY, "--tokenizer_vocab_size", "300",
        "--block_size", "64", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--max_steps", "8", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", *extra,
    ]


def test_built_in_defaults_train_evaluate_and_test(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    run_clm.main(args(tmp_path, corpus))
    out = tmp_path / "out"
    for name in ("train_results.json", "eval_results.json", "test_results.json", "all_results.json", "model.safetensors",
                 "modeling_chiar.py", "tokenizer.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["perplexity"] == pytest.approx(torch.exp(torch.tensor(metrics["eval_loss"])).item(), rel=1e-5)
    for key in ("eval_attention_query_fraction", "eval_attention_flops_fraction", "eval_routing_layer1_attention",
                "eval_routing_layer1_dct", "eval_entropy_layer1", "eval_next_token_accuracy"):
        assert key in metrics, key
    assert metrics["eval_routing_layer1_attention"] + metrics["eval_routing_layer1_dct"] == pytest.approx(1.0)
    assert 0 < metrics["eval_attention_query_fraction"] < 1
    test = json.loads((out / "test_results.json").read_text())
    assert "test_perplexity" in test and "test_routing_layer2_attention" in test

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) <= 300
    router = model.model.layers[1].mixer.router
    assert int(router.num_updates) == 8  # calibrated during training, saved with the weights
    ids = tokenizer("the light falls .", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_json_config_argument_and_compressed_json_data(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    for split in ("train", "valid"):
        lines = (corpus / f"{split}.txt").read_text().splitlines()
        with gzip.open(corpus / f"{split}.jsonl.gz", "wt") as handle:
            for line in lines:
                handle.write(json.dumps({"content": line}) + "\n")
    settings = {
        "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "do_train": True, "do_eval": True,
        "train_file": str(corpus / "train.jsonl.gz"), "validation_file": str(corpus / "valid.jsonl.gz"),
        "text_column_name": "content", "config_name": "chiar-tiny",
        "config_overrides": TINY + ",router_type=learned,routed_operators=[\"dct\",\"rbf\",\"attention\"]",
        "tokenizer_vocab_size": 300, "block_size": 64, "max_steps": 4, "per_device_train_batch_size": 4,
        "report_to": "none", "save_strategy": "no",
    }
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    run_clm.main([str(tmp_path / "settings.json")])
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert "eval_routing_layer1_rbf" in metrics and "eval_aux_loss" in metrics


def test_resume_continues_where_it_stopped(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    first = args(tmp_path, corpus, "--do_train", "--save_strategy", "steps", "--save_steps", "3")
    first[first.index("--max_steps") + 1] = "6"
    first[first.index("--save_strategy") + 1] = "steps"  # the later flag wins; keep one
    run_clm.main(first)
    state = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    second = list(first)
    second[second.index("--max_steps") + 1] = "9"
    trainer = run_clm.main(second)
    assert trainer.state.global_step == 9
    # the first 6 steps were not redone: the run resumed from checkpoint-6 with its router statistics
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert int(model.model.layers[1].mixer.router.num_updates) == 9


def test_two_processes_with_accelerate(tmp_path):
    """DDP on two CPU processes (gloo). `--fsdp` is given too: accelerate (1.15) enables FSDP on
    accelerators only, so on the CPU the run stays DDP, and the Trainer says so (FSDP itself is
    tested in tests/scripts/test_fsdp.py)."""
    corpus = write_corpus(tmp_path / "data")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "run_clm.py"), "--use_cpu", "--do_train", "--do_eval", *args(tmp_path, corpus),
               "--fsdp", "full_shard auto_wrap", "--fsdp_config", '{"transformer_layer_cls_to_wrap": ["ChiarDecoderLayer"]}']
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "this run is plain data parallel" in result.stdout + result.stderr
    training_args = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert training_args.world_size == 2 and training_args.ddp_find_unused_parameters is False
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert "eval_attention_flops_fraction" in metrics


@pytest.mark.parametrize(
    "change, message",
    [
        (("--train_file", "missing.txt"), "file not found"),
        (("--text_column_name", "body"), "not a column"),
        (("--block_size", "4096"), "above what the model supports"),
        (("--config_name", "no-such-config"), "neither a file nor a shipped config"),
        (("--config_overrides", "hidden_size=30"), "divisible"),
        (("--config_overrides", "colour=blue"), "no field 'colour'"),
        (("--train_file", "data.parquet"), "cannot tell the format"),
        (("--routing_settle_batches", "-1"), "routing_settle_batches must be 0"),
    ],
)
def test_bad_arguments_fail_at_start_with_a_clear_message(tmp_path, change, message):
    corpus = write_corpus(tmp_path / "data", lines=30)
    argv = args(tmp_path, corpus)
    flag, value = change
    if flag == "--train_file":
        value = str(tmp_path / value)
        if value.endswith(".parquet"):
            Path(value).write_bytes(b"")
    argv = argv + [flag, value] if flag not in argv else [value if i == argv.index(flag) + 1 else a for i, a in enumerate(argv)]
    with pytest.raises(SystemExit, match=message):
        run_clm.main(argv)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_predict_without_a_test_split_is_an_error(tmp_path):
    corpus = write_corpus(tmp_path / "data", lines=30)
    argv = args(tmp_path, corpus, "--do_predict")
    i = argv.index("--test_file")
    del argv[i : i + 2]
    with pytest.raises(SystemExit, match="needs a test split"):
        run_clm.main(argv)


def test_wikitext2_run(tmp_path):
    folder = data_dir_or_skip("wikitext-2")
    run_clm.main([
        "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
        "--train_file", str(folder / "wiki.train.tokens"), "--validation_file", str(folder / "wiki.valid.tokens"),
        "--tokenizer_vocab_size", "2000", "--max_train_samples", "64", "--max_eval_samples", "16", "--block_size", "128",
        "--max_steps", "4", "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
        "--do_train", "--do_eval", "--disable_tqdm", "true",
    ])
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert metrics["eval_samples"] == 16 and metrics["perplexity"] < 2000 * 2


def test_torch_compile_trains_evaluates_and_saves(tmp_path):
    """--torch_compile (the Trainer's flag; aot_eager here, which traces as inductor does, in seconds)
    trains, evaluates with routing reports and saves a model that loads."""
    import torch._dynamo

    corpus = write_corpus(tmp_path / "data")
    torch._dynamo.reset()
    run_clm.main(args(tmp_path, corpus, "--torch_compile", "--torch_compile_backend", "aot_eager"))
    torch._dynamo.reset()
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert metrics["eval_loss"] > 0 and "eval_overflow_layer1_attention" in metrics
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert int(model.model.layers[1].mixer.router.num_updates) == 8  # calibrated in every compiled step


def test_streaming_trains_and_evaluates_as_the_data_is_read(tmp_path):
    corpus = write_corpus(tmp_path / "data")
    run_clm.main(args(tmp_path, corpus, "--streaming", "--max_eval_samples", "4"))
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert metrics["eval_loss"] > 0 and "eval_routing_layer1_attention" in metrics and "eval_samples" not in metrics
    with pytest.raises(SystemExit, match="--streaming needs --max_steps"):
        run_clm.main([a for a in args(tmp_path, corpus, "--streaming", "--do_train") if a not in ("--max_steps", "8")])
    no_validation = args(tmp_path, corpus, "--streaming")
    i = no_validation.index("--validation_file")
    del no_validation[i : i + 2]
    with pytest.raises(SystemExit, match="--streaming needs a validation split"):
        run_clm.main(no_validation)


def test_stock_spellings_are_honoured():
    """Hyphenated flags count as given (the scratch defaults do not overwrite them), and
    --config_overrides reads Python's True / False / None as the stock scripts do."""
    from chiar.training import apply_config_overrides
    from modeling_chiar import ChiarConfig

    _, _, training_args, _ = run_clm.parse_args(["--output_dir", "out", "--learning-rate", "2e-5", "--report_to", "none"])
    assert training_args.learning_rate == 2e-5
    config = apply_config_overrides(ChiarConfig(), "use_cache=False,use_meta_router=True,router_thresholds=None")
    assert config.use_cache is False and config.use_meta_router is True and config.router_thresholds is None
