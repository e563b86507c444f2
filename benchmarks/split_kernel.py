"""Would splitting each query block's keys make CHIAR's routed attention kernel faster on CPU? (No.)

The model runs the routed queries in blocks of at most 256 (`query_blocks`), each a masked SDPA call
over the keys up to its last query. A block's keys split into a prefix that every query of the block
sees (before its first query: no mask needed) and a staircase (its first to its last query: masked).
This script computes the two parts with torch's CPU flash kernel, which also returns each row's
log-sum-exp, and merges them exactly; in backward the kernel's own backward runs on each part with
the merged output and log-sum-exp, which gives the exact gradients. With smaller blocks the masked
staircase shrinks, so fewer scores are computed than in the model's blocks.

It also times the transposed split (`KeyChunks`, one sequence only): the keys cut into chunks of C;
per chunk, one unmasked call for every routed query after it (large calls) and one masked call for
the queries inside it (a small diagonal), each query's partial results merged the same way.

Forward+backward of the kernels alone on random q, k, v at the query slots of CHIAR's first routed
layer (threshold router at 25%, as `breakdown.py`), interleaved rounds, medians of per-round ratios
against causal SDPA over every token, beside the share of the causal kernel's scores each computes.
CPU only: it calls `aten::_scaled_dot_product_flash_attention_for_cpu` and its backward, private ops.

    python benchmarks/split_kernel.py --length 4096 --rounds 10 --output benchmarks/results/split-kernel-4096-cpu.json
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from breakdown import build, kernel_steps
from common import describe_device, interleaved_rounds, paired_speedup
from modeling_chiar.modeling_chiar import gather_selected
from modeling_chiar.operator_attention import query_blocks

flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class SplitBlock(torch.autograd.Function):
    """Attention of one query block over keys [0, end): [0, start) unmasked, [start, end) with `mask`
    (an additive float mask, 0 or -inf, (B, 1, Mq, end - start)), merged by log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, start, mask, scale):
        out, lse = flash(q, k[:, :, start:], v[:, :, start:], 0.0, False, attn_mask=mask, scale=scale)
        if start > 0:
            prefix_out, prefix_lse = flash(q, k[:, :, :start], v[:, :, :start], 0.0, False, scale=scale)
            merged = torch.logaddexp(prefix_lse, lse)
            out = prefix_out * (prefix_lse - merged).exp().unsqueeze(-1) + out * (lse - merged).exp().unsqueeze(-1)
            lse = merged
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.start, ctx.scale = start, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, mask = ctx.saved_tensors
        start, grad = ctx.start, grad.contiguous()
        gq, gk, gv = flash_backward(grad, q, k[:, :, start:], v[:, :, start:], out, lse, 0.0, False, attn_mask=mask, scale=ctx.scale)
        if start > 0:
            pq, pk, pv = flash_backward(grad, q, k[:, :, :start], v[:, :, :start], out, lse, 0.0, False, scale=ctx.scale)
            gq, gk, gv = gq + pq, torch.cat([pk, gk], dim=2), torch.cat([pv, gv], dim=2)
        return gq, gk, gv, None, None, None


class KeyChunks(torch.autograd.Function):
    """Routed queries at sorted `positions` (1, M) over causal keys cut into chunks of `chunk` keys:
    per chunk an unmasked call for the queries after it and a masked one for the queries inside it,
    each query's partial outputs merged by log-sum-exp; one sequence (batch 1)."""

    @staticmethod
    def forward(ctx, q, k, v, positions, chunk):
        if positions.shape[0] != 1:
            raise ValueError("KeyChunks takes one sequence (batch 1)")
        length, num_queries, scale = k.shape[2], q.shape[2], q.shape[-1] ** -0.5
        starts = torch.arange(0, length, chunk)
        first_inside = torch.searchsorted(positions[0], starts).tolist()
        first_after = torch.searchsorted(positions[0], starts + chunk).tolist()
        calls = []  # (first query, end query, first key, end key, mask or None)
        for c, start in enumerate(starts.tolist()):
            end = min(start + chunk, length)
            a, b = first_inside[c], first_after[c]
            if b > a:
                mask = torch.zeros(1, 1, b - a, end - start, dtype=q.dtype)
                mask.masked_fill_(torch.arange(start, end)[None, None, :] > positions[:, a:b, None], float("-inf"))
                calls.append((a, b, start, end, mask))
            if num_queries > b:
                calls.append((b, num_queries, start, end, None))
        out, lse = q.new_zeros(q.shape), q.new_full(q.shape[:-1], float("-inf"))
        for a, b, start, end, mask in calls:
            part, part_lse = flash(q[:, :, a:b], k[:, :, start:end], v[:, :, start:end], 0.0, False, attn_mask=mask, scale=scale)
            merged = torch.logaddexp(lse[:, :, a:b], part_lse)
            out[:, :, a:b] = out[:, :, a:b] * (lse[:, :, a:b] - merged).exp().unsqueeze(-1) + part * (part_lse - merged).exp().unsqueeze(-1)
            lse[:, :, a:b] = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.calls, ctx.scale = calls, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        gq, gk, gv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for a, b, start, end, mask in ctx.calls:
            dq, dk, dv = flash_backward(grad[:, :, a:b], q[:, :, a:b], k[:, :, start:end], v[:, :, start:end],
                                        out[:, :, a:b], lse[:, :, a:b], 0.0, False, attn_mask=mask, scale=ctx.scale)
            gq[:, :, a:b] += dq
            gk[:, :, start:end] += dk
            gv[:, :, start:end] += dv
        return gq, gk, gv, None, None


def split_attention(queries, k, v, positions, block):
    """Every block of at most `block` routed queries through `SplitBlock`; (B, h, M, hd)."""
    scale = queries.shape[-1] ** -0.5
    outputs = []
    for start, end in query_blocks(positions.shape[1], block=block):
        rows = positions[:, start:end]
        first, last = int(rows.min()), int(rows.max()) + 1
        mask = torch.zeros(rows.shape[0], 1, end - start, last - first, dtype=k.dtype)
        mask.masked_fill_(torch.arange(first, last)[None, None, :] > rows[:, :, None], float("-inf"))
        outputs.append(SplitBlock.apply(queries[:, :, start:end], k[:, :, :last], v[:, :, :last], first, mask, scale))
    return torch.cat(outputs, dim=2)


def masked_attention(queries, k, v, positions, block):
    """The model's kernel calls: one masked SDPA per block over the keys up to its last query."""
    outputs = []
    for start, end in query_blocks(positions.shape[1], block=block):
        rows = positions[:, start:end]
        last = int(rows.max()) + 1
        allowed = torch.arange(last)[None, None, :] <= rows[:, :, None]
        outputs.append(F.scaled_dot_product_attention(queries[:, :, start:end], k[:, :, :last], v[:, :, :last], attn_mask=allowed[:, None]))
    return torch.cat(outputs, dim=2)


def computed_scores(positions, block, split):
    """Scores the calls compute, per batch row: block rows x (keys up to the last query [- the prefix])."""
    total = 0
    for start, end in query_blocks(positions.shape[1], block=block):
        rows = positions[:, start:end]
        keys = int(rows.max()) + 1 - (int(rows.min()) if split else 0)
        total += (end - start) * keys + (end - start) * int(rows.min()) * split
    return total


def key_chunk_scores(positions, chunk, length):
    """Scores `KeyChunks` computes for one sequence: each query's keys up to the end of its own chunk."""
    own_start = torch.div(positions, chunk, rounding_mode="floor") * chunk
    return int((own_start + chunk).clamp(max=length).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--blocks", type=int, nargs="+", default=[256, 128, 64, 32], help="query block sizes of the split kernel")
    parser.add_argument("--key_chunks", type=int, nargs="+", default=[256, 512, 1024], help="key chunk sizes of KeyChunks")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    device = torch.device("cpu")
    ids = torch.randint(0, 8192, (1, args.length), generator=torch.Generator().manual_seed(2))
    chiar = build(None, args.length, device)
    with torch.no_grad():
        routing = chiar(ids, output_routing=True).routing[1]
    positions, _, _ = gather_selected(routing.operator_ids == routing.operators.index("attention"))
    heads, head_dim = chiar.config.num_attention_heads, chiar.config.head_dim
    causal, model_blocks = kernel_steps(positions, args.length, heads, head_dim, device)

    torch.manual_seed(3)
    q = torch.randn(1, heads, positions.shape[1], head_dim, requires_grad=True)
    k, v = (torch.randn(1, heads, args.length, head_dim, requires_grad=True) for _ in range(2))
    reference = masked_attention(q, k, v, positions, 256)
    grad = torch.randn_like(reference)
    reference_grads = torch.autograd.grad(reference, (q, k, v), grad)
    causal_scores = args.length * (args.length + 1) / 2
    variants = {  # name: (attention function, computed scores per sequence)
        **{f"split, blocks of {block}": (lambda q, k, v, block=block: split_attention(q, k, v, positions, block),
                                         computed_scores(positions, block, split=True)) for block in args.blocks},
        **{f"key chunks of {chunk}": (lambda q, k, v, chunk=chunk: KeyChunks.apply(q, k, v, positions, chunk),
                                      key_chunk_scores(positions, chunk, args.length)) for chunk in args.key_chunks},
    }
    steps = {"causal, every token": causal, "model: masked blocks of 256": model_blocks}
    scores = {"causal, every token": causal_scores, "model: masked blocks of 256": computed_scores(positions, 256, split=False)}
    errors = {}
    for name, (attend, computed) in variants.items():
        out = attend(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        errors[name] = max([(out - reference).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, reference_grads)])
        steps[name] = lambda attend=attend: attend(q, k, v).sum().backward()
        scores[name] = computed

    rounds = interleaved_rounds(steps, args.rounds, device)
    rows = {}
    for name, seconds in rounds.items():
        rows[name] = {
            "ms": statistics.median(seconds) * 1000,
            "time / causal kernel": 1 / paired_speedup(rounds["causal, every token"], seconds),
            "computed scores / causal kernel's": scores[name] / causal_scores,
            "max abs difference from the model's kernel (output, gradients)": errors.get(name),
        }
        row = list(rows[name].values())
        print(f"{name:30} {row[0]:7.1f} ms  {row[1]:.3f} of causal  scores {row[2]:.3f}  error {row[3]}")
    visible = float((positions + 1).sum()) / causal_scores
    print(f"visible scores of the routed queries / causal kernel's: {visible:.3f}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({
            "benchmark": "split_kernel", "device": describe_device(device), "torch": torch.__version__,
            "length": args.length, "routed_queries": positions.shape[1], "rounds": args.rounds,
            "visible scores / causal kernel's": visible, "rows": rows, "seconds_all_rounds": rounds,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
