"""What run_clm.py and run_classification.py share: named configs, data loading with early checks,
a locally trained tokenizer, and a Trainer that reports routing next to the loss."""

import math
import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Trainer

from chiar.evaluation import RoutingAccumulator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TEXT_EXTENSIONS = {"txt": "text", "tokens": "text", "raw": "text", "text": "text", "json": "json", "jsonl": "json", "csv": "csv"}
SPECIAL_TOKEN = "<|endoftext|>"


class ArgumentError(SystemExit):
    """A bad command-line argument, reported before any work starts."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


def resolve_config(name):
    """A config path, or the name of a config shipped in configs/ (e.g. `chiar-tiny`)."""
    path = Path(name)
    if path.is_file():
        return str(path)
    shipped = CONFIG_DIR / f"{name.removesuffix('.json')}.json"
    if shipped.is_file():
        return str(shipped)
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
    raise ArgumentError(f"--config_name {name!r} is neither a file nor a shipped config ({available}).")


def builder_for(path):
    """datasets builder for a local file: text, json(l) or csv, optionally gzip-compressed."""
    suffixes = [s.lstrip(".").lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in ("gz", "gzip", "bz2", "xz", "zst"):
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in TEXT_EXTENSIONS:
        raise ArgumentError(f"cannot tell the format of {path!r}: use .txt/.tokens, .json/.jsonl or .csv (optionally .gz).")
    return TEXT_EXTENSIONS[suffixes[-1]]


def load_raw_datasets(data_args, cache_dir=None, hub_hint=""):
    """Hub dataset (`dataset_name`) or local files (train/validation/test), checked before loading."""
    from datasets import load_dataset

    files = {
        split: getattr(data_args, f"{split}_file")
        for split in ("train", "validation", "test")
        if getattr(data_args, f"{split}_file", None)
    }
    if files:
        missing = [f"--{split}_file {path}" for split, path in files.items() if not Path(path).is_file()]
        if missing:
            raise ArgumentError(f"file not found: {', '.join(missing)}")
        builders = {builder_for(path) for path in files.values()}
        if len(builders) > 1:
            raise ArgumentError(f"all data files must have one format, got {sorted(builders)}.")
        builder = builders.pop()
        kwargs = {"keep_linebreaks": getattr(data_args, "keep_linebreaks", True)} if builder == "text" else {}
        return load_dataset(builder, data_files=files, cache_dir=cache_dir, **kwargs)
    if not data_args.dataset_name:
        raise ArgumentError("pass --dataset_name or --train_file/--validation_file.")
    try:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    except Exception as error:  # no network, unknown name: say what to do instead
        raise ArgumentError(
            f"could not load the dataset {data_args.dataset_name!r} ({data_args.dataset_config_name}) from the Hugging Face "
            f"Hub: {type(error).__name__}: {str(error)[:200]}. Offline, point to local files instead{hub_hint}."
        ) from error


def check_column(dataset, column, flag):
    if column not in dataset.column_names:
        raise ArgumentError(f"{flag} {column!r} is not a column of the data; columns: {dataset.column_names}.")


def train_tokenizer(texts, vocab_size, save_dir=None):
    """A byte-level BPE tokenizer trained on `texts` (an iterable of strings) with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN, unk_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN
    )
    if save_dir:
        wrapped.save_pretrained(save_dir)
    return wrapped


def get_tokenizer(model_args, training_args, train_texts):
    """`--tokenizer_name` / the model's own tokenizer, else one trained here and saved in the output dir."""
    from transformers import AutoTokenizer

    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source:
        try:
            return AutoTokenizer.from_pretrained(source, cache_dir=model_args.cache_dir, trust_remote_code=model_args.trust_remote_code)
        except (OSError, ValueError) as error:
            if model_args.tokenizer_name:
                raise ArgumentError(f"cannot load --tokenizer_name {model_args.tokenizer_name!r}: {error}") from error
    save_dir = os.path.join(training_args.output_dir, "tokenizer")
    with training_args.main_process_first(desc="training the tokenizer"):
        if os.path.isfile(os.path.join(save_dir, "tokenizer.json")):
            return PreTrainedTokenizerFast.from_pretrained(save_dir)
        return train_tokenizer(train_texts(), model_args.tokenizer_vocab_size, save_dir if training_args.process_index == 0 else None)


def apply_config_overrides(config, overrides):
    """`--config_overrides "hidden_size=128,router_type=learned"` on a config, values parsed as JSON when
    they parse (and True / False / None as Python spells them). The config is rebuilt, so fields derived from others follow them: changing
    `routed_operators` resets `router_target_fractions` to that set's defaults, and changing
    `num_hidden_layers` resets `layer_schedule`, unless those are overridden too."""
    if not overrides:
        return config
    import json

    values = {}
    for item in _split_top_level(overrides):
        if "=" not in item:
            raise ArgumentError(f"--config_overrides expects key=value pairs, got {item!r}.")
        key, value = (part.strip() for part in item.split("=", 1))
        if not hasattr(config, key):
            raise ArgumentError(f"--config_overrides: the config has no field {key!r}.")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:  # Python's spellings as the stock scripts read them, else a string
            values[key] = {"True": True, "False": False, "None": None}.get(value, value)
    settings = {**config.to_dict(), **values}
    derived = {"routed_operators": "router_target_fractions", "num_hidden_layers": "layer_schedule"}
    for source, target in derived.items():
        if source in values and target not in values and target in settings:
            settings[target] = None
    try:
        return type(config).from_dict(settings)
    except ValueError as error:
        raise ArgumentError(f"--config_overrides: {error}") from error


def _split_top_level(text):
    """Split on commas outside brackets, so list values like routed_operators=["dct","attention"] stay whole."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [item for item in items + [current] if item.strip()]


def prepare_training_args(training_args):
    """Every parameter receives a gradient in every step (each operator runs on its fixed query slots,
    held or not), so DDP need not search for unused ones; checkpointing is non-reentrant, which mixes
    with DDP and torch.compile."""
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False
    if getattr(training_args, "gradient_checkpointing", False):
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False, **(training_args.gradient_checkpointing_kwargs or {})}
    return training_args


class ChiarTrainer(Trainer):
    """A Trainer whose evaluation also reports routing (per-layer shares, mean entropy, attention query
    and FLOP fractions, from the model's own accounting), the router's auxiliary loss, and, for language
    models, the loss without it (so perplexity is exp(eval_loss)) and next-token accuracy."""

    _routing = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._routing is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = super().compute_loss(
            model, {**inputs, "output_routing": True}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        accumulator, extra = self._routing
        accumulator.add(outputs.routing)
        config = self.model.config
        if outputs.aux_loss is not None:
            extra["aux_loss"] += float(outputs.aux_loss) * inputs["input_ids"].shape[0]
            loss = loss - config.router_aux_loss_coef * outputs.aux_loss  # report the task loss alone
        extra["batches"] += inputs["input_ids"].shape[0]
        labels = inputs.get("labels")
        if labels is not None and labels.dim() == 2 and outputs.logits.dim() == 3:  # language modelling
            predicted = outputs.logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            valid = target != -100
            extra["correct"] += float((predicted[valid] == target[valid]).sum())
            extra["predicted"] += float(valid.sum())
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        self._routing = (RoutingAccumulator(self.model.config), {"aux_loss": 0.0, "batches": 0.0, "correct": 0.0, "predicted": 0.0})
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        finally:
            accumulator, extra = self._routing
            self._routing = None
        extras = torch.tensor([extra[k] for k in ("aux_loss", "batches", "correct", "predicted")], dtype=torch.float64)
        totals = torch.cat([accumulator.totals(), extras]).to(self.args.device)
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        totals = totals.cpu()
        routing_totals, (aux, batches, correct, predicted) = totals[: len(accumulator.keys)], totals[len(accumulator.keys) :].tolist()
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in accumulator.metrics(routing_totals).items()}
        if batches and self.model.config.router_type == "learned" and self.model.config.uses_routing:
            metrics[f"{metric_key_prefix}_aux_loss"] = aux / batches
        if predicted:
            metrics[f"{metric_key_prefix}_next_token_accuracy"] = correct / predicted
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None and predicted:
            metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(loss, 700.0))
        output.metrics.update(metrics)
        return output
