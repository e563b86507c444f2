"""Save/load round trips: safetensors, calibrated buffers bit-exact, and the Hub remote-code path."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from harness import build, random_ids
from modeling_chiar import ChiarForCausalLM, ChiarForSequenceClassification, ChiarModel

AUTO_CLASSES = {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}


def calibrated(model_class, variant, **overrides):
    model = build(model_class, variant, hidden_dropout=0.1, **overrides).train()
    with torch.no_grad():
        for seed in range(3):
            model(random_ids(4, 32, seed=seed))
    return model.eval()


@pytest.mark.parametrize("variant", ["chiar-3op", "chiar-learned", "meta-router", "all-rbf"])
def test_save_load_round_trip_is_bit_exact(tmp_path, variant):
    model = calibrated(ChiarForCausalLM, variant)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded, info = ChiarForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, value in original.items():
        assert torch.equal(value, restored[name]), name
    for (name, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), name  # non-persistent buffers too
    ids = random_ids(2, 20, seed=9)
    # Equal tensors; outputs equal up to BLAS paths that depend on memory alignment (loaded tensors
    # are views into the file), which can move the last bit.
    torch.testing.assert_close(model(ids).logits, loaded.eval()(ids).logits, atol=1e-6, rtol=0)


def test_calibrated_thresholds_are_in_the_checkpoint(tmp_path):
    model = calibrated(ChiarForCausalLM, "chiar-threshold")
    router = model.model.layers[1].mixer.router
    assert int(router.num_updates) == 3
    model.save_pretrained(tmp_path)
    loaded = ChiarForCausalLM.from_pretrained(tmp_path).model.layers[1].mixer.router
    assert torch.equal(loaded.thresholds, router.thresholds)
    assert torch.equal(loaded.train_thresholds, router.train_thresholds)
    assert int(loaded.num_updates) == 3


def test_heads_load_each_others_bodies(tmp_path):
    lm = calibrated(ChiarForCausalLM, "chiar-3op")
    lm.save_pretrained(tmp_path)
    body = ChiarModel.from_pretrained(tmp_path)
    classifier = ChiarForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    for name, value in lm.model.state_dict().items():
        assert torch.equal(body.state_dict()[name], value)
        assert torch.equal(classifier.model.state_dict()[name], value)


def test_saved_folder_has_code_and_a_complete_auto_map(tmp_path):
    build(ChiarForCausalLM, "chiar-threshold").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == AUTO_CLASSES
    for reference in config["auto_map"].values():
        assert (tmp_path / (reference.split(".")[0] + ".py")).exists()
    for module in ("configuration_chiar", "modeling_chiar", "routing", "spectral", "operator_dct",
                   "operator_rbf", "operator_attention", "flops", "fp32_buffers"):
        assert (tmp_path / f"{module}.py").exists(), module
    assert not (tmp_path / "__init__.py").exists()


REMOTE = textwrap.dedent(
    """
    import importlib.abc, sys, torch

    class NoProject(importlib.abc.MetaPathFinder):  # this process cannot import the project at all
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_chiar", "configuration_chiar"):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoProject())
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    path, ids = sys.argv[1], torch.tensor([[5, 6, 7, 8, 9]])
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    lm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(lm).__module__.startswith("transformers_modules"), type(lm).__module__
    torch.save({"logits": lm(ids).logits, "config": type(config).__name__,
                "body": type(AutoModel.from_pretrained(path, trust_remote_code=True)).__name__,
                "clf": AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)(ids).logits.shape},
               sys.argv[2])
    """
)


def test_remote_code_round_trip_without_the_project(tmp_path):
    model = calibrated(ChiarForCausalLM, "chiar-3op")
    model.save_pretrained(tmp_path / "ckpt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE, str(tmp_path / "ckpt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["config"] == "ChiarConfig" and out["body"] == "ChiarModel" and out["clf"] == (1, 2)
    torch.testing.assert_close(out["logits"], model(torch.tensor([[5, 6, 7, 8, 9]])).logits, atol=1e-6, rtol=0)


def test_remote_code_classifier_checkpoint(tmp_path):
    model = calibrated(ChiarForSequenceClassification, "chiar-random", is_causal=False, num_labels=3)
    model.save_pretrained(tmp_path / "clf")
    code = REMOTE.replace('lm = AutoModelForCausalLM', 'lm = AutoModelForSequenceClassification').replace(
        '"logits": lm(ids).logits', '"logits": lm(ids).logits, "_": 0')
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "clf"), str(tmp_path / "out.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(out["logits"], model(torch.tensor([[5, 6, 7, 8, 9]])).logits, atol=1e-6, rtol=0)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    build(ChiarForCausalLM, "chiar-threshold").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ChiarForCausalLM.from_pretrained(tmp_path)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    build(ChiarForCausalLM, "chiar-threshold").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match this model's architecture"):
        ChiarForCausalLM.from_pretrained(tmp_path, layer_schedule=["attention"] * 4)
    with pytest.raises(Exception, match="ignore_mismatched_sizes|size mismatch|mismatch"):
        ChiarForCausalLM.from_pretrained(tmp_path, intermediate_size=128)
    relaxed = ChiarForCausalLM.from_pretrained(tmp_path, layer_schedule=["attention"] * 4, strict_architecture=False)
    assert relaxed.config.layer_schedule == ["attention"] * 4
    # Asking for the loading report means reading it yourself, as with any transformers model.
    _, info = ChiarForCausalLM.from_pretrained(tmp_path, layer_schedule=["attention"] * 4, output_loading_info=True)
    assert any("attention.q_proj" in key for key in info["missing_keys"])


def test_a_config_that_disagrees_with_the_weights_is_refused(tmp_path):
    """A post-norm config on a pre-norm checkpoint (the final norm's weights unused), and untied word
    embeddings on a checkpoint saved tied (a random LM head), fail loudly instead of loading."""
    model = calibrated(ChiarForCausalLM, "chiar-threshold")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match this model's architecture.*model.norm"):
        ChiarForCausalLM.from_pretrained(tmp_path, norm_position="post")
    with pytest.raises(ValueError, match="no LM head weights.*tie_word_embeddings=False"):
        ChiarForCausalLM.from_pretrained(tmp_path, tie_word_embeddings=False)
    ChiarForCausalLM.from_pretrained(tmp_path, tie_word_embeddings=False, strict_architecture=False)  # asked for


def test_routing_settings_given_at_load_win_over_the_checkpoints_buffers(tmp_path):
    model = calibrated(ChiarForCausalLM, "chiar-3op")
    model.save_pretrained(tmp_path)
    fixed = ChiarForCausalLM.from_pretrained(tmp_path, router_thresholds=[0.7, 0.9]).model.layers[1].mixer.router
    assert fixed.thresholds.tolist() == pytest.approx([0.7, 0.9]) and not fixed.calibrate
    targets = {"dct": 0.5, "rbf": 0.25, "attention": 0.25}
    retargeted = ChiarForCausalLM.from_pretrained(tmp_path, router_target_fractions=targets)
    router = retargeted.model.layers[1].mixer.router
    assert int(router.num_updates) == 0 and router.quantile_levels == pytest.approx([0.5, 0.75])
    from modeling_chiar.routing import initial_thresholds

    assert torch.equal(router.thresholds, initial_thresholds(retargeted.config))
    # A checkpoint whose own config.json fixes thresholds its buffers do not hold is refused.
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "router_thresholds": [0.7, 0.9]}))
    with pytest.raises(ValueError, match="disagrees with itself"):
        ChiarForCausalLM.from_pretrained(tmp_path)
