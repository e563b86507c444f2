"""The orthonormal DCT-II over the hidden axis, and the spectral entropy that routing reads."""

import math

import torch


def dct_matrix(n, device=None, dtype=torch.float32):
    """Orthonormal DCT-II matrix C (n x n): `C @ x` equals scipy's `dct(x, type=2, norm="ortho")`.

    C is orthogonal, so the inverse transform is `C.T`. We apply it as a matmul rather than an FFT:
    at hidden sizes of a few hundred, one BLAS call beats the FFT's complex arithmetic on CPU and GPU.
    """
    k = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    i = torch.arange(n, device=device, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] = c[0] / math.sqrt(2.0)
    return c.to(dtype)


def spectral_entropy_from_coefficients(coefficients):
    """Normalised Shannon entropy of the DCT power spectrum, in [0, 1]; coefficients over the last axis.

    Computed in fp32 without gradient: p log p has an infinite slope at p = 0, and routing only needs
    the value. The zero vector (no spectrum) gets entropy 1, the maximum-uncertainty value, and huge
    inputs are rescaled before squaring so nothing overflows.
    """
    with torch.no_grad():
        tiny = torch.finfo(torch.float32).tiny
        # max |c| from two reductions, without a full-size |c| tensor
        high, low = coefficients.amax(dim=-1, keepdim=True), coefficients.amin(dim=-1, keepdim=True)
        scale = torch.maximum(high, low.neg()).float().clamp_min(tiny)
        # One new (..., d) tensor and one temporary, the rest in place: on CPU every fresh full-size
        # tensor is an allocation whose pages are faulted in on first touch.
        power = (coefficients.float() / scale).square_()
        total = power.sum(dim=-1)
        # H = -sum p log p with p = power / total, rewritten as log(total) - sum(power log power) / total:
        # fewer passes over (..., d). 0 log 0 = 0 through the clamp (0 * log(tiny)); a clamp and a log
        # run faster than xlogy on CPU.
        power_log_power = power.clamp_min(tiny).log_().mul_(power).sum(dim=-1)
        safe_total = total.clamp_min(tiny)
        entropy = (safe_total.log() - power_log_power / safe_total) / math.log(coefficients.shape[-1])
        return torch.where(total > 0, entropy, 1.0).clamp(0.0, 1.0)


def spectral_entropy(x, dct=None):
    """H(x) of docs/spec.md for hidden vectors x (..., d), in [0, 1] for every finite x; NaN
    where x holds NaN or infinity (no spectrum: it routes nowhere special, every comparison being
    false, and share control refuses to learn from it)."""
    if dct is None:
        dct = dct_matrix(x.shape[-1], device=x.device)
    with torch.no_grad():
        entropy = spectral_entropy_from_coefficients(x.float() @ dct.float().T)
        return torch.where(torch.isfinite(x).all(dim=-1), entropy, math.nan)


def gaussian_entropy_quantiles(hidden_size, quantiles, num_samples=8192, seed=0):
    """Quantiles of H for standard Gaussian vectors of width `hidden_size` (seeded, deterministic).

    The threshold router starts from these before it has seen any data: the paper's published
    thresholds are exactly such quantiles (spec, fidelity note 7).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, hidden_size, generator=generator)
    x = x - x.mean(dim=-1, keepdim=True)  # what a LayerNorm'd input looks like
    entropy = spectral_entropy(x)
    return torch.quantile(entropy, torch.tensor(quantiles, dtype=torch.float32))
