"""Buffers that must stay float32 when the model is cast to bf16 / fp16."""

import torch
from torch import nn


class KeepsFP32Buffers(nn.Module):
    """Buffers named in `fp32_buffers` survive `.to(dtype)`, `.half()` and `.bfloat16()` as float32.

    Routing compares entropies that differ in the third or fourth decimal, below bf16's resolution
    (0.78 and 0.7813 are one bf16 step apart), and the DCT basis and random features feed fp32 maths.
    """

    fp32_buffers = ()

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in self.fp32_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if old.dtype == torch.float32 and new.dtype != torch.float32:
                self._buffers[name] = new.float() if old.is_meta or new.is_meta else old.to(new.device)
        return self
