import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modeling_chiar.operator_attention import RotaryEmbedding, RoutedAttention, masked_sdpa_kernels
from modeling_chiar.operator_dct import DCTMixing
from modeling_chiar.operator_rbf import RBFMixing
from modeling_chiar.operators import MixContext
from modeling_chiar.routing import EVERY_TOKEN, Selection, grant, num_groups, query_slots
from modeling_chiar.spectral import dct_matrix

from harness import tiny_config


def context(config, x, cache=None, key_mask=None, past=0):
    """The MixContext a layer would give an operator for x (B, n, d), positions past, past + 1, ..."""
    batch, length, d = x.shape
    positions = (torch.arange(length) + past).expand(batch, length)
    rope = RotaryEmbedding(config.head_dim, config.rope_theta)(positions, x.dtype)
    token_mask = None if key_mask is None else key_mask[:, past:]
    return MixContext(rope=rope, positions=positions, token_mask=token_mask, key_mask=key_mask, dct=dct_matrix(d),
                      training=False, cache=cache, past_keys=past, start=past)


def selection_of(index, length, causal=True, block=None):
    """A budgeted operator's selection holding the tokens `index` (B, M), built by the budget's own code
    with the smallest capacity that grants everything: blocks of `block` positions (one when None)."""
    block = block or length
    asks = torch.zeros(index.shape[0], length, dtype=torch.bool).scatter(1, index, True)
    groups = num_groups(length, block, False)
    per_block = torch.nn.functional.pad(asks, (0, groups * block - length)).view(-1, groups, block).sum(-1)
    capacity = max(int(per_block.max()), 1)  # the fewest slots that hold every selected token
    granted, rank, group = grant(asks, 0, None, capacity, block)
    assert granted.equal(asks)
    slots = query_slots(granted, rank, group, groups, capacity, 0, block, causal)
    return Selection(mask=asks, slots=slots)


def rows(output, index):
    return output.gather(1, index[..., None].expand(-1, -1, output.shape[-1]))


def test_dct_mixing_is_identity_at_init_and_scales_frequencies():
    d = 16
    c = dct_matrix(d)
    config = tiny_config(hidden_size=d, num_attention_heads=2)
    op = DCTMixing(config)
    for tokens in (5, 40):  # fewer tokens than d: transform, gain, inverse; more: one operator matrix
        x = torch.randn(1, tokens, d)
        ctx = context(config, x)
        with torch.no_grad():
            op.gain.fill_(1.0)
        torch.testing.assert_close(op(x, ctx, EVERY_TOKEN).output, x, atol=1e-5, rtol=0)
        with torch.no_grad():
            op.gain.zero_()
            op.gain[0] = 1.0  # keep only the DC component: every output entry becomes the mean of x
        torch.testing.assert_close(op(x, ctx, EVERY_TOKEN).output, x.mean(-1, keepdim=True).expand_as(x), atol=1e-5, rtol=0)
        with torch.no_grad():
            op.gain.copy_(torch.rand(d))
        with FlopCounterMode(display=False) as counter:
            result = op(x, ctx, EVERY_TOKEN)
        torch.testing.assert_close(result.output, ((x @ c.T) * op.gain) @ c, atol=1e-5, rtol=0)
        assert result.flops == counter.get_total_flops()
        served = torch.rand(1, tokens) < 0.5  # a routed layer keeps the output of the tokens it serves only
        kept = op(x, ctx, Selection(mask=served)).output
        torch.testing.assert_close(kept, torch.where(served[..., None], result.output, 0))


def test_rbf_features_estimate_the_gaussian_kernel():
    torch.manual_seed(0)
    config = tiny_config(rbf_num_features=20000, num_attention_heads=1, hidden_size=8, rbf_gamma=0.5)
    op = RBFMixing(config, layer_idx=0)
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    estimate = (op.feature_map(q) * op.feature_map(k)).sum(-1).squeeze(-1)
    qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    exact = torch.exp(-0.5 * (qn - kn).square().sum(-1))
    torch.testing.assert_close(estimate, exact, atol=0.05, rtol=0.05)
    assert (op.feature_map(q) > 0).all()  # positive features: the normaliser cannot change sign


def reference_rbf(op, x, key_mask=None, causal=True):
    """Quadratic-time reference: out_t = sum_s k(q_t, k_s) v_s / sum_s k(q_t, k_s) over visible real keys."""
    b, t, d = x.shape
    qf = op.feature_map(op.q_proj(x))  # (B, T, h, R)
    kf = op.feature_map(op.k_proj(x))
    v = op.v_proj(x).float().view(b, t, op.num_heads, op.head_dim)
    scores = torch.einsum("bqhr,bkhr->bhqk", qf, kf)
    visible = torch.ones(t, t, dtype=torch.bool).tril() if causal else torch.ones(t, t, dtype=torch.bool)
    visible = visible[None, None].expand(b, 1, t, t)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    scores = scores * visible
    out = torch.einsum("bhqk,bkhe->bqhe", scores, v) / scores.sum(-1).transpose(1, 2)[..., None].clamp_min(1e-6)
    return op.o_proj(out.reshape(b, t, d))


@pytest.mark.parametrize("length", [5, 33, 300])
@pytest.mark.parametrize("causal", [True, False])
def test_rbf_prefix_sums_match_the_quadratic_reference(length, causal):
    torch.manual_seed(0)
    config = tiny_config(is_causal=causal)
    op = RBFMixing(config, layer_idx=1)
    x = torch.randn(2, length, 32)
    ctx = context(config, x)
    result = op(x, ctx, EVERY_TOKEN)
    torch.testing.assert_close(result.output, reference_rbf(op, x, causal=causal), atol=1e-4, rtol=1e-4)
    # Only some tokens are queries (slots): their rows are the same, every other row is zero.
    index = torch.stack([torch.randperm(length)[: max(1, length // 3)].sort().values for _ in range(2)])
    selection = selection_of(index, length, causal, block=8)
    subset = op(x, ctx, selection)
    torch.testing.assert_close(subset.output, torch.where(selection.mask[..., None], result.output, 0), atol=1e-5, rtol=1e-5)
    assert subset.flops < result.flops


def gradients_of(output, weights, x, op):
    """Gradients of sum(output * weights) for the input x and every parameter of op; clears them after."""
    (output * weights).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in op.parameters()]
    x.grad = None
    op.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("causal", [True, False])
def test_rbf_on_selected_queries_has_the_reference_gradient_and_counts_its_flops(causal):
    """Gradients through the routed read (scatter into chunks, gather back) equal the quadratic
    reference's; the FLOPs it reports are the matmuls torch's counter sees."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    config = tiny_config(is_causal=causal)
    op = RBFMixing(config, layer_idx=1)
    x = torch.randn(2, 70, 32, requires_grad=True)
    index = torch.stack([torch.randperm(70)[:25].sort().values for _ in range(2)])
    weights = torch.randn(2, 25, 32)
    expected = gradients_of(rows(reference_rbf(op, x, causal=causal), index), weights, x, op)
    with FlopCounterMode(display=False) as counter:
        result = op(x, context(config, x), selection_of(index, 70, causal, block=16))
    assert result.flops == counter.get_total_flops()
    for a, e in zip(gradients_of(rows(result.output, index), weights, x, op), expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_rbf_decoding_token_by_token_equals_the_full_pass_and_counts_its_flops():
    """One token per call with a cache (the decoding step's own path) gives the full pass's rows, also
    when some tokens only extend the state; its FLOPs are what torch's counter sees."""
    from modeling_chiar.cache import ChiarCache

    torch.manual_seed(0)
    config = tiny_config()
    op = RBFMixing(config, layer_idx=1)
    x = torch.randn(2, 9, 32)
    full = reference_rbf(op, x)
    cache = ChiarCache(num_layers=2)
    for t in range(9):
        reads = t % 3 != 1  # every third token only adds its key (routed elsewhere)
        step = x[:, t : t + 1]
        selection = selection_of(torch.zeros(2, 1, dtype=torch.long), 1)
        if not reads:
            selection.slots.valid.zero_()
            selection.mask.zero_()
        with FlopCounterMode(display=False) as counter:
            result = op(step, context(config, step, cache=cache, past=t), selection)
        assert result.flops == counter.get_total_flops()
        expected = full[:, t : t + 1] if reads else torch.zeros(2, 1, 32)
        torch.testing.assert_close(result.output, expected, atol=1e-5, rtol=1e-5)


def test_rbf_excludes_padding_keys():
    torch.manual_seed(0)
    config = tiny_config()
    op = RBFMixing(config, layer_idx=0)
    x = torch.randn(1, 12, 32)
    key_mask = torch.ones(1, 12, dtype=torch.bool)
    key_mask[0, 8:] = False  # padding (the model puts real tokens first)
    x[0, 8:] = float("nan")  # whatever padding holds must not reach a real token
    out = op(x, context(config, x, key_mask=key_mask), EVERY_TOKEN).output
    alone = op(x[:, :8], context(config, x[:, :8]), EVERY_TOKEN).output
    torch.testing.assert_close(out[:, :8], alone, atol=1e-5, rtol=1e-5)


def dense_reference_attention(op, x, rope, causal):
    b, t, d = x.shape
    cos, sin = rope
    from modeling_chiar.operator_attention import apply_rotary

    q = apply_rotary(op._heads(op.q_proj(x)), cos, sin)
    k = apply_rotary(op._heads(op.k_proj(x)), cos, sin)
    v = op._heads(op.v_proj(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(op.head_dim)
    if causal:
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    return op.o_proj(out)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [7, 200])
def test_attention_on_selected_queries_equals_dense_attention(implementation, causal, length):
    torch.manual_seed(0)
    config = tiny_config(is_causal=causal)
    config._attn_implementation = implementation
    op = RoutedAttention(config, layer_idx=0).eval()
    x = torch.randn(2, length, 32)
    ctx = context(config, x)
    dense = dense_reference_attention(op, x, ctx.rope, causal)
    everything = op(x, ctx, EVERY_TOKEN).output
    torch.testing.assert_close(everything, dense, atol=1e-5, rtol=1e-5)
    index = torch.stack([torch.randperm(length)[: max(1, length // 4)].sort().values for _ in range(2)])
    selection = selection_of(index, length, causal, block=16)
    selected = op(x, ctx, selection).output
    torch.testing.assert_close(selected, torch.where(selection.mask[..., None], dense, 0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("queries", [75, 300])
def test_attention_on_selected_queries_has_the_dense_gradient(implementation, causal, queries):
    """One kernel call, or several each seeing a prefix of the keys: gradients equal dense attention's."""
    torch.manual_seed(0)
    config = tiny_config(is_causal=causal)
    config._attn_implementation = implementation
    op = RoutedAttention(config, layer_idx=0).eval()
    length = 1200
    x = torch.randn(2, length, 32, requires_grad=True)
    ctx = context(config, x)
    index = torch.stack([torch.randperm(length)[:queries].sort().values for _ in range(2)])
    selection = selection_of(index, length, causal, block=64)
    calls, slots = selection.slots.calls, selection.slots
    assert (len(calls) > 1) == (queries > 256)
    assert [first for first, _, _ in calls[1:]] == [end for _, end, _ in calls[:-1]]
    for first, end, keys in calls:  # a causal call sees the keys up to its last block only
        last_query = int(torch.where(slots.valid[:, first:end], slots.index[:, first:end], 0).max())
        assert last_query < keys and (keys == length or (causal and keys % 64 == 0))
    weights = torch.randn(2, queries, 32)
    expected = gradients_of(rows(dense_reference_attention(op, x, ctx.rope, causal), index), weights, x, op)
    actual = gradients_of(rows(op(x, ctx, selection).output, index), weights, x, op)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_masked_sdpa_calls_avoid_cudnn_on_cuda_only():
    """cuDNN's masked SDPA backward returns NaN (pytorch#196678): routed blocks must not reach it on CUDA."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with masked_sdpa_kernels("sdpa", torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    for implementation, device in (("sdpa", torch.device("cpu")), ("eager", torch.device("cuda"))):
        with masked_sdpa_kernels(implementation, device):
            assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_every_masked_sdpa_call_of_routed_attention_runs_under_the_kernel_choice(monkeypatch):
    """The operator, not just the helper: each SDPA call with a mask happens inside `masked_sdpa_kernels`."""
    import contextlib

    import modeling_chiar.operator_attention as attention_module

    active, calls = [False], []

    @contextlib.contextmanager
    def recording_kernels(implementation, device):
        active[0] = True
        yield
        active[0] = False

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is not None, active[0]))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention_module, "masked_sdpa_kernels", recording_kernels)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    config = tiny_config()
    config._attn_implementation = "sdpa"
    op = RoutedAttention(config, layer_idx=0).eval()
    x = torch.randn(2, 1200, 32)
    index = torch.stack([torch.randperm(1200)[:300].sort().values for _ in range(2)])
    op(x, context(config, x), selection_of(index, 1200, block=64))
    masked = [inside for has_mask, inside in calls if has_mask]
    assert len(masked) >= 2 and all(masked), calls
