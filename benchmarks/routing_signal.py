"""Does a router send the right tokens to attention? A synthetic task whose generator knows which
tokens need attention, the same model, data, steps and budget for every router, and the router's
recall and precision on the tokens that need it.

    python benchmarks/routing_signal.py                       # quick profile, three seeds (a few minutes on 2 cores)
    python benchmarks/routing_signal.py --seeds 0 --steps 200 # a smoke run

Tasks. `lookback` (cued copy): a sequence of random content tokens in which about one position in ten
holds the query token Q; the answer at a Q is the token `lag` positions before it. The schedule
`["dct", "routed", "dct", "dct"]` leaves one layer that can mix tokens, the routed one, so a Q is
answered only if the router gives it an attention query there: the Q positions are the marked tokens.
Everything else is token-local. The target is 25% attention; the budget has 20 attention slots per
64-token block (capacity factor 1.25: room for the asks' spread from block to block, so what runs is
what share control asked for, not 0.014-0.026 under it as at factor 1: 242c86b), room for every Q; which
tokens they go to is the router's choice. `distractors`: the same, plus a token D at 20% of the
other positions that needs nothing; Q and D together (about 29% of the tokens) outnumber the 25%
that share control lets a router ask for, so a router must tell them apart to keep its Qs.

Variants: the full-attention baseline of the same shape (`["attention"] * 4`, the ceiling), the
oracle (attention for exactly the marked tokens, the best any router can do at this budget), the
random control (the floor: a fixed hash of the position, 25% of every block), the threshold router (the paper's:
spectral entropy above a calibrated threshold), the learned router (a gate on [x, H], top-1,
with its auxiliary share loss), the learned router exploring (`router_explore`: training draws
each token's operator from the gate, which starts at the target shares), and both with the share
bias instead of the auxiliary loss (`-bias`: `router_share_control="bias"`). Reported per run:
accuracy on the Q positions (held-out data, eval mode), the routed layer's attention share (train,
eval) as run and as asked (the difference is overflow: asks the budget's blocks had no slot for)
and its slots (`slot_share`, the attention queries a fixed-shape kernel computes),
and recall (share of marked tokens that got attention) and precision (share of attention queries
that went to marked tokens).
After training, every router's eval statistics are settled on 16 fresh training batches
(`settle_routing`, as ChiarTrainer does; `--settle_batches 0` keeps the running ones).
Results: benchmarks/results/routing_signal-cpu.json.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from chiar.variants import variant_config
from common import RESULTS, describe_device, provenance
from modeling_chiar import ChiarForCausalLM
from modeling_chiar.routing import RoutingDecision, slots_per_block  # what a router returns: the oracle returns it too

SCHEDULE = ["dct", "routed", "dct", "dct"]
# Names in chiar/variants.py, and the oracle (the random variant with its router replaced by OracleRouter).
VARIANTS = ["baseline", "oracle", "chiar-random", "chiar-threshold", "chiar-learned", "chiar-learned-explore",
            "chiar-learned-bias", "chiar-learned-explore-bias"]


def task_batch(task, batch, length, content, lag, query_rate, distractor_rate, generator):
    """(ids, targets, marks): targets hold the answer at the Q positions and -100 elsewhere.

    `distractors` adds the token D at `distractor_rate` of the other positions: it asks nothing (no
    loss) but looks like Q to a router that has not learned the difference, and Q + D together
    outnumber the budget, so a router that cannot tell them apart loses Qs to overflow."""
    ids = torch.randint(1, content + 1, (batch, length), generator=generator)
    draw = torch.rand(batch, length, generator=generator)
    marks = draw < query_rate
    marks[:, :lag] = False
    marks &= ~torch.roll(marks, lag, dims=1)  # the token to copy is never itself a Q
    if task == "distractors":
        distractors = (draw >= query_rate) & (draw < query_rate + distractor_rate)
        distractors &= ~torch.roll(marks, -lag, dims=1)  # nor a D
        ids = ids.masked_fill(distractors, content + 2)
    ids = ids.masked_fill(marks, content + 1)
    targets = torch.full((batch, length), -100)
    targets[marks] = torch.roll(ids, lag, dims=1)[marks]
    return ids, targets, marks


class OracleRouter(nn.Module):
    """Attention for exactly the tokens the task marks (set in `marks` before each pass)."""

    marks = None

    def forward(self, x, entropy, positions, token_mask, state=None, training=None):
        return RoutingDecision(operator_ids=self.marks.long().to(x.device))


def build(variant, args, seed):
    torch.manual_seed(seed)
    settings = dict(vocab_size=args.content + 3, hidden_size=args.hidden_size, num_attention_heads=4,
                    intermediate_size=2 * args.hidden_size, num_hidden_layers=4, layer_schedule=SCHEDULE,
                    max_position_embeddings=args.length, router_block_size=args.length,
                    router_capacity_factor=args.capacity_factor, hidden_dropout=0.0,
                    attention_dropout=0.0, pad_token_id=0)
    model = ChiarForCausalLM(variant_config("chiar-random" if variant == "oracle" else variant, base=settings))
    if variant == "oracle":
        model.model.layers[1].mixer.router = OracleRouter()
    return model


def shares_and_signal(outputs, marks, routed_layer=1):
    """The routed layer's attention share (run and asked), recall and precision on the marked tokens (counts)."""
    record = outputs.routing[routed_layer]
    counts, tokens = record.counts()
    attention = record.operators.index("attention")
    return {"tokens": tokens, "attention": counts[attention], "asked": record.counts(requested=True)[0][attention], "marked": int(marks.sum()),
            "hits": int(((record.operator_ids == attention) & marks).sum())}


def run(task, variant, args, seed):
    model = build(variant, args, seed)
    oracle = model.model.layers[1].mixer.router if variant == "oracle" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(1000 + seed)  # each seed its own data stream; every variant the same one
    loss_fn = nn.CrossEntropyLoss()
    routed = variant != "baseline"
    train_counts = {"tokens": 0, "attention": 0, "asked": 0, "marked": 0, "hits": 0}
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        ids, targets, marks = task_batch(task, args.batch_size, args.length, args.content, args.lag, args.query_rate,
                                         args.distractor_rate, generator)
        if oracle is not None:
            oracle.marks = marks
        outputs = model(ids, output_routing=routed)
        loss = loss_fn(outputs.logits[marks], targets[marks])
        if outputs.aux_loss is not None:
            loss = loss + model.config.router_aux_loss_coef * outputs.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if routed and step >= args.steps // 2:  # the second half: where training ends up
            for key, value in shares_and_signal(outputs, marks).items():
                train_counts[key] += value
    # the eval statistics once on the final weights, from training batches (what ChiarTrainer does after training)
    model.settle_routing([{"input_ids": task_batch(task, args.batch_size, args.length, args.content, args.lag, args.query_rate,
                                                   args.distractor_rate, generator)[0]} for _ in range(args.settle_batches)])
    seconds = time.perf_counter() - start

    model.eval()
    ids, targets, marks = task_batch(task, args.eval_size, args.length, args.content, args.lag, args.query_rate,
                                     args.distractor_rate, torch.Generator().manual_seed(99))  # one held-out set for every run
    if oracle is not None:
        oracle.marks = marks
    with torch.no_grad():
        outputs = model(ids, output_routing=routed)
    accuracy = float((outputs.logits[marks].argmax(-1) == targets[marks]).float().mean())
    row = {"task": task, "variant": variant, "seed": seed, "accuracy": accuracy, "train_seconds": round(seconds, 1)}
    if routed:
        counts = shares_and_signal(outputs, marks)
        row.update(
            train_attention_share=train_counts["attention"] / train_counts["tokens"],
            eval_attention_share=counts["attention"] / counts["tokens"],
            train_asked_share=train_counts["asked"] / train_counts["tokens"],
            eval_asked_share=counts["asked"] / counts["tokens"],
            slot_share=slots_per_block(model.config, "attention") / model.config.router_block_size,
            marked_share=counts["marked"] / counts["tokens"],
            recall=counts["hits"] / max(counts["marked"], 1),
            precision=counts["hits"] / max(counts["attention"], 1),
            train_recall=train_counts["hits"] / max(train_counts["marked"], 1),
        )
    return row


def summarise(rows):
    """{task: {variant: {metric: {mean, min, max}}}} over the seeds."""
    summary = {}
    for task, variant in dict.fromkeys((row["task"], row["variant"]) for row in rows):
        mine = [row for row in rows if row["task"] == task and row["variant"] == variant]
        summary.setdefault(task, {})[variant] = {
            key: {"mean": statistics.mean(r[key] for r in mine), "min": min(r[key] for r in mine), "max": max(r[key] for r in mine)}
            for key in mine[0] if key not in ("task", "variant", "seed", "train_seconds")}
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["lookback", "distractors"], choices=["lookback", "distractors"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--content", type=int, default=32, help="content tokens (chance accuracy is 1 / content)")
    parser.add_argument("--lag", type=int, default=4)
    parser.add_argument("--query_rate", type=float, default=0.1)
    parser.add_argument("--distractor_rate", type=float, default=0.2, help="distractors task: share of D tokens")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval_size", type=int, default=256)
    parser.add_argument("--capacity_factor", type=float, default=1.25,
                        help="the budget's slots per block over the target (1.25: 20 attention slots per 64 tokens for a 25%% target)")
    parser.add_argument("--settle_batches", type=int, default=16,
                        help="training batches the routers' eval statistics are settled on after training (0: the running ones)")
    parser.add_argument("--output", type=Path, default=RESULTS / "routing_signal-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            for variant in args.variants:
                row = run(task, variant, args, seed)
                rows.append(row)
                shown = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and k != "train_seconds")
                print(f"{task} seed {seed} {variant:<21} {shown} ({row['train_seconds']} s)", flush=True)
    result = {"benchmark": "routing_signal", "tasks": args.tasks, "settings": {k: v for k, v in vars(args).items() if k != "output"}, "schedule": SCHEDULE,
              "device": describe_device(torch.device("cpu")), **provenance(), "runs": rows, "summary": summarise(rows)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
