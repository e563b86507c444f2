"""Configuration of CHIAR-Former (Chiaroscuro Attention).

The semantics of every CHIAR field are fixed by docs/spec.md; this module only stores and checks
them. Every invalid value raises `ValueError` naming the field and what is allowed, at
construction time, so a bad config never reaches the model.
"""

import math

from transformers import PretrainedConfig

# Cheapest first. The threshold router sends higher spectral entropy to later operators, and
# padding tokens take the first (cheapest) operator of a routed layer.
OPERATORS = ("dct", "rbf", "attention")
LAYER_KINDS = OPERATORS + ("routed",)
ROUTER_TYPES = ("threshold", "learned", "soft", "random")
SHARE_CONTROLS = ("aux_loss", "bias")
NORM_POSITIONS = ("pre", "post")
POOLINGS = ("mean", "last", "first")


def default_target_fractions(routed_operators):
    """25% of tokens to attention (spec default), the rest split evenly; even split without attention."""
    ops = list(routed_operators)
    if "attention" not in ops:
        return {op: 1.0 / len(ops) for op in ops}
    rest = [op for op in ops if op != "attention"]
    fractions = {op: 0.75 / len(rest) for op in rest}
    fractions["attention"] = 0.25
    return {op: fractions[op] for op in ops}


def _check_rope_settings(name, params):
    if not isinstance(params, dict):
        raise ValueError(f"{name} must be a dict like {{'rope_type': 'default', 'rope_theta': ...}}, got {params!r}.")
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise ValueError(
            f"{name}={params!r}: CHIAR implements the default RoPE only (set rope_theta); scaled "
            "variants (linear, dynamic, yarn, ...) are not supported."
        )


class ChiarConfig(PretrainedConfig):
    r"""
    Configuration for [`ChiarModel`], [`ChiarForCausalLM`] and [`ChiarForSequenceClassification`].

    The defaults build the spec's 4-layer model: `["dct", "routed", "routed", "attention"]`, routed
    layers choosing between DCT mixing and attention, a threshold router calibrated to send 25% of
    tokens to attention. `layer_schedule=["attention"] * L` is the full-attention baseline.

    CHIAR fields:
        layer_schedule (`list[str]`): one entry per layer, each of `"dct"`, `"rbf"`, `"attention"` or `"routed"`.
        routed_operators (`list[str]`): operators a `"routed"` layer chooses from, cheapest first
            (subset of `["dct", "rbf", "attention"]`, at least two).
        router_type (`str`): `"threshold"`, `"learned"`, `"soft"` or `"random"`.
        router_target_fractions (`dict[str, float]`): operator name -> share of tokens; sums to 1.
        router_thresholds (`list[float]` or `None`): fixed entropy thresholds (one fewer than the routed
            operators, ascending, in [0, 1]) for the threshold router; `None` calibrates them.
        router_aux_loss_coef (`float`): weight of the learned router's share-keeping auxiliary loss. The
            default (5.0) holds the eval shares within 0.05 of their targets in training runs on
            WikiText-2 (tests/model/test_routing.py); 0.1 and 1.0 let the attention share drift to 0.3-0.35.
        router_share_control (`str`): how the learned router keeps its shares at their targets.
            `"aux_loss"` (default): the auxiliary loss weighted by `router_aux_loss_coef`, which has a
            gradient and so competes with the task's. `"bias"`: no loss; a per-layer, per-operator bias on
            the gate's logits (it moves the choice, and the straight-through gradient is taken at the biased
            gate; no gradient reaches it) moves after each training pass by `router_bias_rate` x (target -
            share) / target plus a drift that sums that error (auxiliary-loss-free balancing, after
            DeepSeek-V3, proportional-integral).
        router_bias_rate (`float`): the bias's step, in logits per unit of relative share error, with
            `router_share_control="bias"` (default 0.3: a share of 0.5 against a target of 0.25 moves it
            by 0.3 per pass, and its drift by a tenth of that). Without the drift, at 0.2, a WikiText-2
            epoch's training passes asked 0.30-0.37 attention for a 0.25 target (docs/benchmarks.md); a
            larger rate follows faster but passes the noise of small batches' shares on to the bias.
        router_explore (`bool`): learned router only. In training each token's operator is drawn from the
            gate's probabilities (Gumbel-max, per token, on the device) instead of taken as the most likely
            one, and the gate starts at the target shares for every token instead of at the entropy
            thresholds; eval ranks the tokens by the gate and gives the target shares to the top of the
            ranking (cut at running quantiles calibrated in training). Hard top-1 routing gives the gate a
            gradient only for the operator a token ran, so without exploring the gate never learns what an
            operator it does not pick would do (benchmarks/routing_signal.py). Default False.
        router_calibration_momentum (`float`): floor of the running-quantile update rate (a cumulative
            mean for the first 1/momentum batches, then an EMA). 0.1 follows a model whose hidden states
            move during training; 0.01 lagged so far that a 200-step WikiText-2 run ended with 0.37
            of a layer's tokens on attention instead of 0.25 (benchmarks/quality.py).
        router_block_size (`int`): the budget's block, in real-token positions (default 128). Every
            routed operator but the cheapest has a fixed number of query slots per block, filled in
            position order; a token asking for an operator whose block is full takes the cheapest one
            (overflow, reported). A sequence shorter than a block still has a whole block's slots.
        router_capacity_factor (`float`): slots per block = ceil(target share x block x factor), at most
            the block. The default, 1.0, makes the budget the target share exactly (25% of the queries:
            the paper's saving); above 1 it leaves slack for blocks that ask more (fewer overflows, more
            slots computed); 1 / target or more grants every request.
        rbf_num_features (`int`), rbf_gamma (`float`): random features and bandwidth of RBF mixing.
        use_meta_router (`bool`): v2's gate blending the first layer's output with its input.
        is_causal (`bool`): causal (language modelling) or bidirectional (classification) mixing.
        norm_position (`str`): `"pre"` (default) or `"post"` (the paper's) layer norm.
        classifier_pooling (`str`): `"mean"` (masked mean, default), `"last"` or `"first"` token.

    RoPE is the plain kind, with `rope_theta`. A `rope_parameters` (or `rope_scaling`) of type
    `"default"` may give the theta instead; scaled types (linear, dynamic, yarn, ...) are refused.
    """

    model_type = "chiar"
    keys_to_ignore_at_inference = ["past_key_values", "cache", "routing", "aux_loss"]

    def __init__(
        self,
        vocab_size=50257,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        hidden_act="gelu",
        hidden_dropout=0.1,
        attention_dropout=0.0,
        classifier_dropout=None,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=True,
        layer_schedule=None,
        routed_operators=None,
        router_type="threshold",
        router_target_fractions=None,
        router_thresholds=None,
        router_aux_loss_coef=5.0,
        router_share_control="aux_loss",
        router_bias_rate=0.3,
        router_explore=False,
        router_calibration_momentum=0.1,
        router_block_size=128,
        router_capacity_factor=1.0,
        rbf_num_features=64,
        rbf_gamma=1.0,
        use_meta_router=False,
        is_causal=True,
        norm_position="pre",
        classifier_pooling="mean",
        **kwargs,
    ):
        # Checked before transformers' own validators read them (they fail with a TypeError on a string).
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers),
                            ("num_attention_heads", num_attention_heads), ("intermediate_size", intermediate_size)):
            _check_int(name, value, 1)
        if layer_schedule is not None and not isinstance(layer_schedule, (list, tuple)):
            raise ValueError(f"layer_schedule must be a list of layer kinds {list(LAYER_KINDS)}, got {layer_schedule!r}.")
        if routed_operators is not None and not isinstance(routed_operators, (list, tuple)):
            raise ValueError(f"routed_operators must be a list of operator names from {list(OPERATORS)}, got {routed_operators!r}.")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.classifier_dropout = classifier_dropout
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.use_cache = use_cache
        if layer_schedule is None:
            layer_schedule = _default_schedule(num_hidden_layers)
        self.layer_schedule = list(layer_schedule)
        self.routed_operators = list(routed_operators) if routed_operators is not None else ["dct", "attention"]
        self.router_type = router_type
        if router_target_fractions is None and isinstance(self.routed_operators, list):
            router_target_fractions = default_target_fractions(self.routed_operators)
        self.router_target_fractions = dict(router_target_fractions) if router_target_fractions else {}
        self.router_thresholds = list(router_thresholds) if router_thresholds is not None else None
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_share_control = router_share_control
        self.router_bias_rate = router_bias_rate
        self.router_explore = router_explore
        self.router_calibration_momentum = router_calibration_momentum
        self.router_block_size = router_block_size
        self.router_capacity_factor = router_capacity_factor
        self.rbf_num_features = rbf_num_features
        self.rbf_gamma = rbf_gamma
        self.use_meta_router = use_meta_router
        self.is_causal = is_causal
        self.norm_position = norm_position
        self.classifier_pooling = classifier_pooling
        for name in ("rope_parameters", "rope_scaling"):  # checked before transformers reads them
            if kwargs.get(name) is not None:
                _check_rope_settings(name, kwargs[name])
                self.rope_theta = kwargs[name].get("rope_theta", self.rope_theta)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # transformers 5.x may not keep `tie_word_embeddings` as an attribute on every minor version.
        self.tie_word_embeddings = tie_word_embeddings
        self.validate_chiar()

    def _rope_settings(self):
        """`rope_parameters` / `rope_scaling` if set (5.x configs may give RoPE's theta there). CHIAR
        implements plain RoPE (`rope_theta`): any scaled variant is refused rather than ignored."""
        found = {name: getattr(self, name, None) for name in ("rope_parameters", "rope_scaling")}
        found = {name: params for name, params in found.items() if params is not None}
        for name, params in found.items():
            _check_rope_settings(name, params)
        return found

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def uses_routing(self):
        return "routed" in self.layer_schedule

    def layer_operators(self, layer_idx):
        """Names of the operators layer `layer_idx` can run, cheapest first."""
        kind = self.layer_schedule[layer_idx]
        return tuple(self.routed_operators) if kind == "routed" else (kind,)

    def validate_chiar(self):
        """Check every field the model relies on; raise `ValueError` naming the field."""
        _check_int("vocab_size", self.vocab_size, 1)
        _check_int("hidden_size", self.hidden_size, 2)
        _check_int("num_hidden_layers", self.num_hidden_layers, 1)
        _check_int("num_attention_heads", self.num_attention_heads, 1)
        _check_int("intermediate_size", self.intermediate_size, 1)
        _check_int("max_position_embeddings", self.max_position_embeddings, 1)
        _check_int("rbf_num_features", self.rbf_num_features, 1)
        _check_int("router_block_size", self.router_block_size, 1)
        _check_positive("router_capacity_factor", self.router_capacity_factor)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.head_dim % 2:
            raise ValueError(f"hidden_size / num_attention_heads must be even for rotary embeddings, got {self.head_dim}.")
        for name in ("hidden_dropout", "attention_dropout"):
            _check_prob(name, getattr(self, name))
        if self.classifier_dropout is not None:
            _check_prob("classifier_dropout", self.classifier_dropout)
        _check_positive("rope_theta", self.rope_theta)
        for name, params in self._rope_settings().items():
            if params.get("rope_theta", self.rope_theta) != self.rope_theta:
                theta = params["rope_theta"]
                raise ValueError(f"{name}['rope_theta']={theta} disagrees with rope_theta={self.rope_theta}.")
        _check_positive("rbf_gamma", self.rbf_gamma)
        _check_positive("layer_norm_eps", self.layer_norm_eps)
        if not (_is_number(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0):
            raise ValueError(f"router_aux_loss_coef must be a finite number >= 0, got {self.router_aux_loss_coef!r}.")
        if self.router_share_control not in SHARE_CONTROLS:
            raise ValueError(f"router_share_control must be one of {list(SHARE_CONTROLS)}, got {self.router_share_control!r}.")
        if not (_is_number(self.router_bias_rate) and self.router_bias_rate > 0):
            raise ValueError(f"router_bias_rate must be a finite number > 0, got {self.router_bias_rate!r}.")
        if not (isinstance(self.router_calibration_momentum, (int, float)) and 0 < self.router_calibration_momentum <= 1):
            raise ValueError(
                f"router_calibration_momentum must be in (0, 1], got {self.router_calibration_momentum!r}."
            )
        if not isinstance(self.layer_schedule, list) or len(self.layer_schedule) != self.num_hidden_layers:
            raise ValueError(
                f"layer_schedule must be a list with one entry per layer (num_hidden_layers={self.num_hidden_layers}), "
                f"got {self.layer_schedule!r}."
            )
        bad = [kind for kind in self.layer_schedule if kind not in LAYER_KINDS]
        if bad:
            raise ValueError(f"layer_schedule entries must be one of {list(LAYER_KINDS)}, got {bad}.")
        ops = self.routed_operators
        if len(ops) < 2 or len(set(ops)) != len(ops) or any(op not in OPERATORS for op in ops):
            raise ValueError(
                f"routed_operators must be two or three distinct names from {list(OPERATORS)}, got {ops!r}."
            )
        canonical = [op for op in OPERATORS if op in ops]
        if ops != canonical:
            raise ValueError(f"routed_operators must be listed cheapest first, i.e. {canonical}, got {ops}.")
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {list(ROUTER_TYPES)}, got {self.router_type!r}.")
        fractions = self.router_target_fractions
        if set(fractions) != set(ops):
            raise ValueError(
                f"router_target_fractions must give a share for exactly the routed_operators {ops}, got {fractions!r}."
            )
        if any(not isinstance(v, (int, float)) or not 0 < v < 1 for v in fractions.values()):
            raise ValueError(f"router_target_fractions values must each be in (0, 1), got {fractions!r}.")
        if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"router_target_fractions must sum to 1, got {fractions!r} (sum {sum(fractions.values())}).")
        if self.router_thresholds is not None:
            thresholds = self.router_thresholds
            if len(thresholds) != len(ops) - 1:
                raise ValueError(
                    f"router_thresholds needs {len(ops) - 1} value(s) for routed_operators {ops}, got {thresholds!r}."
                )
            if any(not isinstance(t, (int, float)) or not 0 <= t <= 1 for t in thresholds):
                raise ValueError(f"router_thresholds must lie in [0, 1] (entropy is normalised), got {thresholds!r}.")
            if list(thresholds) != sorted(thresholds):
                raise ValueError(f"router_thresholds must be sorted ascending, got {thresholds!r}.")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {list(NORM_POSITIONS)}, got {self.norm_position!r}.")
        if self.classifier_pooling not in POOLINGS:
            raise ValueError(f"classifier_pooling must be one of {list(POOLINGS)}, got {self.classifier_pooling!r}.")
        if not isinstance(self.is_causal, bool):
            raise ValueError(f"is_causal must be True or False, got {self.is_causal!r}.")
        if not isinstance(self.router_explore, bool):
            raise ValueError(f"router_explore must be True or False, got {self.router_explore!r}.")
        if not isinstance(self.use_meta_router, bool):
            raise ValueError(f"use_meta_router must be True or False, got {self.use_meta_router!r}.")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be None or in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}.")


def _default_schedule(num_layers):
    """Spec default for 4 layers; for other depths: DCT first, attention last, routed in between."""
    if not isinstance(num_layers, int) or num_layers < 1:
        return []  # validate_chiar reports num_hidden_layers
    if num_layers == 1:
        return ["routed"]
    return ["dct"] + ["routed"] * (num_layers - 2) + ["attention"]


def _check_int(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _is_number(value):
    """A finite int or float (not a bool, a string, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_prob(name, value):
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}.")


def _check_positive(name, value):
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


__all__ = ["ChiarConfig"]
