"""How often a pass waits for the device. Routing sizes nothing from the data, so a routed model makes
no more host syncs than the all-attention baseline: the one read of the inputs' values (the clear
errors for bad input, eager mode only), in training (forward and backward), evaluation and a
decoding step, for every variant of the harness. Under torch.compile there is none at all
(tests/model/test_compile.py compiles with fullgraph=True, which refuses any).

Counted on the CPU as the operations that would sync on CUDA: reading a value to Python
(`_local_scalar_dense`: item, int, bool), `nonzero` (boolean indexing, torch.where with one argument),
and `tolist` (which does not go through dispatch, so it is wrapped)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness import VARIANTS, build, random_ids
from modeling_chiar import ChiarForCausalLM, ChiarForSequenceClassification
from modeling_chiar.modeling_chiar import CACHE_NAME

SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in SYNCING
        return func(*args, **(kwargs or {}))


def count_syncs(step, monkeypatch):
    counter = SyncCounter()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        counter.count += 1
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    try:
        with counter:
            step()
    finally:
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return counter.count


def padded_batch():
    ids = random_ids(2, 48, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    return ids, mask


def training_step(model, ids, mask):
    model(ids, attention_mask=mask, labels=ids).loss.backward()


def eval_step(model, ids, mask):
    with torch.no_grad():
        model(ids, attention_mask=mask)


def counted_pass(model, step, ids, mask, monkeypatch, training):
    """Syncs of one pass (switching the mode is not part of it: eval() reads the routers' counters)."""
    model.train(training)
    return count_syncs(lambda: step(model, ids, mask), monkeypatch)


def decoding_step(model, ids, mask):
    """Prefill with a cache, then return the next decoding step (what generate() repeats) to count."""
    model.eval()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    next_ids = out.logits[:, -1:].argmax(-1)
    step_mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
    return lambda: model(next_ids, attention_mask=step_mask, **{CACHE_NAME: out[CACHE_NAME]})


@pytest.fixture(scope="module")
def baseline_counts():
    monkeypatch = pytest.MonkeyPatch()
    ids, mask = padded_batch()
    model = build(ChiarForCausalLM, "baseline")
    counts = {
        "train": counted_pass(model, training_step, ids, mask, monkeypatch, training=True),
        "eval": counted_pass(model, eval_step, ids, mask, monkeypatch, training=False),
    }
    step = decoding_step(model, ids, mask)
    with torch.no_grad():
        counts["decode"] = count_syncs(step, monkeypatch)
    return counts


def test_the_baseline_reads_its_inputs_once(baseline_counts):
    # Training: the inputs' and the labels' checks in one read. Eval and a decoding step: the inputs'.
    assert baseline_counts == {"train": 1, "eval": 1, "decode": 1}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_routing_adds_no_host_sync(variant, baseline_counts, monkeypatch):
    ids, mask = padded_batch()
    model = build(ChiarForCausalLM, variant)
    assert counted_pass(model, training_step, ids, mask, monkeypatch, training=True) <= baseline_counts["train"]
    assert counted_pass(model, eval_step, ids, mask, monkeypatch, training=False) <= baseline_counts["eval"]
    step = decoding_step(model, ids, mask)
    with torch.no_grad():
        assert count_syncs(step, monkeypatch) <= baseline_counts["decode"]


def test_classifier_reads_its_inputs_and_labels_once(monkeypatch):
    ids, mask = padded_batch()
    model = build(ChiarForSequenceClassification, "chiar-3op", is_causal=False, num_labels=3).train()
    labels = torch.tensor([0, 2])
    assert count_syncs(lambda: model(ids, attention_mask=mask, labels=labels).loss.backward(), monkeypatch) == 1
