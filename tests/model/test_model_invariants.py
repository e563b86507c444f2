"""Properties every variant of the shared harness must have: causality, batch and padding invariance,
and real compute skipping. Dropout is off (with dropout they hold in distribution only: spec)."""

import copy
import math

import pytest
import torch

from harness import build, random_ids
from modeling_chiar import ChiarForCausalLM, ChiarForSequenceClassification

ATOL = 2e-5


def logits(model, ids, mask=None):
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_causality(variant, mode):
    """Changing tokens after t never changes logits at positions <= t."""
    model = build(ChiarForCausalLM, variant).train(mode == "train")
    ids = random_ids(1, 24, seed=1)
    for t in (0, 9, 22):
        changed = ids.clone()
        changed[0, t + 1 :] = random_ids(1, 23 - t, seed=100 + t)
        if mode == "train" and model.config.router_explore:  # a per-token draw: causal for a fixed draw
            out = []
            for row in (ids, changed):  # each from the same state: a pass's updates (share bias) must not reach the other
                torch.manual_seed(t)
                out.append(logits(copy.deepcopy(model), row)[0])
        else:  # one forward over both rows: calibration updates (train mode) cannot differ between them
            out = logits(model, torch.cat([ids, changed]))
        torch.testing.assert_close(out[0][: t + 1], out[1][: t + 1], atol=ATOL, rtol=0)


def test_batch_invariance(variant):
    model = build(ChiarForCausalLM, variant).eval()
    ids = random_ids(5, 20, seed=2)
    together = logits(model, ids)
    for row in range(5):
        torch.testing.assert_close(together[row : row + 1], logits(model, ids[row : row + 1]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_invariance_causal_lm(variant, side):
    model = build(ChiarForCausalLM, variant).eval()
    short, long = random_ids(1, 11, seed=3), random_ids(1, 16, seed=4)
    alone = logits(model, short)
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded = torch.cat([short, pad], 1) if side == "right" else torch.cat([pad, short], 1)
    mask = (padded != 0).long()
    batch = logits(model, torch.cat([padded, long]), torch.cat([mask, torch.ones_like(long)]))
    real = batch[0, :11] if side == "right" else batch[0, 5:]
    torch.testing.assert_close(real, alone[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batch[1:], logits(model, long), atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_padding_invariance_classifier(variant, side, causal):
    model = build(ChiarForSequenceClassification, variant, is_causal=causal, num_labels=3).eval()
    short, long = random_ids(1, 9, seed=5), random_ids(1, 14, seed=6)
    alone = logits(model, short)
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded = torch.cat([short, pad], 1) if side == "right" else torch.cat([pad, short], 1)
    batch = logits(model, torch.cat([padded, long]), torch.cat([(padded != 0).long(), torch.ones_like(long)]))
    torch.testing.assert_close(batch[0], alone[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batch[1:], logits(model, long), atol=ATOL, rtol=0)


def test_budgeted_operators_run_their_query_slots_only(variant):
    """Hooks count the rows each operator's query side receives. A budgeted operator (every routed
    operator but the cheapest) receives exactly its fixed slots, which hold every token that ran it;
    the cheapest operator is token-local (DCT) or linear (RBF) and runs on every position."""
    model = build(ChiarForCausalLM, variant).eval()
    seen = {}

    def counter(name):
        def hook(module, args, output):
            seen[name] = seen.get(name, 0) + args[0].shape[:-1].numel()

        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        mixer = layer.mixer
        if mixer.attention is not None:
            handles.append(mixer.attention.q_proj.register_forward_hook(counter((i, "attention"))))
        if mixer.rbf is not None:
            handles.append(mixer.rbf.q_proj.register_forward_hook(counter((i, "rbf"))))
        if mixer.dct is not None:
            handles.append(mixer.dct.register_forward_hook(counter((i, "dct"))))
    length = 40
    out = model(random_ids(1, length, seed=7), output_routing=True)
    for handle in handles:
        handle.remove()
    block = model.config.router_block_size
    for i, record in enumerate(out.routing):
        for k, name in enumerate(record.operators):
            ran = int((record.operator_ids == k).sum())
            if record.dense or k == 0:
                assert seen[(i, name)] == length, (i, name, seen)
                continue
            capacity = math.ceil(round(model.config.router_target_fractions[name] * block * model.config.router_capacity_factor, 6))
            assert record.slots[name] == -(-length // block) * min(capacity, length)
            assert seen[(i, name)] == record.slots[name], (i, name, seen)
            assert ran <= record.slots[name]


@pytest.mark.parametrize("variant_name", ["chiar-threshold", "random-dct+rbf+attention", "chiar-learned"])
def test_non_contiguous_inputs_embeds(variant_name):
    """Routed rows are written into an output buffer by row index: a strided operator input must not
    break that. Post-norm with a routed first layer hands the embeddings to the router as they are."""
    model = build(ChiarForCausalLM, variant_name, layer_schedule=["routed"] * 4, norm_position="post").eval()
    embeds = model.get_input_embeddings()(random_ids(2, 12, seed=7))
    strided = embeds.transpose(0, 2).contiguous().transpose(0, 2)  # same values, other strides
    assert not strided.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=strided).logits, model(inputs_embeds=embeds).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_class", [ChiarForCausalLM, ChiarForSequenceClassification])
def test_bf16_autocast_forward_and_backward(variant, model_class):
    """Mixed precision (how GPUs train): operators return the autocast dtype and must merge with fp32."""
    model = build(model_class, variant, attn_implementation="sdpa").train()
    ids = random_ids(2, 24, seed=5)
    labels = ids if model_class is ChiarForCausalLM else torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_values_never_reach_real_tokens(variant, side):
    """Whatever padding holds (here NaN and infinity) stays out of every real token's output."""
    model = build(ChiarForCausalLM, variant).eval()
    embeds = model.get_input_embeddings()(random_ids(2, 14, seed=8)).detach()
    mask = torch.ones(2, 14, dtype=torch.long)
    pad = slice(10, None) if side == "right" else slice(0, 4)
    mask[0, pad] = 0
    clean = embeds.clone()
    clean[0, pad] = 0.0
    dirty = embeds.clone()
    dirty[0, pad] = float("nan")
    dirty[0, pad.start or 0] = float("inf")
    with torch.no_grad():
        expected = model(inputs_embeds=clean, attention_mask=mask).logits
        actual = model(inputs_embeds=dirty, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(actual[real]).all()
    torch.testing.assert_close(actual[real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant_name", ["baseline", "chiar-3op", "chiar-learned"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_hidden_states_attentions_and_routing_come_back_in_the_callers_order(variant_name, side):
    """Padded rows run with their real tokens first; every output is returned in the caller's order."""
    model = build(ChiarForCausalLM, variant_name).eval()
    short = random_ids(1, 11, seed=3)
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded = torch.cat([short, pad], 1) if side == "right" else torch.cat([pad, short], 1)
    real = slice(0, 11) if side == "right" else slice(5, None)
    kwargs = dict(output_hidden_states=True, output_attentions=True, output_routing=True)
    with torch.no_grad():
        alone = model(short, **kwargs)
        batch = model(torch.cat([padded, random_ids(1, 16, seed=4)]), attention_mask=torch.cat([(padded != 0).long(), torch.ones(1, 16)]).long(), **kwargs)
    for a, b in zip(alone.hidden_states, batch.hidden_states):
        torch.testing.assert_close(b[0, real], a[0], atol=ATOL, rtol=0)
    for a, b in zip(alone.attentions, batch.attentions):
        torch.testing.assert_close(b[0, :, real, real], a[0], atol=ATOL, rtol=0)
        assert float(b[0, :, real].sum()) == pytest.approx(float(a[0].sum()), abs=1e-3)  # nothing on padding columns
    for a, b in zip(alone.routing, batch.routing):
        assert torch.equal(b.operator_ids[0, real], a.operator_ids[0])
        assert int(b.token_mask[0].sum()) == 11
