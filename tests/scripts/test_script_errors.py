"""Bad files and folders given to the scripts and CLIs (run_clm.py, run_classification.py,
chiar-export): one line naming the file, row, column or flag, before any training and before
anything is written; and training runs that meet a non-finite loss or a NaN batch."""

import gzip
import json

import pytest
import torch

import run_classification
import run_clm
from test_run_clm import args as clm_args
from test_run_clm import write_corpus

TINY = "hidden_size=32,num_attention_heads=4,intermediate_size=64"
TEXT = "the light falls and the shadow waits . " * 4


def jsonl(path, rows):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def run_and_expect(main, argv, message):
    """The script stops with SystemExit whose text starts with `error:` and matches `message`."""
    with pytest.raises(SystemExit) as raised:
        main(argv)
    text = str(raised.value.code)
    assert text.startswith("error: ") and "\n" not in text, text
    assert message in text, text
    return text


CLM_FILES = {
    "empty": ("train.txt", b"", "--train_file {train} is empty"),
    "not UTF-8": ("train.txt", bytes(range(120, 256)) * 4, "is not UTF-8 text (byte 8 is 0x80)"),
    "malformed JSON line": ("train.jsonl", b'{"text": "a b"}\n{"text": "a b\n', "line 2 is not valid JSON"),
    "JSON that is not objects": ("train.jsonl", b'"a line"\n"another"\n', "row 1 is a str, not an object with named fields"),
    "rows without fields": ("train.jsonl", b"{}\n{}\n", "has no fields"),
    "a null text": ("train.jsonl", b'{"text": "a b"}\n{"text": null}\n{"text": "c"}\n', "1 row(s) have no value in column 'text' (the first is row 2)"),
    "numbers as text": ("train.jsonl", b'{"text": 1}\n{"text": 2}\n', "column 'text' (--text_column_name) holds int64 values, not text"),
    "a broken gzip": ("train.txt.gz", b"not gzip at all", "cannot be decompressed"),
}


@pytest.mark.parametrize("case", sorted(CLM_FILES))
def test_run_clm_names_what_is_wrong_with_a_data_file(tmp_path, case):
    name, content, message = CLM_FILES[case]
    corpus = write_corpus(tmp_path / "data", lines=30)
    train = tmp_path / name
    train.write_bytes(content)
    argv = clm_args(tmp_path, corpus)
    argv[argv.index("--train_file") + 1] = str(train)
    if name.endswith(".jsonl"):  # every file of one format
        for split in ("validation", "test"):
            i = argv.index(f"--{split}_file")
            del argv[i : i + 2]
    run_and_expect(run_clm.main, argv, message.format(train=train))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_files_whose_columns_disagree(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [{"text": 3}] * 20)
    valid = jsonl(tmp_path / "valid.jsonl", [{"text": TEXT}] * 5)
    argv = ["--output_dir", str(tmp_path / "out"), "--train_file", str(train), "--validation_file", str(valid),
            "--cache_dir", str(tmp_path / "cache"), "--report_to", "none"]
    run_and_expect(run_clm.main, argv, "column 'text' holds different types in different files "
                                       "(--train_file has integers, --validation_file has text)")


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path, where):
    corpus = write_corpus(tmp_path / "data", lines=30)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    argv = clm_args(tmp_path, corpus)
    argv[argv.index("--output_dir") + 1] = str(blocker if where == "a file" else blocker / "run")
    message = "is a file, not a folder" if where == "a file" else "is not writable (Not a directory)"
    run_and_expect(run_clm.main, argv, message)
    run_and_expect(run_classification.main, ["--output_dir", argv[1], "--report_to", "none"], message)


def test_an_unparseable_override_names_the_field(tmp_path):
    corpus = write_corpus(tmp_path / "data", lines=30)
    argv = clm_args(tmp_path, corpus)
    argv[argv.index("--config_overrides") + 1] = "hidden_size=abc"
    run_and_expect(run_clm.main, argv, "--config_overrides: hidden_size must be an integer >= 1, got 'abc'")


def test_resuming_into_an_output_dir_of_another_model_is_refused(tmp_path):
    corpus = write_corpus(tmp_path / "data", lines=60)
    first = clm_args(tmp_path, corpus, "--do_train", "--save_steps", "2")
    first[first.index("--max_steps") + 1] = "2"
    first[first.index("--save_strategy") + 1] = "steps"
    run_clm.main(first)
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    other = list(first)
    other[other.index("--config_overrides") + 1] = other[other.index("--config_overrides") + 1].replace("hidden_size=32", "hidden_size=48")
    run_and_expect(run_clm.main, other, "holds checkpoint-2, from a model with another config (hidden_size: 32 there, 48 now)")
    other += ["--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-2")]
    run_and_expect(run_clm.main, other, "resume with the config that checkpoint was trained with")


def classification_args(tmp_path, train, *extra):
    return ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--config_overrides", TINY,
            "--tokenizer_vocab_size", "300", "--max_seq_length", "32", "--report_to", "none", "--train_file", str(train), *extra]


@pytest.mark.parametrize("labels, flags, message", [
    ([0, 1, "positive"] * 10, [], "holds int, str; labels must be all class names (strings) or all integer ids"),
    ([0.5, 1.5, 2.0] * 10, ["--do_regression", "false"], "holds float; labels must be all class names (strings) or all integer "
                                                           "ids (floats: pass --do_regression for regression)"),
    (["good", "bad"] * 10, ["--do_regression", "true"], "holds string values; regression needs numbers"),
    ([0, None, 1] * 10, [], "10 row(s) have no value in column 'label' (the first is row 2)"),
])
def test_run_classification_names_bad_labels(tmp_path, labels, flags, message):
    train = jsonl(tmp_path / "train.jsonl", [{"text": TEXT, "label": label} for label in labels])
    run_and_expect(run_classification.main, classification_args(tmp_path, train, *flags), message)


def test_run_classification_names_a_null_text(tmp_path):
    train = jsonl(tmp_path / "train.jsonl.gz", [{"text": None if i == 4 else TEXT, "label": i % 2} for i in range(20)])
    run_and_expect(run_classification.main, classification_args(tmp_path, train), "(the first is row 5)")


def test_run_clm_trains_and_evaluates_another_transformers_model(tmp_path):
    """The scripts train any causal LM: a GPT-2 reports loss and perplexity, no routing."""
    corpus = write_corpus(tmp_path / "data", lines=60)
    argv = clm_args(tmp_path, corpus, "--model_type", "gpt2", "--eval_strategy", "steps", "--eval_steps", "4")
    argv[argv.index("--config_overrides") + 1] = "n_embd=32,n_layer=1,n_head=2,n_positions=128"
    run_clm.main(argv)
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert metrics["perplexity"] > 1 and not any("routing" in key for key in metrics)


# --------------------------------------------------------------------------------------------
# chiar-export


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    from harness import calibrated_lm, tiny_tokenizer

    folder = tmp_path_factory.mktemp("trained")
    tokenizer = tiny_tokenizer()
    calibrated_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def export(argv):
    from chiar.hub import main

    with pytest.raises(SystemExit) as raised:
        main([str(a) for a in argv])
    return str(raised.value.code)


def test_export_refuses_a_missing_or_foreign_folder_and_writes_nothing(tmp_path):
    from transformers import GPT2Config

    assert f"MODEL {tmp_path / 'nope'}: no such folder or file" in export([tmp_path / "nope", tmp_path / "out"])
    (tmp_path / "empty").mkdir()
    assert "the folder has no config.json" in export([tmp_path / "empty", tmp_path / "out"])
    GPT2Config(n_embd=8, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert "holds a 'gpt2' model; chiar-export writes CHIAR checkpoints only" in export([tmp_path / "gpt2", tmp_path / "out"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert "cannot read a model config" in export([tmp_path / "broken", tmp_path / "out"])
    assert not (tmp_path / "out").exists()


def test_export_checks_its_inputs_before_writing(tmp_path, saved_lm):
    (tmp_path / "eval.json").write_text("{truncated")
    assert "--eval-results" in export([saved_lm, tmp_path / "out", "--eval-results", tmp_path / "eval.json"])
    (tmp_path / "eval.json").write_text("[1, 2]")
    assert "holds a JSON list" in export([saved_lm, tmp_path / "out", "--eval-results", tmp_path / "eval.json"])
    assert "file not found" in export([saved_lm, tmp_path / "out", "--routing-stats", tmp_path / "none.json"])
    assert "--push needs --repo-id" in export([saved_lm, tmp_path / "out", "--push"])
    assert not (tmp_path / "out").exists()


def test_an_export_that_fails_while_writing_leaves_no_partial_folder(tmp_path, saved_lm, monkeypatch):
    import chiar.hub

    def fails_halfway(model, path, **kwargs):
        model.save_pretrained(path)
        raise OSError("disk full")

    monkeypatch.setattr(chiar.hub, "save_for_hub", fails_halfway)
    with pytest.raises(OSError, match="disk full"):
        chiar.hub.main([str(saved_lm), str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging folder
    monkeypatch.undo()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("kept")
    chiar.hub.main([str(saved_lm), str(tmp_path / "out")])
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------------------------
# training meets a non-finite loss or a NaN batch


@pytest.mark.parametrize("fault", ["non-finite loss", "NaN batch"])
def test_a_faulty_last_step_leaves_the_checkpoints_routing_buffers_as_before_it(tmp_path, fault, monkeypatch):
    """Three clean steps, then a step whose loss is infinite although the hidden states are finite (an
    overflowing LM head), or whose hidden states are NaN (a NaN batch of embeddings): the saved
    checkpoint's thresholds are those of step 3, and the log says an update was skipped."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback
    from transformers.testing_utils import CaptureLogger

    import modeling_chiar.modeling_chiar as modeling

    corpus = write_corpus(tmp_path / "data", lines=60)
    argv = clm_args(tmp_path, corpus, "--do_train", "--save_steps", "4")
    argv[argv.index("--max_steps") + 1] = "4"
    argv[argv.index("--save_strategy") + 1] = "steps"
    before = []

    class Fault(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                for layer in (1, 2):
                    router = model.model.layers[layer].mixer.router
                    before.append((router.thresholds.clone(), router.train_thresholds.clone(), int(router.num_updates)))
                if fault == "non-finite loss":
                    model.lm_head.register_forward_hook(lambda module, inputs, out: out * float("inf"))
                else:
                    model.model.embed_tokens.register_forward_hook(lambda module, inputs, out: out * float("nan"))

    original = run_clm.ChiarTrainer.__init__
    monkeypatch.setattr(run_clm.ChiarTrainer, "__init__",
                        lambda self, *a, callbacks=None, **k: original(self, *a, callbacks=[*(callbacks or []), Fault()], **k))
    with CaptureLogger(modeling.logger) as captured:
        run_clm.main(argv)
    assert "2 routing-statistics update(s) were skipped" in captured.out  # one per routed layer
    # The faulty step's gradient made the weights NaN (the Trainer's business); the routing buffers are intact.
    state = load_file(tmp_path / "out" / "checkpoint-4" / "model.safetensors")
    for layer, (eval_before, train_before, updates_before) in zip((1, 2), before):
        prefix = f"model.layers.{layer}.mixer.router."
        assert torch.equal(state[prefix + "thresholds"], eval_before) and torch.equal(state[prefix + "train_thresholds"], train_before)
        assert updates_before == int(state[prefix + "num_updates"]) == 3


def test_chiar_routing_names_a_malformed_data_file(tmp_path, saved_lm, capsys):
    from chiar.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the light"}\n{oops\n')
    with pytest.raises(SystemExit):
        main(["stats", str(saved_lm), str(bad), "-o", str(tmp_path / "stats")])
    assert f"error: {bad}: line 2 is not valid JSON" in capsys.readouterr().err


def test_an_evaluation_share_far_from_its_target_is_named():
    from chiar.callbacks import off_target
    from modeling_chiar import ChiarConfig

    config = ChiarConfig(num_hidden_layers=4, layer_schedule=["dct", "routed", "routed", "attention"])
    assert config.router_target_fractions == {"dct": 0.75, "attention": 0.25}
    layers = {0: {"shares": {"dct": 1.0}}, 1: {"shares": {"dct": 0.71, "attention": 0.29}},
              2: {"shares": {"dct": 0.93, "attention": 0.07}}, 3: {"shares": {"attention": 1.0}}}
    problems = off_target(layers, config)
    assert len(problems) == 2 and all(p.startswith("layer 2 sent") for p in problems)
    assert "0.070 of its tokens to attention, target 0.250" in problems[1]
    assert off_target(layers, ChiarConfig(num_hidden_layers=4, layer_schedule=["attention"] * 4)) == []


@pytest.mark.parametrize("flag, value, message", [
    ("--block_size", "0", "--block_size must be a positive integer, got 0"),
    ("--max_train_samples", "-1", "--max_train_samples must be a positive integer, got -1"),
    ("--validation_split_percentage", "150", "--validation_split_percentage must be between 0 and 100"),
    ("--tokenizer_vocab_size", "5", "--tokenizer_vocab_size must be at least 257"),
    ("--model_name_or_path", "{tmp}/no-model", "--model_name_or_path {tmp}/no-model: no such folder or file"),
    ("--model_name_or_path", "{tmp}/data", "the folder has no config.json (not a saved model)"),
    ("--config_name", "{tmp}/config.json", "cannot read a model config (It looks like the config file"),
    ("--model_type", "no-such-model", "--model_type 'no-such-model': Unrecognized model identifier"),
    ("--dtype", "float64", "--dtype 'float64': use auto, float32, float16 or bfloat16"),
])
def test_run_clm_names_bad_sizes_and_model_sources(tmp_path, flag, value, message):
    corpus = write_corpus(tmp_path / "data", lines=30)
    (tmp_path / "config.json").write_text("not json")
    argv = clm_args(tmp_path, corpus) + [flag, value.format(tmp=tmp_path)]
    run_and_expect(run_clm.main, argv, message.format(tmp=tmp_path))


def test_a_label_column_with_one_class_is_named(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [{"text": TEXT, "label": "positive"}] * 20)
    run_and_expect(run_classification.main, classification_args(tmp_path, train), "holds one class only (['positive'])")

