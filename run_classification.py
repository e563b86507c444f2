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
    AutoConfig,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

import modeling_chiar  # noqa: F401  (registers CHIAR with the Auto classes)
from chiar.callbacks import RoutingLoggingCallback
from chiar.training import (
    ArgumentError,
    ChiarTrainer,
    apply_config_overrides,
    check_column,
    get_tokenizer,
    load_raw_datasets,
    prepare_training_args,
    resolve_config,
)

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
    trust_remote_code: bool = field(default=False)
    attn_implementation: str = field(default="sdpa")


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default="imdb", metadata={"help": "Hub dataset, or `listops` to generate ListOps here."})
    dataset_config_name: str | None = field(default=None)
    train_file: str | None = field(default=None)
    validation_file: str | None = field(default=None)
    test_file: str | None = field(default=None)
    text_column_name: str = field(default="text")
    label_column_name: str = field(default="label")
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
    changes = {}
    defaults = not any(flag in asked for flag in ("do_train", "do_eval", "do_predict"))
    if defaults:  # built-in defaults: train, evaluate, and test when there is a test split
        changes.update(do_train=True, do_eval=True, do_predict=True)
    if (training_args.do_train or changes.get("do_train")) and not any(k in asked for k in ("eval_strategy", "load_best_model_at_end")):
        # Model selection on the validation split, once per epoch; the test split is never looked at.
        changes.update(eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                       metric_for_best_model="accuracy", save_total_limit=training_args.save_total_limit or 2)
    if model_args.model_name_or_path is None:
        changes.update({key: value for key, value in SCRATCH_DEFAULTS.items() if key not in asked})
    if changes:  # rebuilt, so TrainingArguments checks the combination
        training_args = dataclasses.replace(training_args, **changes)
    return model_args, data_args, prepare_training_args(training_args), defaults


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

    # --- data, checked before anything expensive ---
    local_files = data_args.train_file or data_args.validation_file or data_args.test_file
    if data_args.dataset_name == "listops" and not local_files:
        listops_files(data_args, training_args)
    raw = load_raw_datasets(data_args, model_args.cache_dir, " (e.g. --train_file ../shared/data/imdb/train.jsonl.gz --test_file ../shared/data/imdb/test.jsonl.gz)")
    if "validation" not in raw and "train" in raw:  # e.g. IMDB: select models on a held-out part of train, never on test
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=training_args.seed,
                                              stratify_by_column=None)
        raw["train"], raw["validation"] = split["train"], split["test"]
    for name in raw:
        check_column(raw[name], data_args.text_column_name, "--text_column_name")
        check_column(raw[name], data_args.label_column_name, "--label_column_name")
    if training_args.do_train and "train" not in raw:
        raise ArgumentError("--do_train needs training data (--train_file or a dataset with a train split).")
    if training_args.do_predict and "test" not in raw:
        if not defaults:
            raise ArgumentError("--do_predict needs a test split (--test_file).")
        training_args.do_predict = False

    label_source = raw["train"] if "train" in raw else raw["validation"]
    labels = sorted(set(label_source[data_args.label_column_name]))
    if all(isinstance(label, str) for label in labels) or all(isinstance(label, int) for label in labels):
        label_to_id = {label: i for i, label in enumerate(labels)}
    else:
        raise ArgumentError(f"--label_column_name {data_args.label_column_name!r} must hold class names or ids, got {labels[:5]}.")
    for name in raw:
        unseen = set(raw[name][data_args.label_column_name]) - set(label_to_id)
        if unseen:
            raise ArgumentError(f"the {name} split has labels never seen in training: {sorted(unseen)[:10]}.")

    # --- tokenizer and model ---
    text_column = data_args.text_column_name
    tokenizer = get_tokenizer(model_args, training_args, lambda: (t for t in label_source[text_column] if t.strip()))
    max_seq_length = data_args.max_seq_length or 512
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=len(labels), cache_dir=model_args.cache_dir,
                                            trust_remote_code=model_args.trust_remote_code)
    else:
        config = AutoConfig.from_pretrained(resolve_config(model_args.config_name or "chiar-tiny"), num_labels=len(labels))
        config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
        if getattr(config, "model_type", None) == "chiar":
            config.is_causal = False  # bidirectional by default for classification
            config.max_position_embeddings = max(config.max_position_embeddings, max_seq_length)
    config.label2id = {str(label): i for label, i in label_to_id.items()}
    config.id2label = {i: str(label) for label, i in label_to_id.items()}
    config = apply_config_overrides(config, model_args.config_overrides)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and max_seq_length > max_positions:
        raise ArgumentError(f"--max_seq_length {max_seq_length} is above what the model supports (max_position_embeddings={max_positions}).")
    if model_args.model_name_or_path:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir, trust_remote_code=model_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation, ignore_mismatched_sizes=True,
        )
    else:
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=model_args.attn_implementation)

    def preprocess(examples):
        result = tokenizer(examples[text_column], truncation=True, max_length=max_seq_length)
        result["labels"] = [label_to_id[label] for label in examples[data_args.label_column_name]]
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

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}

    trainer = ChiarTrainer(
        callbacks=[RoutingLoggingCallback()],  # per-layer shares and a rendering at each evaluation
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        # Compiled, every batch is padded to --max_seq_length: one shape, one graph (padding is free of
        # charge for routing, which budgets real-token positions only). Eager, to each batch's longest.
        data_collator=DataCollatorWithPadding(tokenizer, padding="max_length", max_length=max_seq_length)
        if training_args.torch_compile
        else DataCollatorWithPadding(tokenizer, pad_to_multiple_of=None),
        compute_metrics=compute_metrics,
    )

    if training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
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
            logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
            predicted = np.argmax(logits, axis=-1)
            column = raw["test"][text_column]
            texts = [column[row] for row in subset_rows("test", data_args.max_predict_samples)]
            with open(os.path.join(training_args.output_dir, "test_predictions.jsonl"), "w") as handle:
                for index, (text, label, gold) in enumerate(zip(texts, predicted, output.label_ids)):
                    record = {"index": index, "prediction": config.id2label[int(label)], "label": config.id2label[int(gold)], "text": text[:200]}
                    handle.write(json.dumps(record) + "\n")
    return trainer


if __name__ == "__main__":
    main()
