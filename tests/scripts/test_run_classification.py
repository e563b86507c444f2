"""End-to-end runs of run_classification.py (IMDB-shaped and ListOps data, seconds) and its errors."""

import gzip
import itertools
import json
import random

import pytest

import run_classification
from harness import data_dir_or_skip

TINY = "hidden_size=32,num_attention_heads=4,intermediate_size=64"


def write_sentiment(folder, n_train=240, n_test=60, seed=0):
    """IMDB-shaped jsonl (text, label) where the label follows from the words."""
    rng = random.Random(seed)
    good, bad, filler = ["great", "superb", "moving", "bright"], ["dull", "awful", "boring", "dark"], ["the", "film", "was", "and", "plot", "cast"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("test", n_test)):
        with open(folder / f"{split}.jsonl", "w") as handle:
            for _ in range(count):
                label = rng.randint(0, 1)
                words = [rng.choice(filler) for _ in range(rng.randint(8, 30))]
                for _ in range(3):
                    words.insert(rng.randrange(len(words)), rng.choice(good if label else bad))
                handle.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return folder


def common(tmp_path, *extra):
    return ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--config_overrides", TINY,
            "--tokenizer_vocab_size", "300", "--max_seq_length", "64", "--per_device_train_batch_size", "8",
            "--num_train_epochs", "2", "--report_to", "none", "--disable_tqdm", "true", *extra]


def test_imdb_shaped_run_selects_on_validation_and_writes_test_predictions(tmp_path):
    data = write_sentiment(tmp_path / "data")
    run_classification.main(common(tmp_path, "--train_file", str(data / "train.jsonl"), "--test_file", str(data / "test.jsonl")))
    out = tmp_path / "out"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] is not None  # selected on validation (held out of train)
    evaluations = [entry for entry in state["log_history"] if "eval_accuracy" in entry]
    assert len(evaluations) == 2 and state["best_metric"] == max(e["eval_accuracy"] for e in evaluations)
    assert not any(key.startswith("test_") for entry in state["log_history"] for key in entry)  # test never used for selection
    test = json.loads((out / "test_results.json").read_text())
    for key in ("test_accuracy", "test_attention_flops_fraction", "test_routing_layer1_attention", "test_entropy_layer2"):
        assert key in test, key
    predictions = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 60 and {p["prediction"] for p in predictions} <= {"0", "1"}
    accuracy = sum(p["prediction"] == p["label"] for p in predictions) / 60
    assert accuracy == pytest.approx(test["test_accuracy"])
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.is_causal is False and model.config.num_labels == 2  # bidirectional by default


def test_sample_limits_take_a_random_subset_of_label_sorted_data(tmp_path):
    """IMDB's splits are sorted by label: `--max_*_samples` must not keep only the first class."""
    data = write_sentiment(tmp_path / "data", n_test=80)
    rows = sorted((json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()), key=lambda r: r["label"])
    (data / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_classification.main(common(tmp_path, "--train_file", str(data / "train.jsonl"), "--test_file", str(data / "test.jsonl"),
                                   "--max_predict_samples", "30", "--num_train_epochs", "1"))
    predictions = [json.loads(line) for line in (tmp_path / "out" / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 30 and {p["label"] for p in predictions} == {"0", "1"}
    by_text = {row["text"][:200]: str(row["label"]) for row in rows}
    assert all(by_text[p["text"]] == p["label"] for p in predictions)  # each text printed beside its own label


def test_listops_generated_run(tmp_path):
    run_classification.main(common(
        tmp_path, "--dataset_name", "listops", "--listops_num_train", "160", "--listops_num_val", "40",
        "--listops_num_test", "40", "--listops_min_length", "20", "--listops_max_length", "80", "--num_train_epochs", "1",
    ))
    out = tmp_path / "out"
    settings = json.loads((out / "listops-data" / "settings.json").read_text())
    assert settings["num_train"] == 160 and settings["min_length"] == 20
    test = json.loads((out / "test_results.json").read_text())
    assert 0 <= test["test_accuracy"] <= 1 and test["test_samples"] == 40
    assert len((out / "test_predictions.jsonl").read_text().splitlines()) == 40


def test_unseen_label_in_evaluation_data_fails_at_start(tmp_path):
    data = write_sentiment(tmp_path / "data")
    with open(data / "valid.jsonl", "w") as handle:
        handle.write(json.dumps({"text": "great film", "label": 7}) + "\n")
    with pytest.raises(SystemExit, match="labels never seen in training: \\[7\\]"):
        run_classification.main(common(tmp_path, "--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "valid.jsonl")))


@pytest.mark.parametrize("flag, value, message", [
    ("--label_column_name", "sentiment", "not a column"),
    ("--text_column_name", "review", "not a column"),
    ("--test_file", "missing.jsonl", "file not found"),
])
def test_bad_columns_and_files(tmp_path, flag, value, message):
    data = write_sentiment(tmp_path / "data", n_train=20, n_test=10)
    value = str(tmp_path / value) if value.endswith(".jsonl") else value
    argv = common(tmp_path, "--train_file", str(data / "train.jsonl"), flag, value)
    with pytest.raises(SystemExit, match=message):
        run_classification.main(argv)


def test_sequence_length_above_a_pretrained_models_limit(tmp_path):
    from harness import tiny_tokenizer
    from modeling_chiar import ChiarConfig, ChiarForSequenceClassification

    tokenizer = tiny_tokenizer()
    ChiarForSequenceClassification(ChiarConfig(vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                               max_position_embeddings=64, is_causal=False)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = write_sentiment(tmp_path / "data", n_train=20, n_test=10)
    argv = common(tmp_path, "--model_name_or_path", str(tmp_path / "model"), "--tokenizer_name", str(tmp_path / "model"),
                  "--train_file", str(data / "train.jsonl"))
    argv[argv.index("--max_seq_length") + 1] = "512"
    with pytest.raises(SystemExit, match="above what the model supports"):
        run_classification.main(argv)


def test_real_imdb_subset(tmp_path):
    folder = data_dir_or_skip("imdb")
    for split, count in (("train", 200), ("test", 50)):
        with gzip.open(folder / f"{split}.jsonl.gz", "rt") as source, open(tmp_path / f"{split}.jsonl", "w") as target:
            rows = [json.loads(line) for line in itertools.islice(source, 0, 25000, 100)][:count]
            target.writelines(json.dumps(row) + "\n" for row in rows)
    run_classification.main(common(tmp_path, "--train_file", str(tmp_path / "train.jsonl"), "--test_file",
                                   str(tmp_path / "test.jsonl"), "--num_train_epochs", "1", "--max_seq_length", "128"))
    test = json.loads((tmp_path / "out" / "test_results.json").read_text())
    assert test["test_samples"] == 50


def test_torch_compile_trains_and_evaluates(tmp_path):
    """--torch_compile (the Trainer's flag; aot_eager here, which traces as inductor does, in seconds):
    batches are padded to --max_seq_length, so one graph serves every batch."""
    import torch._dynamo

    data = write_sentiment(tmp_path / "data", n_train=64, n_test=16)
    torch._dynamo.reset()
    run_classification.main(common(tmp_path, "--train_file", str(data / "train.jsonl"), "--test_file", str(data / "test.jsonl"),
                                   "--torch_compile", "--torch_compile_backend", "aot_eager", "--num_train_epochs", "1"))
    test = json.loads((tmp_path / "out" / "test_results.json").read_text())
    assert 0 <= test["test_accuracy"] <= 1 and "test_routing_layer1_attention" in test
    torch._dynamo.reset()


def write_reviews(folder, n_train=120, n_eval=30, seed=0):
    """Two text columns, an int rating, a float score and a list of topics per review."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        with open(folder / f"{split}.jsonl", "w") as handle:
            for _ in range(count):
                stars = rng.randint(0, 1)
                topics = [t for t in ("plot", "cast", "music") if rng.random() < 0.5] or ["plot"]
                body = " ".join(rng.choice(["the", "film", "was", "and"]) for _ in range(10)) + (" great" if stars else " dull")
                handle.write(json.dumps({"title": " ".join(topics), "body": body, "stars": stars,
                                         "score": stars + rng.random() / 10, "topics": topics}) + "\n")
    return folder


@pytest.mark.parametrize("task, flags, metrics", [
    ("joined columns", ["--text_column_names", "title,body", "--text_column_delimiter", " | ", "--label_column_name", "stars",
                        "--metric_name", "f1", "--shuffle_train_dataset", "--pad_to_max_length", "true"], ("accuracy", "f1")),
    ("regression", ["--text_column_name", "body", "--label_column_name", "score"], ("mse", "mae")),
    ("multi-label", ["--text_column_name", "title", "--label_column_name", "topics"], ("f1", "accuracy")),
])
def test_stock_tasks_train_evaluate_and_predict(tmp_path, task, flags, metrics):
    data = write_reviews(tmp_path / "data")
    run_classification.main(common(tmp_path, "--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "validation.jsonl"),
                                   "--test_file", str(data / "test.jsonl"), *flags))
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    for name in metrics:
        assert f"eval_{name}" in results and f"test_{name}" in results
    first = json.loads((tmp_path / "out" / "test_predictions.jsonl").read_text().splitlines()[0])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if task == "regression":
        assert isinstance(first["prediction"], float) and config["problem_type"] == "regression" and results["eval_mse"] < 1.5
    elif task == "multi-label":
        assert isinstance(first["label"], list) and set(first["label"]) <= {"plot", "cast", "music"}
        assert config["problem_type"] == "multi_label_classification" and len(config["id2label"]) == 3
    else:
        assert " | " in first["text"] and config["problem_type"] == "single_label_classification"


def test_split_flags_choose_and_drop_splits(tmp_path):
    data = write_reviews(tmp_path / "data", n_train=40, n_eval=10)
    argv = common(tmp_path, "--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "validation.jsonl"),
                  "--test_file", str(data / "test.jsonl"), "--text_column_name", "body", "--label_column_name", "stars")
    with pytest.raises(SystemExit, match="--remove_splits: the data has no split 'unused'"):
        run_classification.main(argv + ["--remove_splits", "unused"])
    with pytest.raises(SystemExit, match="--validation_split_name: the data has no split 'dev'"):
        run_classification.main(argv + ["--validation_split_name", "dev"])
    run_classification.main(argv + ["--remove_splits", "test", "--validation_split_name", "validation", "--remove_columns", "title",
                                    "--num_train_epochs", "1"])
    assert not (tmp_path / "out" / "test_results.json").exists()  # the test split was removed
