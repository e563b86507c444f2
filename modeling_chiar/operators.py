"""The call contract every token operator honours, and the per-pass context they share.

An operator is called as `operator(x, ctx, selection)`:
- x: (B, n) tokens' operator inputs (B, n, d), real tokens first in every row (`ChiarModel`
  compacts padded rows, so padding never sits between real tokens);
- ctx: the `MixContext` of this pass;
- selection: a `routing.Selection` naming the tokens it serves (a mask, and query slots when the
  operator is budgeted), or `routing.EVERY_TOKEN`.
It returns an `OperatorOutput` whose `output` is (B, n, d), zero for the tokens it did not serve, so
the layer adds the outputs of its operators up. Every shape it creates depends on (B, n), the past
length and the config only; FLOPs are counted from those shapes (`flops.py`).
"""

from dataclasses import dataclass

import torch


@dataclass
class OperatorOutput:
    output: torch.Tensor  # (B, n, d), zero where the operator served no token
    flops: float  # FLOPs executed (flops.py)
    attentions: torch.Tensor | None = None  # (B, h, n, past + n), attention with output_attentions only


@dataclass
class MixContext:
    """Per-pass data every layer shares."""

    rope: tuple  # (cos, sin), each (B, n, head_dim), for the n tokens of this pass
    positions: torch.Tensor  # (B, n) positions counting real tokens only
    token_mask: torch.Tensor | None  # (B, n) bool, real tokens of this pass; None when the pass has no padding
    key_mask: torch.Tensor | None  # (B, past + n) bool over every key; None when no key is padding
    dct: torch.Tensor  # (d, d) orthonormal DCT-II
    training: bool  # dropout on, training-mode routing (False in the eval-calibration pass)
    output_routing: bool = False
    output_attentions: bool = False
    cache: object = None  # ChiarCache
    past_keys: int = 0  # tokens the cache had seen before this pass
    start: object = 0  # (B,) real tokens seen before this pass, or 0 when nothing was
    real_counts: torch.Tensor | None = None  # (B,) real tokens of this pass (only needed with a cache)
    router_states: dict | None = None  # layer -> router state the pass routes with (`routing.snapshot`)
    # output_attentions on reordered rows: (B, n) compacted index of each caller position, and (B, past + n)
    # the caller's index of each stored key; attention maps are returned in the caller's order.
    caller_order: tuple | None = None


def gather_rows(x, index):
    """x[b, index[b, m]] for x (B, n, ...) and index (B, M)."""
    if index.shape[1] == x.shape[1] == 1:  # a decoding step's one slot holds its one token
        return x
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def scatter_slots(slot_output, slots, length):
    """Slot outputs (B, M, d) back at their tokens' rows of a (B, length, d) zero tensor; filler slots add nothing."""
    batch, _, d = slot_output.shape
    kept = torch.where(slots.valid[..., None], slot_output, 0)
    if length == kept.shape[1] == 1:
        return kept
    placed = slot_output.new_zeros(batch, length, d)
    return placed.scatter_add(1, slots.index[..., None].expand(-1, -1, d), kept)


def masked(output, selection):
    """A dense operator's output kept only for the tokens it serves."""
    if selection.mask is None:
        return output
    return torch.where(selection.mask[..., None], output, 0)
