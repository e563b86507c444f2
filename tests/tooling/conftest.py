"""Fixtures the tooling tests share: a local tokenizer and a 3-operator causal model built for it."""

import pytest

from harness import build, tiny_tokenizer
from modeling_chiar import ChiarForCausalLM


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build(ChiarForCausalLM, "chiar-3op", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).eval()
