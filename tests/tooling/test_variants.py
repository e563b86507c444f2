"""The variant registry (chiar/variants.py): one definition per variant, the same model whichever way
it is built (a config in a benchmark, --config_overrides in a script, the harness's tiny shape)."""

import json

import pytest

from chiar.data import ArgumentError
from chiar.training import apply_config_overrides, load_config
from chiar.variants import VARIANTS, config_overrides_argument, overrides, resolve_config, variant_config
from modeling_chiar import ChiarForCausalLM

COMPARED = ["baseline", "chiar-threshold", "chiar-learned", "chiar-learned-explore", "chiar-random", "chiar-3op"]


def test_every_variant_is_defined_once():
    entries = [json.dumps(value, sort_keys=True) for value in VARIANTS.values()]
    assert len(entries) == len(set(entries)), "two names for the same overrides"
    assert set(COMPARED) <= set(VARIANTS)


@pytest.mark.parametrize("layers", [2, 4, 28])
def test_the_baseline_is_full_attention_at_any_depth(layers):
    assert overrides("baseline", layers) == {"layer_schedule": ["attention"] * layers}
    assert variant_config("baseline", "chiar-v2").layer_schedule == ["attention"] * 28


@pytest.mark.parametrize("name", COMPARED)
def test_a_script_given_the_variant_builds_the_benchmarks_model(name):
    """quality.py passes `config_overrides_argument(name)` to run_clm.py: the config it gets is the
    one `variant_config` builds for the other benchmarks."""
    script = apply_config_overrides(load_config(resolve_config("chiar-v1-2op"), "--config_name"), config_overrides_argument(name))
    direct = variant_config(name)
    for key in ("layer_schedule", "routed_operators", "router_type", "router_explore", "router_target_fractions", "hidden_size"):
        assert getattr(script, key) == getattr(direct, key), key


def test_every_variant_builds_on_the_test_shape():
    from chiar.variants import build

    for name in VARIANTS:
        model = build(ChiarForCausalLM, name)
        assert model.config.num_hidden_layers == 4


def test_unknown_names_are_refused_naming_the_known_ones():
    with pytest.raises(ArgumentError, match="unknown variant 'chiar-magic'.*chiar-threshold"):
        variant_config("chiar-magic")
    with pytest.raises(ArgumentError, match="neither a file nor a shipped config"):
        variant_config("chiar-threshold", base="no-such-shape")
