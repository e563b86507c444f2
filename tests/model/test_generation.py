"""Cached decoding equals the uncached computation; generate() and pipelines work on every variant."""

import functools

import pytest
import torch

from harness import VARIANTS, build, random_ids
from modeling_chiar import ChiarForCausalLM
from modeling_chiar.cache import ChiarCache

GENERATION_VARIANTS = [
    "chiar-threshold",
    "chiar-3op",
    "learned-dct+rbf+attention",
    "soft-dct+rbf+attention",
    "random-rbf+attention",
    "threshold-dct+rbf",
    "all-rbf",
    "all-dct",
    "baseline",
    "meta-router",
    "meta-router-learned",
    "chiar-learned-bias",  # the eval share bias moves the choice: a step must make the same one
    "chiar-learned-explore",  # eval ranks by the gate, cut at calibrated quantiles: per token, so a step must agree
    "post-norm",
]
assert set(GENERATION_VARIANTS) <= set(VARIANTS)


def lm(variant, **overrides):
    return build(ChiarForCausalLM, variant, **{"eos_token_id": None, "pad_token_id": 0, **overrides}).eval()


def greedy(model, prompt, mask=None, use_cache=True, steps=12):
    return model.generate(prompt, attention_mask=mask, max_new_tokens=steps, do_sample=False, use_cache=use_cache,
                          output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize("variant", GENERATION_VARIANTS)
def test_cached_greedy_equals_uncached_step_by_step(variant):
    model = lm(variant)
    prompt = random_ids(2, 7, seed=11)
    cached, uncached = greedy(model, prompt), greedy(model, prompt, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (a, b) in enumerate(zip(cached.scores, uncached.scores)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"step {step}")
    # and each step equals a full forward over the sequence so far
    full = model(cached.sequences).logits
    for step, scores in enumerate(cached.scores):
        torch.testing.assert_close(scores, full[:, 6 + step], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", GENERATION_VARIANTS)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(variant):
    model = lm(variant)
    prompts = [random_ids(1, n, seed=20 + n)[0] for n in (4, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    batch = greedy(model, ids, mask).sequences[:, width:]
    for row, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None]).sequences[:, len(prompt):]
        assert torch.equal(batch[row : row + 1], alone), (row, batch[row], alone)


def same_steps(a, b):
    """Two generate() results took the same tokens with the same scores (scores catch a wrong context
    even where a tiny random model repeats one token)."""
    assert torch.equal(a.sequences[:, -len(a.scores):], b.sequences[:, -len(b.scores):])
    for step, (x, y) in enumerate(zip(a.scores, b.scores, strict=True)):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("variant", GENERATION_VARIANTS)
def test_generating_from_inputs_embeds_equals_generating_from_ids(variant):
    """(generate() always decodes an embedded prompt with a cache; the ids run without one.)"""
    model = lm(variant)
    ids = random_ids(2, 6, seed=13)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    from_ids = greedy(model, ids, mask, use_cache=False, steps=5)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                                 max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert from_embeds.sequences.shape == (2, 5)  # only the new tokens
    same_steps(from_embeds, from_ids)


@pytest.mark.parametrize("prompt_as", ["ids", "embeds"])
@pytest.mark.parametrize("variant", GENERATION_VARIANTS)
def test_generation_continues_from_a_returned_cache(variant, prompt_as):
    """Three tokens, then three more from the cache generate() returned: the six tokens of one call."""
    model = lm(variant)
    ids = random_ids(2, 6, seed=17)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    embed = model.get_input_embeddings()
    prompt = dict(input_ids=ids) if prompt_as == "ids" else dict(inputs_embeds=embed(ids))
    first = model.generate(**prompt, attention_mask=mask, max_new_tokens=3, do_sample=False,
                           return_dict_in_generate=True)
    name = "cache" if "cache" in first else "past_key_values"
    assert isinstance(first[name], ChiarCache) and first[name].get_seq_length() == 8  # the last token is not fed yet
    so_far = first.sequences if prompt_as == "ids" else torch.cat([ids, first.sequences], dim=1)
    prompt = dict(input_ids=so_far) if prompt_as == "ids" else dict(inputs_embeds=embed(so_far))
    longer_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1)
    second = model.generate(**prompt, attention_mask=longer_mask, max_new_tokens=3, do_sample=False,
                            output_scores=True, return_dict_in_generate=True, **{name: first[name]})
    at_once = greedy(model, ids, mask, use_cache=False, steps=6)
    assert torch.equal(so_far[:, 6:], at_once.sequences[:, 6:9])
    at_once.scores = at_once.scores[3:]
    same_steps(second, at_once)


@pytest.mark.parametrize("variant", GENERATION_VARIANTS)
def test_chunked_prefill_in_generate_equals_one_prefill(variant):
    model = lm(variant)
    ids = random_ids(2, 13, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    whole = greedy(model, ids, mask, steps=4)
    fed, forward = [], model.forward

    @functools.wraps(forward)
    def recording(*args, **kwargs):
        fed.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    model.forward = recording
    chunked = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, prefill_chunk_size=5)
    assert fed == [5, 5, 3, 1, 1, 1]  # the prompt in three chunks, then one token per step
    same_steps(chunked, whole)
    # An unpadded prompt without a mask: generate() then passes each chunk alone.
    whole = greedy(model, ids, torch.ones_like(ids), steps=4)
    fed.clear()
    chunked = model.generate(ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                             prefill_chunk_size=5)
    assert fed == [5, 5, 3, 1, 1, 1]
    same_steps(chunked, whole)


def test_generate_returns_scores_attentions_and_hidden_states_per_step():
    model = lm("chiar-3op")
    out = model.generate(random_ids(2, 6), max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, output_logits=True, output_attentions=True, output_hidden_states=True)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert len(out.scores) == len(out.logits) == len(out.attentions) == len(out.hidden_states) == 3
    for step in range(3):
        new, seen = (6, 6) if step == 0 else (1, 6 + step)
        assert out.scores[step].shape == (2, model.config.vocab_size)
        assert [a.shape for a in out.attentions[step]] == [(2, heads, new, seen)] * layers
        assert [h.shape for h in out.hidden_states[step]] == [(2, new, model.config.hidden_size)] * (layers + 1)


@pytest.mark.parametrize("variant", ["chiar-3op", "all-rbf", "meta-router"])
def test_beam_search_and_sampling(variant):
    model = lm(variant)
    prompt = random_ids(2, 5, seed=3)
    beams = [model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=c) for c in (True, False)]
    assert torch.equal(beams[0], beams[1])
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        samples.append(model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=20, use_cache=use_cache))
    assert torch.equal(samples[0], samples[1])
    assert samples[0].shape == (2, 11)
    torch.manual_seed(0)
    several = model.generate(prompt, max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert several.shape == (6, 9)


@pytest.mark.parametrize("variant", GENERATION_VARIANTS)
def test_prefill_in_chunks_equals_one_pass(variant):
    """Feeding a sequence through the cache in pieces gives the logits of one uncached pass."""
    model = lm(variant)
    ids = random_ids(2, 40, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding in the second row
    whole = model(ids, attention_mask=mask).logits
    cache, pieces = None, []
    for start, end in ((0, 13), (13, 14), (14, 33), (33, 40)):
        out = model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1)[mask.bool()], whole[mask.bool()], atol=1e-4, rtol=0)
    assert cache.get_seq_length() == 40


def test_cache_holds_per_layer_state_of_the_right_size():
    model = lm("chiar-3op", layer_schedule=["dct", "routed", "rbf", "attention"], use_meta_router=True)
    out = model(random_ids(2, 15), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    assert isinstance(cache, ChiarCache) and cache.get_seq_length() == 15
    assert cache.keys[0] is None and cache.rbf_state[0] is None  # DCT needs no state
    assert cache.keys[1].shape == (2, 4, 15, 8)  # keys of every token, whichever operator it took
    assert cache.rbf_state[1].shape == (2, 4, 16, 8) and cache.rbf_norm[1].shape == (2, 4, 16)
    assert cache.keys[2] is None and cache.rbf_state[2].shape == (2, 4, 16, 8)  # fixed-size recurrent state
    assert cache.keys[3].shape == (2, 4, 15, 8)
    assert cache.meta_sum.shape == (2, 32) and torch.equal(cache.meta_count, torch.full((2,), 15.0))


def test_forward_without_use_cache_builds_no_cache():
    model = lm("chiar-threshold")
    out = model(random_ids(1, 5))
    assert out.get("cache") is None and out.get("past_key_values") is None


def test_cache_errors():
    model = lm("chiar-3op")
    out = model(random_ids(1, 5), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(3)
    for drafting in (dict(assistant_model=model), dict(prompt_lookup_num_tokens=2)):
        with pytest.raises(ValueError, match="not supported with stateful models"):
            model.generate(random_ids(1, 5), max_new_tokens=3, **drafting)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(random_ids(1, 1), attention_mask=torch.ones(1, 1), cache=cache)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(random_ids(1, 510), cache=cache)
    from transformers import DynamicCache

    filled = DynamicCache()
    filled.update(torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8), 0)
    with pytest.raises(ValueError, match="ChiarCache"):
        model(random_ids(1, 2), cache=filled)
    # Another model's cache (other depth, schedule or width) is refused, not read as this model's state.
    for other in (dict(num_hidden_layers=3, layer_schedule=None), dict(layer_schedule=["dct", "routed", "attention", "attention"]),
                  dict(hidden_size=64)):
        foreign = lm("chiar-3op", **other)
        with pytest.raises(ValueError, match="made for another model"):
            foreign(random_ids(1, 1), cache=cache)
    with pytest.raises(ValueError, match="past tokens per row"):  # a mask for other past tokens than the cache's
        model(random_ids(1, 1), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]), cache=cache)


def test_text_generation_pipeline():
    from transformers import pipeline

    from harness import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = lm("chiar-3op", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator(["the light falls", "attention is"], max_new_tokens=5, do_sample=False)
    assert len(out) == 2 and all(o[0]["generated_text"].startswith(p) for o, p in zip(out, ["the light falls", "attention is"]))


def test_text_classification_pipeline():
    from transformers import pipeline

    from harness import tiny_tokenizer
    from modeling_chiar import ChiarForSequenceClassification

    tokenizer = tiny_tokenizer()
    model = build(ChiarForSequenceClassification, "chiar-3op", is_causal=False, num_labels=2,
                  vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  id2label={0: "dark", 1: "light"}, label2id={"dark": 0, "light": 1}).eval()
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer)
    out = classifier(["the light falls where detail is needed", "smooth tokens"])
    assert [o["label"] in ("dark", "light") for o in out] == [True, True]
    batch = tokenizer(["the light falls where detail is needed"], return_tensors="pt")
    expected = model(**batch).logits.softmax(-1).max().item()
    assert out[0]["score"] == pytest.approx(expected, abs=1e-5)
