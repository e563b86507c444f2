"""How often a forward pass waits for the device: docs/architecture.md promises three host syncs per
routed layer (the gather's row counts, the blocks' key counts, the DCT rows), padded or not.

On a GPU every one stalls the launch queue. Counted on the CPU as the operations that would sync on
CUDA: reading a value to Python (`_local_scalar_dense`: item, int, bool), `nonzero`, and `tolist`
(which does not go through dispatch, so it is wrapped)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness import build, random_ids
from modeling_chiar import ChiarModel

SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in SYNCING
        return func(*args, **(kwargs or {}))


def syncs_of_one_forward(model, ids, mask, monkeypatch):
    counter = SyncCounter()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        counter.count += 1
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with torch.no_grad(), counter:
        model(ids, attention_mask=mask)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return counter.count


@pytest.mark.parametrize("padded", [False, True])
def test_a_routed_layer_syncs_three_times(padded, monkeypatch):
    ids = random_ids(2, 40, seed=1)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :7] = 0  # left padding
    # Same model with its two routed layers made DCT layers: the difference is what routing costs.
    routed = build(ChiarModel, "threshold-dct+attention").eval()
    floor = build(ChiarModel, "threshold-dct+attention", layer_schedule=["dct", "dct", "dct", "attention"]).eval()
    assert routed.config.layer_schedule.count("routed") == 2
    per_routed_layer = (syncs_of_one_forward(routed, ids, mask, monkeypatch) - syncs_of_one_forward(floor, ids, mask, monkeypatch)) / 2
    assert per_routed_layer == 3
