"""What run_clm.py and run_classification.py share: configs read from folders, files or the Hub,
checks of the output folder and of a checkpoint to resume, a locally trained tokenizer, and a
Trainer that reports routing next to the loss. Data files and their checks live in chiar/data.py,
named configs and variants in chiar/variants.py."""

import itertools
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Trainer

from chiar.data import ArgumentError
from chiar.evaluation import RoutingAccumulator, TrainingShares, perplexity

SPECIAL_TOKEN = "<|endoftext|>"
# Config entries that differ between two runs of one model without changing it.
NOT_THE_MODEL = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "_attn_implementation",
                 "_attn_implementation_autoset", "auto_map", "_commit_hash"}
logger = logging.getLogger(__name__)


def load_config(source, flag, **kwargs):
    """AutoConfig for `source` (a saved model folder, a config file or a Hub id), or one line naming the flag."""
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ArgumentError(f"{flag} {source}: the folder has no config.json (not a saved model).")
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise ArgumentError(f"{flag} {source}: no such folder or file.")
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as error:
        raise ArgumentError(f"{flag} {source}: cannot read a model config ({str(error).splitlines()[0][:300]}).") from error


def check_ranges(data_args, model_args):
    """Sizes and shares the stock scripts take on trust (0 or a negative block size, a split over 100%)."""
    for name in ("block_size", "max_seq_length", "max_train_samples", "max_eval_samples", "max_predict_samples"):
        value = getattr(data_args, name, None)
        if value is not None and value < 1:
            raise ArgumentError(f"--{name} must be a positive integer, got {value}.")
    percentage = getattr(data_args, "validation_split_percentage", None)
    if percentage is not None and not 0 < percentage < 100:
        raise ArgumentError(f"--validation_split_percentage must be between 0 and 100 (exclusive), got {percentage}.")
    if getattr(model_args, "tokenizer_vocab_size", 257) < 257:
        raise ArgumentError(f"--tokenizer_vocab_size must be at least 257 (the 256 byte symbols and one special token), "
                            f"got {model_args.tokenizer_vocab_size}.")
    if getattr(model_args, "routing_settle_batches", 0) < 0:
        raise ArgumentError(f"--routing_settle_batches must be 0 (keep the running statistics) or more, got {model_args.routing_settle_batches}.")


def check_output_dir(path):
    """The output folder exists or can be made, and a file can be written in it: checked first, so a
    run does not train and then fail to save."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ArgumentError(f"--output_dir {path} is a file, not a folder.")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ArgumentError(f"--output_dir {path} is not writable ({error.strerror or error}).") from error


def checkpoint_to_resume(training_args, config):
    """--resume_from_checkpoint, else the last checkpoint in --output_dir (as the stock scripts do),
    once it is shown to come from a model of this config: resuming another model's weights and
    optimizer state would fail deep in `load_state_dict`, or train a mix of two runs."""
    checkpoint, found = training_args.resume_from_checkpoint, False
    if checkpoint is None and os.path.isdir(training_args.output_dir):
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint, found = get_last_checkpoint(training_args.output_dir), True
    if checkpoint is None:
        return None
    flag = f"--output_dir {training_args.output_dir} holds {os.path.basename(checkpoint)}" if found else f"--resume_from_checkpoint {checkpoint}"
    try:
        saved = json.loads(type(config).from_json_file(os.path.join(checkpoint, "config.json")).to_json_string(use_diff=False))
    except (OSError, ValueError, TypeError) as error:
        raise ArgumentError(f"{flag}, which cannot be resumed: its config.json is missing or unreadable ({error}).") from error
    current = json.loads(config.to_json_string(use_diff=False))
    differ = [key for key in sorted(set(saved) | set(current)) if key not in NOT_THE_MODEL and saved.get(key) != current.get(key)]
    if differ:
        shown = "; ".join(f"{key}: {saved.get(key)!r} there, {current.get(key)!r} now" for key in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        advice = "use a new --output_dir to start over" if found else "resume with the config that checkpoint was trained with"
        raise ArgumentError(f"{flag}, from a model with another config ({shown}{more}); {advice}.")
    if found:
        logger.warning(f"Resuming from {checkpoint}, found in --output_dir; use a new --output_dir to start over.")
    return checkpoint


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


def hub_kwargs(model_args):
    """The stock scripts' loading flags, for every `from_pretrained` of a config, tokenizer or model."""
    return {"cache_dir": model_args.cache_dir, "revision": getattr(model_args, "model_revision", "main"),
            "token": getattr(model_args, "token", None), "trust_remote_code": model_args.trust_remote_code}


def model_dtype(model_args):
    """`--dtype` (or the older `--torch_dtype`): "auto", a dtype name, or None (float32)."""
    name = getattr(model_args, "dtype", None) or getattr(model_args, "torch_dtype", None)
    if name in (None, "auto"):
        return name
    if name not in ("float32", "float16", "bfloat16"):
        raise ArgumentError(f"--dtype {name!r}: use auto, float32, float16 or bfloat16.")
    return getattr(torch, name)


def get_tokenizer(model_args, training_args, train_texts):
    """`--tokenizer_name` / the model's own tokenizer, else one trained here and saved in the output dir."""
    from transformers import AutoTokenizer

    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source:
        try:
            return AutoTokenizer.from_pretrained(source, use_fast=getattr(model_args, "use_fast_tokenizer", True), **hub_kwargs(model_args))
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
    models, the loss without it (so perplexity is exp(eval_loss)) and next-token accuracy. Its training
    logs carry the training passes' shares (`TrainingShares`), and after training it settles the
    routers' eval statistics on training batches (`settle_routing`)."""

    _routing = None

    def __init__(self, *args, settle_batches=16, **kwargs):
        """settle_batches: training batches the routers' eval statistics are settled on after training
        (`settle_routing`; 0: keep the running ones)."""
        super().__init__(*args, **kwargs)
        if self.args.fsdp and not self.is_fsdp_enabled:  # accelerate (1.15) shards on accelerators only
            logger.warning("--fsdp was given but accelerate did not enable FSDP (it does on GPUs and other accelerators, "
                           "not on the CPU): this run is plain data parallel, every process holds the whole model.")
        self.settle_batches = settle_batches
        config = getattr(self.model, "config", None)
        routed = getattr(config, "model_type", None) == "chiar" and config.uses_routing
        self._training_shares = TrainingShares(config) if routed else None

    def log(self, logs, *args, **kwargs):
        """Training logs gain each routed layer's asked and executed shares since the last log (`TrainingShares`,
        summed over processes: every process logs the loss)."""
        if "loss" in logs and self._training_shares is not None:
            reduce = (lambda t: self.accelerator.reduce(t, reduction="sum")) if self.args.world_size > 1 else None
            logs = {**logs, **self._training_shares.read(reduce, self.args.device)}
        super().log(logs, *args, **kwargs)

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        if self._training_shares is not None:  # passes after the last log are not carried into a later run's first one
            self._training_shares.counts = None
        self.settle_routing()
        return result

    def settle_routing(self):
        """After training, the routers' eval statistics from `settle_batches` training batches on the final
        weights (`ChiarPreTrainedModel.settle_routing`), so the saved model's eval routes the target shares;
        with several processes, each settles on its own batches and the statistics are averaged."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if self.settle_batches <= 0 or not hasattr(model, "settle_routing"):
            return
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        if self.is_fsdp_enabled or getattr(plugin, "zero_stage", 0) == 3:  # the unwrapped model's parameters are shards
            logger.warning("Routing statistics are not settled under FSDP or DeepSpeed ZeRO-3: the model keeps its running ones.")
            return
        batches = itertools.islice(self.get_train_dataloader(), self.settle_batches)
        with self.accelerator.autocast():  # the precision training ran at (bf16, fp16), which eval will run at
            settled = model.settle_routing(batches)
        if not settled:
            return
        if self.args.world_size > 1:
            for router in filter(None, model.model.routers()):  # None: a layer with one operator
                # the routing module the router was defined in: a Hub checkpoint's remote code has its own copy
                eval_statistics = sys.modules[type(router).__module__].eval_statistics
                for name in eval_statistics(router):
                    getattr(router, name).copy_(self.accelerator.reduce(getattr(router, name).clone(), reduction="mean"))
        logger.info(f"Routing eval statistics settled on (up to) {self.settle_batches} training batches.")

    def training_step(self, model, inputs, num_items_in_batch=None):
        """A step whose loss is NaN or infinite leaves the routers' running statistics as they were
        before it (reported at the next evaluation and at saving)."""
        from modeling_chiar.routing import statistics_before_step, undo_if_not_finite

        routers = self.model.model.routers() if hasattr(getattr(self.model, "model", None), "routers") else []
        saved = statistics_before_step(routers)
        loss = super().training_step(model, inputs, num_items_in_batch)
        undo_if_not_finite(saved, loss)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counting = self._routing is None and self._training_shares is not None and model.training
        if self._routing is None and not counting:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = super().compute_loss(
            model, {**inputs, "output_routing": True}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if counting:  # a training pass: its shares are counted on the device and logged with the loss
            self._training_shares.add(outputs.routing)
            return (loss, outputs) if return_outputs else loss
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
        if getattr(self.model.config, "model_type", None) != "chiar":  # another Transformers model: nothing routes
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
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
        config = self.model.config
        if batches and config.router_type == "learned" and config.uses_routing and config.router_share_control == "aux_loss":
            metrics[f"{metric_key_prefix}_aux_loss"] = aux / batches
        if predicted:
            metrics[f"{metric_key_prefix}_next_token_accuracy"] = correct / predicted
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None and predicted:
            metrics[f"{metric_key_prefix}_perplexity"] = perplexity(loss)
        output.metrics.update(metrics)
        return output
