"""The shared harness: one tiny shape, on which the property tests run every variant of the registry
(chiar/variants.py)."""

import os
from pathlib import Path

import pytest
import torch

import modeling_chiar  # noqa: F401  (registers the Auto classes)
# The tests import the registry's names from here; `build` makes a variant on the test shape.
from chiar.variants import TEST_SHAPE, THREE_OPS, TWO_OPS, VARIANTS, build, random_ids  # noqa: F401
from chiar.variants import overrides as variant_overrides
from modeling_chiar import ChiarConfig

DATA_DIR = Path(os.environ.get("CHIAR_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))

TINY = TEST_SHAPE


def tiny_config(**overrides):
    return ChiarConfig(**{**TINY, **overrides})


def data_dir_or_skip(name):
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"real-data test: {path} not found (set CHIAR_DATA_DIR to the shared/data folder)")
    return path


def wikitext_bpe(vocab_size=4096, train_chars=2_000_000):
    """A byte-level BPE trained on the start of WikiText-2 train (seconds), or skip without the data."""
    folder = data_dir_or_skip("wikitext-2")
    tokenizers = pytest.importorskip("tokenizers")
    text = (folder / "wiki.train.tokens").read_text(encoding="utf-8")[:train_chars]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, initial_alphabet=alphabet)
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    return tokenizer, folder


def wikitext_blocks(tokenizer, folder, split, length, max_chars):
    text = (folder / f"wiki.{split}.tokens").read_text(encoding="utf-8")[:max_chars]
    ids = torch.tensor(tokenizer.encode(text).ids)
    return ids[: len(ids) // length * length].view(-1, length)


def tiny_tokenizer(vocab_size=97):
    """A byte-level BPE trained here on a few sentences, wrapped for transformers (no downloads)."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    text = [
        "the light falls where detail is needed and the dark keeps the rest",
        "attention is paid only where it is needed, smooth tokens take the spectral path",
        "a small model routes each token to one operator at every routed layer",
    ] * 20
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<eos>"], show_progress=False,
        initial_alphabet=sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())[:40],  # sorted: the set's order varies by process
    )
    tokenizer.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def calibrated_lm(tokenizer):
    """A 3-operator LM for `tokenizer`, its thresholds calibrated on three random batches, in eval mode
    (what the Hub-export and CLI tests save and load)."""
    from modeling_chiar import ChiarForCausalLM

    model = build(ChiarForCausalLM, "chiar-3op", vocab_size=len(tokenizer),
                  pad_token_id=tokenizer.pad_token_id, hidden_dropout=0.1).train()
    with torch.no_grad():
        for seed in range(3):
            model(random_ids(4, 24, seed=seed, vocab=len(tokenizer)))
    return model.eval()
