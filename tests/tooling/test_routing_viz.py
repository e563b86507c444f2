"""Routing renderings (PNG, HTML), the Trainer callback and `chiar-routing render`: tiny models, local tokenizers."""

import html
import json
import logging
import re

import pytest
import torch

from harness import build
from chiar.callbacks import RoutingLoggingCallback, routing_metrics
from chiar.cli import main as cli_main
from chiar.routing_viz import display_label, render_routing, route_text, token_pieces, wrap_tokens
from modeling_chiar import ChiarForCausalLM

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT = "the light falls where detail is needed & the dark keeps <the rest><eos>"


def byte_level_tokenizer():
    """A byte-level BPE over the full byte alphabet, so any UTF-8 text round-trips."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>"], initial_alphabet=alphabet,
                                             show_progress=False)
    tok.train_from_iterator(["the café is naïve, the light falls"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def read_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 200
    return pixels


def test_render_writes_a_png_and_an_html_page_that_names_every_token(tmp_path, model, tokenizer):
    view = render_routing(model, tokenizer, TEXT, png_path=tmp_path / "r.png", html_path=tmp_path / "r.html")
    read_png(tmp_path / "r.png")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")

    ids = tokenizer(TEXT)["input_ids"]
    assert view.token_ids == ids
    for i, token_id in enumerate(ids):  # every decoded token appears, escaped
        decoded = tokenizer.decode([token_id])
        assert view.tokens[i] == decoded
        assert f'">{html.escape(display_label(decoded))}</div>' in page
    # Special tokens are escaped, not markup (the page shows "&lt;eos&gt;", never a tag).
    assert "<eos>" in view.tokens and "&lt;eos&gt;" in page and "<eos>" not in page
    # hover: each (token, layer) cell carries the token's entropy and the layer's thresholds
    thresholds = model.model.layers[1].mixer.router.thresholds.tolist()
    tip = f"entropy {view.entropy[1][3]:.5f} · thresholds {thresholds[0]:.5f}, {thresholds[1]:.5f}"
    assert html.escape(tip) in page
    assert len(re.findall(r'class="cell op-', page)) == len(ids) * model.config.num_hidden_layers
    assert "attention (light)" in page and "DCT mixing (dark)" in page  # legend
    assert "http" not in page and "src=" not in page  # self-contained

    with torch.no_grad():  # the view is exactly what the forward pass reports
        routing = model(torch.tensor([ids]), output_routing=True).routing
    for layer, record in enumerate(routing):
        assert view.operators[layer] == [record.operators[k] for k in record.operator_ids[0].tolist()]
        assert view.shares(layer) == pytest.approx(record.shares())
        torch.testing.assert_close(torch.tensor(view.entropy[layer]), record.entropy[0].float())


def test_non_ascii_text_and_byte_level_pieces(tmp_path):
    tokenizer = byte_level_tokenizer()
    model = build(ChiarForCausalLM, "chiar-threshold", vocab_size=len(tokenizer), pad_token_id=0)
    text = "the café is naïve — 日本語 “quotes” <b>&amp;</b>"
    view = render_routing(model, tokenizer, text, png_path=tmp_path / "u.png", html_path=tmp_path / "u.html")
    assert "".join(view.tokens) == text  # multi-byte characters are not broken into U+FFFD
    assert any(piece.startswith(" ") for piece in view.tokens)  # "Ġ" decoded as a space
    page = (tmp_path / "u.html").read_text(encoding="utf-8")
    assert "Ġ" not in page and "caf" in page and "日" in page and "“" in page
    for piece in view.tokens:
        assert f'">{html.escape(display_label(piece))}</div>' in page
    assert "<b>" not in page and "&lt;" in page and "&amp;" in page
    read_png(tmp_path / "u.png")


def test_long_text_is_truncated_with_a_warning_and_wraps(tmp_path, tokenizer):
    model = build(ChiarForCausalLM, "chiar-threshold", vocab_size=len(tokenizer), max_position_embeddings=48)
    text = " ".join(["the light falls where detail is needed"] * 20)
    with pytest.warns(UserWarning, match="max_position_embeddings=48"):
        view = render_routing(model, tokenizer, text, png_path=tmp_path / "long.png", chars_per_line=40)
    assert len(view.tokens) == 48 and view.truncated == len(tokenizer(text)["input_ids"]) - 48
    lines = wrap_tokens(view.tokens, 40)
    assert len(lines) > 2 and sum(len(line) for line in lines) == 48
    read_png(tmp_path / "long.png")
    with pytest.raises(ValueError, match="empty"):
        route_text(model, tokenizer, "")


def test_token_pieces_hold_incomplete_characters_for_the_next_token():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer("日本")["input_ids"]
    pieces = token_pieces(tokenizer, ids)
    assert "".join(pieces) == "日本" and "\ufffd" not in "".join(pieces)


class FakeWriter:
    def __init__(self, log_dir=None):
        self.log_dir, self.figures = log_dir, []

    def add_figure(self, tag, figure, global_step=None):
        self.figures.append((tag, global_step))

    def flush(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("tensorboard", [False, True])
def test_callback_logs_routing_metrics_and_renders_the_sample(tmp_path, model, tokenizer, caplog, monkeypatch, tensorboard):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    import chiar.callbacks as callbacks

    writers = []
    monkeypatch.setattr(callbacks, "_summary_writer", lambda log_dir: writers.append(FakeWriter(log_dir)) or writers[-1] if tensorboard else None)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state = TrainerState(global_step=7)
    metrics = {"eval_loss": 4.0, "eval_routing_layer1_dct": 0.5, "eval_routing_layer1_attention": 0.25, "eval_routing_layer1_rbf": 0.25,
               "eval_entropy_layer1": 0.81, "eval_entropy_layer0": 0.79}
    assert routing_metrics(metrics) == {0: {"mean_entropy": 0.79}, 1: {"shares": {"dct": 0.5, "attention": 0.25, "rbf": 0.25}, "mean_entropy": 0.81}}
    callback = RoutingLoggingCallback()
    model.train()
    with caplog.at_level(logging.INFO, logger="chiar.callbacks"):
        callback.on_evaluate(args, state, TrainerControl(), metrics=metrics, model=model, processing_class=tokenizer)
    assert model.training  # the caller's mode is restored
    model.eval()
    assert "layer 1: dct 0.500, attention 0.250, rbf 0.250; mean entropy 0.8100" in caplog.text
    read_png(tmp_path / "routing" / "step-7.png")
    history = [json.loads(line) for line in (tmp_path / "routing" / "history.jsonl").read_text().splitlines()]
    assert history == [{"step": 7, "layers": {"0": {"mean_entropy": 0.79}, "1": {"shares": {"dct": 0.5, "attention": 0.25, "rbf": 0.25},
                                                                               "mean_entropy": 0.81}}}]
    if tensorboard:
        assert writers[0].figures == [("routing/sample_text", 7)]
    else:
        assert callback._writer is None and not callback.tensorboard  # skipped quietly


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, model, tokenizer):
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_render_end_to_end(tmp_path, saved_model, capsys):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    cli_main(["render", str(saved_model), "--text-file", str(tmp_path / "text.txt"), "-o", str(tmp_path / "out" / "routing")])
    read_png(tmp_path / "out" / "routing.png")
    assert "attention (light)" in (tmp_path / "out" / "routing.html").read_text(encoding="utf-8")
    assert "tokens, 4 layers" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="missing: no such folder or file"):
        cli_main(["render", str(tmp_path / "missing"), "--text", "x", "-o", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not found"):
        cli_main(["render", str(saved_model), "--text-file", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x")])
