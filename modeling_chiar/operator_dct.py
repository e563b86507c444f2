"""DCT spectral mixing: y = IDCT(DCT(x) * w) over the hidden axis, token by token."""

import torch
from torch import nn

from .flops import linear_flops


class DCTMixing(nn.Module):
    """Orthonormal DCT-II, a learnable gain per frequency (initialised to ones), inverse DCT.

    Token-local: no state, causal by construction. With C the orthonormal DCT matrix the operator
    is y = x C^T diag(w) C. For many tokens it runs as one matmul with the (d x d) operator matrix,
    built once per call (2 d^3 FLOPs, then 2 d^2 per token); for fewer tokens than d, as in a
    decoding step, the transform, the gain and the inverse cost less (4 d^2 per token; decoding
    speed in docs/benchmarks.md).
    """

    def __init__(self, hidden_size):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(hidden_size))

    def operator_matrix(self, dct):
        return (dct.T * self.gain.to(dct.dtype)) @ dct

    def forward(self, x, dct):
        """x: (..., d) token vectors; dct: the (d, d) orthonormal DCT-II matrix.
        Returns (output, executed FLOPs)."""
        d = x.shape[-1]
        tokens = x.numel() // d
        if tokens < d:
            c = dct.to(x.dtype)
            return ((x @ c.T) * self.gain.to(x.dtype)) @ c, 2 * linear_flops(tokens, d, d)
        return x @ self.operator_matrix(dct.float()).to(x.dtype), linear_flops(d, d, d) + linear_flops(tokens, d, d)
