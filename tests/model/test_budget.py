"""The attention budget: fixed query slots per block of real-token positions, granted in position order.

Hand-made examples of grants, overflow and carried state; slots that hold every granted token once;
a budget that grants everything reproducing the routers' own routing exactly, and the default budget
changing nothing but the overflowed tokens."""

import itertools
import random

import pytest
import torch

from harness import VARIANTS, build, random_ids
from modeling_chiar import ChiarForCausalLM
from modeling_chiar.routing import (
    EVERY_TOKEN,
    carried_asks,
    grant,
    num_groups,
    query_slots,
    slots_per_block,
    unlimited_capacity_factor,
)


def bools(text):
    """One row of bools from e.g. "1110 1011 1" (spaces are for reading only)."""
    return torch.tensor([[c == "1" for c in text.replace(" ", "")]])


def test_grants_on_a_hand_made_example():
    # blocks of 4 positions, 2 slots each: the third ask of a block overflows, the next block starts afresh
    asks = bools("1110 1011 1")
    granted, rank, group = grant(asks, 0, None, capacity=2, block=4)
    assert granted.int().tolist() == [[1, 1, 0, 0, 1, 0, 1, 0, 1]]
    assert (asks & ~granted).sum() == 2  # the overflow
    assert rank[granted].tolist() == [0, 1, 0, 1, 0]
    assert group.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 2]]


def test_a_continued_input_counts_the_asks_its_block_already_made():
    # Positions 6, 7, 8, ...: the block 4-7 already had one ask (carried), so one slot is left in it.
    asks = torch.tensor([[True, True, True, True]])
    start, carried = torch.tensor([6]), torch.tensor([1])
    granted, rank, group = grant(asks, start, carried, capacity=2, block=4)
    assert granted.int().tolist() == [[1, 0, 1, 1]] and group.tolist() == [[0, 0, 1, 1]]
    assert rank[granted].tolist() == [0, 0, 1]  # slots within this input's groups
    # What the next input (position 10) continues from: block 8-11 has seen two asks.
    assert carried_asks(asks, start, carried, torch.tensor([4]), capacity=2, block=4).tolist() == [2]
    # Had the input ended at a block boundary, the next one starts with nothing carried.
    assert carried_asks(asks[:, :2], start, carried, torch.tensor([2]), capacity=2, block=4).tolist() == [0]


@pytest.mark.parametrize("seed", range(5))
def test_granting_in_pieces_equals_granting_at_once(seed):
    """Decoding grants token by token with the carried state: the same tokens as one pass."""
    rng = random.Random(seed)
    length, block, capacity = rng.randint(5, 40), rng.choice([3, 4, 8]), rng.randint(1, 3)
    asks = torch.tensor([[rng.random() < 0.5 for _ in range(length)] for _ in range(2)])
    whole, _, _ = grant(asks, 0, None, capacity, block)
    start, carried, pieces = torch.zeros(2, dtype=torch.long), None, []
    cuts = sorted(rng.sample(range(1, length), min(3, length - 1)))
    for a, b in itertools.pairwise([0, *cuts, length]):
        piece = asks[:, a:b]
        granted, _, _ = grant(piece, start, carried, capacity, block)
        pieces.append(granted)
        carried = carried_asks(piece, start, carried, torch.full((2,), b - a), capacity, block)
        start = start + (b - a)
    assert torch.equal(torch.cat(pieces, dim=1), whole)


@pytest.mark.parametrize("continues", [False, True])
def test_query_slots_hold_every_granted_token_once(continues):
    generator = torch.Generator().manual_seed(0)
    asks = torch.rand(3, 50, generator=generator) < 0.4
    start = torch.tensor([5, 17, 0]) if continues else 0
    carried = torch.tensor([1, 0, 2]) if continues else None
    granted, rank, group = grant(asks, start, carried, capacity=3, block=8)
    groups = num_groups(50, 8, continues)
    slots = query_slots(granted, rank, group, groups, 3, past_keys=0, block=8, causal=True)
    assert slots.index.shape == (3, groups * 3)  # fixed by (batch, length) and the config
    for row in range(3):
        held = slots.index[row][slots.valid[row]].tolist()
        assert held == sorted(held) == granted[row].nonzero().flatten().tolist()


def test_slots_per_block_follow_the_capacity_factor():
    config = build(ChiarForCausalLM, "chiar-3op", router_block_size=128).config
    assert slots_per_block(config, "attention") == 32  # 25% of 128 at factor 1
    config.router_capacity_factor = 1.125
    assert slots_per_block(config, "attention") == 36
    config.router_capacity_factor = unlimited_capacity_factor(config)
    assert slots_per_block(config, "attention") == slots_per_block(config, "rbf") == 128


def layer_inputs(model, ids):
    """Each layer's operator input, recorded by a forward pre-hook on its mixer."""
    seen = {}
    handles = [layer.mixer.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, args))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return seen


def dense_reference(mixer, x, ctx, ids):
    """Every operator on every token, each token keeping the output of the operator `ids` names."""
    out = 0
    for k, name in enumerate(mixer.operators):
        dense = getattr(mixer, name)(x, ctx, EVERY_TOKEN).output
        out = out + torch.where((ids == k)[..., None], dense, 0)
    return out


@pytest.mark.parametrize("variant", sorted(v for v in VARIANTS if not v.startswith("soft") and VARIANTS[v].get("layer_schedule") is None))
def test_a_budget_that_grants_everything_changes_nothing_but_the_overflow(variant):
    """With every request granted, each token runs what its router asked for, exactly as running every
    operator densely and keeping the asked one; with the default budget the same holds for what ran,
    which differs from the ask only for overflowed tokens, and those took the cheapest operator."""
    model = build(ChiarForCausalLM, variant).eval()
    ids = random_ids(2, 40, seed=9)
    inputs = layer_inputs(model, ids)
    for factor, budgeted in ((unlimited_capacity_factor(model.config), False), (1.0, True)):
        model.config.router_capacity_factor = factor
        for i, layer in enumerate(model.model.layers):
            if layer.mixer.router is None:
                continue
            x, ctx = inputs[i]
            with torch.no_grad():
                output, _, record, _ = layer.mixer(x, ctx)
                reference = dense_reference(layer.mixer, x, ctx, record.operator_ids)
            torch.testing.assert_close(output, reference, atol=2e-5, rtol=1e-5)
            changed = record.operator_ids != record.requested_ids
            assert (record.operator_ids[changed] == 0).all()
            if not budgeted:
                assert not changed.any()
