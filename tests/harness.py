"""The shared harness: one tiny config and the list of model variants every property test runs over."""

import os
from pathlib import Path

import pytest
import torch

import modeling_chiar  # noqa: F401  (registers the Auto classes)
from modeling_chiar import ChiarConfig

DATA_DIR = Path(os.environ.get("CHIAR_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    rbf_num_features=16,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    max_position_embeddings=512,
    pad_token_id=0,
    router_block_size=8,  # small blocks, so the budget binds on the tests' short sequences
)

TWO_OPS = ["dct", "attention"]
THREE_OPS = ["dct", "rbf", "attention"]

# Every router x operator combination, plus the schedules the spec names.
VARIANTS = {
    f"{router}-{'+'.join(ops)}": dict(router_type=router, routed_operators=ops)
    for router in ("threshold", "learned", "soft", "random")
    for ops in (TWO_OPS, THREE_OPS, ["rbf", "attention"], ["dct", "rbf"])
}
VARIANTS.update(
    {
        "all-routed-3op": dict(layer_schedule=["routed"] * 4, routed_operators=THREE_OPS),
        "all-rbf": dict(layer_schedule=["rbf"] * 4),
        "all-dct": dict(layer_schedule=["dct"] * 4),
        "baseline": dict(layer_schedule=["attention"] * 4),
        "meta-router": dict(use_meta_router=True, routed_operators=THREE_OPS),
        "meta-router-learned": dict(use_meta_router=True, router_type="learned"),
        "learned-explore": dict(router_type="learned", router_explore=True),
        "post-norm": dict(norm_position="post", routed_operators=THREE_OPS),
        "fixed-thresholds": dict(routed_operators=THREE_OPS, router_thresholds=[0.80, 0.84]),
    }
)


def tiny_config(**overrides):
    return ChiarConfig(**{**TINY, **overrides})


def build(model_class, variant, attn_implementation="eager", seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(**{**VARIANTS[variant], **overrides})
    return model_class._from_config(config, attn_implementation=attn_implementation)


def random_ids(batch, length, seed=0, vocab=TINY["vocab_size"]):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=generator)


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
