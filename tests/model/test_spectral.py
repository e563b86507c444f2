import math

import numpy as np
import pytest
import torch

from modeling_chiar.spectral import dct_matrix, gaussian_entropy_quantiles, spectral_entropy


def reference_dct_ortho(x):
    """DCT-II with orthonormal scaling written out from its definition (independent of our matrix)."""
    n = x.shape[-1]
    out = np.zeros_like(x, dtype=np.float64)
    for k in range(n):
        scale = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
        out[..., k] = scale * sum(x[..., i] * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n))
    return out


@pytest.mark.parametrize("n", [8, 17, 64])
def test_dct_matches_independent_references(n):
    x = np.random.default_rng(n).standard_normal((5, n))
    ours = (torch.from_numpy(x) @ dct_matrix(n, dtype=torch.float64).T).numpy()
    np.testing.assert_allclose(ours, reference_dct_ortho(x), atol=1e-10)
    scipy_fft = pytest.importorskip("scipy.fft")
    np.testing.assert_allclose(ours, scipy_fft.dct(x, type=2, norm="ortho", axis=-1), atol=1e-10)


@pytest.mark.parametrize("n", [8, 256])
def test_dct_is_orthonormal_and_inverts(n):
    c = dct_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close((x @ c.T) @ c, x)  # IDCT(DCT(x)) = x, not 2x as in the paper's code


def test_entropy_extremes():
    n = 32
    c = dct_matrix(n)
    one_frequency = c[5]  # DCT of a basis row is a delta: all power in one coefficient
    assert spectral_entropy(one_frequency[None]).item() == pytest.approx(0.0, abs=1e-5)
    flat = torch.ones(n) @ c  # inverse DCT of a flat spectrum
    assert spectral_entropy(flat[None]).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(4, 64),
        torch.full((4, 64), 3e38),
        torch.randn(4, 64) * 1e30,
        torch.randn(4, 64) * 1e-30,
        torch.randn(4, 64).to(torch.bfloat16) * 1e4,
        torch.zeros(4, 64, dtype=torch.bfloat16),
        torch.randn(4, 64, dtype=torch.float16),
    ],
    ids=["zero", "max-fp32", "huge", "tiny", "bf16", "bf16-zero", "fp16"],
)
def test_entropy_is_finite_and_in_unit_interval(x):
    h = spectral_entropy(x)
    assert h.dtype == torch.float32
    assert torch.isfinite(h).all()
    assert ((h >= 0) & (h <= 1)).all()


def test_entropy_does_not_track_gradients():
    x = torch.zeros(2, 16, requires_grad=True)
    h = spectral_entropy(x)
    assert not h.requires_grad  # p log p has an infinite slope at p = 0: never differentiate it


def test_gaussian_quantiles_are_deterministic_and_reproduce_the_paper_band():
    a = gaussian_entropy_quantiles(256, [0.25, 0.75])
    b = gaussian_entropy_quantiles(256, [0.25, 0.75])
    assert torch.equal(a, b)
    # The paper's fixed thresholds (0.855 / 0.865 at d=256) sit in the Gaussian-input entropy band (spec note 7).
    assert 0.84 < a[0] < 0.87 and 0.85 < a[1] < 0.88
