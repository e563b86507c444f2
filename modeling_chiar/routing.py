"""Routers: where each token of a routed layer is sent. This is the only place routing is decided.

Every router decides per token from that token's own hidden vector and spectral entropy, its
position, and the model's parameters or buffers: never from other tokens, other sequences or
future positions. Operators are indexed cheapest first (`config.routed_operators` order).
"""

from dataclasses import dataclass

import torch
from torch import nn

from .fp32_buffers import KeepsFP32Buffers
from .spectral import gaussian_entropy_quantiles


@dataclass
class RoutingDecision:
    operator_ids: torch.Tensor  # (B, T) long, index into the layer's operators
    weights: torch.Tensor | None = None  # (B, T, K) output weights: soft blend, or learned straight-through
    aux_loss: torch.Tensor | None = None  # scalar, learned router only


def cumulative_targets(config):
    """Entropy quantile levels that separate consecutive operators, e.g. [0.75] for 25% attention."""
    fractions = [config.router_target_fractions[op] for op in config.routed_operators]
    return [sum(fractions[: j + 1]) for j in range(len(fractions) - 1)]


def initial_thresholds(config):
    """Thresholds before any data: the fixed ones, or the Gaussian-input quantiles (spec)."""
    if config.router_thresholds is not None:
        return torch.tensor(config.router_thresholds, dtype=torch.float32)
    return gaussian_entropy_quantiles(config.hidden_size, cumulative_targets(config))


class ThresholdRouter(KeepsFP32Buffers):
    """Entropy bands: 2 operators: H > tau -> the second; 3: H < lo, lo <= H <= hi, H > hi (the paper's).

    Unless fixed by `router_thresholds`, thresholds are running quantiles of H over real tokens from
    batches already seen in training (like batch-norm statistics), frozen in eval, kept as buffers.
    Dropout shifts the entropy of training-mode hidden states, so there are two sets: `thresholds`,
    calibrated on dropout-free inputs and used in eval, and `train_thresholds`, calibrated on what
    training sees and used there. Both modes then route their target shares.

    Before the first attention layer a token's hidden vector depends on its id alone, so every "the"
    has the same entropy and a frequent token is a mass point that no threshold can split. Exact ties
    are broken by a fixed hash of the token's position, at a scale far below real entropy differences.
    """

    TIE_BREAK = 1e-5
    fp32_buffers = ("thresholds", "train_thresholds")

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.calibrate = config.router_thresholds is None
        self.momentum = config.router_calibration_momentum
        self.quantile_levels = cumulative_targets(config)
        start = initial_thresholds(config)
        self.thresholds = nn.Buffer(start)
        self.train_thresholds = nn.Buffer(start.clone())
        self.num_updates = nn.Buffer(torch.zeros((), dtype=torch.long))

    def score(self, entropy, positions):
        """The entropy, with exact ties broken by position (see the class docstring)."""
        if positions is None:
            return entropy
        return entropy + self.TIE_BREAK * position_hash(positions, self.layer_idx).to(entropy.device)

    def forward(self, x, entropy, positions, token_mask, thresholds=None):
        if thresholds is None:
            thresholds = self.train_thresholds if self.training else self.thresholds
        thresholds = thresholds.to(entropy.device)
        score = self.score(entropy, positions)
        if thresholds.numel() == 1:
            ids = (score > thresholds[0]).long()
        else:
            ids = (score >= thresholds[0]).long() + (score > thresholds[1]).long()
        return RoutingDecision(operator_ids=ids)

    @torch.no_grad()
    def update(self, train_score, train_mask, eval_score=None, eval_mask=None):
        """Move both threshold sets towards this batch's quantiles of `score` (a cumulative mean, then an EMA).

        Without dropout, eval sees what training sees: `eval_score=None` reuses the training quantiles.
        """
        if not self.calibrate:
            return
        train_quantiles = self._quantiles(train_score, train_mask)
        eval_quantiles = train_quantiles if eval_score is None else self._quantiles(eval_score, eval_mask)
        if train_quantiles is None or eval_quantiles is None:
            return  # no real token in this batch (or its eval slice)
        rate = max(1.0 / (int(self.num_updates) + 1), self.momentum)
        self.train_thresholds.lerp_(train_quantiles.to(self.train_thresholds.device), rate)
        self.thresholds.lerp_(eval_quantiles.to(self.thresholds.device), rate)
        self.num_updates += 1

    def _quantiles(self, score, mask):
        values = score.flatten() if mask is None else score[mask]
        if values.numel() == 0:
            return None
        return torch.quantile(values.float(), torch.tensor(self.quantile_levels, device=values.device))


class GateRouter(KeepsFP32Buffers):
    """A linear gate on [x, z(H)] where z standardises the entropy (learned and soft routers).

    The entropy column and the biases start where the threshold router starts (Gaussian quantiles),
    so a fresh gate routes like the paper and learning moves it from there. `hard=True` (learned):
    top-1 in the forward pass, the chosen operator's output scaled by p / p.detach() (1 in value) so
    the gate gets gradient; an auxiliary loss keeps the shares at their targets. `hard=False` (soft):
    a dense softmax blend of every operator (no compute saved; an ablation).
    """

    fp32_buffers = ("targets", "center", "scale")

    def __init__(self, config, layer_idx, hard):
        super().__init__()
        self.hard = hard
        num_ops = len(config.routed_operators)
        targets = torch.tensor([config.router_target_fractions[op] for op in config.routed_operators])
        self.targets = nn.Buffer(targets, persistent=False)
        self.weight = nn.Parameter(torch.zeros(num_ops, config.hidden_size))
        self.entropy_weight = nn.Parameter(torch.zeros(num_ops))
        self.bias = nn.Parameter(torch.zeros(num_ops))
        center, scale, slopes, biases = self.initial_gate(config)
        self.center = nn.Buffer(center, persistent=False)
        self.scale = nn.Buffer(scale, persistent=False)
        with torch.no_grad():
            self.entropy_weight.copy_(slopes)
            self.bias.copy_(biases)

    @staticmethod
    def initial_gate(config, sharpness=4.0):
        """Logits linear in z with slopes 0, s, 2s, ...: boundaries fall at the Gaussian quantiles."""
        levels = cumulative_targets(config)
        stats = gaussian_entropy_quantiles(config.hidden_size, [0.16, 0.5, 0.84] + levels)
        center, scale = stats[1], (stats[2] - stats[0]) / 2
        z_thresholds = (stats[3:] - center) / scale
        num_ops = len(config.routed_operators)
        slopes = sharpness * torch.arange(num_ops, dtype=torch.float32)
        biases = torch.zeros(num_ops)
        for k in range(1, num_ops):  # logit_k - logit_{k-1} = s (z - z_threshold_{k-1})
            biases[k] = biases[k - 1] - sharpness * z_thresholds[k - 1]
        return center, scale, slopes, biases

    def forward(self, x, entropy, positions, token_mask):
        z = (entropy - self.center) / self.scale
        logits = x.float() @ self.weight.float().T + z[..., None] * self.entropy_weight + self.bias
        probs = logits.softmax(dim=-1)
        ids = probs.argmax(dim=-1)
        if not self.hard:
            return RoutingDecision(operator_ids=ids, weights=probs)
        chosen = probs.gather(-1, ids[..., None])
        weights = torch.zeros_like(probs).scatter(-1, ids[..., None], chosen / chosen.detach())
        return RoutingDecision(operator_ids=ids, weights=weights, aux_loss=self.aux_loss(probs, ids, token_mask))

    def aux_loss(self, probs, ids, token_mask):
        """sum_k ((f_k - t_k) / t_k)^2 over the hard shares f, straight-through to the mean probabilities.

        Zero at the targets; its gradient grows with the deviation and reaches the tokens near a
        decision boundary (where p(1 - p) is large), which are the ones that can change side.
        """
        mask = torch.ones_like(ids, dtype=torch.bool) if token_mask is None else token_mask
        count = mask.sum().clamp_min(1)
        hard = (nn.functional.one_hot(ids, probs.shape[-1]).float() * mask[..., None]).sum(dim=(0, 1)) / count
        mean_probs = (probs * mask[..., None]).sum(dim=(0, 1)) / count
        shares = hard + mean_probs - mean_probs.detach()  # value: hard shares; gradient: through the gate
        return ((shares - self.targets) / self.targets).square().sum()


class RandomRouter(KeepsFP32Buffers):
    """The control: a fixed hash of (layer, position) sends each target share to its operator.

    Positions count real tokens only, so padding never changes where a token goes.
    """

    fp32_buffers = ("boundaries",)

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.boundaries = nn.Buffer(torch.tensor(cumulative_targets(config)), persistent=False)

    def forward(self, x, entropy, positions, token_mask):
        return RoutingDecision(operator_ids=torch.bucketize(position_hash(positions, self.layer_idx), self.boundaries))


def position_hash(positions, layer_idx):
    """Uniform-looking values in [0, 1) from (layer, position): murmur3's 32-bit finaliser, any device."""
    mask = 0xFFFFFFFF
    h = (positions.long() * 2654435761 + (layer_idx + 1) * 40503) & mask
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & mask
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & mask
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).float() / float(1 << 24)


def build_router(config, layer_idx):
    if config.router_type == "threshold":
        return ThresholdRouter(config, layer_idx)
    if config.router_type == "random":
        return RandomRouter(config, layer_idx)
    return GateRouter(config, layer_idx, hard=config.router_type == "learned")


class MetaRouter(nn.Module):
    """v2's gate on the first layer: g * layer(x) + (1 - g) * x, g = sigmoid(w . m + b).

    m is a per-sequence mean of the layer input over real tokens: the running mean of positions <= t
    in causal mode (v2 used the batch-and-sequence mean, which leaks the future), the whole
    sequence's mean when bidirectional.
    """

    def __init__(self, config):
        super().__init__()
        self.is_causal = config.is_causal
        self.weight = nn.Parameter(torch.zeros(config.hidden_size))
        self.bias = nn.Parameter(torch.full((), 2.0))

    def forward(self, layer_input, layer_output, token_mask, cache=None):
        """token_mask: (B, n) real tokens or None; cache: earlier positions' running sum and count."""
        x = layer_input.float()
        mask = torch.ones(x.shape[:2], device=x.device) if token_mask is None else token_mask.float()
        weighted = x * mask[..., None]
        if self.is_causal:
            total, count = weighted.cumsum(dim=1), mask.cumsum(dim=1)
            if cache is not None and cache.meta_sum is not None:
                total, count = total + cache.meta_sum[:, None], count + cache.meta_count[:, None]
            if cache is not None:
                cache.meta_sum, cache.meta_count = total[:, -1], count[:, -1]
            summary = total / count.clamp_min(1)[..., None]
        else:
            summary = weighted.sum(dim=1, keepdim=True) / mask.sum(dim=1).clamp_min(1)[:, None, None]
        gate = torch.sigmoid(summary @ self.weight.float() + self.bias)[..., None].to(layer_output.dtype)
        return gate * layer_output + (1 - gate) * layer_input
