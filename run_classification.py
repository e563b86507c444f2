#!/usr/bin/env python
"""Train or evaluate a CHIAR (or any) sequence classifier, shaped like the Transformers example
`run_classification.py`: HfArgumentParser over model / data / TrainingArguments, a lone `.json`
argument as the whole configuration, Trainer.

A bidirectional CHIAR (`is_causal=False`, masked mean pooling) is the default model. Out of the box:

    python run_classification.py --dataset_name imdb --output_dir runs/imdb          # from the Hub
    python run_classification.py --train_file ../shared/data/imdb/train.jsonl.gz \\
        --test_file ../shared/data/imdb/test.jsonl.gz --output_dir runs/imdb          # offline
    python run_classification.py --dataset_name listops --output_dir runs/listops    # generated here

Model selection uses the validation split only (held out of train when there is none, as for
IMDB); the test split is evaluated once, with the selected model, and its predictions are written
to `test_predictions.jsonl`. Evaluation reports accuracy, each layer's operator shares, the mean
spectral entropy and the attention query / FLOP fractions actually executed.
"""

import dataclasses
import json
import logging
import os
import random
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

import modeling_chiar  # noqa: F401  (registers CHIAR with the Auto classes)
from chiar.callbacks import RoutingLoggingCallback
from chiar.data import ArgumentError, check_label_column, check_text_column, label_task, load_raw_datasets, source_of
from chiar.evaluation import CLASSIFICATION_METRICS, classification_metrics
from chiar.training import (
    ChiarTrainer,
    apply_config_overrides,
    check_output_dir,
    check_ranges,
    checkpoint_to_resume,
    get_tokenizer,
    hub_kwargs,
    load_config,
    prepare_training_args,
)
from chiar.variants import resolve_config

logger = logging.getLogger(__name__)
SCRATCH_DEFAULTS = {"learning_rate": 5e-4, "warmup_steps": 0.05, "weight_decay": 0.01}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Checkpoint to start from; omit to train from scratch."})
    config_name: str | None = field(default=None, metadata={"help": "Config file or shipped name; default chiar-tiny, made bidirectional."})
    config_overrides: str | None = field(default=None, metadata={"help": 'e.g. "is_causal=true,classifier_pooling=last"'})
    tokenizer_name: str | None = field(default=None)
    tokenizer_vocab_size: int = field(default=8192)
    cache_dir: str | None = field(default=None)
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (tokenizers-backed) tokenizer when loading one."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of --model_name_or_path on the Hub."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    trust_remote_code: bool = field(default=False)
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "Load a checkpoint whose classifier head has another number of labels."})
    attn_implementation: str = field(default="sdpa")
    routing_settle_batches: int = field(
        default=16, metadata={"help": "Training batches the routers' eval statistics are settled on after training (0: keep the running ones)."}
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default="imdb", metadata={"help": "Hub dataset, or `listops` to generate ListOps here."})
    dataset_config_name: str | None = field(default=None)
    train_file: str | None = field(default=None)
    validation_file: str | None = field(default=None)
    test_file: str | None = field(default=None)
    text_column_name: str = field(default="text", metadata={"help": "Text column; several, comma-separated, are joined."})
    text_column_names: str | None = field(default=None, metadata={"help": "The stock spelling of --text_column_name."})
    text_column_delimiter: str = field(default=" ", metadata={"help": "What joins several text columns."})
    label_column_name: str = field(default="label", metadata={"help": "Class names, integer ids, a list of them (multi-label) or floats (regression)."})
    do_regression: bool = field(default=None, metadata={"help": "Regression on float labels; default: when the labels are floats."})
    train_split_name: str | None = field(default=None, metadata={"help": "The dataset's split to train on (default: train)."})
    validation_split_name: str | None = field(default=None, metadata={"help": "The dataset's split to select models on (default: validation)."})
    test_split_name: str | None = field(default=None, metadata={"help": "The dataset's split to test on (default: test)."})
    remove_splits: str | None = field(default=None, metadata={"help": "Splits to drop, comma-separated."})
    remove_columns: str | None = field(default=None, metadata={"help": "Columns to drop, comma-separated."})
    metric_name: str | None = field(default=None, metadata={"help": "accuracy, f1, precision, recall (macro; micro for multi-label), mse or mae; default by task."})
    pad_to_max_length: bool = field(default=None, metadata={"help": "Pad every batch to --max_seq_length (default: to the longest, or always when compiled)."})
    shuffle_train_dataset: bool = field(default=False, metadata={"help": "Shuffle the training split once, before sampling."})
    shuffle_seed: int = field(default=42)
    max_seq_length: int | None = field(default=None, metadata={"help": "Default 512, or 2048 for ListOps."})
    validation_split_percentage: int = field(default=10, metadata={"help": "Held out of train when there is no validation split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep a seeded random subset of this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep a seeded random subset of this size."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep a seeded random subset of this size."})
    preprocessing_num_workers: int | None = field(default=None)
    overwrite_cache: bool = field(default=False)
    listops_dir: str | None = field(default=None, metadata={"help": "Where ListOps is written (default OUTPUT_DIR/listops-data)."})
    listops_num_train: int = field(default=96000)
    listops_num_val: int = field(default=2000)
    listops_num_test: int = field(default=2000)
    listops_min_length: int = field(default=500)
    listops_max_length: int = field(default=2000)
    listops_max_depth: int = field(default=10)
    listops_max_args: int = field(default=10)
    listops_seed: int = field(default=0)


def parse_args(argv):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        asked = json.loads(open(argv[0]).read()).keys()
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
        asked = [arg.lstrip("-").split("=")[0].replace("-", "_") for arg in argv]  # --learning-rate is --learning_rate
    known = sorted({name for names in CLASSIFICATION_METRICS.values() for name in names})
    if data_args.metric_name is not None and data_args.metric_name not in known:
        raise ArgumentError(f"--metric_name {data_args.metric_name!r}: computed here without downloads, one of {', '.join(known)}.")
    changes = {}
    defaults = not any(flag in asked for flag in ("do_train", "do_eval", "do_predict"))
    if defaults:  # built-in defaults: train, evaluate, and test when there is a test split
        changes.update(do_train=True, do_eval=True, do_predict=True)
    if (training_args.do_train or changes.get("do_train")) and not any(k in asked for k in ("eval_strategy", "load_best_model_at_end")):
        # Model selection on the validation split, once per epoch; the test split is never looked at.
        metric = data_args.metric_name or "accuracy"  # regression switches to mse once the labels are seen
        changes.update(eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model=metric,
                       greater_is_better=metric not in ("mse", "mae"), save_total_limit=training_args.save_total_limit or 2)
    if model_args.model_name_or_path is None:
        changes.update({key: value for key, value in SCRATCH_DEFAULTS.items() if key not in asked})
    if changes:  # rebuilt, so TrainingArguments checks the combination
        training_args = dataclasses.replace(training_args, **changes)
    return model_args, data_args, prepare_training_args(training_args), defaults


def choose_splits(raw, data_args):
    """The stock flags that pick splits and columns: --remove_splits, --{train,validation,test}_split_name,
    --remove_columns."""
    for name in filter(None, (data_args.remove_splits or "").split(",")):
        if name.strip() not in raw:
            raise ArgumentError(f"--remove_splits: the data has no split {name.strip()!r}; splits: {list(raw)}.")
        raw.pop(name.strip())
    for role in ("train", "validation", "test"):
        name = getattr(data_args, f"{role}_split_name")
        if name is not None and name != role:
            if name not in raw:
                raise ArgumentError(f"--{role}_split_name: the data has no split {name!r}; splits: {list(raw)}.")
            raw[role] = raw.pop(name)
    for column in filter(None, (c.strip() for c in (data_args.remove_columns or "").split(","))):
        for name in raw:
            if column in raw[name].column_names:
                raw[name] = raw[name].remove_columns(column)
    return raw


def listops_files(data_args, training_args):
    """Generate ListOps (once, main process first) and point the data arguments at its files."""
    from chiar.listops import write_listops

    folder = data_args.listops_dir or os.path.join(training_args.output_dir, "listops-data")
    settings = dict(
        num_train=data_args.listops_num_train, num_val=data_args.listops_num_val, num_test=data_args.listops_num_test,
        min_length=data_args.listops_min_length, max_length=data_args.listops_max_length,
        max_depth=data_args.listops_max_depth, max_args=data_args.listops_max_args, seed=data_args.listops_seed,
    )
    with training_args.main_process_first(desc="generating ListOps"):
        record = os.path.join(folder, "settings.json")
        existing = json.load(open(record)) if os.path.isfile(record) else {}
        if any(existing.get(key) != value for key, value in settings.items()):
            if training_args.process_index == 0:
                write_listops(folder, **settings)
    data_args.train_file = os.path.join(folder, "train.jsonl")
    data_args.validation_file = os.path.join(folder, "validation.jsonl")
    data_args.test_file = os.path.join(folder, "test.jsonl")
    data_args.max_seq_length = data_args.max_seq_length or 2048


def main(argv=None):
    model_args, data_args, training_args, defaults = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)
    check_ranges(data_args, model_args)
    check_output_dir(training_args.output_dir)

    # --- data, checked before anything expensive ---
    local_files = data_args.train_file or data_args.validation_file or data_args.test_file
    if data_args.dataset_name == "listops" and not local_files:
        listops_files(data_args, training_args)
    raw = load_raw_datasets(data_args, model_args.cache_dir, " (e.g. --train_file ../shared/data/imdb/train.jsonl.gz --test_file "
                            "../shared/data/imdb/test.jsonl.gz)", token=model_args.token)
    raw = choose_splits(raw, data_args)
    text_columns = [c.strip() for c in (data_args.text_column_names or data_args.text_column_name).split(",") if c.strip()]
    label_column = data_args.label_column_name
    first = next(iter(raw.values()))
    task = label_task(first, label_column, data_args.do_regression) if label_column in first.column_names else "single_label"
    for name in raw:
        for column in text_columns:
            check_text_column(raw[name], column, source_of(data_args, name))
        check_label_column(raw[name], label_column, source_of(data_args, name), task)
    if "validation" not in raw and "train" in raw:  # e.g. IMDB: select models on a held-out part of train, never on test
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=training_args.seed,
                                              stratify_by_column=None)
        raw["train"], raw["validation"] = split["train"], split["test"]
    if data_args.shuffle_train_dataset and "train" in raw:
        raw["train"] = raw["train"].shuffle(seed=data_args.shuffle_seed)
    if training_args.do_train and "train" not in raw:
        raise ArgumentError("--do_train needs training data (--train_file or a dataset with a train split).")
    if training_args.do_predict and "test" not in raw:
        if not defaults:
            raise ArgumentError("--do_predict needs a test split (--test_file).")
        training_args.do_predict = False
    if task == "regression" and training_args.metric_for_best_model == "accuracy" and data_args.metric_name is None:
        training_args.metric_for_best_model, training_args.greater_is_better = "mse", False
    metric = data_args.metric_name or CLASSIFICATION_METRICS[task][0]
    if metric not in CLASSIFICATION_METRICS[task]:
        raise ArgumentError(f"--metric_name {metric} does not apply to {task.replace('_', '-')} labels: use {', '.join(CLASSIFICATION_METRICS[task])}.")

    label_source = raw["train"] if "train" in raw else raw["validation"]
    if task == "regression":
        labels, label_to_id = [], {}
    else:
        values = label_source[label_column]
        labels = sorted({v for row in values for v in row} if task == "multi_label" else set(values))  # one kind, no nulls: checked
        label_to_id = {label: i for i, label in enumerate(labels)}
        if len(labels) < 2:
            raise ArgumentError(f"--label_column_name {label_column!r} holds one class only ({labels[:1]}): classification needs two or more.")
        for name in raw:
            values = raw[name][label_column]
            unseen = ({v for row in values for v in row} if task == "multi_label" else set(values)) - set(label_to_id)
            if unseen:
                raise ArgumentError(f"the {name} split has labels never seen in training: {sorted(unseen)[:10]}.")

    def joined_texts(examples):
        if len(text_columns) == 1:
            return examples[text_columns[0]]
        return [data_args.text_column_delimiter.join(parts) for parts in zip(*(examples[c] for c in text_columns))]

    # --- tokenizer and model ---
    tokenizer = get_tokenizer(model_args, training_args, lambda: (t for t in joined_texts(label_source.select_columns(text_columns)[:]) if t.strip()))
    max_seq_length = data_args.max_seq_length or 512
    num_labels = 1 if task == "regression" else len(labels)
    problem_type = {"single_label": "single_label_classification", "multi_label": "multi_label_classification", "regression": "regression"}[task]
    if model_args.model_name_or_path:
        config = load_config(model_args.model_name_or_path, "--model_name_or_path", num_labels=num_labels, **hub_kwargs(model_args))
    else:
        config = load_config(resolve_config(model_args.config_name or "chiar-tiny"), "--config_name", num_labels=num_labels)
        config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
        if getattr(config, "model_type", None) == "chiar":
            config.is_causal = False  # bidirectional by default for classification
            config.max_position_embeddings = max(config.max_position_embeddings, max_seq_length)
    config.problem_type = problem_type
    if task != "regression":
        config.label2id = {str(label): i for label, i in label_to_id.items()}
        config.id2label = {i: str(label) for label, i in label_to_id.items()}
    config = apply_config_overrides(config, model_args.config_overrides)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and max_seq_length > max_positions:
        raise ArgumentError(f"--max_seq_length {max_seq_length} is above what the model supports (max_position_embeddings={max_positions}).")
    if model_args.model_name_or_path:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, config=config, attn_implementation=model_args.attn_implementation,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub_kwargs(model_args),
        )
    else:
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=model_args.attn_implementation)

    def encode_labels(values):
        if task == "regression":
            return [float(value) for value in values]
        if task == "multi_label":
            return [[1.0 if label in row else 0.0 for label in labels] for row in values]
        return [label_to_id[value] for value in values]

    def preprocess(examples):
        result = tokenizer(joined_texts(examples), truncation=True, max_length=max_seq_length)
        result["labels"] = encode_labels(examples[label_column])
        return result

    with training_args.main_process_first(desc="tokenizing"):
        encoded = raw.map(preprocess, batched=True, num_proc=data_args.preprocessing_num_workers,
                          remove_columns=raw[next(iter(raw))].column_names, load_from_cache_file=not data_args.overwrite_cache,
                          desc="Tokenizing")

    def subset_rows(split, limit):
        """Seeded random rows, in order: the first rows of a split can be one class (IMDB's are sorted by label)."""
        size = len(encoded[split])
        if limit is None or limit >= size:
            return range(size)
        return sorted(random.Random(training_args.seed).sample(range(size), limit))

    def limited(split, limit):
        rows = subset_rows(split, limit)
        return encoded[split] if len(rows) == len(encoded[split]) else encoded[split].select(rows)

    train_dataset = limited("train", data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = limited("validation", data_args.max_eval_samples) if (training_args.do_eval or training_args.do_train) else None

    def readable(values, gold=False):
        """Predictions or gold labels as the data spells them: class names, lists of them, or numbers."""
        values = values[0] if isinstance(values, tuple) else values
        if task == "regression":
            return [float(v) for v in np.reshape(values, (len(values), -1))[:, 0]]
        if task == "multi_label":
            return [[config.id2label[i] for i in np.flatnonzero(row > (0.5 if gold else 0.0))] for row in values]
        return [config.id2label[int(v)] for v in (values if gold else np.argmax(values, axis=-1))]

    def compute_metrics(prediction):
        return classification_metrics(task, prediction.predictions, prediction.label_ids)

    trainer = ChiarTrainer(
        callbacks=[RoutingLoggingCallback()],  # per-layer shares and a rendering at each evaluation
        settle_batches=model_args.routing_settle_batches,
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        # Compiled (or --pad_to_max_length), every batch is padded to --max_seq_length: one shape, one
        # graph (padding is free of charge for routing, which budgets real-token positions only).
        # Otherwise to each batch's longest.
        data_collator=DataCollatorWithPadding(tokenizer, padding="max_length", max_length=max_seq_length)
        if training_args.torch_compile or data_args.pad_to_max_length
        else DataCollatorWithPadding(tokenizer, pad_to_multiple_of=None),
        compute_metrics=compute_metrics,
    )

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint_to_resume(training_args, model.config))
        trainer.save_model()  # the model selected on validation, when load_best_model_at_end
        metrics = {**result.metrics, "train_samples": len(train_dataset)}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = {**trainer.evaluate(), "eval_samples": len(eval_dataset)}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        test_dataset = limited("test", data_args.max_predict_samples)
        output = trainer.predict(test_dataset, metric_key_prefix="test")
        metrics = {**output.metrics, "test_samples": len(test_dataset)}
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
        if trainer.is_world_process_zero():
            texts = joined_texts(raw["test"].select_columns(text_columns).select(subset_rows("test", data_args.max_predict_samples))[:])
            with open(os.path.join(training_args.output_dir, "test_predictions.jsonl"), "w") as handle:
                for index, (text, predicted, gold) in enumerate(zip(texts, readable(output.predictions), readable(output.label_ids, True))):
                    handle.write(json.dumps({"index": index, "prediction": predicted, "label": gold, "text": text[:200]}) + "\n")
    return trainer


if __name__ == "__main__":
    main()
