"""Hub-ready folders: model card, code, tokenizer; loading both ways in a fresh process; push_to_hub up to the upload."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from harness import build, calibrated_lm, tiny_tokenizer
from chiar.evaluation import RoutingAccumulator
from chiar.hub import main as export_main
from chiar.hub import save_for_hub
from modeling_chiar import ChiarForCausalLM, ChiarForSequenceClassification


def evaluation_of(model, tokenizer):
    accumulator = RoutingAccumulator(model.config)
    batch = tokenizer(["the light falls where detail is needed", "smooth tokens"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"], output_routing=True)
    accumulator.add(out.routing)
    return {"eval_loss": float(out.loss), "perplexity": float(torch.exp(out.loss)),
            **{f"eval_{k}": v for k, v in accumulator.metrics().items()}}


def test_save_for_hub_writes_an_uploadable_folder_with_a_model_card(tmp_path):
    tokenizer = tiny_tokenizer()
    model = calibrated_lm(tokenizer)
    evaluation = evaluation_of(model, tokenizer)
    path = save_for_hub(model, tmp_path / "hub", tokenizer=tokenizer, evaluation=evaluation,
                        datasets=["wikitext"], repo_id="someone/chiar-tiny")
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "modeling_chiar.py", "configuration_chiar.py",
            "tokenizer.json"} <= names
    config = json.loads((path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}

    from huggingface_hub import ModelCard

    card = ModelCard.load(path / "README.md")
    assert card.data.library_name == "transformers"
    assert "chiar" in card.data.tags and card.data.datasets == ["wikitext"]
    assert set(card.data.metrics) == {"loss", "perplexity"}
    text = card.text
    router = model.model.layers[1].mixer.router
    assert f"{router.thresholds[0].item():.5f}" in text  # calibrated thresholds of each routed layer
    assert "['dct', 'rbf', 'attention']" in text and "threshold" in text
    share = evaluation["eval_routing_layer1_attention"]
    assert f"{share:.3f}" in text  # per-layer routing shares from the evaluation
    assert f"{evaluation['eval_attention_flops_fraction']:.3f}" in text
    assert 'from_pretrained("someone/chiar-tiny", trust_remote_code=True)' in text and "import modeling_chiar" in text
    for settings, said in ((dict(), "by the auxiliary loss (weight 5.0)"), (dict(router_share_control="bias"), "by the share bias")):
        learned = build(ChiarForCausalLM, "chiar-learned", vocab_size=len(tokenizer), **settings)
        assert said in (save_for_hub(learned, tmp_path / f"learned-{len(settings)}") / "README.md").read_text()


LOAD_BOTH_WAYS = textwrap.dedent(
    """
    import importlib.abc, sys, torch
    path, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "remote":
        class NoProject(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("modeling_chiar", "configuration_chiar", "chiar"):
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, NoProject())
    else:
        import modeling_chiar
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    kwargs = {"trust_remote_code": True} if mode == "remote" else {}
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("the light falls", return_tensors="pt")["input_ids"]
    head = AutoModelForCausalLM if "lm" in path else AutoModelForSequenceClassification
    model = head.from_pretrained(path, **kwargs).eval()
    base = AutoModel.from_pretrained(path, **kwargs)
    assert (type(model).__module__.startswith("transformers_modules")) == (mode == "remote"), type(model).__module__
    torch.save({"logits": model(ids).logits, "ids": ids, "base": type(base).__name__}, out)
    """
)


@pytest.mark.parametrize("head", ["lm", "clf"])
@pytest.mark.parametrize("mode", ["installed", "remote"])
def test_hub_folder_loads_both_ways_in_a_fresh_process(tmp_path, head, mode):
    tokenizer = tiny_tokenizer()
    if head == "lm":
        model = calibrated_lm(tokenizer)
    else:
        model = build(ChiarForSequenceClassification, "random-dct+rbf+attention", is_causal=False, num_labels=3,
                      vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).eval()
    folder = save_for_hub(model, tmp_path / head, tokenizer=tokenizer)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", LOAD_BOTH_WAYS, str(folder), mode, str(tmp_path / "out.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["base"] == "ChiarModel"
    torch.testing.assert_close(out["logits"], model(out["ids"]).logits, atol=1e-6, rtol=0)


def test_export_cli(tmp_path):
    tokenizer = tiny_tokenizer()
    model = calibrated_lm(tokenizer)
    model.save_pretrained(tmp_path / "trained")
    tokenizer.save_pretrained(tmp_path / "trained")
    (tmp_path / "eval_results.json").write_text(json.dumps(evaluation_of(model, tokenizer)))
    export_main([str(tmp_path / "trained"), str(tmp_path / "export"), "--eval-results", str(tmp_path / "eval_results.json"),
                 "--dataset", "wikitext"])
    assert (tmp_path / "export" / "README.md").exists() and (tmp_path / "export" / "tokenizer.json").exists()
    assert "Routing shares" in (tmp_path / "export" / "README.md").read_text()


def test_push_to_hub_uploads_code_and_weights(monkeypatch):
    """The standard transformers method, with the Hub calls intercepted just before the network."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    uploaded, created = {}, []

    class Repo:
        repo_id = "someone/chiar-tiny"

    def create_repo(self, repo_id, **kwargs):
        created.append(repo_id)
        return Repo()

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            source = op.path_or_fileobj
            uploaded[op.path_in_repo] = open(source, "rb").read() if isinstance(source, str) else source
        return None

    def no_card(*args, **kwargs):
        raise EntryNotFoundError("no card yet")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(lambda cls, *a, **k: no_card()))
    model = build(ChiarForCausalLM, "chiar-threshold")
    model.push_to_hub("someone/chiar-tiny")
    assert created == ["someone/chiar-tiny"]
    assert {"config.json", "model.safetensors", "modeling_chiar.py", "routing.py", "cache.py"} <= set(uploaded)
    assert set(json.loads(uploaded["config.json"])["auto_map"]) >= {"AutoModelForCausalLM", "AutoConfig"}


def test_model_card_summarises_routing_statistics(tmp_path):
    from chiar.routing_stats import routing_statistics, write_report

    tokenizer = tiny_tokenizer()
    model = calibrated_lm(tokenizer)
    texts = ["the light falls where detail is needed, and the dark keeps the rest", "a small model routes each token"] * 3
    stats = routing_statistics(model, tokenizer, texts, min_count=2)
    report = write_report(stats, tmp_path / "stats")
    export_main([_saved(model, tokenizer, tmp_path), str(tmp_path / "export"), "--routing-stats", str(report)])
    text = (tmp_path / "export" / "README.md").read_text()
    assert "## Routing statistics" in text and f"over {stats['tokens']} tokens" in text
    assert f"| 1 | routed | {stats['layers'][1]['shares']['dct']:.3f} |" in text
    for name in ("function words", "punctuation", "other tokens"):
        assert f"| {name} |" in text
    assert f"{stats['attention_tokens']['most'][0]['token']!r}" in text
    card = save_for_hub(model, tmp_path / "api", routing_statistics=stats)
    assert "## Routing statistics" in (card / "README.md").read_text()
    assert "## Routing statistics" not in (save_for_hub(model, tmp_path / "plain") / "README.md").read_text()


def test_model_card_states_the_routers_measured_signal_beside_its_shares(tmp_path):
    from chiar.audit import audit, write_audit

    tokenizer = tiny_tokenizer()
    model = calibrated_lm(tokenizer)
    records = [{"text": "the light falls where detail is needed, and the dark keeps the rest"}, {"text": "a small model routes each token"}] * 3
    report = audit(model, tokenizer, records, max_length=32)
    path = write_audit(report, tmp_path / "audit.json")
    export_main([_saved(model, tokenizer, tmp_path), str(tmp_path / "export"), "--audit", str(path)])
    text = (tmp_path / "export" / "README.md").read_text()
    assert "## Router signal" in text and f"over {report['tokens']} tokens" in text
    for name, result in report["variants"].items():
        shares = ", ".join(f"{s.get('attention', 0.0):.3f}" for s in result["shares"].values())
        assert f"| {name} | {result['perplexity']:.4g} | {result['max_share_deviation']:.4f} | {shares} |" in text
    gap = report["variants"]["trained"]["perplexity"] - report["variants"]["random"]["perplexity"]
    assert f"**{gap:+.4g}** perplexity" in text
    (tmp_path / "stats.json").write_text(json.dumps({"tokens": 3}))  # a stats report is not an audit
    with pytest.raises(SystemExit, match="not a `chiar-routing audit` report"):
        export_main([_saved(model, tokenizer, tmp_path), str(tmp_path / "again"), "--audit", str(tmp_path / "stats.json")])
    assert not (tmp_path / "again").exists()


def _saved(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "trained")
    tokenizer.save_pretrained(tmp_path / "trained")
    return str(tmp_path / "trained")
