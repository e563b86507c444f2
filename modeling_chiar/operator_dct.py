"""DCT spectral mixing: y = IDCT(DCT(x) * w) over the hidden axis, token by token."""

import torch
from torch import nn

from .flops import dct_mixing_flops
from .operators import OperatorOutput, masked


class DCTMixing(nn.Module):
    """Orthonormal DCT-II, a learnable gain per frequency (initialised to ones), inverse DCT.

    Token-local: no state, causal by construction. With C the orthonormal DCT matrix the operator
    is y = x C^T diag(w) C. For many tokens it runs as one matmul with the (d x d) operator matrix,
    built once per call; for fewer tokens than d, as in a decoding step, the transform, the gain and
    the inverse cost less (decoding speed in docs/benchmarks.md). It runs on every position: at 2 d^2
    FLOPs per token, gathering the routed rows costs more than it saves.
    """

    def __init__(self, config, layer_idx=None):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(config.hidden_size))

    def reset_from_config(self, config):
        from transformers import initialization

        initialization.ones_(self.gain)

    def operator_matrix(self, dct):
        return (dct.T * self.gain.to(dct.dtype)) @ dct

    def forward(self, x, ctx, selection):
        d = x.shape[-1]
        tokens = x.numel() // d
        if tokens < d:
            c = ctx.dct.to(x.dtype)
            y = ((x @ c.T) * self.gain.to(x.dtype)) @ c
        else:
            y = x @ self.operator_matrix(ctx.dct.float()).to(x.dtype)
        return OperatorOutput(masked(y, selection), dct_mixing_flops(tokens, d))
