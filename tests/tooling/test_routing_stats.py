"""Routing statistics and the signal audit: agreement with `outputs.routing`, share-matched controls, the CLI."""

import copy
import json
import math

import pytest
import torch

from harness import build
from chiar.audit import (InvertedEntropyRouter, MatchedRandomRouter, audit, fit_boundaries, inverted_routers, swapped_routers,
                         unbudgeted)
from chiar.cli import main as cli_main
from chiar.batching import make_batches
from chiar.data import read_documents
from chiar.routing_stats import FUNCTION_WORDS, routing_statistics, token_category, write_report
from modeling_chiar import ChiarForCausalLM, ChiarForSequenceClassification
from modeling_chiar.routing import ThresholdRouter

DOCS = [
    "the light falls where detail is needed, and the dark keeps the rest",
    "a small model routes each token to one operator",
    "attention is paid only where it is needed",
]


def corpus(n, words=12):
    base = " ".join(DOCS).split()
    return [" ".join(base[(i * 7 + j) % len(base)] for j in range(words + i % 5)) for i in range(n)]


def test_token_categories():
    assert token_category(" the") == token_category("The") == "function_word"
    assert token_category(",") == token_category(" ...") == token_category("—") == "punctuation"
    assert token_category(" light") == token_category(" ") == token_category("th") == "other"
    assert {"the", "of", "and", "a", "to", "in", "is"} <= FUNCTION_WORDS


def test_statistics_agree_with_the_models_own_records(model, tokenizer):
    """Expected numbers computed by hand, token by token, from one padded forward pass."""
    report = routing_statistics(model, tokenizer, DOCS, batch_size=len(DOCS), min_count=1, top_k=1000)

    batch = tokenizer(DOCS, padding=True, return_tensors="pt")  # right padding, as the statistics batch
    with torch.no_grad():
        routing = model(**batch, output_routing=True).routing
    mask = batch["attention_mask"].tolist()
    ids = batch["input_ids"].tolist()
    real = [(b, t) for b in range(len(DOCS)) for t in range(len(mask[b])) if mask[b][t]]
    assert len(real) < batch["input_ids"].numel()  # there is padding, and it must be excluded
    assert report["tokens"] == len(real) and report["sequences"] == len(DOCS)

    sent = {}  # token id -> [occurrences, (token, layer) pairs sent to attention]
    for i, record in enumerate(routing):
        layer = report["layers"][i]
        chosen = [record.operators[record.operator_ids[b, t]] for b, t in real]
        expected = {op: chosen.count(op) / len(real) for op in record.operators}
        assert layer["shares"] == expected  # exactly, not approximately
        assert layer["counts"] == {op: chosen.count(op) for op in record.operators}
        assert layer["mean_entropy"] == pytest.approx(sum(float(record.entropy[b, t]) for b, t in real) / len(real), abs=1e-6)
        assert layer["thresholds"] == (record.thresholds.tolist() if record.thresholds is not None else None)
        assert sum(map(sum, layer["entropy_histogram"]["counts"].values())) == len(real)
        if i in report["attention_layers"]:
            for (b, t), op in zip(real, chosen):
                sent.setdefault(ids[b][t], [0, 0])[1] += op == "attention"
    for b, t in real:
        sent.setdefault(ids[b][t], [0, 0])[0] += 1
    assert report["attention_layers"] == [1, 2]

    ranking = {row["id"]: row for row in report["attention_tokens"]["most"]}
    assert set(ranking) == set(sent)
    for token_id, (count, attention) in sent.items():
        assert (ranking[token_id]["count"], ranking[token_id]["attention"]) == (count, attention)
        assert ranking[token_id]["share"] == attention / (2 * count)
    total_sent = sum(a for _, a in sent.values())
    assert report["attention_share"]["overall"] == total_sent / (2 * len(real))
    by_category = {}
    for token_id, (count, attention) in sent.items():
        entry = by_category.setdefault(token_category(tokenizer.decode([token_id])), [0, 0])
        entry[0], entry[1] = entry[0] + count, entry[1] + attention
    for name, (count, attention) in by_category.items():
        assert report["categories"][name]["occurrences"] == count
        assert report["categories"][name]["attention_share"]["overall"] == attention / (2 * count)
    assert sum(b["occurrences"] for b in report["frequency_buckets"]) == len(real)


def test_batching_does_not_change_the_statistics(model, tokenizer):
    one = routing_statistics(model, tokenizer, DOCS, batch_size=1)
    three = routing_statistics(model, tokenizer, DOCS, batch_size=3)
    assert [l["counts"] for l in one["layers"]] == [l["counts"] for l in three["layers"]]


def test_report_files(tmp_path, model, tokenizer):
    report = routing_statistics(model, tokenizer, corpus(12), min_count=2)
    path = write_report(report, tmp_path / "stats")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["charts"] == ["shares.png", "entropy.png", "attention_by_token.png"]
    from PIL import Image

    for name in saved["charts"]:
        assert (tmp_path / "stats" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(tmp_path / "stats" / name) as image:
            assert image.size[0] > 300
    assert all(row["count"] >= 2 for row in saved["attention_tokens"]["most"])


def test_fit_boundaries_gives_exact_shares():
    scores = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    boundaries = fit_boundaries(scores, [0.5, 0.3, 0.2])
    ids = torch.bucketize(scores, torch.tensor(boundaries, dtype=torch.float32))
    assert torch.bincount(ids, minlength=3).tolist() == [500, 300, 200]


def lm_records(n=24, words=40):
    return [{"text": text} for text in corpus(n, words)]


def test_audit_random_control_matches_the_measured_shares(model, tokenizer):
    report = audit(model, tokenizer, lm_records(16), max_length=128, batch_size=8)
    assert report["metric"] == "perplexity" and report["tokens"] > 1000
    assert set(report["variants"]) == {"trained", "random", "inverted"}
    measured = report["measured_shares"]
    one_position = math.ceil(report["tokens"] / 128) / report["tokens"]  # blocks of 128 tokens: about 1/128
    assert measured["1"]["attention"] > 0.05  # something to match
    for name in ("random", "inverted"):
        realised = report["variants"][name]["shares"]
        for layer in measured:
            for op, share in measured[layer].items():
                # the position hash cannot split the tokens at one position: off by less than one position's share
                assert abs(realised[layer][op] - share) < one_position, (name, layer, op)
        assert report["variants"][name]["perplexity"] > 1
    assert all(isinstance(layer.mixer.router, ThresholdRouter) for layer in model.model.layers[1:3])  # restored


def test_inverted_control_keeps_shares_but_sends_other_tokens_to_attention(model, tokenizer):
    texts = [r["text"] for r in lm_records(8)]
    batches = [(ids, mask) for ids, mask in make_batches((tokenizer(t)["input_ids"] for t in texts), 8, tokenizer.pad_token_id)]
    real = batches[0][1].bool()
    model = copy.deepcopy(model)  # thresholds at this batch's quantiles: about 25% attention, whatever the tokenizer
    with torch.no_grad(), unbudgeted(model):  # routers compared on their own choices, as the audit does
        for i in (1, 2):
            entropy = model(batches[0][0], attention_mask=batches[0][1], output_routing=True).routing[i].entropy[real]
            model.model.layers[i].mixer.router.thresholds.copy_(torch.quantile(entropy, torch.tensor([0.4, 0.75])))
        trained = model(batches[0][0], attention_mask=batches[0][1], output_routing=True).routing
    shares = {str(i): trained[i].shares() for i in (1, 2)}
    routers = inverted_routers(model, batches, shares)
    assert all(isinstance(r, InvertedEntropyRouter) for r in routers.values())
    with swapped_routers(model, routers), torch.no_grad(), unbudgeted(model):
        inverted = model(batches[0][0], attention_mask=batches[0][1], output_routing=True).routing
    for i in (1, 2):  # equal up to ties (one token id at one position has one entropy): a few of ~480 tokens
        assert inverted[i].shares() == pytest.approx(trained[i].shares(), abs=0.01)
    # Layer 1's entropies are the same in both runs (layer 0 is not routed): the attention sets are disjoint,
    # and every token the inverted router sends to attention has lower entropy than any the trained one sends.
    attention = trained[1].operators.index("attention")
    was = (trained[1].operator_ids == attention) & real
    now = (inverted[1].operator_ids == attention) & real
    torch.testing.assert_close(inverted[1].entropy, trained[1].entropy)
    assert not bool((was & now).any()) and abs(int(now.sum()) - int(was.sum())) <= 5
    assert float(inverted[1].entropy[now].max()) < float(trained[1].entropy[was].min())
    # and the random control's choice does not depend on entropy at all: a hash of (layer, position)
    router = MatchedRandomRouter(1, [0.5])
    positions = torch.arange(10)[None]
    first = router(torch.zeros(1, 10, 4), torch.rand(1, 10), positions, None).operator_ids
    assert torch.equal(first, router(torch.zeros(1, 10, 4), torch.rand(1, 10), positions, None).operator_ids)


def test_audit_rejects_bad_input(tokenizer):
    baseline = build(ChiarForCausalLM, "baseline", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="no routed layer"):
        audit(baseline, tokenizer, lm_records(2))
    soft = build(ChiarForCausalLM, "soft-dct+attention", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="soft router"):
        audit(soft, tokenizer, lm_records(2))
    with pytest.raises(FileNotFoundError, match="not found"):
        list(read_documents(["/nonexistent/valid.txt"]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, tokenizer):
    folder = tmp_path_factory.mktemp("models")
    model.save_pretrained(folder / "lm")
    tokenizer.save_pretrained(folder / "lm")
    classifier = build(ChiarForSequenceClassification, "chiar-threshold", is_causal=False, num_labels=2,
                       vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    classifier.config.label2id, classifier.config.id2label = {"neg": 0, "pos": 1}, {0: "neg", 1: "pos"}
    classifier.save_pretrained(folder / "clf")
    tokenizer.save_pretrained(folder / "clf")
    return folder


def test_cli_stats_and_audit_end_to_end(tmp_path, saved, capsys):
    (tmp_path / "valid.txt").write_text("\n".join(corpus(16, 30)) + "\n", encoding="utf-8")
    cli_main(["stats", str(saved / "lm"), str(tmp_path / "valid.txt"), "-o", str(tmp_path / "stats"), "--min-count", "2"])
    report = json.loads((tmp_path / "stats" / "report.json").read_text())
    assert report["sequences"] == 16 and (tmp_path / "stats" / "entropy.png").is_file()
    assert "function word" in capsys.readouterr().out

    cli_main(["audit", str(saved / "lm"), str(tmp_path / "valid.txt"), "-o", str(tmp_path / "audit.json"), "--max-length", "64",
             "--max-documents", "6"])
    audit_report = json.loads((tmp_path / "audit.json").read_text())
    assert audit_report["metric"] == "perplexity" and set(audit_report["variants"]) == {"trained", "random", "inverted"}
    assert "random" in capsys.readouterr().out

    rows = [{"text": text, "label": "pos" if i % 2 else "neg"} for i, text in enumerate(corpus(10))]
    (tmp_path / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    cli_main(["audit", str(saved / "clf"), str(tmp_path / "valid.jsonl"), "-o", str(tmp_path / "clf.json"), "--variants", "trained", "random"])
    clf = json.loads((tmp_path / "clf.json").read_text())
    assert clf["metric"] == "accuracy" and 0 <= clf["variants"]["random"]["accuracy"] <= 1
    assert clf["variants"]["trained"]["examples"] == 10

    with pytest.raises(SystemExit, match="not found"):
        cli_main(["stats", str(saved / "lm"), str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        cli_main(["audit", str(saved / "clf"), str(tmp_path / "valid.txt"), "-o", str(tmp_path / "y.json")])  # no label column
