"""Bad input gets a clear error naming the problem, never a stack trace from deep inside torch."""

import pytest
import torch
import transformers

from harness import build, random_ids, tiny_config
from modeling_chiar import ChiarForCausalLM, ChiarForSequenceClassification, ChiarModel
from modeling_chiar.cache import ChiarCache


@pytest.fixture(scope="module")
def lm():
    return build(ChiarForCausalLM, "chiar-3op").eval()


@pytest.mark.parametrize("bad", [97, 1000, -1])
def test_token_ids_outside_the_vocabulary(lm, bad):
    ids = random_ids(1, 6)
    ids[0, 3] = bad
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 97\)"):
        lm(ids)


def test_attention_mask_shape_mismatch(lm):
    with pytest.raises(ValueError, match="attention_mask has shape"):
        lm(random_ids(2, 6), attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        lm(random_ids(2, 6), attention_mask=torch.ones(6))


def test_attention_mask_values(lm):
    with pytest.raises(ValueError, match="only 0"):
        lm(random_ids(1, 4), attention_mask=torch.tensor([[1, 2, 1, 1]]))


def test_sequence_longer_than_supported(lm):
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=512"):
        lm(random_ids(1, 513))
    with pytest.raises(ValueError, match="position_ids"):
        lm(random_ids(1, 4), position_ids=torch.tensor([[0, 1, 2, 600]]))


def test_inputs_ids_and_embeds(lm):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        lm()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        lm(random_ids(1, 3), inputs_embeds=torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="inputs_embeds must have shape"):
        lm(inputs_embeds=torch.randn(1, 3, 31))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, sequence\)"):
        lm(torch.tensor([1, 2, 3]))


def test_labels_out_of_range(lm):
    ids = random_ids(1, 5)
    with pytest.raises(ValueError, match="labels must be -100"):
        lm(ids, labels=torch.tensor([[1, 2, 3, 400, -100]]))
    clf = build(ChiarForSequenceClassification, "chiar-threshold", num_labels=2)
    with pytest.raises(ValueError, match=r"class ids in \[0, num_labels=2\)"):
        clf(random_ids(2, 5), labels=torch.tensor([0, 5]))


def test_bidirectional_language_model_is_refused():
    with pytest.raises(ValueError, match="is_causal=True"):
        ChiarForCausalLM(tiny_config(is_causal=False))


def test_a_bidirectional_model_refuses_a_cache_and_ignores_use_cache(caplog):
    model = build(ChiarModel, "chiar-threshold", is_causal=False).eval()
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match=r"needs a causal model \(is_causal=True\)"):
        model(ids, cache=ChiarCache(model.config.num_hidden_layers))
    # The flag alone follows transformers' convention for a flag that cannot apply: a warning, no cache.
    transformers.utils.logging.warning_once.cache_clear()  # once per process: an earlier test may have used it
    with caplog.at_level("WARNING"):
        flagged = model(ids, use_cache=True)
    assert "no effect on a bidirectional model" in caplog.text
    assert torch.equal(flagged.last_hidden_state, model(ids).last_hidden_state)
    assert flagged.to_tuple()[1:] == ()  # nothing but the hidden states: no cache


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_classifier_refuses_a_cache(name):
    model = build(ChiarForSequenceClassification, "chiar-threshold", num_labels=2).eval()
    with pytest.raises(ValueError, match=f"takes no decoding cache, got {name}"):
        model(random_ids(2, 6), **{name: ChiarCache(model.config.num_hidden_layers)})
