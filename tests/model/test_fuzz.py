"""Property-based fuzzing of configs, inputs and cache pairings (hypothesis).

The property: a bad value is refused with a `ValueError` or `TypeError` raised by this project's own
code, naming the problem; anything accepted gives finite outputs that keep the invariants (a row's
real tokens get the logits they get alone, whatever padding surrounds them). The default profile (100 examples
per test) takes about 15 s; `-m slow` runs ten times as many.
"""

import os
import traceback

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from harness import TINY, build, random_ids  # noqa: E402
from modeling_chiar import ChiarConfig, ChiarForCausalLM, ChiarForSequenceClassification  # noqa: E402
from modeling_chiar.modeling_chiar import CACHE_NAME  # noqa: E402

PROJECT = (os.sep + "modeling_chiar" + os.sep, os.sep + "configuration_chiar" + os.sep)
EXAMPLES = int(os.environ.get("CHIAR_FUZZ_EXAMPLES", "100"))
PROFILE = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# Valid and invalid values of every CHIAR field (and the shape fields the model reads).
FIELDS = {
    "hidden_size": [16, 32, 30, 0, -8, "32", 32.5, None, True],
    "num_attention_heads": [1, 2, 4, 3, 0, None, "4"],
    "num_hidden_layers": [1, 2, 4, 0, 2.0],
    "intermediate_size": [8, 64, 0, "64"],
    "vocab_size": [97, 1, 0, -1],
    "max_position_embeddings": [64, 512, 0, float("inf")],
    "hidden_dropout": [0.0, 0.5, 1.0, -0.1, float("nan"), "0.1"],
    "attention_dropout": [0.0, 0.2, 2.0],
    "rope_theta": [10000.0, 0.0, -1.0, float("inf"), float("nan")],
    "layer_schedule": [None, ["routed"] * 4, ["dct", "attention"], ["attention"] * 4, ["rbf", "routed", "dct", "attention"],
                       "routed", ["mamba"] * 4],
    "routed_operators": [["dct", "attention"], ["dct", "rbf", "attention"], ["rbf", "attention"], ["attention", "dct"],
                         ["dct"], ["dct", "dct"], "dct"],
    "router_type": ["threshold", "learned", "soft", "random", "oracle", None],
    "router_target_fractions": [None, {"dct": 0.5, "attention": 0.5}, {"dct": 0.9, "attention": 0.2}, {"dct": 1.0, "attention": 0.0},
                                {"attention": 0.25}],
    "router_thresholds": [None, [0.8], [0.8, 0.85], [0.9, 0.8], [1.5], [float("nan")]],
    "router_aux_loss_coef": [5.0, 0.0, -1.0, float("inf")],
    "router_explore": [False, True, 1],
    "router_calibration_momentum": [0.1, 1.0, 0.0, 1.5],
    "router_block_size": [8, 1, 128, 0, 8.5],
    "router_capacity_factor": [1.0, 0.1, 10.0, 0.0, float("inf"), -1.0],
    "rbf_num_features": [16, 1, 0],
    "rbf_gamma": [1.0, 1e-3, 0.0, float("inf")],
    "use_meta_router": [False, True, 1],
    "is_causal": [True, False, "yes"],
    "norm_position": ["pre", "post", "middle"],
    "classifier_pooling": ["mean", "last", "first", "max"],
    "pad_token_id": [0, None, 96, 97, -1],
}


def raised_here(error):
    """The error is a ValueError/TypeError raised by this project's code, with a message."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if any(part in frame.filename for part in PROJECT)]
    return isinstance(error, (ValueError, TypeError)) and ours and ours[-1] is frames[-1] and len(str(error)) > 10


def expect(call):
    """Run `call`; returns its result, or None when it was refused in the project's own words."""
    try:
        return call()
    except (ValueError, TypeError) as error:
        assert raised_here(error), "".join(traceback.format_exception(error))
        return None


@settings(max_examples=EXAMPLES, **PROFILE)
@given(st.fixed_dictionaries({}, optional={name: st.sampled_from(values) for name, values in FIELDS.items()}))
def test_random_configs_are_refused_by_name_or_run_finite(overrides):
    config = expect(lambda: ChiarConfig(**{**TINY, **overrides}))
    if config is None:
        return
    model_class = ChiarForCausalLM if config.is_causal else ChiarForSequenceClassification
    torch.manual_seed(0)
    model = expect(lambda: model_class(config))
    if model is None:
        return
    model.train()
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids if config.is_causal else torch.tensor([0, 1])
    out = model(ids, labels=labels)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
    out.loss.backward()


def padded_row_matches_alone(model, ids, mask):
    """Every row's real tokens get the logits they get alone."""
    with torch.no_grad():
        together = model(ids, attention_mask=mask).logits
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            if not real.any():
                continue
            alone = model(ids[row : row + 1, real]).logits[0]
            torch.testing.assert_close(together[row, real], alone, atol=2e-5, rtol=0)


MODELS = {}


def model_for(variant):
    if variant not in MODELS:
        MODELS[variant] = build(ChiarForCausalLM, variant).eval()
    return MODELS[variant]


@settings(max_examples=EXAMPLES, **PROFILE)
@given(
    variant=st.sampled_from(["chiar-3op", "chiar-learned", "chiar-random", "baseline"]),
    batch=st.integers(1, 3),
    length=st.integers(0, 30),
    ids_dtype=st.sampled_from([torch.long, torch.int32, torch.float32, torch.bool]),
    mask_kind=st.sampled_from(["none", "binary", "bool", "values", "wrong shape", "list"]),
    id_range=st.sampled_from(["valid", "negative", "too large"]),
    seed=st.integers(0, 1000),
)
def test_random_inputs_are_refused_by_name_or_keep_the_invariants(variant, batch, length, ids_dtype, mask_kind, id_range, seed):
    model = model_for(variant)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=generator)
    if id_range == "negative" and ids.numel():
        ids[0, 0] = -3
    elif id_range == "too large" and ids.numel():
        ids[-1, -1] = model.config.vocab_size
    ids = ids.to(ids_dtype)
    mask = None
    if mask_kind in ("binary", "bool", "values", "list"):
        mask = (torch.rand(batch, length, generator=generator) > 0.3).long()
        mask = mask.bool() if mask_kind == "bool" else mask
        if mask_kind == "values" and mask.numel():
            mask[0, 0] = 2
        if mask_kind == "list":
            mask = mask.tolist()
    elif mask_kind == "wrong shape":
        mask = torch.ones(batch, length + 1, dtype=torch.long)
    with torch.no_grad():
        out = expect(lambda: model(ids, attention_mask=mask))
    if out is None:
        return
    assert ids_dtype in (torch.long, torch.int32) and id_range == "valid" and length > 0
    real = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask.bool()
    assert torch.isfinite(out.logits[real]).all()
    padded_row_matches_alone(model, ids.long(), real.long())


@settings(max_examples=max(EXAMPLES // 2, 10), **PROFILE)
@given(
    embeds_dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.long]),
    poison=st.sampled_from(["none", "nan at a real token", "inf at padding", "nan at padding"]),
    length=st.integers(1, 20),
)
def test_random_embeddings_are_refused_by_name_or_stay_finite(embeds_dtype, poison, length):
    model = model_for("chiar-3op")
    embeds = torch.randn(2, length, model.config.hidden_size, generator=torch.Generator().manual_seed(length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, : length // 2] = 0
    pad = (~mask.bool()).nonzero()
    if poison == "nan at a real token":
        embeds[0, 0] = float("nan")
    elif poison.endswith("at padding") and len(pad):
        embeds[pad[0, 0], pad[0, 1]] = float("nan") if poison.startswith("nan") else float("inf")
    embeds = embeds.to(embeds_dtype)
    with torch.no_grad():
        out = expect(lambda: model(inputs_embeds=embeds, attention_mask=mask))
    if out is None:
        assert poison == "nan at a real token" or not embeds_dtype.is_floating_point
        return
    assert torch.isfinite(out.logits[mask.bool()]).all()


@settings(max_examples=max(EXAMPLES // 2, 10), **PROFILE)
@given(
    other=st.sampled_from([{}, dict(num_hidden_layers=3, layer_schedule=None), dict(hidden_size=64),
                           dict(routed_operators=["dct", "attention"]), dict(layer_schedule=["routed"] * 4)]),
    batch_change=st.sampled_from([0, 1]),
    prompt=st.integers(1, 12),
)
def test_random_cache_pairings_are_refused_by_name_or_continue_exactly(other, batch_change, prompt):
    model = model_for("chiar-3op")
    ids = random_ids(2, prompt + 1, seed=prompt)
    with torch.no_grad():
        cache = model(ids[:, :prompt], use_cache=True)[CACHE_NAME]
        decoder = model if not other else build(ChiarForCausalLM, "chiar-3op", **other).eval()
        step = ids[: 2 - batch_change, prompt:]
        out = expect(lambda: decoder(step, **{CACHE_NAME: cache}))
        if out is None:
            return
        assert decoder is model and not batch_change
        torch.testing.assert_close(out.logits[:, -1], model(ids).logits[:, -1], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_long_fuzz_profile():
    """Ten times the examples of every test above (CHIAR_FUZZ_EXAMPLES=400 in a subprocess)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "CHIAR_FUZZ_EXAMPLES": str(EXAMPLES * 10)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-m", "not slow"],
                          env=env, capture_output=True, text=True, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stdout[-4000:]

