import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from harness import VARIANTS, build, random_ids
from modeling_chiar import ChiarConfig, ChiarForCausalLM, ChiarModel, routing_report
from modeling_chiar.flops import linear_flops


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("padded", [False, True])
def test_flop_accounting_matches_torch_flop_counter(variant, padded):
    """With eager attention, each layer's reported FLOPs are what torch's counter sees: the attention
    operator's inside its module, and the whole token-operator sub-layer's (the gate, every operator,
    the DCT operator's construction) inside the mixer, less the entropy the mixer computes only for
    the routing report (`output_routing=True` on a layer whose router does not read it)."""
    model = build(ChiarForCausalLM, variant, attn_implementation="eager").eval()
    ids = random_ids(2, 150, seed=3)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, 100:] = 0
    with FlopCounterMode(display=False) as counter:
        out = model(ids, attention_mask=mask, output_routing=True)
    per_module = counter.get_flop_counts()

    def counted(suffix):
        key = next((k for k in per_module if k.endswith(suffix)), None)
        return sum(per_module[key].values()) if key else 0

    d = model.config.hidden_size
    for i, record in enumerate(out.routing):
        assert record.attention_flops == counted(f"layers.{i}.mixer.attention"), i
        reported_only = 0 if model.model.layers[i].mixer.reads_entropy() else linear_flops(ids.numel(), d, d)
        assert record.operator_flops + reported_only == counted(f"layers.{i}.mixer"), (i, record.operators)


def test_baseline_fraction_is_one_and_sdpa_counts_the_causal_kernel():
    for implementation in ("eager", "sdpa"):
        model = build(ChiarForCausalLM, "baseline", attn_implementation=implementation).eval()
        report = routing_report(model(random_ids(2, 64), output_routing=True).routing, model.config)
        assert report["attention_query_fraction"] == 1.0
        assert report["attention_flops_fraction"] == pytest.approx(1.0)


def calibrated_default_model(length, implementation):
    torch.manual_seed(0)
    config = ChiarConfig(vocab_size=512, hidden_dropout=0.0)
    model = ChiarModel._from_config(config, attn_implementation=implementation)
    generator = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(8):
            model(torch.randint(0, 512, (2, length), generator=generator))
    return model.eval(), torch.randint(0, 512, (2, length), generator=generator)


@pytest.mark.parametrize("length", [256, 1024])
def test_default_model_at_25_percent_does_at_most_three_eighths_of_the_attention_queries(length):
    model, ids = calibrated_default_model(length, "sdpa")
    with torch.no_grad():
        report = routing_report(model(ids, output_routing=True).routing, model.config)
    # (0 + 0.25 + 0.25 + 1) / 4 = 0.375: the paper's "62.5% fewer attention FLOPs"
    assert report["attention_query_fraction"] <= 0.375 + 0.025
    # Everything executed (K/V for every token; Q/O and the kernel for the budget's query slots, 25% of
    # the tokens at the default capacity factor, held or not; each kernel call seeing the keys up to its
    # last block) costs more, and approaches the query share as the sequence grows (docs/architecture.md).
    assert report["attention_query_fraction"] < report["attention_flops_fraction"]
    assert report["attention_flops_fraction"] <= {256: 0.555, 1024: 0.535}[length]


def test_routing_report_shares_and_entropy():
    model = build(ChiarForCausalLM, "random-dct+rbf+attention").eval()
    ids = random_ids(3, 50)
    mask = torch.ones_like(ids)
    mask[0, 30:] = 0
    out = model(ids, attention_mask=mask, output_routing=True)
    report = routing_report(out.routing, model.config)
    for layer, record in zip(report["layers"], out.routing):
        assert sum(layer["shares"].values()) == pytest.approx(1.0)
        real_ids = record.operator_ids[mask.bool()]
        for k, op in enumerate(record.operators):
            assert layer["shares"][op] == pytest.approx((real_ids == k).float().mean().item())
        assert 0 <= layer["mean_entropy"] <= 1
