"""CHIAR-Former: each token, at each routed layer, takes one of DCT mixing, RBF mixing or attention.

Assembly only: operators live in `operator_*.py`, routing in `routing.py`, FLOP formulas in
`flops.py`. Semantics: spec/CHIAR.md.
"""

import dataclasses
import inspect
import os
import shutil
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .cache import ChiarCache
from .configuration_chiar import ChiarConfig
from .flops import linear_flops
from .fp32_buffers import KeepsFP32Buffers
from .operator_attention import RotaryEmbedding, RoutedAttention
from .operator_dct import DCTMixing
from .operator_rbf import RBFMixing, rbf_features
from .routing import GateRouter, MetaRouter, RandomRouter, ThresholdRouter, build_router, initial_thresholds
from .spectral import dct_matrix, spectral_entropy_from_coefficients

logger = logging.get_logger(__name__)


@dataclass
class LayerRouting:
    """What one layer did: which operator each token took, its entropy, and the work executed."""

    operators: tuple  # operator names; `operator_ids` index into them
    operator_ids: torch.Tensor  # (B, T) long
    entropy: torch.Tensor | None  # (B, T) in [0, 1]
    token_mask: torch.Tensor | None  # (B, T) bool, real tokens; None when nothing is padded
    thresholds: torch.Tensor | None = None  # threshold router only
    attention_queries: int = 0  # real tokens that ran attention as a query
    attention_flops: float = 0.0  # attention FLOPs executed (projections and kernel)
    operator_flops: float = 0.0  # FLOPs of the token-operator sub-layer, routing included

    def shares(self):
        """Each operator's share of the real (non-padding) tokens."""
        mask = torch.ones_like(self.operator_ids, dtype=torch.bool) if self.token_mask is None else self.token_mask
        ids = self.operator_ids[mask]
        total = max(int(ids.numel()), 1)
        return {op: int((ids == k).sum()) / total for k, op in enumerate(self.operators)}


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


@dataclass
class MixContext:
    """Per-forward data every layer shares."""

    rope: tuple  # (cos, sin), each (B, n, head_dim), for the n tokens of this pass
    positions: torch.Tensor  # (B, n) positions counting real tokens only
    token_mask: torch.Tensor | None  # (B, n) bool, real tokens of this pass; None when none is padding
    dct: torch.Tensor  # (d, d) orthonormal DCT-II
    output_routing: bool
    output_attentions: bool
    cache: ChiarCache | None = None
    key_mask: torch.Tensor | None = None  # (B, past + n) bool over every key; None when nothing is padding
    # Threshold-router thresholds as they were when the pass started: the update that follows the pass
    # must not reach a gradient-checkpointing recomputation of it.
    thresholds: dict | None = None
    _real_tokens: int | None = None

    def real_tokens(self):
        """Number of real tokens of this pass, read from the device once per forward, when first needed."""
        if self._real_tokens is None:
            self._real_tokens = int(self.token_mask.sum()) if self.token_mask is not None else self.positions.numel()
        return self._real_tokens


def gather_selected(selected):
    """Indices (B, M) of the True entries of `selected` (B, T) in position order, which are real, and
    each row's count as a list (read in one host sync, which also sizes the gather).

    Rows with fewer than M selections are filled with unselected positions marked invalid: they are
    computed (a rectangular batch) but their outputs are discarded.
    """
    length = selected.shape[1]
    counts = selected.sum(dim=1)
    per_row = counts.tolist()
    num = max(per_row, default=0)
    order_key = (~selected).long() * length + torch.arange(length, device=selected.device)
    index = order_key.argsort(dim=1)[:, :num]
    valid = torch.arange(num, device=selected.device)[None, :] < counts[:, None]
    return index, valid, per_row


class TokenMixer(nn.Module):
    """The token-operator sub-layer of one layer: route, run each operator on its tokens only, merge."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.operators = config.layer_operators(layer_idx)
        self.dct = DCTMixing(config.hidden_size) if "dct" in self.operators else None
        self.rbf = RBFMixing(config, layer_idx) if "rbf" in self.operators else None
        self.attention = RoutedAttention(config, layer_idx) if "attention" in self.operators else None
        self.router = build_router(config, layer_idx) if len(self.operators) > 1 else None

    def needs_entropy(self, output_routing):
        return output_routing or isinstance(self.router, (ThresholdRouter, GateRouter))

    def forward(self, x, ctx):
        batch, length, d = x.shape
        entropy = None
        flops = 0.0
        if self.needs_entropy(ctx.output_routing):
            with torch.no_grad():  # routing reads the value only
                entropy = spectral_entropy_from_coefficients(x.float() @ ctx.dct.T)
            if self.needs_entropy(False):  # counted when routing needs it, not when only reported
                flops += linear_flops(batch * length, d, d)

        decision = None
        if self.router is None:
            ids = torch.zeros(batch, length, dtype=torch.long, device=x.device)
        else:
            if isinstance(self.router, ThresholdRouter) and ctx.thresholds:
                decision = self.router(x, entropy, ctx.positions, ctx.token_mask, ctx.thresholds[self.layer_idx])
            else:
                decision = self.router(x, entropy, ctx.positions, ctx.token_mask)
            ids = decision.operator_ids
            if isinstance(self.router, GateRouter):  # its gate: one logit per operator from the hidden vector
                flops += linear_flops(batch * length, d, len(self.operators))
            if ctx.token_mask is not None:  # padding takes the cheapest operator
                ids = ids.masked_fill(~ctx.token_mask, 0)
        soft = isinstance(self.router, GateRouter) and not self.router.hard

        output = x.new_zeros(x.shape)  # contiguous even when x is not: routed rows are written into its rows
        attentions = None
        attention_queries, attention_flops = 0, 0.0
        for k, name in enumerate(self.operators):
            every_token = self.router is None or soft
            selected = None if every_token else ids == k
            # Routed tokens are written straight into `output` (each token has one operator);
            # an operator that sees every token returns its full output, which is added. An operator
            # nobody was routed to costs nothing, not even its keys (unless a cache needs them).
            if name == "dct":
                op_out, op_flops = self._run_dct(x, ctx.dct, selected, output)
            else:
                op_out, op_flops, op_attn, queries = self._run_mixing(name, x, ctx, selected, output, takes_padding=k == 0)
                if name == "attention":
                    attentions, attention_flops, attention_queries = op_attn, op_flops, queries
            if selected is not None:
                output = op_out
            else:
                if soft:
                    op_out = op_out * decision.weights[..., k : k + 1].to(op_out.dtype)
                output = output + op_out
            flops += op_flops
        if decision is not None and decision.weights is not None and not soft:
            # Learned router: the chosen operator's output times p / p.detach(), 1 in value, for the gradient.
            output = output * decision.weights.sum(dim=-1, keepdim=True).to(output.dtype)

        record = LayerRouting(
            operators=self.operators,
            operator_ids=ids,
            entropy=entropy,
            token_mask=ctx.token_mask,
            thresholds=self.router.thresholds.detach().clone() if isinstance(self.router, ThresholdRouter) else None,
            attention_queries=attention_queries,
            attention_flops=attention_flops,
            operator_flops=flops,
        )
        aux_loss = decision.aux_loss if decision is not None else None
        return output, attentions, record, aux_loss

    def _run_dct(self, x, dct, selected, output):
        """DCT mixing of every token (returned), or of the selected ones (written into `output`)."""
        d = x.shape[-1]
        if selected is None:
            return self.dct(x, dct)
        # Row indices, not a boolean mask: the backward of x[mask] is an accumulating index_put,
        # much slower on CPU than index_select's backward (index_add) for the same rows.
        rows = selected.reshape(-1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return output, 0.0
        mixed, flops = self.dct(x.reshape(-1, d).index_select(0, rows), dct)
        # Under autocast `mixed` is in the autocast dtype: cast to output's.
        output.view(-1, d).index_copy_(0, rows, mixed.to(output.dtype))
        return output, flops

    def _run_mixing(self, name, x, ctx, selected, output, takes_padding):
        """Attention or RBF for every token (returned), or the selected ones (added into `output`).

        Also returns how many real tokens were queries, counted from the gather's own host sync:
        padding is routed to operator 0 (`takes_padding`), so any other operator selected real tokens only.
        """
        operator = self.attention if name == "attention" else self.rbf
        d = x.shape[-1]
        index = valid = None
        if selected is None:
            queries = ctx.real_tokens()
        else:
            index, valid, counts = gather_selected(selected)
            if max(counts, default=0) == 0 and ctx.cache is None:
                return output, 0.0, None, 0
            padded = ctx.token_mask is not None and takes_padding
            queries = int((selected & ctx.token_mask).sum()) if padded else sum(counts)
        if name == "attention":
            out, attn, flops = operator(x, ctx.rope, index, ctx.key_mask, ctx.output_attentions, ctx.cache, valid)
        else:
            (out, flops), attn = operator(x, index, ctx.token_mask, ctx.cache), None
        if index is None:
            return out, flops, attn, queries
        if min(counts) < index.shape[1]:  # filler slots (valid False) hold other tokens: they add zero
            out = out * valid[..., None].to(out.dtype)
        out = out.to(output.dtype)
        return output.scatter_add_(1, index[..., None].expand(-1, -1, d), out), flops, attn, queries


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
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.meta_router = MetaRouter(config) if config.use_meta_router and layer_idx == 0 else None

    def forward(self, hidden_states, ctx):
        layer_input = hidden_states
        if self.pre_norm:
            mixed, attentions, record, aux = self.mixer(self.mixer_norm(hidden_states), ctx)
            hidden_states = hidden_states + self.dropout(mixed)
            hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        else:
            mixed, attentions, record, aux = self.mixer(hidden_states, ctx)
            hidden_states = self.mixer_norm(hidden_states + self.dropout(mixed))
            hidden_states = self.mlp_norm(hidden_states + self.dropout(self.mlp(hidden_states)))
        if self.meta_router is not None:
            hidden_states = self.meta_router(layer_input, hidden_states, ctx.token_mask, ctx.cache)
        if aux is None:
            aux = hidden_states.new_zeros(())
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

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Weights and config as usual, plus the model's code and a complete `auto_map`, so the folder
        loads with `trust_remote_code=True` where this project is not installed."""
        self.config.auto_map = dict(self.auto_map)
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
            base = getattr(model, model.base_model_prefix, model)
            prefix = "" if base is model else model.base_model_prefix + "."
            roots = {prefix + name.split(".")[0] for name in base.state_dict()}
            body = sorted(
                key
                for key in set(info["missing_keys"]) | set(info["unexpected_keys"])
                if any(key == root or key.startswith(root + ".") for root in roots)
            )
            if body:
                raise ValueError(
                    f"The checkpoint at {pretrained_model_name_or_path!r} does not match this model's architecture "
                    f"(layer_schedule={model.config.layer_schedule}, routed_operators={model.config.routed_operators}): "
                    f"missing or unexpected weights {body[:6]}{' ...' if len(body) > 6 else ''}. Load it with its own "
                    "config.json, or pass strict_architecture=False to re-initialise what is missing."
                )
        return (model, info) if want_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        """Parameters as transformers does; every buffer rebuilt from the config (works from the meta device)."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DCTMixing):
            init.ones_(module.gain)
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(device=module.inv_freq.device))
        elif isinstance(module, RBFMixing):
            features = rbf_features(module.num_heads, module.head_dim, module.num_features, module.layer_idx)
            init.copy_(module.projection, features.to(module.projection.device))
        elif isinstance(module, ThresholdRouter):
            init.copy_(module.thresholds, initial_thresholds(self.config).to(module.thresholds.device))
            init.copy_(module.train_thresholds, initial_thresholds(self.config).to(module.thresholds.device))
            init.zeros_(module.num_updates)
        elif isinstance(module, GateRouter):
            center, scale, slopes, biases = GateRouter.initial_gate(self.config)
            init.normal_(module.weight, mean=0.0, std=std)
            init.copy_(module.entropy_weight, slopes)
            init.copy_(module.bias, biases)
            init.copy_(module.center, center)
            init.copy_(module.scale, scale)
            targets = [self.config.router_target_fractions[op] for op in self.config.routed_operators]
            init.copy_(module.targets, torch.tensor(targets))
        elif isinstance(module, RandomRouter):
            init.copy_(module.boundaries, RandomRouter(self.config, module.layer_idx).boundaries)
        elif isinstance(module, MetaRouter):
            init.zeros_(module.weight)
            init.constant_(module.bias, 2.0)
        elif isinstance(module, ChiarModel):
            init.copy_(module.dct_basis, dct_matrix(self.config.hidden_size, device=module.dct_basis.device))


class ChiarModel(ChiarPreTrainedModel, KeepsFP32Buffers):
    """Embeddings, the scheduled layers, and a final norm (pre-norm only)."""

    fp32_buffers = ("dct_basis",)

    def __init__(self, config):
        super().__init__(config)
        config.validate_chiar()  # fields may have been changed since the config was built
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([ChiarDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm_position == "pre" else None
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.dct_basis = nn.Buffer(dct_matrix(config.hidden_size), persistent=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

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
        **kwargs,
    ):
        """With a `ChiarCache` (passed as `cache` or `past_key_values`, or made by `use_cache=True`),
        `input_ids` are the new tokens only and `attention_mask` covers past and new tokens. A cache is
        built only when asked for: training and evaluation passes do not pay for one."""
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
            cache = ChiarCache(config.num_hidden_layers)
        if cache is not None and not config.is_causal:
            raise ValueError("Incremental decoding (a cache) needs a causal model (is_causal=True).")
        inputs_embeds, token_mask, key_mask, positions = self._check_inputs(
            input_ids, inputs_embeds, attention_mask, position_ids, cache
        )

        hidden_states = self.dropout(inputs_embeds)
        ctx = MixContext(
            rope=self.rotary_emb(positions, hidden_states.dtype),
            positions=positions,
            token_mask=token_mask,
            dct=self.dct_basis,
            output_routing=bool(output_routing),
            output_attentions=bool(output_attentions),
            cache=cache,
            key_mask=key_mask,
        )
        calibrating = self.training and cache is None and self._calibrating_routers()
        if calibrating:
            ctx.thresholds = {
                i: layer.mixer.router.train_thresholds.clone()
                for i, layer in enumerate(self.layers)
                if isinstance(layer.mixer.router, ThresholdRouter)
            }
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        records, aux_losses = [], []
        batch, length = hidden_states.shape[:2]
        for layer in self.layers:
            hidden_states, aux, attentions, record = layer(hidden_states, ctx)
            records.append(record)
            if isinstance(layer.mixer.router, GateRouter) and layer.mixer.router.hard:
                aux_losses.append(aux)
            if output_attentions:
                if attentions is None:  # no token of this layer ran attention
                    total = length if key_mask is None else key_mask.shape[1]
                    total = total if cache is None else cache.seen_tokens + length
                    attentions = hidden_states.new_zeros(batch, config.num_attention_heads, length, total)
                all_attentions += (attentions,)
            if output_hidden_states:
                all_hidden += (hidden_states,)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
            if output_hidden_states:
                all_hidden = all_hidden[:-1] + (hidden_states,)
        if cache is not None:
            cache.advance(token_mask, length, batch, hidden_states.device)

        if calibrating:
            self._calibrate_routers(records, inputs_embeds, token_mask, positions)
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else None

        output = ChiarModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden,
            attentions=all_attentions,
            routing=tuple(records) if output_routing else None,
            aux_loss=aux_loss,
            **{CACHE_NAME: cache},
        )
        return output if return_dict else output.to_tuple()

    def _calibrating_routers(self):
        routers = [layer.mixer.router for layer in self.layers]
        return any(isinstance(r, ThresholdRouter) and r.calibrate for r in routers)

    @torch.no_grad()
    def _calibrate_routers(self, records, inputs_embeds, token_mask, positions):
        """Update the threshold routers after the pass, so routing only ever uses batches already seen.

        With dropout active, eval-mode thresholds come from a dropout-free, no-grad pass over a slice
        of the batch (1/8 of its sequences, at least one): what eval will see, at a small cost.
        """
        eval_records, eval_mask = records, token_mask
        if any(m.p > 0 for m in self.modules() if isinstance(m, nn.Dropout)) or self.config.attention_dropout > 0:
            rows = max(1, inputs_embeds.shape[0] // 8)
            eval_mask = None if token_mask is None else token_mask[:rows]
            ctx = MixContext(
                rope=self.rotary_emb(positions[:rows], inputs_embeds.dtype),
                positions=positions[:rows],
                token_mask=eval_mask,
                dct=self.dct_basis,
                output_routing=False,
                output_attentions=False,
                key_mask=eval_mask,
            )
            modes = {module: module.training for module in self.modules()}
            self.train(False)
            try:
                hidden_states, eval_records = inputs_embeds[:rows].detach(), []
                for layer in self.layers:
                    hidden_states, _, _, record = layer(hidden_states, ctx)
                    eval_records.append(record)
            finally:
                for module, mode in modes.items():
                    module.training = mode
        eval_positions = positions[: eval_records[0].operator_ids.shape[0]]
        for layer, record, eval_record in zip(self.layers, records, eval_records):
            router = layer.mixer.router
            if isinstance(router, ThresholdRouter):
                train_score = router.score(record.entropy, positions)
                if eval_record is record:  # no dropout: eval would see these very scores
                    router.update(train_score, token_mask)
                else:
                    router.update(train_score, token_mask, router.score(eval_record.entropy, eval_positions), eval_mask)

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache=None):
        """Validate the inputs with clear errors.

        Returns the embeddings (B, n, d), the real-token mask of the new tokens (B, n), the mask of every
        key (B, past + n) (both None when nothing is padded) and the positions of the new tokens (B, n).
        """
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape (batch, sequence), got {tuple(input_ids.shape)}.")
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
                bad = input_ids[(input_ids < 0) | (input_ids >= config.vocab_size)]
                raise ValueError(
                    f"input_ids contain token ids outside the vocabulary [0, {config.vocab_size}): "
                    f"{bad.unique()[:8].tolist()}. Check that the tokenizer matches the model."
                )
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape (batch, sequence, {config.hidden_size}), got {tuple(inputs_embeds.shape)}."
            )
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past = cache.seen_tokens if cache is not None else 0
        if past and cache.real_tokens is not None and cache.real_tokens.shape[0] != batch:
            raise ValueError(f"The cache holds {cache.real_tokens.shape[0]} sequences but the input has {batch}.")
        if past + length > config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {past + length} exceeds max_position_embeddings={config.max_position_embeddings}, "
                "the longest this model supports. Truncate the input or raise max_position_embeddings in the config."
            )
        key_mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, past + length):
                expected = f"{(batch, past + length)} (past {past} + new {length} tokens)" if past else str((batch, length))
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but must be {expected}: one 1/0 "
                    "entry per token."
                )
            if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask must contain only 0 (padding) and 1 (real token).")
            key_mask = attention_mask.to(device=device, dtype=torch.bool)
        elif cache is not None and cache.token_mask is not None:
            key_mask = torch.cat([cache.token_mask, torch.ones(batch, length, dtype=torch.bool, device=device)], 1)
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None
        token_mask = None if key_mask is None else key_mask[:, past:]
        if token_mask is not None and bool(token_mask.all()):
            token_mask = None

        if position_ids is None:
            # Positions count real tokens only, so left padding shifts nothing.
            start = cache.real_tokens[:, None] if cache is not None and cache.real_tokens is not None else 0
            if token_mask is None:
                position_ids = torch.arange(length, device=device).expand(batch, length) + start
            else:
                position_ids = (token_mask.long().cumsum(dim=1) - 1).clamp_min(0) + start
        else:
            position_ids = position_ids.to(device).expand(batch, length)
            if int(position_ids.max()) >= config.max_position_embeddings or int(position_ids.min()) < 0:
                raise ValueError(
                    f"position_ids must lie in [0, max_position_embeddings={config.max_position_embeddings})."
                )
        return inputs_embeds, token_mask, key_mask, position_ids


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
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            bad = (labels != -100) & ((labels < 0) | (labels >= self.config.vocab_size))
            if bool(bad.any()):
                raise ValueError(f"labels must be -100 (ignored) or token ids in [0, {self.config.vocab_size}).")
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
            model_kwargs[CACHE_NAME] = ChiarCache(self.config.num_hidden_layers)

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
            state = ChiarCache(self.config.num_hidden_layers)
        seen = state.get_seq_length() if state is not None else 0
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, CACHE_NAME: state}
        if inputs_embeds is not None and (is_first_iteration or seen == 0):
            length = inputs_embeds.shape[1] - seen  # the embeddings are of the whole prompt
            inputs["inputs_embeds"] = inputs_embeds[:, seen:]
            inputs["input_ids"] = None
        else:
            total = attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]
            length = next_sequence_length if next_sequence_length is not None else total - seen
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
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_routing=output_routing,
            return_dict=True,
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

    def classification_loss(self, logits, labels):
        """transformers' `problem_type` convention: regression, single- or multi-label classification."""
        config = self.config
        if config.problem_type is None:
            if self.num_labels == 1:
                config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                config.problem_type = "single_label_classification"
            else:
                config.problem_type = "multi_label_classification"
        if config.problem_type == "regression":
            if self.num_labels == 1:
                return nn.functional.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
            return nn.functional.mse_loss(logits, labels.to(logits.dtype))
        if config.problem_type == "single_label_classification":
            labels = labels.view(-1)
            bad = (labels != -100) & ((labels < 0) | (labels >= self.num_labels))
            if bool(bad.any()):
                raise ValueError(f"labels must be class ids in [0, num_labels={self.num_labels}), got {labels[bad][:8].tolist()}.")
            return nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


__all__ = [
    "ChiarPreTrainedModel",
    "ChiarModel",
    "ChiarForCausalLM",
    "ChiarForSequenceClassification",
    "LayerRouting",
]
