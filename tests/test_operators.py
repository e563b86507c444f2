import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modeling_chiar.operator_attention import RotaryEmbedding, RoutedAttention, masked_sdpa_kernels, query_blocks
from modeling_chiar.operator_dct import DCTMixing
from modeling_chiar.operator_rbf import RBFMixing
from modeling_chiar.spectral import dct_matrix

from harness import tiny_config


def test_dct_mixing_is_identity_at_init_and_scales_frequencies():
    d = 16
    c = dct_matrix(d)
    op = DCTMixing(d)
    for tokens in (5, 40):  # fewer tokens than d: transform, gain, inverse; more: one operator matrix
        x = torch.randn(tokens, d)
        with torch.no_grad():
            op.gain.fill_(1.0)
        torch.testing.assert_close(op(x, c)[0], x, atol=1e-5, rtol=0)
        with torch.no_grad():
            op.gain.zero_()
            op.gain[0] = 1.0  # keep only the DC component: every output entry becomes the mean of x
        torch.testing.assert_close(op(x, c)[0], x.mean(-1, keepdim=True).expand_as(x), atol=1e-5, rtol=0)
        with torch.no_grad():
            op.gain.copy_(torch.rand(d))
        with FlopCounterMode(display=False) as counter:
            y, flops = op(x, c)
        torch.testing.assert_close(y, ((x @ c.T) * op.gain) @ c, atol=1e-5, rtol=0)
        assert flops == counter.get_total_flops()


def test_rbf_features_estimate_the_gaussian_kernel():
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
    op = RBFMixing(tiny_config(is_causal=causal), layer_idx=1)
    x = torch.randn(2, length, 32)
    out, flops = op(x)
    torch.testing.assert_close(out, reference_rbf(op, x, causal=causal), atol=1e-4, rtol=1e-4)
    # Only some tokens read from the state: their outputs are the same rows.
    index = torch.stack([torch.randperm(length)[: max(1, length // 3)].sort().values for _ in range(2)])
    subset, subset_flops = op(x, query_index=index)
    torch.testing.assert_close(subset, out.gather(1, index[..., None].expand(-1, -1, 32)), atol=1e-5, rtol=1e-5)
    assert subset_flops < flops


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
    op = RBFMixing(tiny_config(is_causal=causal), layer_idx=1)
    x = torch.randn(2, 70, 32, requires_grad=True)
    index = torch.stack([torch.randperm(70)[:25].sort().values for _ in range(2)])
    weights = torch.randn(2, 25, 32)
    expected = gradients_of(reference_rbf(op, x, causal=causal).gather(1, index[..., None].expand(-1, -1, 32)), weights, x, op)
    with FlopCounterMode(display=False) as counter:
        output, flops = op(x, query_index=index)
    assert flops == counter.get_total_flops()
    for a, e in zip(gradients_of(output, weights, x, op), expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_rbf_decoding_token_by_token_equals_the_full_pass_and_counts_its_flops():
    """One token per call with a cache (the decoding step's own path) gives the full pass's rows, also
    when some tokens only extend the state; its FLOPs are what torch's counter sees."""
    from modeling_chiar.cache import ChiarCache

    torch.manual_seed(0)
    op = RBFMixing(tiny_config(), layer_idx=1)
    x = torch.randn(2, 9, 32)
    full = reference_rbf(op, x)
    cache = ChiarCache(num_layers=2)
    for t in range(9):
        reads = t % 3 != 1  # every third token only adds its key (routed elsewhere)
        index = torch.zeros(2, 1 if reads else 0, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            out, flops = op(x[:, t : t + 1], query_index=index, cache=cache)
        assert flops == counter.get_total_flops()
        if reads:
            torch.testing.assert_close(out, full[:, t : t + 1], atol=1e-5, rtol=1e-5)
        else:
            assert out.shape == (2, 0, 32)


def test_rbf_excludes_padding_keys():
    torch.manual_seed(0)
    op = RBFMixing(tiny_config(), layer_idx=0)
    x = torch.randn(1, 12, 32)
    key_mask = torch.ones(1, 12, dtype=torch.bool)
    key_mask[0, :4] = False  # left padding
    out, _ = op(x, key_mask=key_mask)
    torch.testing.assert_close(out[:, 4:], reference_rbf(op, x, key_mask)[:, 4:], atol=1e-5, rtol=1e-5)
    alone, _ = op(x[:, 4:])
    torch.testing.assert_close(out[:, 4:], alone, atol=1e-5, rtol=1e-5)


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
    rope = RotaryEmbedding(config.head_dim, config.rope_theta)(torch.arange(length).expand(2, length), x.dtype)
    dense = dense_reference_attention(op, x, rope, causal)
    everything, _, _ = op(x, rope)
    torch.testing.assert_close(everything, dense, atol=1e-5, rtol=1e-5)
    index = torch.stack([torch.randperm(length)[: max(1, length // 4)].sort().values for _ in range(2)])
    selected, _, _ = op(x, rope, query_index=index)
    torch.testing.assert_close(selected, dense.gather(1, index[..., None].expand(-1, -1, 32)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("queries", [75, 300])
def test_attention_on_selected_queries_has_the_dense_gradient(implementation, causal, queries):
    """One query block, or several each seeing a prefix of the keys: gradients equal dense attention's."""
    torch.manual_seed(0)
    config = tiny_config(is_causal=causal)
    config._attn_implementation = implementation
    op = RoutedAttention(config, layer_idx=0).eval()
    length = 1200
    assert len(query_blocks(queries)) == (1 if queries <= 256 else 2)
    x = torch.randn(2, length, 32, requires_grad=True)
    rope = RotaryEmbedding(config.head_dim, config.rope_theta)(torch.arange(length).expand(2, length), x.dtype)
    index = torch.stack([torch.randperm(length)[:queries].sort().values for _ in range(2)])
    weights = torch.randn(2, queries, 32)
    expected = gradients_of(dense_reference_attention(op, x, rope, causal).gather(1, index[..., None].expand(-1, -1, 32)), weights, x, op)
    actual = gradients_of(op(x, rope, query_index=index)[0], weights, x, op)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_queries, block", [(0, 256), (1, 256), (256, 256), (257, 256), (1000, 256), (10, 3)])
def test_query_blocks_are_equal_contiguous_and_bounded(num_queries, block):
    blocks = query_blocks(num_queries, block=block)
    assert [index for start, end in blocks for index in range(start, end)] == list(range(num_queries))
    sizes = [end - start for start, end in blocks]
    assert all(size <= block for size in sizes) and len(set(sizes[:-1])) <= 1  # equal but for a shorter last one
    assert len(blocks) == -(-num_queries // block)  # as few blocks as the bound allows


def test_query_blocks_name_a_block_size_below_one():
    with pytest.raises(ValueError, match="block size of 0"):
        query_blocks(10, block=0)


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
    rope = RotaryEmbedding(config.head_dim, config.rope_theta)(torch.arange(1200).expand(2, 1200), x.dtype)
    op(x, rope, query_index=torch.stack([torch.randperm(1200)[:300].sort().values for _ in range(2)]))
    masked = [inside for has_mask, inside in calls if has_mask]
    assert len(masked) >= 2 and all(masked), calls
