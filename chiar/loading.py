"""Opening a saved CHIAR model and its tokenizer: the one loader that the CLI (render, stats,
audit), the routing views and statistics, and the Hub export share."""

import contextlib
import os
from pathlib import Path


def load_model(model, tokenizer=None, device=None):
    """(model, tokenizer) from a model object or a saved folder / Hub id; the tokenizer defaults to
    the model's folder. A loaded model is in eval mode (routing thresholds are frozen in eval); a
    model object is left in its mode, and the functions that run it switch to eval themselves."""
    if isinstance(model, (str, os.PathLike)):
        path = str(model)
        model = load_checkpoint(path).eval()
        if tokenizer is None:
            tokenizer = path
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer))
    if tokenizer is None:
        raise ValueError("A tokenizer is needed when the model is passed as an object (give a tokenizer or its folder).")
    if getattr(model.config, "model_type", None) != "chiar":
        raise TypeError(f"Expected a CHIAR model (model_type 'chiar'), got {getattr(model.config, 'model_type', type(model).__name__)!r}.")
    if device is not None:
        model = model.to(device)
    return model, tokenizer


@contextlib.contextmanager
def eval_mode(model):
    """Run in eval mode (frozen thresholds, no dropout), then restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _looks_local(path):
    """A Hub id is `name` or `owner/name`; anything else is meant as a folder on this machine."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or (os.sep != "/" and os.sep in path)


def load_checkpoint(path):
    """The right head for a saved CHIAR folder or Hub id (causal LM or classifier, from `architectures`)."""
    import modeling_chiar  # noqa: F401  (registers the Auto classes)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if not Path(path).exists() and _looks_local(path):
        raise FileNotFoundError(f"Model folder not found: {path!r}.")
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as error:
        raise FileNotFoundError(f"Cannot load a model config from {path!r}: not a saved model folder, and not reachable as a Hub id ({error}).") from error
    if config.model_type != "chiar":
        raise TypeError(f"{path!r} holds a {config.model_type!r} model, not a CHIAR model.")
    architectures = getattr(config, "architectures", None) or ["ChiarForCausalLM"]
    auto = AutoModelForSequenceClassification if "SequenceClassification" in architectures[0] else AutoModelForCausalLM
    return auto.from_pretrained(path)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"Cannot load a tokenizer from {path!r} (pass --tokenizer / tokenizer=...): {error}") from error
