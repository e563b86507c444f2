"""CHIAR-Former: each token, at each routed layer, takes one of DCT mixing, RBF mixing or attention.

Assembly only: embeddings, layers and heads. Operators live in `operator_*.py` (one call contract,
`operators.py`), routing in `routing.py`, FLOP formulas in `flops.py`. Semantics: docs/architecture.md.
"""

import dataclasses
import inspect
import os
import shutil
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .cache import ChiarCache
from .configuration_chiar import ChiarConfig
from .flops import entropy_flops, gate_flops
from .fp32_buffers import KeepsFP32Buffers
from .operator_attention import RotaryEmbedding, RoutedAttention
from .operator_dct import DCTMixing
from .operator_rbf import RBFMixing
from .operators import MixContext, gather_rows
from .routing import (
    EVERY_TOKEN,
    MetaRouter,
    build_router,
    calibrates,
    eval_statistics,
    has_gate,
    is_dense,
    needs_entropy,
    needs_eval_pass,
    observe,
    reconcile_loaded_thresholds,
    reported_thresholds,
    route,
    running_statistics,
    settle,
    snapshot,
)
from .spectral import dct_matrix, spectral_entropy

logger = logging.get_logger(__name__)

OPERATOR_CLASSES = {"dct": DCTMixing, "rbf": RBFMixing, "attention": RoutedAttention}
HEAD_ROOTS = ("lm_head", "score")  # task heads' weights; everything else is the body


@dataclass
class LayerRouting:
    """What one layer did: which operator each token asked for and took, its entropy, and the work executed.

    Tensors are in the caller's token order. Counts are read from them on demand, after the pass.
    """

    operators: tuple  # operator names; `operator_ids` index into them
    operator_ids: torch.Tensor  # (B, T) long: the operator each token ran
    entropy: torch.Tensor | None  # (B, T) in [0, 1]
    token_mask: torch.Tensor | None  # (B, T) bool, real tokens; None when the input had no attention_mask
    thresholds: torch.Tensor | None = None  # threshold router only: its eval thresholds
    requested_ids: torch.Tensor | None = None  # (B, T) what the router asked for (None: same as operator_ids)
    router_score: torch.Tensor | None = None  # (B, T) the exploring gate's ranking score (its eval cut calibrates on it)
    router_logits: torch.Tensor | None = None  # (B, T, K) a balancing gate's choice logits before its share bias
    slots: dict | None = None  # budgeted operator -> query slots of this pass (batch x slots per row)
    dense: bool = False  # every operator ran on every token (one operator, or the soft router)
    attention_flops: float = 0.0  # attention FLOPs executed (projections and kernel)
    operator_flops: float = 0.0  # FLOPs of the token-operator sub-layer, routing included

    def _real(self, ids):
        return ids.flatten() if self.token_mask is None else ids[self.token_mask]

    def counts(self, requested=False):
        """(real tokens per operator, real tokens): what ran, or with `requested` what the router
        asked for, read back to the host (the audit and the routing statistics count with it; the
        Trainer's metrics count the same real tokens on the device, `routing.operator_counts`)."""
        ids = self.requested_ids if requested and self.requested_ids is not None else self.operator_ids
        real = self._real(ids)
        return torch.bincount(real, minlength=len(self.operators)).tolist(), int(real.numel())

    def shares(self):
        """Each operator's share of the real (non-padding) tokens: what ran."""
        counts, total = self.counts()
        return {op: count / max(total, 1) for op, count in zip(self.operators, counts)}

    def requested_shares(self):
        """Each operator's share of the real tokens that asked for it."""
        counts, total = self.counts(requested=True)
        return {op: count / max(total, 1) for op, count in zip(self.operators, counts)}

    def overflow(self):
        """Budgeted operator -> share of real tokens that asked for it and took the cheapest operator."""
        asked, ran = self.requested_shares(), self.shares()
        return {op: asked[op] - ran[op] for op in (self.slots or {})}

    def unused_slots(self):
        """Budgeted operator -> share of its query slots that no token held."""
        counts, _ = self.counts()
        return {op: 1 - counts[self.operators.index(op)] / max(n, 1) for op, n in (self.slots or {}).items()}

    @property
    def attention_queries(self):
        """Real tokens that ran attention as a query."""
        if "attention" not in self.operators:
            return 0
        real = self._real(self.operator_ids)
        return int(real.numel()) if self.dense else int((real == self.operators.index("attention")).sum())

    def mean_entropy(self):
        if self.entropy is None:
            return None
        values = self._real(self.entropy)
        return float(values.float().mean()) if values.numel() else None


# transformers 5.17 passes and reads the decoding cache as `past_key_values`; later 5.x versions call it
# `cache` (and rename the field of any ModelOutput). Outputs and inputs use whichever this version uses.
CACHE_NAME = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"


def _output_class(name, fields, doc):
    cls = dataclasses.make_dataclass(name, [(field, object, None) for field in fields], bases=(ModelOutput,))
    cls.__doc__ = doc
    return cls


ChiarModelOutput = _output_class(
    "ChiarModelOutput",
    ["last_hidden_state", CACHE_NAME, "hidden_states", "attentions", "routing", "aux_loss"],
    "Final hidden states, the decoding cache, and per-layer routing records (`output_routing=True`).",
)
ChiarCausalLMOutput = _output_class(
    "ChiarCausalLMOutput",
    ["loss", "logits", CACHE_NAME, "hidden_states", "attentions", "routing", "aux_loss"],
    "Language-modelling loss (router auxiliary loss included) and logits, plus what ChiarModelOutput has.",
)
ChiarSequenceClassifierOutput = _output_class(
    "ChiarSequenceClassifierOutput",
    ["loss", "logits", "hidden_states", "attentions", "routing", "aux_loss"],
    "Classification loss and logits, hidden states, attentions and routing records.",
)


class TokenMixer(nn.Module):
    """The token-operator sub-layer of one layer: route, run each operator on what it serves, add up."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.operators = config.layer_operators(layer_idx)
        for name, operator_class in OPERATOR_CLASSES.items():
            setattr(self, name, operator_class(config, layer_idx) if name in self.operators else None)
        self.router = build_router(config, layer_idx) if len(self.operators) > 1 else None

    def reads_entropy(self):
        return self.router is not None and needs_entropy(self.router)

    def forward(self, x, ctx):
        batch, length, d = x.shape
        entropy = None
        flops = 0.0
        if self.reads_entropy() or ctx.output_routing:
            entropy = spectral_entropy(x, ctx.dct)  # no gradient: routing reads the value only
            if self.reads_entropy():  # counted when routing needs it, not when only reported
                flops += entropy_flops(batch * length, d)

        routed = None
        selections = [EVERY_TOKEN] * len(self.operators)
        if self.router is not None:
            cache = ctx.cache
            state = ctx.router_states.get(self.layer_idx) if ctx.router_states else None
            carried = cache.budget_state[self.layer_idx] if cache is not None else None
            routed = route(self.router, self.operators, self.config, x, entropy, ctx, state, carried)
            selections = routed.selections
            if cache is not None:
                cache.budget_state[self.layer_idx] = routed.budget_state
            if has_gate(self.router):
                flops += gate_flops(batch * length, d, len(self.operators))

        output, attentions, attention_flops = None, None, 0.0
        for name, selection in zip(self.operators, selections):
            result = getattr(self, name)(x, ctx, selection)
            y = result.output if selection.weight is None else result.output * selection.weight.to(result.output.dtype)
            output = y if output is None else output + y
            flops += result.flops
            if name == "attention":
                attentions, attention_flops = result.attentions, result.flops

        if routed is None:
            ids = torch.zeros(batch, length, dtype=torch.long, device=x.device)
            requested, slots = None, None
        else:
            ids, requested = routed.operator_ids, routed.requested_ids
            slots = {
                self.operators[k]: selection.slots.index.numel()
                for k, selection in enumerate(selections)
                if selection.slots is not None
            }
        thresholds = reported_thresholds(self.router) if ctx.output_routing else None
        record = LayerRouting(
            operators=self.operators,
            operator_ids=ids,
            entropy=entropy,
            token_mask=ctx.token_mask,
            thresholds=thresholds,
            requested_ids=requested,
            router_score=routed.score if routed is not None else None,
            router_logits=routed.logits if routed is not None else None,
            slots=slots,
            dense=routed is None or is_dense(self.router),
            attention_flops=attention_flops,
            operator_flops=flops,
        )
        aux_loss = routed.aux_loss if routed is not None else None
        return output, attentions, record, aux_loss


class ChiarMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


class ChiarDecoderLayer(GradientCheckpointingLayer):
    """Token-operator sub-layer, then the position-wise FFN, each with a residual and a layer norm."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.mixer = TokenMixer(config, layer_idx)
        self.mlp = ChiarMLP(config)
        self.mixer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.hidden_dropout = config.hidden_dropout
        self.meta_router = MetaRouter(config) if config.use_meta_router and layer_idx == 0 else None

    def dropout(self, x, ctx):
        # By the pass, not the module: the eval-calibration pass runs a training model without dropout.
        return nn.functional.dropout(x, self.hidden_dropout, training=ctx.training)

    def forward(self, hidden_states, ctx):
        layer_input = hidden_states
        if self.pre_norm:
            mixed, attentions, record, aux = self.mixer(self.mixer_norm(hidden_states), ctx)
            hidden_states = hidden_states + self.dropout(mixed, ctx)
            hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)), ctx)
        else:
            mixed, attentions, record, aux = self.mixer(hidden_states, ctx)
            hidden_states = self.mixer_norm(hidden_states + self.dropout(mixed, ctx))
            hidden_states = self.mlp_norm(hidden_states + self.dropout(self.mlp(hidden_states), ctx))
        if self.meta_router is not None:
            hidden_states = self.meta_router(layer_input, hidden_states, ctx.token_mask, ctx.cache)
        return hidden_states, aux, attentions, record


class ChiarPreTrainedModel(PreTrainedModel):
    config_class = ChiarConfig
    config: ChiarConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChiarDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    # The decoding cache cannot be rolled back (RBF state is a running sum): generate() then refuses
    # assisted and speculative decoding with a message saying so.
    _is_stateful = True

    # Hub remote code: every Auto class resolves to these modules, copied flat next to the weights.
    auto_map = {
        "AutoConfig": "configuration_chiar.ChiarConfig",
        "AutoModel": "modeling_chiar.ChiarModel",
        "AutoModelForCausalLM": "modeling_chiar.ChiarForCausalLM",
        "AutoModelForSequenceClassification": "modeling_chiar.ChiarForSequenceClassification",
    }

    @torch.no_grad()
    def settle_routing(self, batches):
        """Set the routers' eval statistics once, on the weights as they are: each calibrating router's eval
        thresholds, exploring cut or share bias (`routing.eval_statistics`) from eval-mode passes over
        `batches` (dicts with `input_ids`, optionally `attention_mask` and `position_ids`: training batches, the data the
        running statistics come from), so that eval routes the target shares of that data. Training
        statistics are left alone. Call it after training (ChiarTrainer does; precise statistics, as for
        batch norm): the running ones trail a gate that was still moving. One round of passes per
        calibrating router, since a router's inputs depend on the routers before it.

        Returns the number of routers settled (0: nothing to settle, no pass is made)."""
        base = getattr(self, self.base_model_prefix, self)
        settling = [r for r in base.routers() if eval_statistics(r)]
        batches = list(batches)
        if not settling or not batches:
            return 0
        was_training = base.training
        base.eval()
        device = base.embed_tokens.weight.device
        try:
            for _ in settling:
                base._settle_passes = []
                for batch in batches:
                    extra = {key: batch[key].to(device) for key in ("attention_mask", "position_ids") if batch.get(key) is not None}
                    base(input_ids=batch["input_ids"].to(device), **extra)
                settle(base.routers(), base._settle_passes)
        finally:
            base._settle_passes = None
            base.train(was_training)
        return len(settling)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Weights and config as usual, plus the model's code and a complete `auto_map`, so the folder
        loads with `trust_remote_code=True` where this project is not installed."""
        self.config.auto_map = dict(self.auto_map)
        base = getattr(self, self.base_model_prefix, self)
        if isinstance(base, ChiarModel):
            base.report_skipped_updates()
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for source in [__file__] + get_relative_import_files(__file__):
                shutil.copy(source, os.path.join(save_directory, os.path.basename(source)))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict_architecture=True, **kwargs):
        """transformers' loading, with clear errors for corrupt checkpoints and, unless
        `strict_architecture=False`, for checkpoints whose body does not match the config (missing or
        unexpected weights outside the task head would otherwise be silently re-initialised). With
        `output_loading_info=True` or an explicit `state_dict`, the report is returned as transformers does."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        except Exception as error:  # safetensors raises its own type; name the file and the cause
            if type(error).__name__ == "SafetensorError" or "deserializ" in str(error):
                raise ValueError(
                    f"The checkpoint at {pretrained_model_name_or_path!r} is corrupt or truncated "
                    f"and cannot be read ({error}). Re-download or re-save it."
                ) from error
            raise
        # A caller who asks for the loading report, or loads a state dict of its own, reads the report itself.
        if strict_architecture and not want_info and pretrained_model_name_or_path is not None and "state_dict" not in kwargs:
            # Everything but a task head (lm_head, score) is body: a base model loads without a head and a
            # classifier brings its own, but a missing or extra body weight means another architecture
            # (a post-norm config on a pre-norm checkpoint leaves the final norm's weights unused).
            body = sorted(
                key for key in set(info["missing_keys"]) | set(info["unexpected_keys"]) if key.split(".")[0] not in HEAD_ROOTS
            )
            if "lm_head.weight" in info["missing_keys"] and not model.config.tie_word_embeddings:
                raise ValueError(
                    f"The checkpoint at {pretrained_model_name_or_path!r} has no LM head weights (it was saved with tied "
                    "word embeddings) but the config says tie_word_embeddings=False: the head would be random. Load it "
                    "with tie_word_embeddings=True, or pass strict_architecture=False to train a new head."
                )
            if body:
                raise ValueError(
                    f"The checkpoint at {pretrained_model_name_or_path!r} does not match this model's architecture "
                    f"(layer_schedule={model.config.layer_schedule}, routed_operators={model.config.routed_operators}): "
                    f"missing or unexpected weights {body[:6]}{' ...' if len(body) > 6 else ''}. Load it with its own "
                    "config.json, or pass strict_architecture=False to re-initialise what is missing."
                )
        bad = [name for name, buffer in model.named_buffers() if buffer.is_floating_point() and not bool(torch.isfinite(buffer).all())]
        if bad:
            raise ValueError(
                f"The checkpoint at {pretrained_model_name_or_path!r} holds NaN or infinite values in {bad[:4]}: routing "
                "statistics are corrupt (a training step on non-finite data?). Load an earlier checkpoint or recalibrate."
            )
        base = getattr(model, model.base_model_prefix, model)
        if isinstance(base, ChiarModel) and pretrained_model_name_or_path is not None:
            checkpoint_targets = None
            if "router_target_fractions" in kwargs:
                saved = ChiarConfig.from_pretrained(pretrained_model_name_or_path).router_target_fractions
                if saved != model.config.router_target_fractions:
                    checkpoint_targets = saved
            changes = reconcile_loaded_thresholds(base.routers(), model.config, "router_thresholds" in kwargs, checkpoint_targets)
            for change in changes:
                logger.warning(f"Loading {pretrained_model_name_or_path}: {change}.")
        return (model, info) if want_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        """Parameters as transformers does; every CHIAR module rebuilds its own parameters and buffers
        from the config (`reset_from_config`), which works from the meta device."""
        super()._init_weights(module)
        if hasattr(module, "reset_from_config"):
            module.reset_from_config(self.config)


class ValueChecks:
    """Checks on tensor values, read back from the device in one sync, before the pass runs.

    Each check is a 0-dim bool tensor (True: the input is bad) and a function that words the error
    (called, and free to read more values, only when its check failed). Under `torch.compile` values
    are not checked: a compiled graph never waits for the host (shapes and types are still checked).
    """

    def __init__(self):
        self.checks = []

    def add(self, failed, message):
        self.checks.append((failed, message))

    def raise_if_failed(self):
        if not self.checks or torch.compiler.is_compiling():
            return
        flags = torch.stack([failed.reshape(()).to(self.checks[0][0].device) for failed, _ in self.checks]).tolist()
        self.checks, checks = [], self.checks
        for flag, (_, message) in zip(flags, checks):
            if flag:
                raise ValueError(message())


@dataclass
class PreparedInputs:
    """The pass's inputs in the order the layers see them: real tokens first in every row."""

    embeds: torch.Tensor  # (B, n, d)
    token_mask: torch.Tensor | None  # (B, n) real tokens (compacted), None when no attention_mask was given
    caller_mask: torch.Tensor | None  # (B, n) the same in the caller's order
    key_mask: torch.Tensor | None  # (B, past + n) over every key in stored order, None when none is padding
    positions: torch.Tensor  # (B, n)
    order: torch.Tensor | None  # (B, n): caller index of each compacted token; None when not reordered
    restore: torch.Tensor | None  # (B, n): inverse of `order`
    start: object  # (B,) real tokens seen before this pass, or 0
    real_counts: torch.Tensor  # (B,) real tokens of this pass


INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class ChiarModel(ChiarPreTrainedModel, KeepsFP32Buffers):
    """Embeddings, the scheduled layers, and a final norm (pre-norm only)."""

    fp32_buffers = ("dct_basis",)

    def __init__(self, config):
        super().__init__(config)
        config.validate_chiar()  # fields may have been changed since the config was built
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([ChiarDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm_position == "pre" else None
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.dct_basis = nn.Buffer(dct_matrix(config.hidden_size), persistent=False)
        self.gradient_checkpointing = False
        self._settle_passes = None  # a list while `settle_routing` collects eval passes' records
        self.post_init()

    def reset_from_config(self, config):
        from transformers import initialization

        initialization.copy_(self.dct_basis, dct_matrix(config.hidden_size, device=self.dct_basis.device))

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def routers(self):
        return [layer.mixer.router for layer in self.layers]

    def report_skipped_updates(self):
        """Router-statistics updates refused or undone since the model was built (batches with NaN or infinite
        hidden states; in ChiarTrainer, steps with a non-finite loss), logged once per new refusal. Read
        outside the forward pass: by `eval()` and saving."""
        counts = [r.skipped_updates for r in self.routers() if running_statistics(r) and not r.skipped_updates.is_meta]
        total = int(torch.stack([c.to(counts[0].device) for c in counts]).sum()) if counts else 0
        if total > getattr(self, "_skipped_reported", 0):
            logger.warning(
                f"{total - getattr(self, '_skipped_reported', 0)} routing-statistics update(s) were skipped: a batch had NaN or "
                "infinite hidden states (or, in the Trainer, a NaN or infinite loss), and the routers' statistics were left "
                "as they were before it."
            )
            self._skipped_reported = total
        return total

    def train(self, mode=True):
        super().train(mode)
        if not mode:
            self.report_skipped_updates()
        return self

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        output_routing=None,
        return_dict=None,
        cache=None,
        value_checks=None,
        **kwargs,
    ):
        """With a `ChiarCache` (passed as `cache` or `past_key_values`, or made by `use_cache=True`),
        `input_ids` are the new tokens only and `attention_mask` covers past and new tokens. A cache is
        built only when asked for: training and evaluation passes do not pay for one. `value_checks`
        (a `ValueChecks`) lets a head add its own checks to the one read of the inputs' values."""
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, ChiarCache):
            if hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0:
                cache = None  # an empty transformers cache made by a caller: use our own
            else:
                raise ValueError(f"CHIAR models decode with a ChiarCache, got {type(cache).__name__}.")
        if use_cache and cache is None and not config.is_causal:
            # transformers' convention for a flag that cannot apply (cf. gradient checkpointing): warn, build none.
            logger.warning_once(
                "use_cache=True has no effect on a bidirectional model (is_causal=False): no cache is built."
            )
            use_cache = False
        if cache is None and use_cache:
            cache = ChiarCache(config.num_hidden_layers, ChiarCache.model_signature(config))
        if cache is not None:
            if not config.is_causal:
                raise ValueError("Incremental decoding (a cache) needs a causal model (is_causal=True).")
            cache.check_model(config)
        inputs = self._prepare_inputs(input_ids, inputs_embeds, attention_mask, position_ids, cache, value_checks)
        batch, length = inputs.embeds.shape[:2]

        hidden_states = nn.functional.dropout(inputs.embeds, config.hidden_dropout, training=self.training)
        calibrating = self.training and cache is None and any(calibrates(r) for r in self.routers())
        ctx = MixContext(
            rope=self.rotary_emb(inputs.positions, hidden_states.dtype),
            positions=inputs.positions,
            token_mask=inputs.token_mask,
            key_mask=inputs.key_mask,
            dct=self.dct_basis,
            training=self.training,
            output_routing=bool(output_routing),
            output_attentions=bool(output_attentions),
            cache=cache,
            past_keys=cache.seen_tokens if cache is not None else 0,
            start=inputs.start,
            real_counts=inputs.real_counts,
            # What the routers route with as the pass starts (thresholds, share biases): the update
            # after it must not reach a gradient-checkpointing recomputation of it.
            router_states={i: snapshot(r, True) for i, r in enumerate(self.routers()) if calibrates(r)} if calibrating else None,
        )
        if output_attentions and (inputs.order is not None or (cache is not None and cache.key_order is not None)):
            ctx.caller_order = (inputs.restore, self._stored_key_order(inputs, cache, batch, length))

        def returned(hidden_states):
            """A hidden state in the caller's order, and the pass continuing from it (so that gradients reach it)."""
            if inputs.restore is None:
                return hidden_states, hidden_states
            caller = gather_rows(hidden_states, inputs.restore)
            return caller, gather_rows(caller, inputs.order)

        all_hidden, all_attentions = None, () if output_attentions else None
        if output_hidden_states:
            first, hidden_states = returned(hidden_states)
            all_hidden = (first,)
        records, aux_losses = [], []
        for i, layer in enumerate(self.layers):
            hidden_states, aux, attentions, record = layer(hidden_states, ctx)
            records.append(record)
            if aux is not None:  # the learned router's share-keeping loss
                aux_losses.append(aux)
            if output_attentions:
                if attentions is None:  # no token of this layer ran attention
                    attentions = hidden_states.new_zeros(batch, config.num_attention_heads, length, ctx.past_keys + length)
                all_attentions += (attentions,)
            if output_hidden_states and (i < len(self.layers) - 1 or self.norm is None):
                caller, hidden_states = returned(hidden_states)
                all_hidden += (caller,)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        last = gather_rows(hidden_states, inputs.restore) if inputs.restore is not None else hidden_states
        if output_hidden_states and self.norm is not None:
            all_hidden += (last,)
        elif output_hidden_states:
            all_hidden = all_hidden[:-1] + (last,)
        if cache is not None:
            cache.advance(inputs.token_mask, inputs.order, length, batch, hidden_states.device)
        if calibrating:
            self._observe(records, inputs, ctx)
        if self._settle_passes is not None:
            self._settle_passes.append((records, inputs.positions, inputs.token_mask))
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else None

        if output_routing:
            records = [self._record_in_caller_order(record, inputs) for record in records]
        output = ChiarModelOutput(
            last_hidden_state=last,
            hidden_states=all_hidden,
            attentions=all_attentions,
            routing=tuple(records) if output_routing else None,
            aux_loss=aux_loss,
            **{CACHE_NAME: cache},
        )
        return output if return_dict else output.to_tuple()

    def _observe(self, records, inputs, ctx):
        """Share control after the pass (`routing.observe`), so routing only ever uses batches already seen.

        With dropout active, eval-mode thresholds and share biases come from a dropout-free, no-grad pass
        over a slice of the batch (1/8 of its sequences, at least one): what eval will see, at a small cost.
        """
        config = self.config
        dropout = config.hidden_dropout > 0 or config.attention_dropout > 0
        if not (dropout and any(needs_eval_pass(r) for r in self.routers())):
            observe(self.routers(), records, inputs.positions, inputs.token_mask)
            return
        rows = max(1, inputs.embeds.shape[0] // 8)
        eval_mask = None if inputs.token_mask is None else inputs.token_mask[:rows]
        eval_ctx = MixContext(
            rope=tuple(t[:rows] for t in ctx.rope),
            positions=inputs.positions[:rows],
            token_mask=eval_mask,
            key_mask=None if inputs.key_mask is None else inputs.key_mask[:rows],
            dct=self.dct_basis,
            training=False,
        )
        with torch.no_grad():
            hidden_states, eval_records = inputs.embeds[:rows].detach(), []
            for layer in self.layers:
                hidden_states, _, _, record = layer(hidden_states, eval_ctx)
                eval_records.append(record)
        observe(self.routers(), records, inputs.positions, inputs.token_mask, eval_records, inputs.positions[:rows], eval_mask)

    def _prepare_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, value_checks):
        """Validate the inputs with clear errors (shapes and types here; values in one read, `ValueChecks`),
        embed them, and put each row's real tokens first, in order (`PreparedInputs`)."""
        config = self.config
        checks = value_checks if value_checks is not None else ValueChecks()
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            if not torch.is_tensor(input_ids):
                raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}.")
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape (batch, sequence), got {tuple(input_ids.shape)}.")
            if input_ids.dtype not in INTEGER_DTYPES:
                raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
            bad_ids = (input_ids < 0) | (input_ids >= config.vocab_size)
            checks.add(
                bad_ids.any(),
                lambda: f"input_ids contain token ids outside the vocabulary [0, {config.vocab_size}): "
                f"{input_ids[bad_ids].unique()[:8].tolist()}. Check that the tokenizer matches the model.",
            )
            batch, length = input_ids.shape
            device = input_ids.device
        else:
            if not torch.is_tensor(inputs_embeds):
                raise TypeError(f"inputs_embeds must be a torch.Tensor, got {type(inputs_embeds).__name__}.")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must have shape (batch, sequence, {config.hidden_size}), got {tuple(inputs_embeds.shape)}."
                )
            if not inputs_embeds.is_floating_point():
                raise TypeError(f"inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}.")
            batch, length = inputs_embeds.shape[:2]
            device = inputs_embeds.device
        if length == 0:
            raise ValueError("The input has no tokens (sequence length 0); pass at least one token per sequence.")
        past = cache.seen_tokens if cache is not None else 0
        if past and cache.real_tokens is not None and cache.real_tokens.shape[0] != batch:
            raise ValueError(f"The cache holds {cache.real_tokens.shape[0]} sequences but the input has {batch}.")
        if past + length > config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {past + length} exceeds max_position_embeddings={config.max_position_embeddings}, "
                "the longest this model supports. Truncate the input or raise max_position_embeddings in the config."
            )
        new_mask = None
        if attention_mask is not None:
            if not torch.is_tensor(attention_mask):
                raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}.")
            if tuple(attention_mask.shape) != (batch, past + length):
                expected = f"{(batch, past + length)} (past {past} + new {length} tokens)" if past else str((batch, length))
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but must be {expected}: one 1/0 "
                    "entry per token."
                )
            if attention_mask.dtype != torch.bool:
                checks.add(
                    ((attention_mask != 0) & (attention_mask != 1)).any(),
                    lambda: "attention_mask must contain only 0 (padding) and 1 (real token).",
                )
            if past and cache.real_tokens is not None:
                seen = attention_mask[:, :past].to(device).bool().sum(dim=1)
                checks.add(
                    (seen != cache.real_tokens).any(),
                    lambda: f"attention_mask marks {seen.tolist()} real past tokens per row, but the cache has seen "
                    f"{cache.real_tokens.tolist()}: pass the mask of the tokens this cache was filled with.",
                )
            new_mask = attention_mask[:, past:].to(device=device, dtype=torch.bool)
        if position_ids is not None:
            if not torch.is_tensor(position_ids) or position_ids.is_floating_point() or position_ids.dtype == torch.bool:
                raise TypeError("position_ids must be a tensor of integer positions.")
            if position_ids.shape[-1] != length or position_ids.dim() > 2 or (position_ids.dim() == 2 and position_ids.shape[0] not in (1, batch)):
                raise ValueError(f"position_ids must have shape (batch, {length}) or ({length},), got {tuple(position_ids.shape)}.")
            position_ids = position_ids.to(device).expand(batch, length)
            checks.add(
                ((position_ids < 0) | (position_ids >= config.max_position_embeddings)).any(),
                lambda: f"position_ids must lie in [0, max_position_embeddings={config.max_position_embeddings}).",
            )
        if inputs_embeds is not None:  # what padding holds never reaches a real token (tests/model/test_model_invariants.py)
            bad_values = ~torch.isfinite(inputs_embeds).all(dim=-1)
            if new_mask is not None:
                bad_values = bad_values & new_mask
            checks.add(bad_values.any(), lambda: "inputs_embeds contain NaN or infinite values at real (unmasked) tokens.")
        checks.raise_if_failed()  # one read of every value check, the head's included

        if input_ids is not None:
            inputs_embeds = self.embed_tokens(input_ids)
        else:
            inputs_embeds = inputs_embeds.to(self.embed_tokens.weight.dtype)
        start = cache.real_tokens if cache is not None and cache.real_tokens is not None else 0
        order = restore = token_mask = None
        if new_mask is not None:
            token_mask = new_mask
            if length > 1:  # real tokens first, in order: padding is never between or before them
                order = (~new_mask).to(torch.uint8).argsort(dim=1, stable=True)
                restore = order.argsort(dim=1)
                inputs_embeds = gather_rows(inputs_embeds, order)
                token_mask = gather_rows(new_mask, order)
                if position_ids is not None:
                    position_ids = gather_rows(position_ids, order)
        past_mask = cache.token_mask if cache is not None else None
        key_mask = None
        if past_mask is not None or token_mask is not None:
            if past_mask is None:
                past_mask = torch.ones(batch, past, dtype=torch.bool, device=device)
            new = token_mask if token_mask is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
            key_mask = torch.cat([past_mask, new], dim=1)
        if position_ids is None:  # positions count real tokens only
            steps = torch.arange(length, device=device).expand(batch, length)
            position_ids = steps + start[:, None] if torch.is_tensor(start) else steps
        real_counts = token_mask.sum(dim=1) if token_mask is not None else torch.full((batch,), length, device=device)
        return PreparedInputs(
            inputs_embeds, token_mask, new_mask, key_mask, position_ids, order, restore, start, real_counts
        )

    @staticmethod
    def _stored_key_order(inputs, cache, batch, length):
        """(B, past + n): the caller's index of every key in stored order (see ChiarCache.key_order)."""
        device = inputs.embeds.device
        past = cache.seen_tokens if cache is not None else 0
        if cache is not None and cache.key_order is not None:
            before = cache.key_order
        else:
            before = torch.arange(past, device=device).expand(batch, past)
        new = inputs.order if inputs.order is not None else torch.arange(length, device=device).expand(batch, length)
        return torch.cat([before, new + past], dim=1)

    @staticmethod
    def _record_in_caller_order(record, inputs):
        if inputs.restore is not None:
            back = lambda t: None if t is None else gather_rows(t, inputs.restore)  # noqa: E731
            record = dataclasses.replace(
                record, operator_ids=back(record.operator_ids), requested_ids=back(record.requested_ids), entropy=back(record.entropy),
                router_score=back(record.router_score),
                router_logits=back(record.router_logits),
            )
        return dataclasses.replace(record, token_mask=inputs.caller_mask)


class ChiarForCausalLM(ChiarPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        if not config.is_causal:
            raise ValueError("ChiarForCausalLM needs is_causal=True; bidirectional models are for classification.")
        self.model = ChiarModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        output_routing=None,
        return_dict=None,
        logits_to_keep=0,
        cache=None,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        checks = ValueChecks()
        if labels is not None:
            if not torch.is_tensor(labels) or labels.dtype not in INTEGER_DTYPES:
                raise TypeError("labels must be a tensor of integer token ids (or -100 for positions to ignore).")
            bad = (labels != -100) & ((labels < 0) | (labels >= self.config.vocab_size))
            checks.add(bad.any(), lambda: f"labels must be -100 (ignored) or token ids in [0, {self.config.vocab_size}).")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_routing=output_routing,
            return_dict=True,
            value_checks=checks,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            labels = labels.to(device=logits.device, dtype=torch.long)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if outputs.aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss
        output = ChiarCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            routing=outputs.routing,
            aux_loss=outputs.aux_loss,
            **{CACHE_NAME: outputs[CACHE_NAME] if CACHE_NAME in outputs else None},
        )
        return output if return_dict else output.to_tuple()

    # --- generation: our own cache, under whichever name this transformers version uses ---

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # generate() must not build a DynamicCache: we make a ChiarCache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Make the ChiarCache before the prefill (chunked prefill, `prefill_chunk_size`, needs one to fill).
        Should a transformers version not call this, prepare_inputs_for_generation still makes it."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is not False and model_kwargs.get(CACHE_NAME) is None:
            model_kwargs[CACHE_NAME] = ChiarCache(self.config.num_hidden_layers, ChiarCache.model_signature(self.config))

    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        is_first_iteration=False,
        cache=None,
        use_cache=True,
        position_ids=None,
        **kwargs,
    ):
        """Feed the tokens the cache has not seen (all of them without a cache), with the full mask.

        `input_ids` hold the prompt and what was generated, or only what was generated when the prompt
        came as `inputs_embeds`; `attention_mask` always covers every token, past and new.
        """
        state = cache if cache is not None else past_key_values
        if state is not None and not isinstance(state, ChiarCache):
            state = None if state.get_seq_length() == 0 else state  # forward() rejects a non-empty foreign cache
        if state is None and use_cache:
            state = ChiarCache(self.config.num_hidden_layers, ChiarCache.model_signature(self.config))
        seen = state.get_seq_length() if state is not None else 0
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, CACHE_NAME: state}
        if inputs_embeds is not None and (is_first_iteration or seen == 0):
            length = inputs_embeds.shape[1] - seen  # the embeddings are of the whole prompt
            inputs["inputs_embeds"] = inputs_embeds[:, seen:]
            inputs["input_ids"] = None
        else:
            if next_sequence_length is not None:
                length = next_sequence_length
            elif attention_mask is not None:  # the mask covers every token, seen and new
                length = attention_mask.shape[1] - seen
            else:  # the whole sequence so far, or (a chunked prefill) only the next chunk
                length = input_ids.shape[1] - seen if input_ids.shape[1] > seen else input_ids.shape[1]
            new_ids = input_ids[:, input_ids.shape[1] - length :]
            inputs["input_ids"] = new_ids.clone(memory_format=torch.contiguous_format)
        if position_ids is not None:
            inputs["position_ids"] = position_ids[..., -length:]
        for key, value in kwargs.items():
            if key not in inputs and key not in ("labels", "cache_position"):
                inputs[key] = value
        return inputs


class ChiarForSequenceClassification(ChiarPreTrainedModel):
    """Pooled (masked mean by default) final hidden states -> dropout -> linear head."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ChiarModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def pool(self, hidden_states, attention_mask):
        batch, length = hidden_states.shape[:2]
        mask = torch.ones(batch, length, device=hidden_states.device) if attention_mask is None else attention_mask
        mask = mask.to(device=hidden_states.device, dtype=hidden_states.dtype)
        if self.config.classifier_pooling == "mean":
            return (hidden_states * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1)
        positions = torch.arange(length, device=hidden_states.device)
        real = mask > 0
        if self.config.classifier_pooling == "last":
            index = torch.where(real, positions, -1).amax(dim=1).clamp_min(0)
        else:
            index = torch.where(real, positions, length).amin(dim=1).clamp_max(length - 1)
        return hidden_states[torch.arange(batch, device=hidden_states.device), index]

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        output_routing=None,
        return_dict=None,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        given = [name for name in ("cache", "past_key_values") if kwargs.get(name) is not None]
        if given:
            raise ValueError(f"ChiarForSequenceClassification takes no decoding cache, got {given[0]}.")
        checks = ValueChecks()
        if labels is not None:
            if not torch.is_tensor(labels):
                raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
            if self.classifies(labels):
                flat = labels.view(-1)
                bad = (flat != -100) & ((flat < 0) | (flat >= self.num_labels))
                checks.add(
                    bad.any(),
                    lambda: f"labels must be class ids in [0, num_labels={self.num_labels}), got {flat[bad][:8].tolist()}.",
                )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_routing=output_routing,
            return_dict=True,
            value_checks=checks,
        )
        logits = self.score(self.dropout(self.pool(outputs.last_hidden_state, attention_mask)))

        loss = None
        if labels is not None:
            loss = self.classification_loss(logits, labels.to(logits.device))
            if outputs.aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss
        output = ChiarSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            routing=outputs.routing,
            aux_loss=outputs.aux_loss,
        )
        return output if return_dict else output.to_tuple()

    def problem_type(self, labels):
        """transformers' `problem_type` convention: regression, single- or multi-label classification,
        inferred from the labels when the config leaves it unset and then written to the config, in
        eager mode only (a config changed inside a compiled forward would make it recompile)."""
        if self.config.problem_type is not None:
            return self.config.problem_type
        if self.num_labels == 1:
            inferred = "regression"
        elif labels.dtype in (torch.long, torch.int):
            inferred = "single_label_classification"
        else:
            inferred = "multi_label_classification"
        if not torch.compiler.is_compiling():
            self.config.problem_type = inferred
        return inferred

    def classifies(self, labels):
        return self.problem_type(labels) == "single_label_classification"

    def classification_loss(self, logits, labels):
        problem_type = self.problem_type(labels)
        if problem_type == "regression":
            if self.num_labels == 1:
                return nn.functional.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
            return nn.functional.mse_loss(logits, labels.to(logits.dtype))
        if problem_type == "single_label_classification":
            return nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1).long())
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


__all__ = [
    "ChiarPreTrainedModel",
    "ChiarModel",
    "ChiarForCausalLM",
    "ChiarForSequenceClassification",
    "LayerRouting",
]
