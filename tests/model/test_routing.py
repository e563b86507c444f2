import pytest
import torch

from harness import build, random_ids, tiny_config, wikitext_blocks, wikitext_bpe
from modeling_chiar import ChiarConfig, ChiarForCausalLM
from modeling_chiar.operators import MixContext
from modeling_chiar.routing import (DRIFT_RATE, GateRouter, RandomRouter, ThresholdRouter, balancing_bias, break_logit_ties, eval_statistics,
                                    block_rank, position_hash, route)


def test_threshold_bands_two_and_three_operators():
    two = ThresholdRouter(tiny_config(router_thresholds=[0.5]), 0)
    entropy = torch.tensor([[0.1, 0.5, 0.50001, 0.9]])
    assert two(None, entropy, None, None).operator_ids.tolist() == [[0, 0, 1, 1]]  # H > tau -> attention
    three = ThresholdRouter(tiny_config(routed_operators=["dct", "rbf", "attention"], router_thresholds=[0.4, 0.6]), 0)
    entropy = torch.tensor([[0.39, 0.4, 0.5, 0.6, 0.61]])
    # H < lo -> DCT, lo <= H <= hi -> RBF, H > hi -> attention
    assert three(None, entropy, None, None).operator_ids.tolist() == [[0, 1, 1, 1, 2]]


def test_fixed_thresholds_are_never_updated():
    model = build(ChiarForCausalLM, "fixed-thresholds").train()
    model(random_ids(2, 30))
    for layer in model.model.layers:
        if isinstance(layer.mixer.router, ThresholdRouter):
            assert layer.mixer.router.thresholds.tolist() == pytest.approx([0.80, 0.84])


def calibrated_eval_shares(model, train_batches, held_out):
    model.train()
    with torch.no_grad():
        for batch in train_batches:
            model(batch)
    model.eval()
    with torch.no_grad():
        out = model(held_out, output_routing=True)
    return [record.shares() for record in out.routing if len(record.operators) > 1]


def uniform_batches(num_batches, batch, length, vocab, seed):
    """Uniform tokens: no token type is frequent enough to be a mass point of the entropy distribution.

    (Before the first attention layer a token's hidden state, hence its entropy, depends on its id
    only, so a frequent token puts all its occurrences on one side of a threshold; real text, below,
    shows how much that moves the share.)
    """
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length), generator=generator) for _ in range(num_batches)]


@pytest.mark.parametrize("ops", [["dct", "attention"], ["dct", "rbf", "attention"]])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_calibration_reaches_the_target_share_on_held_out_data(ops, dropout):
    torch.manual_seed(0)
    config = ChiarConfig(vocab_size=500, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                         routed_operators=ops, hidden_dropout=dropout)
    model = ChiarForCausalLM(config)
    train = uniform_batches(40, 8, 64, 500, seed=1)
    held_out = uniform_batches(1, 16, 64, 500, seed=2)[0]
    for shares in calibrated_eval_shares(model, train, held_out):
        for op, target in config.router_target_fractions.items():
            assert abs(shares[op] - target) <= 0.05, (shares, config.router_target_fractions)


def test_calibration_on_wikitext():
    """Real text: a byte-level BPE trained on WikiText-2 train, train-mode calibration, eval share on valid.

    Before the first attention layer routing is a function of the token id, so the held-out share is
    a sum of token frequencies: it lands on target only when train and held-out text share them.
    """
    tokenizer, folder = wikitext_bpe()
    train_ids = wikitext_blocks(tokenizer, folder, "train", 128, 400_000)[:320]
    valid_ids = wikitext_blocks(tokenizer, folder, "valid", 128, 100_000)[:16]
    for seed, dropout in ((0, 0.0), (1, 0.1)):
        torch.manual_seed(seed)
        config = ChiarConfig(vocab_size=4096, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                             hidden_dropout=dropout)
        model = ChiarForCausalLM(config)
        for shares in calibrated_eval_shares(model, list(train_ids.split(8)), valid_ids):
            assert abs(shares["attention"] - 0.25) <= 0.05, shares


def test_learned_router_default_aux_loss_holds_the_share_through_training():
    """Train a small LM with the learned router at the default coefficient: the eval shares stay on target."""
    tokenizer, folder = wikitext_bpe()
    train_ids = wikitext_blocks(tokenizer, folder, "train", 64, 1_500_000)
    valid_ids = wikitext_blocks(tokenizer, folder, "valid", 64, 100_000)[:48]
    torch.manual_seed(0)
    config = ChiarConfig(vocab_size=4096, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                         router_type="learned")
    model = ChiarForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(300):
        batch = train_ids[torch.randint(0, len(train_ids), (16,), generator=generator)]
        model.train()
        out = model(batch, labels=batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        out = model(valid_ids, labels=valid_ids, output_routing=True)
    for record in out.routing[1:3]:
        assert abs(record.shares()["attention"] - 0.25) <= 0.05, record.shares()


def test_random_router_hits_its_share_and_ignores_content():
    config = tiny_config(router_type="random")
    router = RandomRouter(config, layer_idx=1)
    positions = torch.arange(20000)[None]
    ids = router(None, None, positions, None).operator_ids
    block = config.router_block_size
    whole = ids[0, : 20000 // block * block].view(-1, block)
    assert (whole.sum(-1) == round(0.25 * block)).all()  # every whole block: its share to the token
    assert not (whole == whole[:1]).all()  # a different draw in each block
    again = router(torch.randn(1, 20000, 32), None, positions, None).operator_ids
    assert torch.equal(ids, again)
    other_layer = RandomRouter(config, layer_idx=2)(None, None, positions, None).operator_ids
    assert not torch.equal(ids, other_layer)  # layers draw different tokens
    u = position_hash(torch.arange(100000), 0)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    ranks = block_rank(torch.arange(5 * 12)[None], layer_idx=1, block=12).view(5, 12) * 12 - 0.5
    assert (ranks.sort(-1).values == torch.arange(12.0)).all()  # a permutation of each block
    assert torch.equal(block_rank(torch.arange(24, 36), 1, 12), block_rank(torch.arange(5 * 12), 1, 12)[24:36])  # of the position alone


def test_random_router_splits_three_operators_exactly_per_block():
    config = tiny_config(router_type="random", routed_operators=["dct", "rbf", "attention"], router_block_size=16,
                         router_target_fractions={"dct": 0.5, "rbf": 0.25, "attention": 0.25})
    ids = RandomRouter(config, layer_idx=1)(None, None, torch.arange(16 * 40)[None], None).operator_ids.view(40, 16)
    counts = torch.stack([(ids == k).sum(-1) for k in range(3)], dim=-1)
    assert (counts == torch.tensor([8, 4, 4])).all()


def test_learned_router_gets_gradient_from_the_loss_and_the_aux_loss():
    model = build(ChiarForCausalLM, "learned-dct+rbf+attention").train()
    ids = random_ids(2, 24)
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    out.loss.backward()
    routers = [layer.mixer.router for layer in model.model.layers if isinstance(layer.mixer.router, GateRouter)]
    assert routers
    for router in routers:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
        assert router.entropy_weight.grad.abs().sum() > 0
    model.zero_grad()
    out = model(ids)
    out.aux_loss.backward()  # the balancing loss alone has a real gradient (the paper's is detached)
    assert all(router.bias.grad.abs().sum() > 0 for router in routers)


def test_learned_router_forward_value_is_the_hard_choice():
    """Scaling by p / p.detach() must leave the forward output exactly that of the executed operator:
    the weight is 1 in value, the selections partition the tokens, and the gate still gets gradient."""
    model = build(ChiarForCausalLM, "chiar-learned")
    mixer = model.model.layers[1].mixer
    x = torch.randn(1, 20, 32)
    entropy = mixer.router.center + mixer.router.scale * torch.randn(1, 20)
    ctx = MixContext(rope=None, positions=torch.arange(20)[None], token_mask=None, key_mask=None, dct=None, training=True)
    routed = route(mixer.router, mixer.operators, model.config, x, entropy, ctx)
    masks = torch.stack([selection.mask for selection in routed.selections])
    assert torch.equal(masks.sum(0), torch.ones(1, 20, dtype=torch.long))  # one operator per token
    for k, selection in enumerate(routed.selections):
        assert torch.equal(selection.mask, routed.operator_ids == k)
        torch.testing.assert_close(selection.weight.detach(), torch.ones(1, 20, 1), atol=0, rtol=0)
    routed.selections[0].weight.sum().backward()
    assert mixer.router.weight.grad.abs().sum() > 0


def test_soft_router_blends_every_operator():
    router = GateRouter(tiny_config(routed_operators=["dct", "rbf", "attention"], router_type="soft"), 0, hard=False)
    entropy = router.center + router.scale * torch.randn(2, 5)  # typical entropies
    decision = router(torch.randn(2, 5, 32) * 0.1, entropy, None, None)
    torch.testing.assert_close(decision.probs.sum(-1), torch.ones(2, 5))
    assert (decision.probs > 0).all() and decision.aux_loss is None


def test_fresh_gate_routes_like_the_threshold_router():
    """The learned gate starts from the Gaussian-quantile thresholds, so it starts near the target share."""
    config = ChiarConfig(hidden_size=256, router_type="learned")
    gate = GateRouter(config, 1, hard=True)
    x = torch.randn(4000, 256)
    x = x - x.mean(-1, keepdim=True)
    from modeling_chiar.spectral import spectral_entropy

    with torch.no_grad():
        gate.weight.zero_()
        ids = gate(x, spectral_entropy(x), None, None).operator_ids
    assert abs(ids.float().mean().item() - 0.25) < 0.05


def test_a_batch_with_non_finite_hidden_states_leaves_the_routing_statistics_and_says_so():
    """A training run meets NaN hidden states (here a weight gone NaN, as after a diverged step): the
    thresholds keep their values from before that batch, the refusal is counted, and eval() and
    saving log it; a checkpoint whose routing buffers are non-finite is refused at load."""
    from transformers.testing_utils import CaptureLogger

    import modeling_chiar.modeling_chiar as modeling

    model = build(ChiarForCausalLM, "chiar-3op").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ids = random_ids(2, 30)
    for _ in range(2):  # clean steps calibrate
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    routers = [layer.mixer.router for layer in model.model.layers if isinstance(layer.mixer.router, ThresholdRouter)]
    before = [(r.thresholds.clone(), r.train_thresholds.clone(), int(r.num_updates)) for r in routers]
    assert all(n == 2 for _, _, n in before)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    loss = model(ids, labels=ids).loss
    assert not torch.isfinite(loss)
    for router, (eval_t, train_t, updates) in zip(routers, before):
        assert torch.equal(router.thresholds, eval_t) and torch.equal(router.train_thresholds, train_t)
        assert int(router.num_updates) == updates and int(router.skipped_updates) == 1
    with CaptureLogger(modeling.logger) as captured:
        model.eval()
    assert "update(s) were skipped" in captured.out


def test_non_finite_routing_buffers_are_refused_at_load(tmp_path):
    model = build(ChiarForCausalLM, "chiar-threshold")
    with torch.no_grad():
        model.model.layers[1].mixer.router.thresholds.fill_(float("nan"))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="NaN or infinite values in .*layers.1.mixer.router.thresholds"):
        ChiarForCausalLM.from_pretrained(tmp_path)


def test_an_exploring_gate_starts_at_the_targets_draws_in_training_and_ranks_in_eval():
    """router_explore: a fresh gate gives every token the target shares; training draws each token's
    operator from the gate (shares near the probabilities, different draws each pass) and calibrates
    the eval cut; eval sends the tokens the gate ranks highest, at the target share, deterministically;
    without exploring, training and eval take the most likely operator."""
    config = tiny_config(router_type="learned", router_explore=True)
    router = GateRouter(config, 1, hard=True).eval()
    router.reset_from_config(config)
    x = torch.randn(4, 512, config.hidden_size)
    entropy = torch.rand(4, 512)
    probs = router(x, entropy, None, None).probs
    assert torch.equal(router.entropy_weight, torch.zeros(2))  # no entropy preference: only the weights' small init
    assert abs(probs[..., 1].mean().item() - 0.25) < 0.01 and probs[..., 1].std().item() < 0.05
    router.train()
    first, second = router(x, entropy, None, None), router(x, entropy, None, None)
    assert abs(first.operator_ids.float().mean().item() - probs[..., 1].mean().item()) < 0.03
    assert not torch.equal(first.operator_ids, second.operator_ids)
    for decision in (first, second):  # what routing.observe does after a training pass
        router.calibrate(decision.score, None)
    assert int(router.num_updates) == 2
    router.eval()
    picked = router(x, entropy, None, None).operator_ids
    assert abs(picked.float().mean().item() - 0.25) < 0.01 and torch.equal(picked, router(x, entropy, None, None).operator_ids)
    ranked = probs[..., 1].flatten().argsort(descending=True)
    assert picked.flatten()[ranked[:400]].all() and not picked.flatten()[ranked[-1500:]].any()  # the top of the ranking
    plain = GateRouter(tiny_config(router_type="learned"), 1, hard=True).train()
    decision = plain(x, entropy, None, None)
    assert torch.equal(decision.operator_ids, decision.probs.argmax(-1)) and not hasattr(plain, "eval_thresholds")


def test_an_exploring_gates_eval_cut_splits_tokens_that_tie_at_the_target_share():
    """Below the first attention layer equal tokens have equal hidden vectors, so the gate scores them
    alike: a mass point. Split by position (routing.break_ties), the calibrated cut gives the target
    share even when it falls inside one; without positions the share can only jump between masses."""
    config = tiny_config(router_type="learned", router_explore=True)
    router = GateRouter(config, 1, hard=True)
    router.reset_from_config(config)
    kinds = torch.randn(2, config.hidden_size)  # two token kinds, half the tokens each
    ids = torch.randint(0, 2, (4, 512), generator=torch.Generator().manual_seed(0))
    x, entropy, positions = kinds[ids], torch.full((4, 512), 0.8), torch.arange(512).expand(4, 512)
    router.train()
    for _ in range(3):  # what routing.observe does after each training pass
        router.calibrate(router(x, entropy, positions, None).score, None)
    router.eval()
    shares = router(x, entropy, positions, None).operator_ids.float().mean().item()
    assert abs(shares - 0.25) < 0.01, shares
    tied = router(x, entropy, None, None).operator_ids.float().mean().item()  # no positions: no split
    assert abs(tied - 0.25) > 0.15, tied  # none of the tokens, or a whole kind


def test_exploring_training_routes_causally_and_keeps_the_budget():
    """A drawn operator depends on the token alone (its own noise), so the model stays causal in
    training for a fixed draw, and the budget still caps what runs."""
    model = build(ChiarForCausalLM, "chiar-learned", router_explore=True).train()
    ids = random_ids(2, 40)
    torch.manual_seed(3)
    out = model(ids, output_routing=True)
    changed = ids.clone()
    changed[:, 30:] = (changed[:, 30:] + 1) % model.config.vocab_size
    torch.manual_seed(3)
    again = model(changed, output_routing=True)
    torch.testing.assert_close(out.logits[:, :30], again.logits[:, :30])
    for record in out.routing:
        if "attention" in record.operators and len(record.operators) > 1:
            attention = record.operators.index("attention")
            assert (record.operator_ids == attention).float().mean() <= 0.25  # the budget: 2 slots per block of 8


def test_an_exploring_routers_calibration_is_saved_and_loaded(tmp_path):
    model = build(ChiarForCausalLM, "chiar-learned", router_explore=True).train()
    with torch.no_grad():
        for seed in range(3):
            model(random_ids(2, 32, seed=seed))
    model.eval()
    router = model.model.layers[1].mixer.router
    assert int(router.num_updates) == 3 and not torch.equal(router.eval_thresholds, GateRouter.flat_score(model.config))
    model.save_pretrained(tmp_path)
    loaded = ChiarForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.model.layers[1].mixer.router.eval_thresholds, router.eval_thresholds)
    ids = random_ids(2, 32, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_a_share_bias_moves_against_the_share_error_and_skips_what_it_cannot_count():
    """router_share_control="bias": one observed batch moves each operator's drift by DRIFT_RATE x
    bias_rate x e, e = (target - share) / target, and its bias by bias_rate x e plus the drift, train and
    eval sets alike without a dropout-free pass; a batch without real tokens, or with a NaN entropy,
    leaves them all and is counted."""
    three = ["dct", "rbf", "attention"]  # targets 0.375, 0.375, 0.25
    config = tiny_config(router_type="learned", router_share_control="bias", router_bias_rate=0.1, routed_operators=three)
    gate = GateRouter(config, 1, hard=True)
    ids = torch.tensor([[2, 2, 2, 0, 1, 1, 1, 1]])  # shares 0.125, 0.5, 0.375
    entropy = torch.rand(1, 8)
    gate.balance_shares(ids, None, entropy)
    error = [(0.375 - 0.125) / 0.375, (0.375 - 0.5) / 0.375, (0.25 - 0.375) / 0.25]
    drift = [DRIFT_RATE * 0.1 * e for e in error]
    bias = [0.1 * e + d for e, d in zip(error, drift)]
    assert gate.train_share_drift.tolist() == pytest.approx(drift) and gate.train_share_bias.tolist() == pytest.approx(bias)
    assert torch.equal(gate.share_bias, gate.train_share_bias) and torch.equal(gate.share_drift, gate.train_share_drift)
    gate.balance_shares(ids, torch.zeros(1, 8, dtype=torch.bool), entropy)  # no real token
    gate.balance_shares(ids, None, entropy.masked_fill(torch.arange(8) == 3, float("nan")))
    assert gate.train_share_bias.tolist() == pytest.approx(bias) and gate.train_share_drift.tolist() == pytest.approx(drift)
    assert int(gate.skipped_updates) == 1
    mask = torch.tensor([[True] * 4 + [False] * 4])  # the real tokens alone: shares 0.25, 0, 0.75
    gate.balance_shares(ids, mask, entropy, eval_ids=torch.zeros_like(ids), eval_mask=mask, eval_entropy=entropy)
    for buffer, drift_buffer, errors in ((gate.train_share_bias, gate.train_share_drift, [(0.375 - 0.25) / 0.375, 1.0, (0.25 - 0.75) / 0.25]),
                                         (gate.share_bias, gate.share_drift, [(0.375 - 1) / 0.375, 1.0, 1.0])):
        moved = [d + DRIFT_RATE * 0.1 * e for d, e in zip(drift, errors)]
        assert drift_buffer.tolist() == pytest.approx(moved)
        assert buffer.tolist() == pytest.approx([b + 0.1 * e + m for b, e, m in zip(bias, errors, moved)])
    # The bias moves the choice, and the probabilities (the straight-through gradient) are the biased gate's.
    x = torch.randn(1, 8, config.hidden_size)
    plain = GateRouter(tiny_config(router_type="learned", routed_operators=three), 1, hard=True)
    plain.load_state_dict(gate.state_dict(), strict=False)
    biased = gate.train()(x, entropy, None, None)
    unbiased = plain.train()(x, entropy, None, None).probs
    torch.testing.assert_close(biased.probs, (unbiased.log() + gate.train_share_bias).softmax(-1))
    assert torch.equal(biased.operator_ids, biased.probs.argmax(-1)) and biased.aux_loss is None


def held_out_attention_asks(model, rows):
    """Each routed layer's share of held-out random tokens (rows x 64) that asked for attention, in eval mode."""
    model.eval()
    with torch.no_grad():
        out = model(random_ids(rows, 64, seed=1000), output_routing=True)
    return [record.requested_shares()["attention"] for record in out.routing[1:3]]


def test_a_share_bias_holds_the_budget_without_an_auxiliary_loss():
    """A gate started far off its target (about 45% of the tokens asking for attention) is brought to the
    25% target by the bias alone: no auxiliary loss, so the gate's gradient is the task's; with dropout,
    the eval bias (moved by the dropout-free pass) holds the eval asks at the target too (the spec's 0.05)."""
    model = build(ChiarForCausalLM, "chiar-learned-bias", hidden_dropout=0.1).train()
    gates = [layer.mixer.router for layer in model.model.layers if isinstance(layer.mixer.router, GateRouter)]
    with torch.no_grad():
        for gate in gates:
            gate.bias[1] += 2.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    asked = []
    for step in range(150):
        ids = random_ids(8, 64, seed=step)
        out = model(ids, labels=ids, output_routing=True)
        assert out.aux_loss is None
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        asked.append([out.routing[i].requested_shares()["attention"] for i in (1, 2)])
    assert min(asked[0]) > 0.4  # where it started
    late = torch.tensor(asked[-50:]).mean(0)
    assert (late - 0.25).abs().max() < 0.02, late
    asks = held_out_attention_asks(model, rows=16)
    assert all(abs(ask - 0.25) < 0.05 for ask in asks), asks


def test_a_step_with_a_non_finite_loss_undoes_every_routers_running_statistics():
    """statistics_before_step / undo_if_not_finite (ChiarTrainer.training_step) put back whatever a
    router updated during the step: thresholds, an exploring gate's calibrated cut, share biases."""
    from modeling_chiar.routing import statistics_before_step, undo_if_not_finite

    for variant in ("chiar-3op", "chiar-learned-explore", "chiar-learned-bias", "chiar-learned-explore-bias"):
        model = build(ChiarForCausalLM, variant).train()
        routers = [r for r in model.model.routers() if r is not None]
        saved = statistics_before_step(routers)
        assert saved, variant
        before = {id(r): {name: value.clone() for name, value in values.items()} for r, values in saved}
        ids = random_ids(2, 32)
        model(ids, labels=ids).loss.backward()
        assert any(not torch.equal(getattr(r, name), value) for r, values in saved for name, value in before[id(r)].items())
        undo_if_not_finite(saved, torch.tensor(float("nan")))
        for router, values in saved:
            for name, value in before[id(router)].items():
                assert torch.equal(getattr(router, name), value), (variant, name)
        assert sum(int(r.skipped_updates) for r, _ in saved) >= 1
        # A finite loss keeps the step's update.
        saved = statistics_before_step(routers)
        model(ids, labels=ids)
        moved = {id(r): {name: getattr(r, name).clone() for name in values} for r, values in saved}
        undo_if_not_finite(saved, torch.tensor(1.0))
        assert all(torch.equal(getattr(r, name), moved[id(r)][name]) for r, values in saved for name in values)


def test_an_exploring_gate_calibrates_its_eval_cut_after_the_pass_on_what_eval_ranks(monkeypatch):
    """The eval cut is calibrated once per training pass, after it (a gradient-checkpointing
    recomputation cannot add a second update), on the dropout-free pass's scores when dropout is on
    (eval ranks dropout-free scores), on the training pass's otherwise."""
    seen = []
    calibrate = GateRouter.calibrate
    monkeypatch.setattr(GateRouter, "calibrate", lambda self, score, mask: (seen.append(tuple(score.shape)), calibrate(self, score, mask)))
    ids = random_ids(8, 24)
    for dropout, rows in ((0.0, 8), (0.1, 1)):
        seen.clear()
        model = build(ChiarForCausalLM, "chiar-learned-explore", hidden_dropout=dropout).train()
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model(ids, labels=ids).loss.backward()
        assert seen == [(rows, 24), (rows, 24)]  # the two routed layers, once each
        assert all(int(r.num_updates) == 1 for r in model.model.routers() if isinstance(r, GateRouter))


def test_an_exploring_gate_with_a_share_bias_ranks_by_the_biased_gate():
    """Without an auxiliary loss nothing anchors the gate's own probabilities, which drift faster than a
    running quantile follows; the bias holds the drawn shares, so the biased score's distribution stays
    put and the eval cut calibrated on it keeps the eval asks near the target (ranked by the unbiased
    gate and calibrated on dropout-on scores, a one-epoch run's eval asks reached 0.79-0.88:
    docs/benchmarks.md, changelog, "One epoch")."""
    model = build(ChiarForCausalLM, "chiar-learned-explore-bias", hidden_dropout=0.1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(150):
        ids = random_ids(16, 64, seed=step)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    asks = held_out_attention_asks(model, rows=32)
    assert all(abs(ask - 0.25) < 0.1 for ask in asks), asks


def test_the_straight_through_weight_is_one_where_a_bias_chooses_an_operator_the_gate_gives_no_probability():
    """p / p.detach() is 0 / 0 where p underflows; a share bias can choose such an operator. The weight
    must be exactly 1 there, and the output and gradients finite."""
    model = build(ChiarForCausalLM, "chiar-learned-bias").train()
    mixer = model.model.layers[1].mixer
    with torch.no_grad():
        mixer.router.bias.copy_(torch.tensor([0.0, -300.0]))  # p(attention) = 0 in float32
        mixer.router.train_share_bias.copy_(torch.tensor([0.0, 400.0]))  # and the bias chooses it anyway
    x = torch.randn(1, 8, 32, requires_grad=True)
    entropy = mixer.router.center + mixer.router.scale * torch.randn(1, 8)
    ctx = MixContext(rope=None, positions=torch.arange(8)[None], token_mask=None, key_mask=None, dct=None, training=True)
    routed = route(mixer.router, mixer.operators, model.config, x, entropy, ctx)
    assert (routed.requested_ids == 1).all()
    for selection in routed.selections:
        torch.testing.assert_close(selection.weight.detach(), torch.ones(1, 8, 1), atol=0, rtol=0)
    routed.selections[1].weight.sum().backward()
    assert torch.isfinite(mixer.router.weight.grad).all()


SETTLING = ["chiar-threshold", "chiar-3op", "chiar-learned-explore", "chiar-learned-explore-bias", "chiar-learned-bias",
            "learned-bias-dct+rbf+attention"]


def asked_shares(model, batches):
    """Each routed layer's asked share of every operator over `batches`, in eval mode."""
    model.eval()
    with torch.no_grad():
        outs = [model(**batch, output_routing=True) for batch in batches]
    shares = []
    for i, record in enumerate(outs[0].routing):
        if len(record.operators) > 1:
            counts = torch.tensor([out.routing[i].counts(requested=True)[0] for out in outs]).sum(0).float()
            shares.append(dict(zip(record.operators, (counts / counts.sum()).tolist())))
    return shares


@pytest.mark.parametrize("variant", SETTLING)
def test_settling_routes_the_target_shares_of_the_data_it_was_settled_on(variant):
    """After a few training steps the running statistics are off; settled on fixed weights, eval asks the
    targets of the settling batches (left-padded rows included) to a token, and training statistics stay."""
    model = build(ChiarForCausalLM, variant, hidden_dropout=0.1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(10):
        ids = random_ids(4, 64, seed=step)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    mask = torch.ones(8, 64, dtype=torch.long)
    mask[:3, :20] = 0  # left padding: real tokens only are counted
    batches = [{"input_ids": random_ids(8, 64, seed=100 + i), "attention_mask": mask} for i in range(4)]
    training = {name: buffer.clone() for name, buffer in model.named_buffers() if "train_" in name or "num_updates" in name}
    assert model.settle_routing(batches) == 2
    for name, buffer in model.named_buffers():
        if name in training:
            assert torch.equal(buffer, training[name]), name
    tokens = int(mask.sum()) * len(batches)
    for shares in asked_shares(model, batches):
        for op, target in model.config.router_target_fractions.items():
            assert abs(shares[op] - target) <= 2 / tokens + 1e-6, (shares, op)


@pytest.mark.parametrize("variant", ["chiar-threshold", "chiar-learned-explore-bias", "chiar-learned-bias"])
def test_settling_leaves_out_tokens_whose_score_is_not_finite(variant):
    """A row whose hidden states are NaN at the first routed layer (a non-finite input) counts for nothing:
    the statistics are those settled on the other rows alone."""
    batches = [{"input_ids": random_ids(4, 32, seed=i)} for i in range(2)]
    settled = {}
    for poisoned in (True, False):
        model = build(ChiarForCausalLM, variant)
        mixer = model.model.layers[1].mixer
        hook = mixer.register_forward_pre_hook(lambda module, args: (args[0].index_fill(0, torch.tensor([0]), float("nan")),) + args[1:])
        if poisoned:
            model.settle_routing(batches)
        else:
            hook.remove()
            model.settle_routing([{"input_ids": batch["input_ids"][1:]} for batch in batches])
        hook.remove()
        settled[poisoned] = [torch.cat([getattr(router, name) for name in eval_statistics(router)]) for router in model.model.routers()
                             if router is not None and eval_statistics(router)]
    assert all(torch.isfinite(s).all() for s in settled[True])
    for with_nan, without in zip(settled[True], settled[False]):
        torch.testing.assert_close(with_nan, without)


def test_settling_leaves_the_training_mode_and_does_nothing_where_nothing_calibrates():
    model = build(ChiarForCausalLM, "chiar-threshold").train()
    assert model.settle_routing([{"input_ids": random_ids(2, 16)}]) == 2 and model.training
    for variant in ("baseline", "chiar-random", "chiar-learned", "fixed-thresholds"):
        model = build(ChiarForCausalLM, variant)
        before = {name: buffer.clone() for name, buffer in model.named_buffers()}
        assert model.settle_routing([{"input_ids": random_ids(2, 16)}]) == 0
        assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())


def test_a_settled_share_bias_splits_tokens_that_tie_at_the_target_share():
    """Two token kinds with equal hidden vectors within a kind (as below the first attention layer): a
    plain share-bias gate's choice splits a kind by position, so the settled bias gives the target share;
    without positions it can only take all of a kind or none."""
    config = tiny_config(router_type="learned", router_share_control="bias")
    router = GateRouter(config, 1, hard=True)
    router.reset_from_config(config)
    router.eval()
    kinds = torch.randn(2, config.hidden_size)
    ids = torch.randint(0, 2, (4, 512), generator=torch.Generator().manual_seed(0))
    x, entropy, positions = kinds[ids], torch.full((4, 512), 0.8), torch.arange(512).expand(4, 512)
    logits = router(x, entropy, positions, None).logits
    router.settle(None, torch.ones(4 * 512, dtype=torch.bool), logits.flatten(0, 1))
    share = router(x, entropy, positions, None).operator_ids.float().mean().item()
    assert abs(share - 0.25) < 0.005, share
    tied = router(x, entropy, None, None).operator_ids.float().mean().item()
    assert abs(tied - 0.25) > 0.15, tied


def test_a_share_bias_holds_the_target_share_while_the_gate_drifts():
    """The task's gradient raises a gate's attention logit steadily, for every token alike (a ramp). A
    bias moved by the error alone trails a ramp of slope r by a relative share error r / bias_rate that
    does not vanish (0.2 / 0.3 here: 0.17 of a 0.25 share); its drift learns the slope, and the share
    returns to the target."""
    config = tiny_config(router_type="learned", router_share_control="bias")
    gate = GateRouter(config, 1, hard=True)
    generator = torch.Generator().manual_seed(0)
    shares = []
    for step in range(600):
        logits = torch.randn(1, 1024, 2, generator=generator) * 2 + torch.tensor([0.0, 0.2 * step])  # slope 0.2 per pass
        ids = (logits + gate.train_share_bias).argmax(-1)
        gate.balance_shares(ids, None, torch.rand(1, 1024, generator=generator))
        shares.append(ids.float().mean().item())
    late = torch.tensor(shares[-200:])
    assert abs(late.mean().item() - 0.25) < 0.005, late.mean()
    assert late.std().item() < 0.02, late.std()  # a batch's own spread is 0.0135


def test_a_tie_split_survives_large_logits():
    """A mass point of logits far from zero (a gate the task has pushed for a while): split by position,
    the balancing bias still gives it the target share; the hash is not rounded away beside the offset."""
    positions = torch.arange(4096)[None]
    logits = torch.tensor([300.0, 292.0]).expand(1, 4096, 2)
    split = break_logit_ties(logits, positions, 1)[0]
    bias = balancing_bias(split, None, torch.tensor([0.75, 0.25]), torch.zeros(2))
    share = (split + bias).argmax(-1).float().mean().item()
    assert abs(share - 0.25) < 0.01, share


def test_the_balancing_bias_is_the_quantile_cut_for_two_operators_and_exact_for_three():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5000, 2, generator=generator) * 3
    mask = torch.rand(5000, generator=generator) > 0.2
    targets = torch.tensor([0.75, 0.25])
    bias = balancing_bias(logits, mask, targets, torch.zeros(2))
    chosen = (logits + bias).argmax(-1)
    assert abs(chosen[mask].float().mean().item() - 0.25) < 1e-3
    difference = (logits[:, 1] - logits[:, 0])[mask]
    assert abs(torch.quantile(difference, 0.75).item() - (bias[0] - bias[1]).item()) < 0.02  # the cut is the quantile
    logits = torch.randn(6000, 3, generator=generator) + torch.tensor([4.0, -2.0, 0.0])  # far from the targets at b = 0
    targets = torch.tensor([0.375, 0.375, 0.25])
    shares = torch.bincount((logits + balancing_bias(logits, None, targets, torch.zeros(3))).argmax(-1), minlength=3) / 6000
    torch.testing.assert_close(shares, targets, atol=1e-3, rtol=0)
    start = torch.tensor([0.5, -0.5, 0.0])
    assert torch.equal(balancing_bias(logits, torch.zeros(6000, dtype=torch.bool), targets, start), start)  # no row: start
