"""ListOps generator (`chiar.listops`): labels, format, limits, splits, files and the evaluator."""

import json
import re
import subprocess
import sys
from collections import Counter

import pytest

from chiar import listops
from chiar.listops import ListOpsSettings, evaluate_listops, generate_listops, listops_length, write_listops

SMALL = dict(num_train=200, num_val=50, num_test=50, min_length=20, max_length=200, seed=0)
TOKEN = re.compile(r"\[(MIN|MAX|MED|SM)|[0-9]|\]")


@pytest.fixture(scope="module")
def small():
    return generate_listops(progress=False, **SMALL)


def all_examples(data):
    return [example for split in ("train", "validation", "test") for example in data[split]]


def shape(text):
    """Independent of the module: (deepest operator nesting, [argument count of every operator])."""
    open_args, arg_counts, deepest = [], [], 0
    for token in text.split(" "):
        assert TOKEN.fullmatch(token), f"bad token {token!r}"
        if token.startswith("["):
            if open_args:
                open_args[-1] += 1
            open_args.append(0)
            deepest = max(deepest, len(open_args))
        elif token == "]":
            arg_counts.append(open_args.pop())
        else:
            open_args[-1] += 1
    assert not open_args
    return deepest, arg_counts


# --- generator ---------------------------------------------------------------------------------


def test_labels_agree_with_the_independent_evaluator(small):
    examples = all_examples(small)
    assert len(examples) == 300
    for example in examples:
        assert type(example["label"]) is int and 0 <= example["label"] <= 9
        assert evaluate_listops(example["text"]) == example["label"], example["text"]


def test_split_sizes_and_format(small):
    assert {split: len(small[split]) for split in small} == {"train": 200, "validation": 50, "test": 50}
    for example in all_examples(small):
        text = example["text"]
        assert text == text.strip() and "  " not in text
        assert text.startswith("[") and text.endswith(" ]")  # the root is always an operator


def test_lengths_depth_and_arguments_within_limits(small):
    for example in all_examples(small):
        assert SMALL["min_length"] <= listops_length(example["text"]) <= SMALL["max_length"]
        deepest, arg_counts = shape(example["text"])
        # max_depth counts levels with the digits included (LRA): operators nest at most 9 deep.
        assert 1 <= deepest <= 9
        assert all(2 <= n <= 10 for n in arg_counts)


def test_limits_are_reached_not_just_respected():
    data = generate_listops(progress=False, num_train=300, num_val=0, num_test=0, max_args=4, max_depth=4,
                            min_length=10, max_length=60, subtree_prob=0.5, seed=3)
    shapes = [shape(example["text"]) for example in data["train"]]
    assert max(deepest for deepest, _ in shapes) == 3  # max_depth - 1 nested operators
    assert {n for _, counts in shapes for n in counts} == {2, 3, 4}
    lengths = [listops_length(example["text"]) for example in data["train"]]
    assert min(lengths) >= 10 and max(lengths) <= 60


def test_length_counts_every_whitespace_token():
    # [MAX 2 9 [MIN 4 7 ] 0 ]: [MAX 2 9 [MIN 4 7 ] 0 ] -> 2 operators, 5 digits, 2 closing brackets = 9
    assert listops_length("[MAX 2 9 [MIN 4 7 ] 0 ]") == 9


def test_splits_are_disjoint(small):
    texts = [example["text"] for example in all_examples(small)]
    assert len(set(texts)) == len(texts)


def test_deterministic_for_a_seed_and_different_for_another(small):
    assert generate_listops(progress=False, **SMALL) == small
    other = generate_listops(progress=False, **{**SMALL, "seed": 1})
    assert other != small
    assert not {e["text"] for e in all_examples(other)} & {e["text"] for e in all_examples(small)}


def test_validation_and_test_do_not_depend_on_num_train(small):
    fewer = generate_listops(progress=False, **{**SMALL, "num_train": 30})
    assert fewer["validation"] == small["validation"] and fewer["test"] == small["test"]
    assert fewer["train"] == small["train"][:30]  # each split is a prefix-stable stream of its own


def test_label_distribution_is_not_degenerate(small):
    labels = Counter(example["label"] for example in all_examples(small))
    assert len(labels) > 5
    assert max(labels.values()) < 0.5 * sum(labels.values())


def test_lra_defaults():
    settings = ListOpsSettings()
    assert (settings.num_train, settings.num_val, settings.num_test) == (96_000, 2_000, 2_000)
    assert (settings.max_args, settings.max_depth, settings.min_length, settings.max_length) == (10, 10, 500, 2_000)
    assert settings.subtree_prob == 0.25


def test_default_length_band_is_reachable():
    data = generate_listops(progress=False, num_train=5, num_val=0, num_test=0)
    for example in data["train"]:
        assert 500 <= listops_length(example["text"]) <= 2000
        assert evaluate_listops(example["text"]) == example["label"]


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_depth=2, min_length=20),  # at most 2 + 10 digits = 12 tokens
        dict(subtree_prob=0.0, min_length=13),
        dict(min_length=300, max_length=200),
        dict(max_args=1),
        dict(max_depth=1),
        dict(num_train=-1),
        dict(subtree_prob=1.5),
        dict(num_val=2.5),
    ],
)
def test_invalid_settings_are_rejected(settings):
    with pytest.raises(ValueError):
        generate_listops(progress=False, **{**SMALL, **settings})


def test_running_out_of_distinct_trees_raises(monkeypatch):
    # max_depth=2, max_args=2, length 4: only "[OP d d ]", 4 * 10 * 10 = 400 distinct trees
    monkeypatch.setattr(listops, "MAX_CONSECUTIVE_REJECTIONS", 2_000)
    with pytest.raises(RuntimeError, match="draws in a row"):
        generate_listops(progress=False, num_train=401, num_val=0, num_test=0, max_args=2, max_depth=2,
                         min_length=4, max_length=4)


# --- evaluator ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7", 7),  # a bare digit is an expression
        ("[MIN 3 8 ]", 3),
        ("[MAX 4 ]", 4),  # a single argument parses (the generator always writes 2+)
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),  # MIN(4,7)=4; MAX(2,9,4,0)=9
        ("[MED 1 9 4 ]", 4),  # sorted 1 4 9 -> middle 4
        ("[MED 2 5 ]", 2),  # even count: lower median sorted(2,5)[0] = 2 (LRA's int(np.median) would give 3)
        ("[MED 7 1 8 3 ]", 3),  # sorted 1 3 7 8 -> index (4-1)//2 = 1 -> 3
        ("[MED 5 5 0 0 ]", 0),  # sorted 0 0 5 5 -> index 1 -> 0
        ("[SM 1 2 3 ]", 6),  # 6, no wrap
        ("[SM 9 8 ]", 7),  # 17 mod 10 = 7
        ("[SM 5 5 ]", 0),  # 10 mod 10 = 0
        ("[SM 9 9 9 ]", 7),  # 27 mod 10 = 7
        ("[SM [MAX 3 8 ] [MED 6 2 9 1 ] 5 ]", 5),  # MAX=8; MED: sorted 1 2 6 9 -> 2; 8+2+5=15 -> 5
        ("[MIN [MAX [MED [SM 4 8 ] 9 0 ] 3 ] 6 ]", 3),  # SM 12->2; MED(2,9,0)=2; MAX(2,3)=3; MIN(3,6)=3
        ("[MAX [MIN 9 8 ] [SM 6 7 ] [MED 5 5 0 0 ] ]", 8),  # MIN=8; SM 13->3; MED=0; MAX(8,3,0)=8
        ("[SM [SM 9 9 ] [SM 9 9 ] [SM 9 9 ] ]", 4),  # each SM 18->8; 8+8+8=24 -> 4
        ("  [MIN\t5 \n 6 ]  ", 5),  # any whitespace separates tokens
    ],
)
def test_evaluator_on_hand_written_examples(text, expected):
    assert evaluate_listops(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "]",
        "[MAX 1 2",  # unclosed
        "[MAX [MIN 1 2 ]",  # outer unclosed
        "[MAX 1 2 ] ]",  # one ] too many
        "[MAX 1 2 ] 3",  # trailing digit
        "[MAX 1 2 ] [MIN 3 4 ]",  # two expressions
        "1 2",  # digits outside an operator
        "[MAX ]",  # no arguments
        "[FOO 1 2 ]",  # unknown operator
        "[MAX 10 2 ]",  # not a digit
        "[MAX1 2 ]",  # operator glued to its argument
        "MAX 1 2 ]",  # operator without its bracket
        "( [MAX 1 2 ] )",  # LRA's parenthesised encoding is not this format
        "[max 1 2 ]",  # operators are upper case
    ],
)
def test_malformed_input_raises_value_error(text):
    with pytest.raises(ValueError):
        evaluate_listops(text)


# --- files and CLI -----------------------------------------------------------------------------


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_listops_files_settings_and_datasets(tmp_path, small):
    paths = write_listops(tmp_path / "listops", progress=False, **SMALL)
    assert set(paths) == {"train", "validation", "test", "settings"}
    assert sorted(p.name for p in (tmp_path / "listops").iterdir()) == [
        "settings.json", "test.jsonl", "train.jsonl", "validation.jsonl"]  # no temporary files left
    for split in ("train", "validation", "test"):
        assert read_jsonl(paths[split]) == small[split]  # same data as in memory
    record = json.loads(paths["settings"].read_text())
    assert record["counts"] == {"train": 200, "validation": 50, "test": 50}
    assert {k: record[k] for k in SMALL} == SMALL
    assert record["max_args"] == 10 and record["subtree_prob"] == 0.25
    assert sum(record["stats"]["train"]["label_counts"]) == 200
    assert SMALL["min_length"] <= record["stats"]["test"]["min_length"] <= record["stats"]["test"]["max_length"] <= 200

    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset(
        "json", data_files={split: str(paths[split]) for split in ("train", "validation", "test")},
        cache_dir=str(tmp_path / "cache"),
    )
    assert {split: loaded[split].num_rows for split in loaded} == {"train": 200, "validation": 50, "test": 50}
    assert loaded["train"][0] == small["train"][0]
    assert loaded["train"].features["label"].dtype == "int64"


def test_write_listops_leaves_nothing_behind_on_error(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(listops, "_settings_record", fail)  # after all three splits were written
    with pytest.raises(OSError, match="disk full"):
        write_listops(tmp_path, progress=False, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_write_listops_keeps_old_files_on_error(tmp_path, monkeypatch):
    write_listops(tmp_path, progress=False, **{**SMALL, "num_train": 10})
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    monkeypatch.setattr(listops, "_settings_record", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_listops(tmp_path, progress=False, **SMALL)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_cli(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "chiar.listops", "--output_dir", str(out), "--num_train", "20", "--num_val", "5",
         "--num_test", "5", "--min_length", "10", "--max_length", "80", "--max_depth", "5", "--max_args", "6",
         "--subtree_prob", "0.3", "--seed", "7", "--no_progress"],
        capture_output=True, text=True, check=True,
    )
    assert "train.jsonl" in result.stdout
    record = json.loads((out / "settings.json").read_text())
    assert record["counts"] == {"train": 20, "validation": 5, "test": 5}
    assert (record["seed"], record["max_depth"], record["max_args"], record["subtree_prob"]) == (7, 5, 6, 0.3)
    for split in ("train", "validation", "test"):
        for example in read_jsonl(out / f"{split}.jsonl"):
            assert 10 <= listops_length(example["text"]) <= 80
            assert evaluate_listops(example["text"]) == example["label"]
            deepest, arg_counts = shape(example["text"])
            assert deepest <= 4 and max(arg_counts) <= 6


def test_cli_rejects_impossible_settings(tmp_path):
    with pytest.raises(SystemExit):
        listops.main(["--output_dir", str(tmp_path), "--max_depth", "2", "--min_length", "50", "--no_progress"])
    assert list(tmp_path.iterdir()) == []
