import pytest

from modeling_chiar import ChiarConfig


def test_defaults_follow_the_spec():
    config = ChiarConfig()
    assert config.model_type == "chiar"
    assert config.num_hidden_layers == 4
    assert config.layer_schedule == ["dct", "routed", "routed", "attention"]
    assert config.routed_operators == ["dct", "attention"]
    assert config.router_type == "threshold"
    assert config.router_target_fractions == {"dct": 0.75, "attention": 0.25}
    assert config.router_thresholds is None
    assert config.norm_position == "pre" and config.is_causal and config.tie_word_embeddings
    for field in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_act",
                  "hidden_dropout", "attention_dropout", "max_position_embeddings", "rope_theta",
                  "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id", "use_cache",
                  "router_aux_loss_coef", "rbf_num_features", "rbf_gamma", "use_meta_router"):
        assert hasattr(config, field), field


def test_three_operator_default_targets():
    config = ChiarConfig(routed_operators=["dct", "rbf", "attention"])
    assert config.router_target_fractions == {"dct": 0.375, "rbf": 0.375, "attention": 0.25}


def test_round_trip(tmp_path):
    config = ChiarConfig(routed_operators=["dct", "rbf", "attention"], router_thresholds=[0.8, 0.9],
                         router_type="threshold", is_causal=False, norm_position="post")
    config.save_pretrained(tmp_path)
    loaded = ChiarConfig.from_pretrained(tmp_path)
    for key in ("layer_schedule", "routed_operators", "router_target_fractions", "router_thresholds",
                "is_causal", "norm_position"):
        assert getattr(loaded, key) == getattr(config, key)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=30, num_attention_heads=4), "divisible by num_attention_heads"),
        (dict(hidden_size=12, num_attention_heads=4), "even for rotary"),
        (dict(layer_schedule=["dct", "attention"]), "layer_schedule"),
        (dict(layer_schedule=["dct", "routed", "sparse", "attention"]), "layer_schedule entries"),
        (dict(layer_schedule="dct"), "layer_schedule"),
        (dict(routed_operators=["dct", "lstm"]), "routed_operators"),
        (dict(routed_operators=["dct"]), "routed_operators"),
        (dict(routed_operators=["dct", "dct"]), "routed_operators"),
        (dict(routed_operators=["attention", "dct"]), "cheapest first"),
        (dict(router_type="topk"), "router_type"),
        (dict(router_target_fractions={"dct": 0.5, "attention": 0.6}), "sum to 1"),
        (dict(router_target_fractions={"dct": 1.0}), "router_target_fractions"),
        (dict(router_target_fractions={"dct": 1.2, "attention": -0.2}), "router_target_fractions"),
        (dict(router_thresholds=[0.9, 0.8], routed_operators=["dct", "rbf", "attention"]), "sorted ascending"),
        (dict(router_thresholds=[0.5, 0.6]), "needs 1 value"),
        (dict(router_thresholds=[1.5]), "[0, 1]"),
        (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
        (dict(router_share_control="loss"), "router_share_control must be one of"),
        (dict(router_bias_rate=0.0), "router_bias_rate"),
        (dict(router_bias_rate=float("nan")), "router_bias_rate"),
        (dict(rbf_num_features=0), "rbf_num_features"),
        (dict(rbf_gamma=0.0), "rbf_gamma"),
        (dict(norm_position="sandwich"), "norm_position"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(vocab_size=10, pad_token_id=10), "pad_token_id"),
        (dict(classifier_pooling="max"), "classifier_pooling"),
        (dict(is_causal="yes"), "is_causal"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ChiarConfig(**overrides)


def test_model_rechecks_a_config_changed_after_construction():
    from modeling_chiar import ChiarModel

    config = ChiarConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    config.num_hidden_layers = 6  # schedule still has 4 entries
    with pytest.raises(ValueError, match="layer_schedule"):
        ChiarModel(config)


@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated")
@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
        dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}),
        dict(rope_parameters="default"),
    ],
)
def test_scaled_rope_is_refused_not_ignored(rope):
    with pytest.raises(ValueError, match="default RoPE only|must be a dict"):
        ChiarConfig(**rope)


def test_rope_parameters_set_rope_theta_and_survive_a_round_trip(tmp_path):
    """transformers 5.x configs may give RoPE's theta inside `rope_parameters`; the model must use it."""
    from modeling_chiar import ChiarModel

    config = ChiarConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert config.rope_theta == 500000.0
    config.save_pretrained(tmp_path)
    assert ChiarConfig.from_pretrained(tmp_path).rope_theta == 500000.0
    model = ChiarModel(config)
    inv_freq = model.rotary_emb.inv_freq
    assert inv_freq[1].item() == pytest.approx(500000.0 ** (-2 / config.head_dim), rel=1e-6)
    config.rope_theta = 20000.0  # now disagrees with rope_parameters
    with pytest.raises(ValueError, match="disagrees with rope_theta"):
        ChiarModel(config)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0}  # a scaled kind set after construction
    with pytest.raises(ValueError, match="default RoPE only"):
        ChiarModel(config)
