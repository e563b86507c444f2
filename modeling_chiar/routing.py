"""Routing: where each token of a routed layer goes. The only place routing is decided.

Three parts, applied in this order by `route()`:
- a *router* asks for one operator per token, from that token's own hidden vector and spectral
  entropy, its position, and the model's parameters or buffers: never from other tokens, other
  sequences or future positions (`ThresholdRouter`, `GateRouter`, `RandomRouter`);
- the *budget* grants the asks: every routed operator but the cheapest has a fixed number of query
  slots per block of real-token positions, filled in position order; a token that finds its block
  full takes the cheapest operator (overflow). Slots, and so every shape, depend only on (batch,
  length) and the config;
- *share control* keeps the asks near their targets: after each training pass (`observe`), running
  quantiles for the threshold router and, with `router_share_control="bias"`, a per-layer bias on the
  learned gate moved against the share error (no gradient); or the learned router's auxiliary loss
  (`router_share_control="aux_loss"`).
Operators are indexed cheapest first (`config.routed_operators` order). Nothing here reads a tensor
back to the host. Every router is called as `router(x, entropy, positions, token_mask, state, training)`
and returns a `RoutingDecision`; `state` is what it routes with in this pass (`snapshot`: thresholds,
share bias; None: its buffers for `training`), `training` the pass's mode (the eval-calibration pass
runs a training model in eval mode).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from .fp32_buffers import KeepsFP32Buffers
from .spectral import gaussian_entropy_quantiles

MAX_CALL_QUERIES = 256  # query slots per attention kernel call (see `QuerySlots`)


@dataclass
class RoutingDecision:
    """What a router asks for."""

    operator_ids: torch.Tensor  # (B, n) long, index into the layer's operators
    probs: torch.Tensor | None = None  # (B, n, K) gate probabilities (learned and soft routers)
    aux_loss: torch.Tensor | None = None  # scalar, learned router only
    score: torch.Tensor | None = None  # (B, n) the exploring gate's ranking score, detached (its eval cut calibrates on it)
    logits: torch.Tensor | None = None  # (B, n, K) a balancing gate's choice logits before its share bias (centred, ties split), detached (`settle`)


@dataclass
class QuerySlots:
    """Fixed query slots of one operator: `index` (B, M) names the token in each slot (position order),
    `valid` (B, M) marks the slots a granted token holds (the others hold token 0 and are discarded).

    Slots come in groups of `per_group`, one group per budget block the input touches; the tokens of
    group g lie before chunk index (g + 1) * block. `calls` splits the slots into runs of whole
    groups, (first slot, end slot, chunk keys its queries can see), so a causal kernel call never
    computes keys after its last query's block.
    """

    index: torch.Tensor
    valid: torch.Tensor
    calls: tuple


@dataclass
class Selection:
    """The tokens one operator serves in one pass, and how its output is weighted.

    mask: (B, n) bool, tokens that take the operator (None: every token); slots: the operator's
    query slots when it is budgeted (None: it runs on every position); weight: (B, n, 1) scale of its
    output (soft blend or the learned router's straight-through factor), None for 1.
    """

    mask: torch.Tensor | None = None
    slots: QuerySlots | None = None
    weight: torch.Tensor | None = None


EVERY_TOKEN = Selection()


@dataclass
class RoutedTokens:
    """`route()`'s result: the selections the operators receive and what the routing record reports."""

    selections: list  # one `Selection` per operator
    operator_ids: torch.Tensor  # (B, n) the operator each token ran
    requested_ids: torch.Tensor  # (B, n) the operator each token asked for
    aux_loss: torch.Tensor | None
    budget_state: torch.Tensor | None  # (B, K) asks so far in each row's current block (decoding cache)
    score: torch.Tensor | None = None  # the router's ranking score (`RoutingDecision.score`)
    logits: torch.Tensor | None = None  # a balancing gate's choice logits (`RoutingDecision.logits`)


# ----------------------------------------------------------------------------------------------
# routers


def cumulative_targets(config):
    """Entropy quantile levels that separate consecutive operators, e.g. [0.75] for 25% attention."""
    fractions = [config.router_target_fractions[op] for op in config.routed_operators]
    return [sum(fractions[: j + 1]) for j in range(len(fractions) - 1)]


def initial_thresholds(config):
    """Thresholds before any data: the fixed ones, or the Gaussian-input quantiles (spec)."""
    if config.router_thresholds is not None:
        return torch.tensor(config.router_thresholds, dtype=torch.float32)
    return gaussian_entropy_quantiles(config.hidden_size, cumulative_targets(config))


def update_rate(num_updates, momentum, found):
    """The running statistics' step: a cumulative mean for the first 1 / momentum updates, then an EMA
    at `momentum`; 0 where `found` is False (nothing to learn from this batch)."""
    return (1.0 / (num_updates + 1).float()).clamp_min(momentum) * found


TIE_BREAK = 1e-5  # far below real score differences (entropies, gate probabilities)


def break_ties(score, positions, layer_idx):
    """`score` plus a fixed hash of (layer, position) at the scale TIE_BREAK: a score that ranks
    tokens against a calibrated cut. Before the first attention layer a token's hidden vector depends
    on its id alone, so every "the" scores the same and a frequent token is a mass point that no cut
    can split: the share a cut gives would jump by that token's frequency. Split by position, a mass
    point's tokens fall on both sides of the cut in the share the cut asks for."""
    if positions is None:
        return score
    return score + TIE_BREAK * position_hash(positions, layer_idx).to(score.device)


DRIFT_RATE = 0.1  # a share bias's integral step, relative to its proportional one (`GateRouter.balance_shares`)
LOGIT_TIE_BREAK = 1e-3  # a thousandth of a logit: no preference of a gate's, yet resolved in float32 beside biases of 10s


def break_logit_ties(logits, positions, layer_idx):
    """`break_ties` for an argmax over (..., K) logits: each token's logits less their maximum (the same
    argmax, whatever a bias adds), operator k's then gaining k x the position hash at the scale
    LOGIT_TIE_BREAK. Centred, the hash is added beside the logit differences and the bias that cuts them
    rather than beside a large common offset, where float32 would round it away."""
    if positions is None:
        return logits
    ranks = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
    centred = logits - logits.amax(dim=-1, keepdim=True)
    return centred + LOGIT_TIE_BREAK * position_hash(positions, layer_idx).to(logits.device)[..., None] * ranks


class ThresholdRouter(KeepsFP32Buffers):
    """Entropy bands: 2 operators: H > tau -> the second; 3: H < lo, lo <= H <= hi, H > hi (the paper's).

    Unless fixed by `router_thresholds`, thresholds are running quantiles of H over real tokens from
    batches already seen in training (like batch-norm statistics), frozen in eval, kept as buffers.
    Dropout shifts the entropy of training-mode hidden states, so there are two sets: `thresholds`,
    calibrated on dropout-free inputs and used in eval, and `train_thresholds`, calibrated on what
    training sees and used there. Both modes then route their target shares.

    Exact ties of the entropy (mass points: every "the" before the first attention layer) are broken
    by position (`break_ties`).
    """

    fp32_buffers = ("thresholds", "train_thresholds")

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.calibrate = config.router_thresholds is None
        self.running_statistics = ("thresholds", "train_thresholds", "num_updates") if self.calibrate else ()
        self.momentum = config.router_calibration_momentum
        self.quantile_levels = cumulative_targets(config)
        start = initial_thresholds(config)
        self.thresholds = nn.Buffer(start)
        self.train_thresholds = nn.Buffer(start.clone())
        self.num_updates = nn.Buffer(torch.zeros((), dtype=torch.long))
        # Batches whose update was refused because a real token's input was NaN or infinite (read and
        # reported outside the forward pass: ChiarModel.report_skipped_updates).
        self.skipped_updates = nn.Buffer(torch.zeros((), dtype=torch.long), persistent=False)

    def reset_from_config(self, config):
        init = _init_functions()
        start = initial_thresholds(config).to(self.thresholds.device)
        init.copy_(self.thresholds, start)
        init.copy_(self.train_thresholds, start)
        init.zeros_(self.num_updates)
        init.zeros_(self.skipped_updates)

    def score(self, entropy, positions):
        """The entropy, with exact ties broken by position."""
        return break_ties(entropy, positions, self.layer_idx)

    def routing_state(self, training):
        """The thresholds a pass in this mode routes with."""
        return self.train_thresholds if training else self.thresholds

    def forward(self, x, entropy, positions, token_mask, state=None, training=None):
        training = self.training if training is None else training
        thresholds = (self.routing_state(training) if state is None else state).to(entropy.device)
        score = self.score(entropy, positions)
        if thresholds.numel() == 1:
            ids = (score > thresholds[0]).long()
        else:
            ids = (score >= thresholds[0]).long() + (score > thresholds[1]).long()
        return RoutingDecision(operator_ids=ids)

    @torch.no_grad()
    def observe(self, train_score, train_mask, eval_score=None, eval_mask=None):
        """Move both threshold sets towards this batch's quantiles of `score` (a cumulative mean, then an EMA).

        Without dropout, eval sees what training sees: `eval_score=None` reuses the training quantiles.
        A batch without a real token leaves the thresholds as they were; so does a batch in which a real
        token's score is NaN (its input was not finite), which is counted in `skipped_updates`.
        """
        if not self.calibrate:
            return
        finite = ~_nan_at(train_score, train_mask)
        if eval_score is not None:
            finite = finite & ~_nan_at(eval_score, eval_mask)
        train_quantiles, train_found = masked_quantiles(train_score, train_mask, self.quantile_levels)
        if eval_score is None:
            eval_quantiles, eval_found = train_quantiles, train_found
        else:
            eval_quantiles, eval_found = masked_quantiles(eval_score, eval_mask, self.quantile_levels)
        found = train_found & eval_found & finite
        rate = update_rate(self.num_updates, self.momentum, found)
        self.train_thresholds.lerp_(torch.where(found, train_quantiles, self.train_thresholds), rate)
        self.thresholds.lerp_(torch.where(found, eval_quantiles, self.thresholds), rate)
        self.num_updates.add_(found.long())
        self.skipped_updates.add_((~finite).long())

    @torch.no_grad()
    def settle(self, score, mask):
        """Set the eval thresholds to the quantiles of `score` where `mask` (`routing.settle`)."""
        quantiles, found = masked_quantiles(score, mask, self.quantile_levels)
        self.thresholds.copy_(torch.where(found, quantiles, self.thresholds))


def _nan_at(score, mask):
    """Whether any counted entry of `score` is NaN (0-dim bool)."""
    nan = torch.isnan(score)
    return (nan if mask is None else nan & mask).any()


def masked_quantiles(values, mask, levels):
    """torch.quantile's linear-interpolation quantiles of `values` where `mask` (None: everywhere), at
    fixed shapes: masked-out entries sort last and the index is computed on the device.

    Returns (quantiles (L,), whether any entry counted (0-dim bool)).
    """
    values = values.float().flatten()
    if mask is None:
        count = torch.full((), values.numel(), device=values.device)
    else:
        mask = mask.flatten()
        values = torch.where(mask, values, math.inf)
        count = mask.sum()
    ordered = values.sort().values
    last = (count - 1).clamp_min(0)
    position = torch.tensor(levels, device=values.device) * last
    low = position.floor().long()
    high = (low + 1).clamp_max(last)
    quantiles = torch.lerp(ordered.gather(0, low), ordered.gather(0, high), position - low)
    return torch.where(count > 0, quantiles, 0.0), count > 0


def operator_counts(ids, mask, num_ops):
    """(num_ops,) float: how many of the tokens where `mask` (None: all) chose each operator; on the
    device, at fixed shapes (one_hot would read the ids back to size its output)."""
    chosen = ids[..., None] == torch.arange(num_ops, device=ids.device)
    if mask is not None:
        chosen = chosen & mask[..., None]
    return chosen.sum(dim=tuple(range(ids.dim()))).float()


def share_error(ids, mask, targets):
    """(target - share) / target for each operator, its share counted over the tokens where `mask`
    (None: all), and whether any token counted (0-dim bool)."""
    count = operator_counts(ids, mask, targets.numel())
    total = count.sum()
    targets = targets.to(count.device)
    return (targets - count / total.clamp_min(1)) / targets, total > 0


def balancing_bias(logits, mask, targets, start, steps=400, first_rate=1.0, last_rate=1e-7):
    """The bias b at which argmax(logits + b) gives each operator its target share of the rows of `logits`
    (N, K) where `mask` (N,): the proportional part of `balance_shares`'s step (fixed logits have no drift
    to follow), iterated from `start` with a step that shrinks geometrically from `first_rate` to
    `last_rate`, so it settles inside the gap between two tokens' logits rather than jumping across it;
    `start` where no row is masked in."""
    bias = start.clone().float()
    decay = (last_rate / first_rate) ** (1.0 / steps)
    for step in range(steps):
        error, found = share_error((logits + bias).argmax(dim=-1), mask, targets)
        bias += first_rate * decay**step * error * found  # no token: `start` stays
    return bias


class GateRouter(KeepsFP32Buffers):
    """A linear gate on [x, z(H)] where z standardises the entropy (learned and soft routers).

    The entropy column and the biases start where the threshold router starts (Gaussian quantiles),
    so a fresh gate routes like the paper and learning moves it from there. `hard=True` (learned):
    top-1 in the forward pass, the executed operator's output scaled by p / p.detach() (1 in value,
    `route()`) so the gate gets gradient. Share control (`router_share_control`): an auxiliary loss
    (`"aux_loss"`), or (`"bias"`) a per-operator bias added to the logits (for the choice and the
    straight-through gradient; none reaches the bias), moved after each training pass by `bias_rate`
    x (target - share) / target plus a drift that sums that error (`balance_shares`; the
    auxiliary-loss-free balancing of DeepSeek-V3, proportional-integral where theirs takes the sign:
    the sign settles where the median batch hits the target, which with small batches is off the
    mean): no gradient, so it cannot outweigh the task's. Like the threshold router it keeps two sets, `train_share_bias` for
    what training sees (dropout on) and `share_bias` for eval, moved by a dropout-free pass's shares.
    `hard=False` (soft): a dense softmax blend of every operator (no compute saved; an ablation).
    With `router_explore` (learned only) training draws each token's operator from the gate, which
    starts at the target shares for every token, so every operator's effect reaches the gate; eval
    ranks tokens by the gate's expected operator index (for two operators, p(attention)), ties split
    by position (`break_ties`), and cuts the ranking at running quantiles calibrated on training
    batches (`eval_thresholds`, as the threshold router does with the entropy), so the eval shares
    are the targets and the tokens the gate ranks highest get the costlier operators.
    """

    fp32_buffers = ("targets", "center", "scale", "eval_thresholds", "train_share_bias", "train_share_drift", "share_bias", "share_drift")

    def __init__(self, config, layer_idx, hard):
        super().__init__()
        self.layer_idx = layer_idx
        self.hard = hard
        self.explore = hard and config.router_explore
        self.balance = hard and config.router_share_control == "bias"
        num_ops = len(config.routed_operators)
        statistics = []
        if self.explore:
            self.quantile_levels = cumulative_targets(config)
            self.momentum = config.router_calibration_momentum
            self.eval_thresholds = nn.Buffer(self.flat_score(config).repeat(num_ops - 1))
            self.num_updates = nn.Buffer(torch.zeros((), dtype=torch.long))
            statistics += ["eval_thresholds", "num_updates"]
        if self.balance:
            self.bias_rate = config.router_bias_rate
            self.train_share_bias = nn.Buffer(torch.zeros(num_ops))
            self.train_share_drift = nn.Buffer(torch.zeros(num_ops))
            statistics += ["train_share_bias", "train_share_drift"]
            if not self.explore:  # an exploring gate's eval cuts at its calibrated quantiles instead
                self.share_bias = nn.Buffer(torch.zeros(num_ops))
                self.share_drift = nn.Buffer(torch.zeros(num_ops))
                statistics += ["share_bias", "share_drift"]
        if statistics:
            self.skipped_updates = nn.Buffer(torch.zeros((), dtype=torch.long), persistent=False)
        self.running_statistics = tuple(statistics)
        self.targets = nn.Buffer(target_fractions(config), persistent=False)
        self.weight = nn.Parameter(torch.zeros(num_ops, config.hidden_size))
        self.entropy_weight = nn.Parameter(torch.zeros(num_ops))
        self.bias = nn.Parameter(torch.zeros(num_ops))
        center, scale, slopes, biases = self.initial_gate(config)
        self.center = nn.Buffer(center, persistent=False)
        self.scale = nn.Buffer(scale, persistent=False)
        with torch.no_grad():
            self.entropy_weight.copy_(slopes)
            self.bias.copy_(biases)

    def reset_from_config(self, config):
        init = _init_functions()
        center, scale, slopes, biases = self.initial_gate(config)
        init.normal_(self.weight, mean=0.0, std=config.initializer_range)
        init.copy_(self.entropy_weight, slopes)
        init.copy_(self.bias, biases)
        init.copy_(self.center, center)
        init.copy_(self.scale, scale)
        init.copy_(self.targets, target_fractions(config))
        if self.explore:
            init.copy_(self.eval_thresholds, self.flat_score(config).repeat(len(config.routed_operators) - 1).to(self.bias.device))
            init.zeros_(self.num_updates)
        for name in ("train_share_bias", "train_share_drift", "share_bias", "share_drift", "skipped_updates"):
            if hasattr(self, name):
                init.zeros_(getattr(self, name))

    @staticmethod
    def flat_score(config):
        """The score every token has under the flat initial gate (the expected operator index at the targets)."""
        targets = target_fractions(config)
        return (targets * torch.arange(len(targets), dtype=torch.float32)).sum().reshape(1)

    @staticmethod
    def initial_gate(config, sharpness=4.0):
        """Logits linear in z with slopes 0, s, 2s, ...: boundaries fall at the Gaussian quantiles.
        Exploring, flat logits at log(target): every token starts with the target shares."""
        levels = cumulative_targets(config)
        stats = gaussian_entropy_quantiles(config.hidden_size, [0.16, 0.5, 0.84] + levels)
        center, scale = stats[1], (stats[2] - stats[0]) / 2
        z_thresholds = (stats[3:] - center) / scale
        num_ops = len(config.routed_operators)
        if config.router_type == "learned" and config.router_explore:
            return center, scale, torch.zeros(num_ops), target_fractions(config).log()
        slopes = sharpness * torch.arange(num_ops, dtype=torch.float32)
        biases = torch.zeros(num_ops)
        for k in range(1, num_ops):  # logit_k - logit_{k-1} = s (z - z_threshold_{k-1})
            biases[k] = biases[k - 1] - sharpness * z_thresholds[k - 1]
        return center, scale, slopes, biases

    def routing_state(self, training):
        """The share bias a pass in this mode chooses with (None: no bias). An exploring gate ranks with
        its training bias in eval too: the bias holds the drawn shares, so the distribution of the
        biased score, which its eval cut is calibrated on, stays put while the gate learns (unbiased, it
        drifts faster than a running quantile follows)."""
        if not self.balance:
            return None
        return self.train_share_bias if training or self.explore else self.share_bias

    def forward(self, x, entropy, positions, token_mask, state=None, training=None):
        training = self.training if training is None else training
        z = (entropy - self.center) / self.scale
        logits = x.float() @ self.weight.float().T + z[..., None] * self.entropy_weight + self.bias
        bias = self.routing_state(training) if state is None else state
        # With a share bias the straight-through gradient is taken at the biased gate, the one that chooses:
        # unbiased, the task's pull on every token's attention logit (which the bias offsets) saturates the
        # gate, and its gradient p(1 - p) vanishes while the logits and the bias run away together.
        probs = (logits if bias is None else logits + bias.to(logits.device)).softmax(dim=-1)
        choice, unbiased, score = logits.detach(), None, None
        if self.balance and not self.explore:  # ties split by position, so that a bias can cut a mass point
            choice = unbiased = break_logit_ties(choice, positions, self.layer_idx)
        if bias is not None:
            choice = choice + bias.to(logits.device)  # no gradient reaches the bias
        if not self.explore:
            ids = choice.argmax(dim=-1)
        else:
            # the ranking (of the biased gate when balancing); ties split by position, as the cut needs
            score = break_ties(self.score(choice.softmax(dim=-1)), positions, self.layer_idx)
            if training:  # Gumbel-max: a draw from softmax(choice), token by token
                noise = torch.rand_like(logits).clamp_(1e-12, 1.0 - 1e-7)
                ids = (choice - (-noise.log()).log()).argmax(dim=-1)
            else:  # the ranking, cut at the calibrated quantiles
                bands = self.eval_thresholds.to(probs.device)
                ids = (score > bands[0]).long() if bands.numel() == 1 else (score >= bands[0]).long() + (score > bands[1]).long()
        aux_loss = self.aux_loss(probs, ids, token_mask) if self.hard and not self.balance else None
        return RoutingDecision(operator_ids=ids, probs=probs, aux_loss=aux_loss, score=score, logits=unbiased)

    @torch.no_grad()
    def balance_shares(self, train_ids, train_mask, entropy, eval_ids=None, eval_mask=None, eval_entropy=None):
        """Move each share bias against e = (target - share) / target of this batch's asks (real tokens):
        `train_share_bias` from the training pass, `share_bias` from the dropout-free pass when one was
        made (else from the training pass). A batch without a real token, or with a NaN entropy (its
        input was not finite), leaves them, and is counted in `skipped_updates`.

        A bias moves by `bias_rate` x e plus its drift, which sums e at DRIFT_RATE x `bias_rate` (a
        proportional-integral step). The task's gradient moves the gate's logits steadily, for most
        tokens alike; a bias moved by e alone trails such a ramp by a share error that does not vanish
        (0.30-0.37 asked for a 0.25 target in one WikiText-2 epoch, bias_rate 0.2: docs/benchmarks.md),
        and the drift learns the ramp's slope."""
        finite = ~_nan_at(entropy, train_mask)
        if eval_ids is not None:
            finite = finite & ~_nan_at(eval_entropy, eval_mask)
        train_error, train_found = share_error(train_ids, train_mask, self.targets)
        self._step(self.train_share_bias, self.train_share_drift, train_error, train_found & finite)
        if hasattr(self, "share_bias"):
            eval_error, eval_found = (train_error, train_found) if eval_ids is None else share_error(eval_ids, eval_mask, self.targets)
            self._step(self.share_bias, self.share_drift, eval_error, eval_found & finite)
        self.skipped_updates.add_((~finite).long())

    def _step(self, bias, drift, error, moved):
        drift.add_(DRIFT_RATE * self.bias_rate * error * moved)
        bias.add_((self.bias_rate * error + drift) * moved)

    @staticmethod
    def score(probs):
        """The expected operator index under the gate, detached: for two operators p(attention)."""
        return (probs.detach() * torch.arange(probs.shape[-1], device=probs.device)).sum(-1)

    @torch.no_grad()
    def calibrate(self, score, token_mask):
        """Move `eval_thresholds` towards this batch's quantiles of the score (a cumulative mean, then an
        EMA): after a training pass (`routing.observe`), on the dropout-free pass's scores when dropout is
        on, since eval ranks dropout-free scores; a batch without a real token or with a NaN score leaves
        them."""
        found = masked_quantiles(score, token_mask, self.quantile_levels)
        quantiles, found = found[0], found[1] & ~_nan_at(score, token_mask)
        rate = update_rate(self.num_updates, self.momentum, found)
        self.eval_thresholds.lerp_(torch.where(found, quantiles, self.eval_thresholds), rate)
        self.num_updates.add_(found.long())

    @torch.no_grad()
    def settle(self, score, mask, logits):
        """Set what eval routes with from eval-mode passes on fixed weights (`routing.settle`): an exploring
        gate's cut to the quantiles of its ranking `score`, a plain balancing gate's `share_bias` to the bias
        at which the argmax of its `logits` gives the target shares."""
        if self.explore:
            quantiles, found = masked_quantiles(score, mask, self.quantile_levels)
            self.eval_thresholds.copy_(torch.where(found, quantiles, self.eval_thresholds))
        elif self.balance:
            self.share_bias.copy_(balancing_bias(logits, mask, self.targets, self.share_bias))

    def aux_loss(self, probs, ids, token_mask):
        """sum_k ((f_k - t_k) / t_k)^2 over the hard shares f, straight-through to the mean probabilities.

        Zero at the targets; its gradient grows with the deviation and reaches the tokens near a
        decision boundary (where p(1 - p) is large), which are the ones that can change side.
        """
        mask = torch.ones_like(ids, dtype=torch.bool) if token_mask is None else token_mask
        count = mask.sum().clamp_min(1)
        hard = operator_counts(ids, mask, probs.shape[-1]) / count
        mean_probs = (probs * mask[..., None]).sum(dim=(0, 1)) / count
        shares = hard + mean_probs - mean_probs.detach()  # value: hard shares; gradient: through the gate
        return ((shares - self.targets) / self.targets).square().sum()


class RandomRouter(KeepsFP32Buffers):
    """The control: a fixed hash of (layer, position) sends each target share to its operator.

    The hash orders the positions of each budget block (`block_rank`), and the target shares of that
    order go to their operators: every whole block gets its share to the token (a hash read as a
    uniform draw gave 0.22-0.27 of a 0.25 target per layer at block 128), so the control runs at the
    share the routers it is compared with are held to. Positions count real tokens only, so padding
    never changes where a token goes.
    """

    fp32_buffers = ("boundaries",)

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.block = config.router_block_size
        self.boundaries = nn.Buffer(torch.tensor(cumulative_targets(config)), persistent=False)

    def reset_from_config(self, config):
        _init_functions().copy_(self.boundaries, torch.tensor(cumulative_targets(config)))

    def routing_state(self, training):
        return None

    def forward(self, x, entropy, positions, token_mask, state=None, training=None):
        return RoutingDecision(operator_ids=torch.bucketize(block_rank(positions, self.layer_idx, self.block), self.boundaries))


def block_rank(positions, layer_idx, block):
    """(rank + 0.5) / block, the rank of each position's hash among the hashes of its block's
    `block` positions (ties by position): a fixed permutation of every block, read as evenly spaced
    values in (0, 1). A function of (layer, position) alone, so causal, and (..., block) in size."""
    positions = positions.long()
    others = positions - positions % block
    others = others.unsqueeze(-1) + torch.arange(block, device=positions.device)
    own, theirs = position_hash(positions, layer_idx).unsqueeze(-1), position_hash(others, layer_idx)
    before = (theirs < own) | ((theirs == own) & (others < positions.unsqueeze(-1)))
    return (before.sum(-1).float() + 0.5) / block


def position_hash(positions, layer_idx):
    """Uniform-looking values in [0, 1) from (layer, position): murmur3's 32-bit finaliser, any device."""
    mask = 0xFFFFFFFF
    h = (positions.long() * 2654435761 + (layer_idx + 1) * 40503) & mask
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & mask
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & mask
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).float() / float(1 << 24)


def target_fractions(config):
    return torch.tensor([config.router_target_fractions[op] for op in config.routed_operators])


def build_router(config, layer_idx):
    if config.router_type == "threshold":
        return ThresholdRouter(config, layer_idx)
    if config.router_type == "random":
        return RandomRouter(config, layer_idx)
    return GateRouter(config, layer_idx, hard=config.router_type == "learned")


def needs_entropy(router):
    """Whether a router reads the spectral entropy (the mixer computes it only then, or for reports)."""
    return isinstance(router, (ThresholdRouter, GateRouter))


def is_dense(router):
    """A soft router blends every operator on every token: no selection, no budget."""
    return isinstance(router, GateRouter) and not router.hard


def has_gate(router):
    """Whether a router runs a learned gate over the hidden vector (its FLOPs count: flops.gate_flops)."""
    return isinstance(router, GateRouter)


def reported_thresholds(router):
    """The thresholds a routing record shows: the threshold router's eval thresholds, else None."""
    return router.thresholds.detach().clone() if isinstance(router, ThresholdRouter) else None


@torch.no_grad()
def reconcile_loaded_thresholds(routers, config, thresholds_given, checkpoint_targets):
    """After a checkpoint loads, make its threshold buffers agree with the config they run under.

    - Fixed thresholds (`config.router_thresholds`) that differ from the loaded buffers: the caller's
      values win when given to `from_pretrained` (`thresholds_given`); a checkpoint whose own
      config.json and buffers disagree is refused.
    - Target fractions changed at load (`checkpoint_targets`: the checkpoint's own, when they differ):
      calibrated thresholds route the old shares, so they restart from the Gaussian quantiles of the
      new targets and recalibrate in training. Returns what was changed, for the log.
    """
    changes = []
    for i, router in enumerate(routers):
        if not isinstance(router, ThresholdRouter):
            continue
        if config.router_thresholds is not None:
            fixed = torch.tensor(config.router_thresholds, dtype=torch.float32, device=router.thresholds.device)
            if torch.allclose(router.thresholds, fixed) and torch.allclose(router.train_thresholds, fixed):
                continue
            if not thresholds_given:
                raise ValueError(
                    f"The checkpoint's config fixes router_thresholds={config.router_thresholds}, but layer {i}'s saved "
                    f"thresholds are {router.thresholds.tolist()}: the checkpoint disagrees with itself. Pass "
                    "router_thresholds=... to choose, or fix config.json."
                )
            router.thresholds.copy_(fixed)
            router.train_thresholds.copy_(fixed)
            changes.append(f"layer {i}: thresholds set to router_thresholds={config.router_thresholds}")
        elif checkpoint_targets is not None:
            start = initial_thresholds(config).to(router.thresholds.device)
            router.thresholds.copy_(start)
            router.train_thresholds.copy_(start)
            router.num_updates.zero_()
            changes.append(f"layer {i}: thresholds calibrated for {checkpoint_targets} restart for the new targets")
    return changes


def _init_functions():
    from transformers import initialization  # transformers' init helpers honour its "already initialised" flags

    return initialization


# ----------------------------------------------------------------------------------------------
# the budget


def slots_per_block(config, operator):
    """Query slots per budget block of a routed operator: ceil(target x block x capacity factor), at most the block."""
    block = config.router_block_size
    wanted = config.router_target_fractions[operator] * block * config.router_capacity_factor
    return max(1, min(block, math.ceil(round(wanted, 6))))


def unlimited_capacity_factor(config):
    """The smallest capacity factor that grants every request: each budgeted operator gets a slot per position."""
    return 1.0 / min(config.router_target_fractions.values())


def num_groups(length, block, continues):
    """Budget blocks that `length` consecutive positions can touch: starting at a block boundary
    (`continues=False`: nothing seen before), or anywhere (a cache has seen some tokens)."""
    if length == 0:
        return 0
    return (length + block - 2) // block + 1 if continues else -(-length // block)


def grant(asks, start, carried, capacity, block):
    """Grant the asks of one budgeted operator, causally within each block of real-token positions.

    asks: (B, n) bool, real tokens asking for the operator (real tokens come first in each row:
    `ChiarModel` compacts padded rows), at positions start + j; start: (B,) long, or 0 when nothing
    was seen before; carried: (B,) asks already made in each row's current block (a cache), or None.
    A token is granted when fewer than `capacity` earlier tokens of its block asked: that depends on
    itself and the earlier tokens of its block only.

    Returns granted (B, n) bool; rank (B, n), the asks (so, for a granted token, the grants) earlier in
    its block and in this input, which is its slot within its group; and group (B, n), its block
    counted from the first block this input touches.
    """
    batch, length = asks.shape
    device = asks.device
    j = torch.arange(length, device=device).expand(batch, length)
    position = j + (start[:, None] if torch.is_tensor(start) else start)
    first_block = start // block
    group = position // block - (first_block[:, None] if torch.is_tensor(start) else first_block)
    inclusive = asks.long().cumsum(dim=1)
    before = inclusive - asks.long()
    # Index (in this input) where each token's block starts, or -1 when it began before this input.
    block_start = torch.where(position % block == 0, j, -1).cummax(dim=1).values
    at_block_start = before.gather(1, block_start.clamp_min(0))
    in_input = before - torch.where(block_start >= 0, at_block_start, 0)
    earlier = in_input
    if carried is not None:
        earlier = earlier + torch.where(block_start < 0, carried[:, None], 0)
    granted = asks & (earlier < capacity)
    return granted, in_input, group


def grant_step(asks, start, carried, capacity, block):
    """`grant` and `carried_asks` for a decoding step (one token per row, after a prefill), in a few
    operations: the token is granted when fewer than `capacity` tokens of its block asked before it;
    a token at a block boundary starts the block afresh. Returns (granted (B, 1), carried after it)."""
    earlier = torch.where(start % block == 0, 0, carried)
    granted = asks & (earlier < capacity)[:, None]
    return granted, (earlier + asks[:, 0].long()).clamp_max(capacity)


def carried_asks(asks, start, carried, real_tokens, capacity, block):
    """Asks made so far in the block the next input starts in (clipped at `capacity`): the budget's
    decoding state. real_tokens: (B,) real tokens of this input."""
    length = asks.shape[1]
    inclusive = torch.cat([asks.new_zeros(asks.shape[0], 1, dtype=torch.long), asks.long().cumsum(dim=1)], dim=1)
    start = start if torch.is_tensor(start) else torch.full_like(real_tokens, start)
    next_position = start + real_tokens
    block_start = next_position // block * block  # position where the next token's block began
    index = (block_start - start).clamp(0, length)  # in this input; 0 when the block began before it
    count = inclusive[:, -1] - inclusive.gather(1, index[:, None])[:, 0]
    if carried is not None:
        count = count + torch.where(block_start < start, carried, 0)
    return count.clamp_max(capacity)


def query_slots(granted, rank, group, groups, capacity, past_keys, block, causal):
    """Place the granted tokens in fixed slots: group g's slots are [g * per_group, (g + 1) * per_group).

    Tokens that are not granted go to overflow columns past the slots, one each, which are dropped: no
    two tokens ever share a column, so the placement is deterministic.
    """
    batch, length = granted.shape
    per_group = min(capacity, length)
    total = groups * per_group
    j = torch.arange(length, device=granted.device).expand(batch, length)
    column = torch.where(granted, group * per_group + rank, total + j)
    index = granted.new_zeros(batch, total + length, dtype=torch.long).scatter(1, column, j)[:, :total]
    valid = granted.new_zeros(batch, total + length).scatter(1, column, granted)[:, :total]
    groups_per_call = max(1, MAX_CALL_QUERIES // max(per_group, 1))
    calls = []
    for first in range(0, groups, groups_per_call):
        last = min(first + groups_per_call, groups)
        visible = min(length, last * block) if causal else length
        calls.append((first * per_group, last * per_group, past_keys + visible))
    return QuerySlots(index=index, valid=valid, calls=tuple(calls))


# ----------------------------------------------------------------------------------------------
# one routed layer, end to end


def route(router, operators, config, x, entropy, ctx, router_state=None, carried=None):
    """Ask, grant and select for one routed layer.

    router_state: what the router routes with, its thresholds or share bias (None: its buffers for
    ctx.training; `snapshot`);
    carried: (B, K) asks so far in each row's current block, from a decoding cache (None: none).
    ctx supplies positions, the real-token mask (None: no padding), the pass's start position and
    whether it trains (operators.MixContext).
    """
    decision = router(x, entropy, ctx.positions, ctx.token_mask, router_state, training=ctx.training)
    asked = decision.operator_ids
    if ctx.token_mask is not None:  # padding takes the cheapest operator and asks for nothing
        asked = asked.masked_fill(~ctx.token_mask, 0)
    if is_dense(router):
        selections = [Selection(weight=decision.probs[..., k : k + 1]) for k in range(len(operators))]
        return RoutedTokens(selections, asked, asked, None, None)

    length = asked.shape[1]
    block = config.router_block_size
    groups = num_groups(length, block, continues=ctx.past_keys > 0)
    keep_state = ctx.cache is not None
    step = length == 1 and carried is not None and torch.is_tensor(ctx.start)  # a decoding step
    executed, slots, states = asked, {}, []
    for k in range(1, len(operators)):
        capacity = slots_per_block(config, operators[k])
        asks = asked == k
        carried_k = None if carried is None else carried[:, k]
        if step:
            granted, state = grant_step(asks, ctx.start, carried_k, capacity, block)
            slots[k] = QuerySlots(index=torch.zeros_like(asked), valid=granted, calls=((0, 1, ctx.past_keys + 1),))
            states.append(state)
        else:
            granted, rank, group = grant(asks, ctx.start, carried_k, capacity, block)
            slots[k] = query_slots(granted, rank, group, groups, capacity, ctx.past_keys, block, config.is_causal)
            if keep_state:
                states.append(carried_asks(asks, ctx.start, carried_k, ctx.real_counts, capacity, block))
        executed = torch.where(asks & ~granted, 0, executed)
    weight = None
    if decision.probs is not None:  # learned: the executed operator's p / p.detach(), 1 in value
        # written 1 + (p - p) / p so that the value is exactly 1 even where p underflows to 0 (a share
        # bias can choose an operator its gate gives no probability; p / p would be 0 / 0 there)
        chosen = decision.probs.gather(-1, executed[..., None])
        weight = 1 + (chosen - chosen.detach()) / chosen.detach().clamp_min(torch.finfo(chosen.dtype).tiny)
    selections = [Selection(mask=executed == 0, weight=weight)]
    selections += [Selection(mask=executed == k, slots=slots[k], weight=weight) for k in range(1, len(operators))]
    budget_state = torch.stack([torch.zeros_like(states[0])] + states, dim=1) if keep_state else None
    return RoutedTokens(selections, executed, asked, decision.aux_loss, budget_state, decision.score, decision.logits)


@torch.no_grad()
def observe(routers, records, positions, token_mask, eval_records=None, eval_positions=None, eval_mask=None):
    """Share control after a training pass: each calibrating threshold router moves its thresholds
    towards this batch's quantiles, each exploring gate its eval cut, each balancing gate its share
    biases against the share error (train-mode records, and eval-mode ones from `eval_records` when a
    dropout-free pass was made). Only batches already seen ever route."""
    for i, (router, record) in enumerate(zip(routers, records)):
        if not calibrates(router):
            continue
        plain = eval_records is None
        if isinstance(router, ThresholdRouter):
            router.observe(router.score(record.entropy, positions), token_mask,
                           None if plain else router.score(eval_records[i].entropy, eval_positions), eval_mask)
            continue
        if router.explore:  # the eval cut: on what eval ranks, dropout-free scores when there are some
            router.calibrate(*((record.router_score, token_mask) if plain else (eval_records[i].router_score, eval_mask)))
        if router.balance:
            router.balance_shares(record.requested_ids, token_mask, record.entropy, None if plain else eval_records[i].requested_ids,
                                  eval_mask, None if plain else eval_records[i].entropy)


@torch.no_grad()
def settle(routers, passes):
    """Set each calibrating router's eval statistics (`eval_statistics`) from eval-mode passes over fixed
    weights, pooled over every pass's real tokens (`ChiarPreTrainedModel.settle_routing`). A running
    statistic follows a gate that moves while it trains, and a share bias or a cut that moves step by
    step can land on either side of a mass point; computed once on the final weights, eval routes the
    target shares of the data it was settled on (precise statistics, as for batch norm).

    passes: (records, positions, token_mask) of each pass, the records in the model's token order.
    """
    for i, router in enumerate(routers):
        if not eval_statistics(router):
            continue
        records = [(records[i], positions, mask) for records, positions, mask in passes]
        real = [torch.ones_like(r.operator_ids, dtype=torch.bool) if m is None else m for r, _, m in records]
        mask = torch.cat([m.flatten() for m in real])
        if isinstance(router, ThresholdRouter):
            score = torch.cat([router.score(r.entropy, p).flatten() for r, p, _ in records])
            router.settle(score, mask & torch.isfinite(score))  # a token whose input was not finite is left out
            continue
        score = None if records[0][0].router_score is None else torch.cat([r.router_score.flatten() for r, _, _ in records])
        logits = None if records[0][0].router_logits is None else torch.cat([r.router_logits.flatten(0, -2) for r, _, _ in records])
        finite = torch.isfinite(score) if score is not None else torch.isfinite(logits).all(dim=-1)
        router.settle(score, mask & finite, logits)


def eval_statistics(router):
    """Names of the buffers `settle` sets: what a router routes with in eval that training calibrates."""
    if isinstance(router, ThresholdRouter) and router.calibrate:
        return ("thresholds",)
    if isinstance(router, GateRouter) and router.explore:
        return ("eval_thresholds",)
    if isinstance(router, GateRouter) and router.balance:
        return ("share_bias",)
    return ()


def calibrates(router):
    """Whether a router updates its statistics from the records after a training pass (`observe`)."""
    return (isinstance(router, ThresholdRouter) and router.calibrate) or (
        isinstance(router, GateRouter) and (router.balance or router.explore))


def needs_eval_pass(router):
    """Whether `observe` needs a dropout-free pass's records for a router's eval statistics."""
    return calibrates(router) and (router.routing_state(False) is not None or (isinstance(router, GateRouter) and router.explore))


def snapshot(router, training):
    """A copy of what a router routes with in this mode (None: nothing): the update after the pass
    must not reach a gradient-checkpointing recomputation of it."""
    state = router.routing_state(training) if router is not None else None
    return None if state is None else state.clone()


def running_statistics(router):
    """Names of the buffers a router updates while it trains (none for most)."""
    return getattr(router, "running_statistics", ()) if router is not None else ()


def statistics_before_step(routers):
    """Copies of the routers' running statistics (thresholds, calibrated cuts, share biases, their
    counters), taken before a training step. With `undo_if_not_finite` after the step, a step whose
    loss is NaN or infinite although the hidden states the routers saw were finite (a loss that
    overflowed) leaves them as they were, as `observe` does for a batch with non-finite hidden states."""
    return [(r, {name: getattr(r, name).clone() for name in running_statistics(r)}) for r in routers if running_statistics(r)]


@torch.no_grad()
def undo_if_not_finite(saved, loss):
    """Put back the statistics of `statistics_before_step` if `loss` is not finite, counting the undone
    updates in `skipped_updates`; no host sync (the choice is a `torch.where` on the device)."""
    finite = torch.isfinite(loss.detach()).all()
    for router, before in saved:
        finite = finite.to(router.skipped_updates.device)
        moved = torch.zeros((), dtype=torch.bool, device=finite.device)
        for name, value in before.items():
            current = getattr(router, name)
            moved = moved | (current != value).any()
            current.copy_(torch.where(finite, current, value))
        router.skipped_updates.add_((moved & ~finite).long())


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

    def reset_from_config(self, config):
        init = _init_functions()
        init.zeros_(self.weight)
        init.constant_(self.bias, 2.0)

    def forward(self, layer_input, layer_output, token_mask, cache=None):
        """token_mask: (B, n) real tokens or None; cache: earlier positions' running sum and count."""
        x = layer_input.float()
        mask = torch.ones(x.shape[:2], device=x.device) if token_mask is None else token_mask.float()
        weighted = x if token_mask is None else torch.where(token_mask[..., None], x, 0)  # padding holds no value
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
