"""DCT spectral mixing: y = IDCT(DCT(x) * w) over the hidden axis, token by token."""

import torch
from torch import nn


class DCTMixing(nn.Module):
    """Orthonormal DCT-II, a learnable gain per frequency (initialised to ones), inverse DCT.

    Token-local: no state, causal by construction. The routed layer already has every token's DCT
    coefficients (it needs them for the entropy), so `forward` takes coefficients, not hidden states.
    """

    def __init__(self, hidden_size):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(hidden_size))

    def forward(self, coefficients, dct):
        # coefficients: (N, d) = x @ C.T; inverse of the orthonormal C is C.T, so y = (c * w) @ C.
        return (coefficients * self.gain.to(coefficients.dtype)) @ dct.to(coefficients.dtype)
