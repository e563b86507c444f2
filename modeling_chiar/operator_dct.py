"""DCT spectral mixing: y = IDCT(DCT(x) * w) over the hidden axis, token by token."""

import torch
from torch import nn


class DCTMixing(nn.Module):
    """Orthonormal DCT-II, a learnable gain per frequency (initialised to ones), inverse DCT.

    Token-local: no state, causal by construction. With C the orthonormal DCT matrix the operator
    is y = x C^T diag(w) C, so it runs as one matmul with the (d x d) operator matrix, built once per
    call, instead of a transform, a gain and an inverse transform per token.
    """

    def __init__(self, hidden_size):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(hidden_size))

    def operator_matrix(self, dct):
        return (dct.T * self.gain.to(dct.dtype)) @ dct

    def forward(self, x, dct):
        """x: (..., d) token vectors; dct: the (d, d) orthonormal DCT-II matrix."""
        return x @ self.operator_matrix(dct.float()).to(x.dtype)
