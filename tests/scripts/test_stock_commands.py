"""The Transformers examples' README commands, copied as a user would, parse here with their stock
meaning (parse-only: nothing is downloaded), and the stock flags that only exist there are honoured."""

import shlex

import pytest

import run_classification
import run_clm

# examples/pytorch/language-modeling/README.md
CLM_README = [
    """--model_name_or_path gpt2 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1
       --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --do_train --do_eval --output_dir /tmp/test-clm""",
    """--model_name_or_path gpt2 --train_file path_to_train_file --validation_file path_to_validation_file
       --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --do_train --do_eval --output_dir /tmp/test-clm""",
    """--model_type gpt2 --tokenizer_name gpt2 --config_overrides=n_embd=1024,n_head=16,n_layer=48,n_positions=102
       --output_dir /tmp/test-clm""",
]
# examples/pytorch/text-classification/README.md, "Text classification"
CLASSIFICATION_README = [
    """--model_name_or_path google-bert/bert-base-uncased --dataset_name amazon_reviews_multi --dataset_config_name en
       --shuffle_train_dataset --metric_name accuracy --text_column_name "review_title,review_body,product_category"
       --text_column_delimiter "\\n" --label_column_name stars --do_train --do_eval --max_seq_length 512
       --per_device_train_batch_size 32 --learning_rate 2e-5 --num_train_epochs 1 --output_dir /tmp/amazon_reviews_multi_en/""",
    """--model_name_or_path google-bert/bert-base-uncased --dataset_name reuters21578 --dataset_config_name ModApte
       --shuffle_train_dataset --remove_splits "unused" --metric_name f1 --text_column_name text --label_column_name topics
       --do_train --do_eval --max_seq_length 512 --per_device_train_batch_size 32 --learning_rate 2e-5 --num_train_epochs 15
       --output_dir /tmp/reuters21578/""",
]


@pytest.mark.parametrize("command", CLM_README)
def test_run_clm_readme_commands_parse(command):
    model_args, data_args, training_args, _ = run_clm.parse_args(shlex.split(command) + ["--report_to", "none"])
    assert training_args.output_dir == "/tmp/test-clm"
    if "--model_name_or_path" in command:
        assert model_args.model_name_or_path == "gpt2" and training_args.do_train and training_args.do_eval
        assert training_args.per_device_train_batch_size == 8
    else:
        assert model_args.model_type == "gpt2" and model_args.config_overrides.startswith("n_embd=1024")


def test_run_classification_readme_commands_parse():
    model_args, data_args, training_args, _ = run_classification.parse_args(shlex.split(CLASSIFICATION_README[0]) + ["--report_to", "none"])
    assert data_args.shuffle_train_dataset and data_args.metric_name == "accuracy" and data_args.label_column_name == "stars"
    assert data_args.text_column_name == "review_title,review_body,product_category" and data_args.text_column_delimiter == "\\n"
    assert training_args.learning_rate == 2e-5 and training_args.metric_for_best_model == "accuracy"
    model_args, data_args, training_args, _ = run_classification.parse_args(shlex.split(CLASSIFICATION_README[1]) + ["--report_to", "none"])
    assert data_args.remove_splits == "unused" and data_args.metric_name == "f1" and training_args.metric_for_best_model == "f1"
    assert training_args.greater_is_better


@pytest.mark.parametrize("flags, field, value", [
    ("--streaming", "streaming", True),
    ("--dtype bfloat16", "dtype", "bfloat16"),
    ("--torch_dtype float16", "torch_dtype", "float16"),
    ("--low_cpu_mem_usage", "low_cpu_mem_usage", True),
    ("--model_revision v1.0", "model_revision", "v1.0"),
    ("--use_fast_tokenizer False", "use_fast_tokenizer", False),
    ("--token hf_abc", "token", "hf_abc"),  # once an ambiguous prefix of --tokenizer_*
])
def test_run_clm_stock_model_and_data_flags(flags, field, value):
    model_args, data_args, _, _ = run_clm.parse_args(["--output_dir", "out", "--report_to", "none", *flags.split()])
    assert getattr(model_args, field, getattr(data_args, field, None)) == value


@pytest.mark.parametrize("flags, field, value", [
    ("--do_regression true", "do_regression", True),
    ("--text_column_names a,b", "text_column_names", "a,b"),
    ("--pad_to_max_length", "pad_to_max_length", True),
    ("--ignore_mismatched_sizes", "ignore_mismatched_sizes", True),
    ("--train_split_name train_2021", "train_split_name", "train_2021"),
    ("--validation_split_name validation_2021", "validation_split_name", "validation_2021"),
    ("--test_split_name test_2021", "test_split_name", "test_2021"),
    ("--remove_columns id,date", "remove_columns", "id,date"),
    ("--shuffle_seed 7", "shuffle_seed", 7),
    ("--token hf_abc", "token", "hf_abc"),
])
def test_run_classification_stock_flags(flags, field, value):
    model_args, data_args, _, _ = run_classification.parse_args(["--output_dir", "out", "--report_to", "none", *flags.split()])
    assert getattr(model_args, field, getattr(data_args, field, None)) == value


def test_a_metric_that_is_not_computed_here_is_named():
    with pytest.raises(SystemExit, match="--metric_name 'matthews_correlation': computed here without downloads, one of"):
        run_classification.parse_args(["--output_dir", "out", "--metric_name", "matthews_correlation"])
