"""A Trainer callback that keeps an eye on routing while a CHIAR model trains.

    trainer = ChiarTrainer(..., callbacks=[RoutingLoggingCallback()])

At each evaluation it
- logs the per-layer operator shares and mean entropies that `ChiarTrainer` already put in the eval
  metrics (`eval_routing_layer{i}_{op}`, `eval_entropy_layer{i}`), and appends them to
  `{output_dir}/routing/history.jsonl`, so the routing of a run can be followed over time;
- renders a fixed sample text (see `chiar.routing_viz`) to `{output_dir}/routing/step-{N}.png`,
  and to TensorBoard (`add_figure`) when tensorboard is installed (skipped quietly otherwise).

It warns when a routed layer's evaluation share of an operator is more than `share_tolerance` (the
spec's 0.05) from `router_target_fractions`: thresholds calibrated on other data, or a router that
drifted, change what the model costs and how it behaves, and say nothing otherwise.

Only the main process renders; the model is put back in the mode it was in.
"""

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from chiar.evaluation import routing_metrics
from chiar.routing_viz import route_text, routing_figure

logger = logging.getLogger(__name__)

SAMPLE_TEXT = (
    "The light falls where detail is needed, and the dark keeps the rest. In 1905, Einstein published "
    "four papers; the third introduced special relativity."
)
def _summary_writer(log_dir):
    """A TensorBoard SummaryWriter, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError when the tensorboard package is missing
        return None
    return SummaryWriter(log_dir=log_dir)


class RoutingLoggingCallback(TrainerCallback):
    """Log routing shares and entropy at each evaluation, and render a sample text (PNG, TensorBoard)."""

    def __init__(self, sample_text=SAMPLE_TEXT, tokenizer=None, subdir="routing", tensorboard=True, max_length=256,
                 share_tolerance=0.05):
        self.share_tolerance = share_tolerance
        self.sample_text = sample_text
        self.tokenizer = tokenizer
        self.subdir = subdir
        self.tensorboard = tensorboard
        self.max_length = max_length
        self._writer = None
        self._disabled = False

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / self.subdir
        folder.mkdir(parents=True, exist_ok=True)
        layers = routing_metrics(metrics)
        if layers:
            logger.info("routing at step %d:\n%s", state.global_step, format_layers(layers))
            with open(folder / "history.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, "layers": {str(k): v for k, v in layers.items()}}) + "\n")
            config = getattr(getattr(model, "module", model), "config", None)
            for problem in off_target(layers, config, self.share_tolerance):
                logger.warning("routing at step %d: %s", state.global_step, problem)
        tokenizer = self.tokenizer or processing_class or kwargs.get("tokenizer")
        if getattr(getattr(getattr(model, "module", model), "config", None), "model_type", None) != "chiar":
            return  # another Transformers model: nothing to render
        if self._disabled or model is None or tokenizer is None or not hasattr(tokenizer, "decode"):
            return
        try:
            self.render(getattr(model, "module", model), tokenizer, folder / f"step-{state.global_step}.png", args, state.global_step)
        except ImportError as error:  # matplotlib missing: keep training, say so once
            logger.warning("RoutingLoggingCallback cannot render the sample text (%s); install matplotlib.", error)
            self._disabled = True

    def render(self, model, tokenizer, path, args, step):
        """Route the sample text, save the PNG, and add the figure to TensorBoard when available."""
        view = route_text(model, tokenizer, self.sample_text, max_length=self.max_length)
        figure = routing_figure(view)
        figure.savefig(path)
        writer = self._get_writer(args)
        if writer is not None:
            writer.add_figure("routing/sample_text", figure, global_step=step)
            writer.flush()

    def _get_writer(self, args):
        if self._writer is None and self.tensorboard:
            self._writer = _summary_writer(getattr(args, "logging_dir", None) or str(Path(args.output_dir) / "runs"))
            if self._writer is None:
                self.tensorboard = False  # not installed: do not try again
        return self._writer

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def off_target(layers, config, tolerance=0.05):
    """Sentences for each routed layer whose share of an operator is more than `tolerance` from its target."""
    if config is None or not getattr(config, "uses_routing", False):
        return []
    problems = []
    for layer, values in layers.items():
        if layer >= len(config.layer_schedule) or config.layer_schedule[layer] != "routed":
            continue
        for operator, target in config.router_target_fractions.items():
            share = values.get("shares", {}).get(operator)
            if share is not None and abs(share - target) > tolerance:
                problems.append(f"layer {layer} sent {share:.3f} of its tokens to {operator}, target {target:.3f} "
                                f"(router_target_fractions); more than {tolerance} off, so its cost and behaviour are not the intended ones.")
    return problems


def format_layers(layers):
    lines = []
    for layer, values in layers.items():
        shares = ", ".join(f"{op} {share:.3f}" for op, share in values.get("shares", {}).items())
        entropy = values.get("mean_entropy")
        lines.append(f"  layer {layer}: {shares}" + (f"; mean entropy {entropy:.4f}" if entropy is not None else ""))
    return "\n".join(lines)


__all__ = ["RoutingLoggingCallback", "off_target", "routing_metrics", "SAMPLE_TEXT"]
