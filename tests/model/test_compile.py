"""torch.compile(model, fullgraph=True) trains every variant of the harness.

fullgraph=True refuses a graph break, and with it any host sync (reading a value back, a shape sized
from data). Every variant compiles with the `aot_eager` backend (dynamo's full trace and autograd's
graph, run by eager kernels: what fullgraph checks, in seconds), and the spec's default model and the
baseline with inductor, torch.compile's default (about a minute on 2 cores); all variants with inductor
run in the slow profile. Gradients, losses and the routers' buffers equal eager mode's on five
batches of one shape whose routing differs, and the compiled model never recompiles for them.
"""

import copy

import pytest
import torch
import torch._dynamo

from harness import VARIANTS, build, random_ids
from modeling_chiar import ChiarForCausalLM, ChiarForSequenceClassification
from modeling_chiar.modeling_chiar import CACHE_NAME

TOLERANCE = dict(atol=1e-4, rtol=1e-4)


def batches(count=5, batch=2, length=48):
    """Same shape, different tokens and padding: different routing in every batch."""
    out = []
    for i in range(count):
        ids = random_ids(batch, length, seed=10 + i)
        mask = torch.ones_like(ids)
        mask[1, : 3 + 2 * i] = 0  # left padding of another length each time
        out.append((ids, mask))
    return out


def train_and_compare(model, backend, model_inputs):
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    routings = []
    for step, inputs in enumerate(model_inputs):
        torch.manual_seed(step)  # an exploring router's draws: the same in both models
        expected = eager(**inputs)
        expected.loss.backward()
        torch.manual_seed(step)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            actual = compiled(**inputs)
            actual.loss.backward()
        torch.testing.assert_close(actual.loss, expected.loss, **TOLERANCE)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, **TOLERANCE, msg=lambda m: f"{name}: {m}")
        for (name, b), c in zip(model.named_buffers(), eager.buffers()):
            torch.testing.assert_close(b, c, **TOLERANCE, msg=lambda m: f"{name}: {m}")
        model.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        eager.eval()  # an eval pass does not calibrate: both models keep the same buffers
        with torch.no_grad():
            routings.append([r.operator_ids for r in eager(**inputs, output_routing=True).routing])
        eager.train()
    return routings


def lm_inputs():
    return [dict(input_ids=ids, attention_mask=mask, labels=ids) for ids, mask in batches()]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains_under_fullgraph_compile(variant):
    model = build(ChiarForCausalLM, variant, attn_implementation="sdpa").train()
    routings = train_and_compare(model, "aot_eager", lm_inputs())
    if model.config.uses_routing and model.config.router_type != "soft":  # the five batches routed differently
        first = routings[0]
        assert any(not torch.equal(a, b) for other in routings[1:] for a, b in zip(first, other))


@pytest.mark.parametrize("variant", ["chiar-threshold", "baseline"])
def test_inductor_trains_the_default_model_and_the_baseline(variant):
    model = build(ChiarForCausalLM, variant, attn_implementation="sdpa").train()
    train_and_compare(model, "inductor", lm_inputs()[:2])


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inductor_trains_every_variant(variant):
    model = build(ChiarForCausalLM, variant, attn_implementation="sdpa").train()
    train_and_compare(model, "inductor", lm_inputs()[:2])


@pytest.mark.parametrize("variant", ["chiar-3op", "chiar-learned"])
def test_dropout_and_its_eval_calibration_pass_compile(variant):
    """With dropout the threshold router calibrates its eval thresholds on a dropout-free pass inside the
    forward: it compiles too (dropout draws differ from eager, so only the trace is checked here)."""
    model = build(ChiarForCausalLM, variant, hidden_dropout=0.1, attention_dropout=0.1).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for inputs in lm_inputs()[:2]:
        compiled(**inputs).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bidirectional_classifier_trains_under_fullgraph_compile():
    model = build(ChiarForSequenceClassification, "chiar-3op", is_causal=False, num_labels=3).train()
    inputs = [dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])) for ids, mask in batches(3)]
    train_and_compare(model, "aot_eager", inputs)


def decode_and_compare(variant, dynamic, steps):
    model = build(ChiarForCausalLM, variant).eval()
    ids, mask = batches(1)[0]
    with torch.no_grad():
        eager_out = model(ids, attention_mask=mask, use_cache=True)
        compiled_out = model(ids, attention_mask=mask, use_cache=True)
    step = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    next_ids = eager_out.logits[:, -1:].argmax(-1)
    for t in range(steps):
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        with torch.no_grad():
            expected = model(next_ids, attention_mask=mask, **{CACHE_NAME: eager_out[CACHE_NAME]})
            with torch._dynamo.config.patch(error_on_recompile=t > 0):
                actual = step(next_ids, attention_mask=mask, **{CACHE_NAME: compiled_out[CACHE_NAME]})
        torch.testing.assert_close(actual.logits, expected.logits, **TOLERANCE)
        next_ids = expected.logits[:, -1:].argmax(-1)


@pytest.mark.parametrize("variant", ["chiar-3op", "chiar-learned", "baseline"])
def test_a_decoding_step_compiles_without_host_syncs(variant):
    """A decoding step (one new token against the cache, the budget's and RBF's state included) traces
    as one graph: no host sync, no graph break, the same logits as eager."""
    decode_and_compare(variant, dynamic=False, steps=1)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["chiar-3op", "chiar-learned", "baseline"])
def test_decoding_compiles_once_for_every_length(variant):
    """The cache grows by a token per step; with dynamic=True one graph serves every step (about a
    minute per variant to trace symbolically on 2 cores)."""
    decode_and_compare(variant, dynamic=True, steps=3)
