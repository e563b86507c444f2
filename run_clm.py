#!/usr/bin/env python
"""Train or evaluate a CHIAR (or any) causal language model on a text dataset, shaped like the
Transformers example `run_clm.py`: HfArgumentParser over model / data / TrainingArguments, a lone
`.json` argument as the whole configuration, Trainer, grouped blocks, perplexity.

On built-in defaults it trains the tiny CHIAR (configs/chiar-tiny.json) on WikiText-2 from the Hub
(`wikitext-2-v1`, the tokenized form, as the offline copy), with a byte-level BPE tokenizer trained
on the training split. Offline, point it to local files:

    python run_clm.py --output_dir runs/clm-tiny \\
        --train_file ../shared/data/wikitext-2/wiki.train.tokens \\
        --validation_file ../shared/data/wikitext-2/wiki.valid.tokens \\
        --test_file ../shared/data/wikitext-2/wiki.test.tokens

Evaluation adds, next to loss and perplexity, each layer's operator shares, the mean spectral
entropy and the attention query / FLOP fractions actually executed (eval_results.json,
all_results.json, the Trainer logs). Works under `accelerate launch` (CPU or GPUs).
"""

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from itertools import chain

import datasets
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import modeling_chiar  # noqa: F401  (registers CHIAR with the Auto classes)
from chiar.callbacks import RoutingLoggingCallback
from chiar.data import ArgumentError, check_text_column, load_raw_datasets, source_of
from chiar.evaluation import perplexity
from chiar.training import (
    ChiarTrainer,
    apply_config_overrides,
    check_output_dir,
    check_ranges,
    checkpoint_to_resume,
    get_tokenizer,
    hub_kwargs,
    load_config,
    model_dtype,
    prepare_training_args,
)
from chiar.variants import resolve_config

logger = logging.getLogger(__name__)
# TrainingArguments values used when training from scratch unless given on the command line.
SCRATCH_DEFAULTS = {"learning_rate": 1e-3, "warmup_steps": 0.05, "weight_decay": 0.01}
OFFLINE_HINT = (
    " (e.g. --train_file ../shared/data/wikitext-2/wiki.train.tokens --validation_file ../shared/data/wikitext-2/wiki.valid.tokens "
    "--test_file ../shared/data/wikitext-2/wiki.test.tokens)"
)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Checkpoint to start from; omit to train from scratch."})
    model_type: str = field(default="chiar", metadata={"help": "Model type when training from scratch without --config_name."})
    config_name: str | None = field(
        default=None,
        metadata={"help": "Config file, or a shipped config name: chiar-tiny, chiar-v1-2op, chiar-v1-3op, baseline-v1, chiar-v2, baseline-v2. "
                  "Default from scratch: chiar-tiny."},
    )
    config_overrides: str | None = field(default=None, metadata={"help": 'e.g. "router_type=learned,hidden_dropout=0.0"'})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Any HF tokenizer; default: the model's, else one trained here."})
    tokenizer_vocab_size: int = field(default=8192, metadata={"help": "Vocabulary of the byte-level BPE trained when no tokenizer is given."})
    cache_dir: str | None = field(default=None)
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (tokenizers-backed) tokenizer when loading one."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of --model_name_or_path on the Hub."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets (default: `hf auth login`'s)."})
    trust_remote_code: bool = field(default=False)
    dtype: str | None = field(default=None, metadata={"help": "auto, float32, float16 or bfloat16 (weights' dtype at load)."})
    torch_dtype: str | None = field(default=None, metadata={"help": "The older name of --dtype."})
    low_cpu_mem_usage: bool = field(default=False, metadata={"help": "Accepted for the stock scripts; transformers 5 always loads this way."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager or sdpa"})
    routing_settle_batches: int = field(
        default=16, metadata={"help": "Training batches the routers' eval statistics are settled on after training (0: keep the running ones)."}
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default="wikitext", metadata={"help": "Hub dataset; ignored when --train_file is given."})
    dataset_config_name: str | None = field(
        default="wikitext-2-v1",
        metadata={"help": "Default: the tokenized WikiText-2, the form of the offline copy, so Hub and offline runs compare "
                  "(the stock examples use wikitext-2-raw-v1)."},
    )
    train_file: str | None = field(default=None, metadata={"help": "text (.txt/.tokens), json/jsonl or csv, optionally .gz"})
    validation_file: str | None = field(default=None)
    test_file: str | None = field(default=None)
    streaming: bool = field(default=False, metadata={"help": "Stream the data instead of loading it (needs --max_steps and a validation split)."})
    text_column_name: str = field(default="text")
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the number of training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the number of evaluation and test blocks."})
    block_size: int | None = field(default=None, metadata={"help": "Tokens per block; default min(256, max_position_embeddings)."})
    validation_split_percentage: int = field(default=5, metadata={"help": "Held out of train when there is no validation split."})
    preprocessing_num_workers: int | None = field(default=None)
    overwrite_cache: bool = field(default=False)
    keep_linebreaks: bool = field(default=True)


def parse_args(argv):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        asked = json.loads(open(argv[0]).read()).keys()
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
        asked = [arg.lstrip("-").split("=")[0].replace("-", "_") for arg in argv]  # --learning-rate is --learning_rate
    # TrainingArguments turns do_eval on by itself when an eval strategy is set: look at what was asked.
    defaults = not any(flag in asked for flag in ("do_train", "do_eval", "do_predict"))
    if defaults:  # built-in defaults: train, evaluate, and test when there is a test split
        training_args.do_train = training_args.do_eval = training_args.do_predict = True
    if model_args.model_name_or_path is None:  # from scratch, a small model wants a larger step than 5e-5
        changes = {key: value for key, value in SCRATCH_DEFAULTS.items() if key not in asked}
        training_args = dataclasses.replace(training_args, **changes)  # rebuilt, so TrainingArguments checks it
    return model_args, data_args, prepare_training_args(training_args), defaults


def main(argv=None):
    model_args, data_args, training_args, defaults = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)
    check_ranges(data_args, model_args)
    model_dtype(model_args)  # a bad --dtype stops here, before the data is read
    check_output_dir(training_args.output_dir)

    # --- data, checked before anything expensive ---
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise ArgumentError("--streaming needs --max_steps: a stream's length is not known in advance.")
    raw = load_raw_datasets(data_args, model_args.cache_dir, OFFLINE_HINT, token=model_args.token)
    for name in raw:
        check_text_column(raw[name], data_args.text_column_name, source_of(data_args, name))
    if "validation" not in raw and "train" in raw:
        if data_args.streaming:
            raise ArgumentError("--streaming needs a validation split (--validation_file): a stream cannot be split.")
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=training_args.seed)
        raw["train"], raw["validation"] = split["train"], split["test"]
    if training_args.do_train and "train" not in raw:
        raise ArgumentError("--do_train needs training data (--train_file or a dataset with a train split).")
    if training_args.do_predict and "test" not in raw:
        if not defaults:
            raise ArgumentError("--do_predict needs a test split (--test_file).")
        training_args.do_predict = False

    # --- tokenizer and model ---
    text_column = data_args.text_column_name

    def train_texts():
        texts = (row[text_column] for row in raw["train"]) if data_args.streaming else raw["train"][text_column]
        return (text for text in texts if text.strip())

    tokenizer = get_tokenizer(model_args, training_args, train_texts)
    if model_args.model_name_or_path:
        config = load_config(model_args.model_name_or_path, "--model_name_or_path", **hub_kwargs(model_args))
    else:
        if model_args.config_name or model_args.model_type == "chiar":
            config = load_config(resolve_config(model_args.config_name or "chiar-tiny"), "--config_name")
        else:
            try:
                config = AutoConfig.for_model(model_args.model_type)
            except ValueError as error:
                raise ArgumentError(f"--model_type {model_args.model_type!r}: {str(error).splitlines()[0][:200]}") from error
        config.vocab_size = len(tokenizer)
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config = apply_config_overrides(config, model_args.config_overrides)
    max_positions = getattr(config, "max_position_embeddings", None)
    block_size = data_args.block_size or min(256, max_positions or 256)
    if max_positions is not None and block_size > max_positions:
        raise ArgumentError(f"--block_size {block_size} is above what the model supports (max_position_embeddings={max_positions}).")

    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, config=config, attn_implementation=model_args.attn_implementation,
            dtype=model_dtype(model_args), **hub_kwargs(model_args),
        )
    else:
        dtype = model_dtype(model_args)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=model_args.attn_implementation,
                                                 dtype=None if dtype == "auto" else dtype)
        logger.info(f"New model from scratch: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    # --- preprocessing: tokenize, then concatenate and cut into blocks (once, main process first) ---
    def tokenize(examples):
        return tokenizer(examples[text_column])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    with training_args.main_process_first(desc="tokenizing and grouping"):
        first = raw["train" if "train" in raw else "validation"]
        columns = first.column_names or list(next(iter(first)))  # a stream may not know its columns before reading
        if data_args.streaming:  # lazily, as the Trainer reads
            blocks = raw.map(tokenize, batched=True, remove_columns=columns).map(group_texts, batched=True)
        else:
            tokenized = raw.map(tokenize, batched=True, num_proc=data_args.preprocessing_num_workers, remove_columns=columns,
                                load_from_cache_file=not data_args.overwrite_cache, desc="Tokenizing")
            blocks = tokenized.map(group_texts, batched=True, num_proc=data_args.preprocessing_num_workers,
                                   load_from_cache_file=not data_args.overwrite_cache, desc=f"Grouping into blocks of {block_size}")

    def limited(split, limit):
        data = blocks[split]
        if data_args.streaming:
            return data.take(limit) if limit is not None else data
        return data.select(range(min(limit, len(data)))) if limit is not None else data

    def size(data):
        return len(data) if hasattr(data, "__len__") else None

    train_dataset = limited("train", data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = limited("validation", data_args.max_eval_samples) if training_args.do_eval else None
    for name, data in (("train", train_dataset), ("validation", eval_dataset)):
        if data is not None and size(data) == 0:
            raise ArgumentError(f"the {name} split has fewer than block_size={block_size} tokens.")

    trainer = ChiarTrainer(
        callbacks=[RoutingLoggingCallback()],  # per-layer shares and a rendering at each evaluation
        settle_batches=model_args.routing_settle_batches,
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint_to_resume(training_args, model.config))
        trainer.save_model()  # model, calibrated router thresholds, code files, tokenizer
        metrics = result.metrics
        if size(train_dataset) is not None:  # a stream has no length
            metrics["train_samples"] = size(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        if size(eval_dataset) is not None:  # a stream has no length
            metrics["eval_samples"] = size(eval_dataset)
        metrics["perplexity"] = perplexity(metrics["eval_loss"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        test_dataset = limited("test", data_args.max_eval_samples)
        metrics = trainer.evaluate(test_dataset, metric_key_prefix="test")
        if size(test_dataset) is not None:  # a stream has no length
            metrics["test_samples"] = size(test_dataset)
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
    return trainer


if __name__ == "__main__":
    main()
