"""FSDP2 (torch's `fully_shard`, one unit per decoder layer) on two CPU processes with gloo: a sharded
training step gives the parameters that one process gives on the whole batch.

The scripts cannot show this on the CPU: accelerate (1.15) turns FSDP on only for accelerator
devices, so `--fsdp` with `--use_cpu` runs DDP (docs/training.md, "Several processes"); this test
drives the model with torch's own FSDP2 instead."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from modeling_chiar import ChiarConfig, ChiarForCausalLM

ROOT = Path(__file__).resolve().parents[2]
CONFIG = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=4,
              max_position_embeddings=64, hidden_dropout=0.0)
WORKER = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from modeling_chiar import ChiarConfig, ChiarForCausalLM

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = ChiarForCausalLM(ChiarConfig(**{config}))
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # Adam would magnify reduction-order noise in near-zero gradients
batch = torch.load(sys.argv[1])[2 * rank : 2 * rank + 2]  # each process its half of the batch
model(batch, labels=batch).loss.backward()
optimizer.step()
state = {{name: value.full_tensor() for name, value in model.state_dict().items() if hasattr(value, "full_tensor")}}
if rank == 0:
    torch.save(state, sys.argv[2])
dist.destroy_process_group()
"""


def test_a_sharded_step_equals_one_process_on_the_whole_batch(tmp_path):
    batch = torch.randint(0, CONFIG["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(1))
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "worker.py").write_text(WORKER.format(config=CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(tmp_path / "worker.py"), str(tmp_path / "batch.pt"), str(tmp_path / "sharded.pt")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    sharded = torch.load(tmp_path / "sharded.pt")

    torch.manual_seed(0)
    model = ChiarForCausalLM(ChiarConfig(**CONFIG))
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # Adam would magnify reduction-order noise in near-zero gradients
    model(batch, labels=batch).loss.backward()  # equal token counts: the mean of the halves' means
    optimizer.step()
    state = model.state_dict()
    assert {name for name, _ in model.named_parameters()} <= set(sharded)
    for name, value in sharded.items():
        torch.testing.assert_close(value, state[name], atol=1e-5, rtol=1e-4, msg=lambda detail, name=name: f"{name}: {detail}")
    moved = [not torch.equal(sharded[name], initial[name]) for name, _ in model.named_parameters()]
    assert sum(moved) >= 0.9 * len(moved)  # the step did something

