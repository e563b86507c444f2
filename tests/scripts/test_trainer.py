"""ChiarTrainer on an in-memory dataset: after training it settles the routers' eval statistics on
training batches, so the model it leaves routes the target shares of its training data in eval."""

import pytest
import torch
from transformers import TrainingArguments

from chiar.evaluation import TrainingShares
from chiar.training import ChiarTrainer
from harness import build, random_ids
from modeling_chiar import ChiarForCausalLM


def eval_attention_asks(model, rows):
    model.eval()
    with torch.no_grad():
        out = model(rows, output_routing=True)
    return [record.requested_shares()["attention"] for record in out.routing if len(record.operators) > 1]


@pytest.mark.parametrize("settle_batches", [16, 0])
def test_the_trainer_settles_eval_routing_on_training_batches_after_training(tmp_path, settle_batches):
    rows = random_ids(32, 32, seed=0)
    dataset = [{"input_ids": row, "labels": row} for row in rows]
    model = build(ChiarForCausalLM, "chiar-threshold", hidden_dropout=0.1)
    settled, settle = [], model.settle_routing
    model.settle_routing = lambda batches: settled.append(True) or settle(batches)
    training_args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=5, report_to="none",
                                      save_strategy="no", disable_tqdm=True, use_cpu=True, learning_rate=3e-3)
    ChiarTrainer(model=model, args=training_args, train_dataset=dataset, settle_batches=settle_batches).train()
    assert settled == ([True] if settle_batches else [])  # 0: the running statistics are kept
    if settle_batches:  # 8 batches of 4 rows: 16 settle batches cover every training row
        asks = eval_attention_asks(model, rows)
        assert all(abs(ask - 0.25) <= 2 / rows.numel() for ask in asks), asks


def test_training_logs_carry_each_routed_layers_asked_and_executed_shares(tmp_path):
    """The random control routes by position only, so every training batch of full rows has the shares one
    pass shows; the training logs must give exactly those, for the routed layers only."""
    rows = random_ids(16, 32, seed=0)
    model = build(ChiarForCausalLM, "chiar-random", router_capacity_factor=0.5)  # half a block's asks get a slot
    with torch.no_grad():
        records = model(rows[:4], output_routing=True).routing
    expected = {i: (r.shares(), r.requested_shares()) for i, r in enumerate(records) if len(r.operators) > 1}
    training_args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=2,
                                      report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True)
    trainer = ChiarTrainer(model=model, args=training_args, train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2
    for row in logged:
        shares = {key: value for key, value in row.items() if key.startswith("train_")}
        assert set(shares) == {f"train_{kind}_layer{i}_{op}" for kind in ("asked", "routing") for i in expected for op in expected[i][0]}
        for i, (ran, asked) in expected.items():
            for op in ran:
                assert row[f"train_routing_layer{i}_{op}"] == pytest.approx(ran[op])
                assert row[f"train_asked_layer{i}_{op}"] == pytest.approx(asked[op])
    assert any(expected[i][0] != expected[i][1] for i in expected)  # some asks overflowed: both are needed


def test_a_process_without_training_passes_still_joins_the_reduction():
    """With several processes every one reduces at each loss log; one that counted nothing since the last
    log takes part with zeros (else the others would wait for it), and alone it logs no shares."""
    shares = TrainingShares(build(ChiarForCausalLM, "chiar-random").config)
    reduced = []
    assert shares.read(lambda counts: reduced.append(counts) or counts) == {}
    assert len(reduced) == 1 and reduced[0].shape == (2, 2, 2) and not reduced[0].any()
    assert shares.read() == {}  # one process: nothing to reduce, nothing to log
