"""See where a CHIAR model pays attention: every token of a text, layer by layer, shaded by the
operator it was routed to ("light where detail is needed, dark elsewhere").

    view = render_routing("path/to/model", None, "The light falls where detail is needed.",
                          png_path="routing.png", html_path="routing.html")
    view.tokens, view.operators[1], view.entropy[1], view.thresholds[1]

Attention is drawn light, RBF mixing mid-grey, DCT mixing dark. The PNG (matplotlib, Agg) is for
papers and TensorBoard; the HTML page is self-contained (no external resources) and shows each
token's entropy and its layer's thresholds on hover. Everything comes from the model's own
records (`outputs.routing`), so the picture is exactly what the forward pass did.
"""

import html
import math
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chiar.loading import eval_mode, load_model

# Light for attention, dark for DCT, RBF in between: the chiaroscuro the model is named after.
OPERATOR_COLORS = {"attention": "#fbe8a6", "rbf": "#8c7d99", "dct": "#22253a"}
OPERATOR_LABELS = {"attention": "attention (light)", "rbf": "RBF mixing", "dct": "DCT mixing (dark)"}
FONT_FAMILY = ["DejaVu Sans Mono", "DejaVu Sans"]  # both ship with matplotlib; wide glyph coverage


# --------------------------------------------------------------------------------------------
# routing one text


@dataclass
class RoutingView:
    """What one forward pass did to one text: per layer, each token's operator and entropy."""

    text: str
    token_ids: list  # ids fed to the model (after truncation)
    tokens: list  # the text each token stands for, decoded with the tokenizer ("Ġthe" -> " the")
    layer_kinds: list  # layer_schedule entry per layer ("dct", "routed", ...)
    layer_operators: list  # per layer: the operators it can run, cheapest first
    operators: list  # per layer: the operator name each token took
    entropy: list  # per layer: each token's spectral entropy in [0, 1]
    thresholds: list  # per layer: the eval thresholds (threshold router) or None
    layer_shares: list  # per layer: each operator's share of the tokens (`LayerRouting.shares()`)
    truncated: int = 0  # tokens dropped to fit max_position_embeddings
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self):
        return len(self.operators)

    def shares(self, layer):
        """Each operator's share of this text's tokens at `layer`."""
        return self.layer_shares[layer]


def token_pieces(tokenizer, ids):
    """The text each token contributes, decoded with the tokenizer.

    Decoding token by token turns byte-level BPE pieces into text ("Ġthe" -> " the") but breaks
    characters split over several byte tokens into U+FFFD. Decoding a short window incrementally
    fixes that: a token that ends mid-character gets "" and the next one carries the character.
    """
    pieces, start = [], 0  # start: first token whose text has not been emitted yet
    for i in range(len(ids)):
        context = max(0, start - 4)
        prefix = tokenizer.decode(ids[context:start], clean_up_tokenization_spaces=False)
        full = tokenizer.decode(ids[context : i + 1], clean_up_tokenization_spaces=False)
        if full.endswith("\ufffd") and i + 1 < len(ids) and i - start < 4:
            pieces.append("")  # an incomplete character: its text comes with a later token
            continue
        if full.startswith(prefix):
            text = full[len(prefix) :]
        else:
            text = tokenizer.decode(ids[start : i + 1], clean_up_tokenization_spaces=False)
        pieces.append(text)
        start = i + 1
    return pieces


def _truncate(ids, config, max_length):
    limit = config.max_position_embeddings if max_length is None else min(max_length, config.max_position_embeddings)
    if len(ids) <= limit:
        return ids, 0
    warnings.warn(
        f"The text has {len(ids)} tokens, more than this model takes at once ({limit}, max_position_embeddings="
        f"{config.max_position_embeddings}); only the first {limit} are shown.",
        stacklevel=3,
    )
    return ids[:limit], len(ids) - limit


def route_text(model, tokenizer, text, max_length=None):
    """Run `text` through the model (eval mode, no grad) and collect its routing as a RoutingView."""
    model, tokenizer = load_model(model, tokenizer)
    if not isinstance(text, str) or not text:
        raise ValueError("The text to render is empty.")
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise ValueError(f"The tokenizer produced no tokens for {text[:40]!r}.")
    ids, dropped = _truncate(ids, model.config, max_length)
    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():
        outputs = model(torch.tensor([ids], device=device), output_routing=True)
    return view_from_records(outputs.routing, model.config, text, ids, token_pieces(tokenizer, ids), dropped)


def view_from_records(routing, config, text, ids, pieces, truncated=0):
    """A RoutingView from the records of a one-sequence, unpadded forward pass."""
    operators, entropy, thresholds, layer_operators = [], [], [], []
    for record in routing:
        names = record.operators
        layer_operators.append(list(names))
        operators.append([names[k] for k in record.operator_ids[0].tolist()])
        entropy.append(record.entropy[0].float().tolist() if record.entropy is not None else [math.nan] * len(ids))
        thresholds.append(record.thresholds.float().tolist() if record.thresholds is not None else None)
    meta = {"router_type": config.router_type, "hidden_size": config.hidden_size, "name": getattr(config, "_name_or_path", "")}
    return RoutingView(text, list(ids), pieces, list(config.layer_schedule), layer_operators, operators, entropy, thresholds,
                       [record.shares() for record in routing], truncated, meta)


# --------------------------------------------------------------------------------------------
# layout shared by the PNG and the HTML page


def display_label(piece):
    """What a token cell shows: control characters made visible, an empty piece as a dot."""
    label = piece.replace("\r\n", "↵").replace("\n", "↵").replace("\t", "⇥").replace("\r", "↵")
    label = "".join(ch if unicodedata.category(ch)[0] != "C" else "�" for ch in label)
    return label if label else "·"


def text_width(label):
    """Width in monospace cells: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in label)


def wrap_tokens(pieces, chars_per_line):
    """Token indices per line, wrapping at `chars_per_line` cells and after newlines."""
    lines, line, used = [], [], 0
    for i, piece in enumerate(pieces):
        width = max(text_width(display_label(piece)), 1) + 1
        if line and used + width > chars_per_line:
            lines.append(line)
            line, used = [], 0
        line.append(i)
        used += width
        if "\n" in piece:
            lines.append(line)
            line, used = [], 0
    if line:
        lines.append(line)
    return lines


def layer_label(view, layer):
    label = f"L{layer} {view.layer_kinds[layer]}"
    if view.thresholds[layer]:
        label += " τ " + "/".join(f"{t:.3f}" for t in view.thresholds[layer])
    return label


def token_tooltip(view, i, layer):
    """Hover text for one (token, layer) cell: token, operator, entropy, thresholds."""
    tip = f"{display_label(view.tokens[i])!r} (token {i}, id {view.token_ids[i]}) · layer {layer} ({view.layer_kinds[layer]}) → "
    tip += f"{view.operators[layer][i]} · entropy {view.entropy[layer][i]:.5f}"
    if view.thresholds[layer]:
        tip += " · thresholds " + ", ".join(f"{t:.5f}" for t in view.thresholds[layer])
    return tip


# --------------------------------------------------------------------------------------------
# PNG


def routing_figure(view, chars_per_line=100, font_size=9):
    """A matplotlib Figure (Agg): per wrapped line of text, a row of tokens over one band per layer."""
    from matplotlib.figure import Figure  # not pyplot: no global state, and savefig uses Agg
    from matplotlib.patches import Patch, Rectangle

    lines = wrap_tokens(view.tokens, chars_per_line)
    layers = view.num_layers
    band = 1.0 if layers <= 8 else max(0.35, 8.0 / layers)  # many layers: thinner bands
    block = 1.0 + layers * band + 0.7  # token row, the bands, a gap
    char_in = 0.62 * font_size / 72  # width of one monospace cell in inches
    row_in = 1.9 * font_size / 72
    label_in, right_in, top_in, legend_in = 1.9, 0.2, 0.55, 0.55
    width_in = label_in + chars_per_line * char_in + right_in
    body_in = len(lines) * block * row_in
    height_in = top_in + body_in + legend_in

    fig = Figure(figsize=(width_in, height_in), dpi=110)
    ax = fig.add_axes((label_in / width_in, legend_in / height_in, chars_per_line * char_in / width_in, body_in / height_in))
    ax.set_xlim(0, chars_per_line)
    ax.set_ylim(len(lines) * block, 0)
    ax.axis("off")
    text_style = dict(fontsize=font_size, family=FONT_FAMILY, parse_math=False, va="center")
    for n, line in enumerate(lines):
        top = n * block
        ax.text(-0.6, top + 0.5, "token", ha="right", color="#555555", **{**text_style, "fontsize": font_size - 1})
        for layer in range(layers):
            ax.text(-0.6, top + 1 + (layer + 0.5) * band, layer_label(view, layer), ha="right", color="#333333",
                    **{**text_style, "fontsize": max(font_size - 2, 5)})
        x = 0.0
        for i in line:
            label = display_label(view.tokens[i])
            width = max(text_width(label), 1) + 1
            ax.text(x + 0.5, top + 0.5, label, ha="left", color="#111111", **text_style)
            for layer in range(layers):
                color = OPERATOR_COLORS.get(view.operators[layer][i], "#cccccc")
                ax.add_patch(Rectangle((x, top + 1 + layer * band), width, band, facecolor=color, edgecolor="white", linewidth=0.6))
            x += width
    present = [op for op in ("attention", "rbf", "dct") if any(op in ops for ops in view.layer_operators)]
    handles = [Patch(facecolor=OPERATOR_COLORS[op], edgecolor="#555555", label=OPERATOR_LABELS[op]) for op in present]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=font_size,
               bbox_to_anchor=(0.5, 0.05 / height_in))
    title = f"CHIAR routing of {len(view.tokens)} tokens ({view.meta.get('router_type', '')} router)"
    if view.truncated:
        title += f", {view.truncated} more tokens truncated"
    fig.text(0.5, 1 - 0.3 / height_in, title, ha="center", va="center", fontsize=font_size + 2, family="DejaVu Sans")
    return fig


def save_png(view, path, chars_per_line=100, font_size=9):
    """Render `view` to a PNG file (no pyplot, so it works headless and in threads)."""
    fig = routing_figure(view, chars_per_line=chars_per_line, font_size=font_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # e.g. CJK: drawn as boxes
        fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.2em} table.summary{border-collapse:collapse;margin:0.8em 0;font-size:0.85em}
table.summary td,table.summary th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.legend span{display:inline-block;margin-right:1.2em} .swatch{display:inline-block;width:1em;height:1em;
vertical-align:middle;margin-right:0.3em;border:1px solid #555}
.line{display:flex;align-items:flex-start;margin:0 0 0.9em 0}
.labels{flex:0 0 13em;font-size:0.72em;color:#444;text-align:right;padding-right:0.6em}
.labels div,.col div{height:var(--band);line-height:var(--band);white-space:nowrap;overflow:hidden}
.labels .tokrow,.col .tok{height:1.6em;line-height:1.6em}
.col{display:flex;flex-direction:column;border-right:1px solid #fff}
.col .tok{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;white-space:pre;padding:0 2px;font-size:0.9em}
.col:hover{outline:2px solid #d33}
.cell{min-width:0.6em}
.op-attention{background:#fbe8a6}.op-rbf{background:#8c7d99}.op-dct{background:#22253a}
"""


def routing_html(view, chars_per_line=100):
    """A self-contained HTML page: summary per layer, legend, and every token over its layer bands;
    hovering a cell shows the token's entropy and the layer's thresholds (title attributes)."""
    esc = lambda s: html.escape(s, quote=True)  # noqa: E731
    band = "1.1em" if view.num_layers <= 8 else "0.5em"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>CHIAR routing</title>',
        f"<style>{_CSS}:root{{--band:{band}}}</style></head><body>",
        f"<h1>CHIAR routing of {len(view.tokens)} tokens ({esc(view.meta.get('router_type', ''))} router)</h1>",
    ]
    if view.truncated:
        parts.append(f"<p><b>Truncated:</b> {view.truncated} tokens beyond the model's maximum length are not shown.</p>")
    present = [op for op in ("attention", "rbf", "dct") if any(op in ops for ops in view.layer_operators)]
    legend = "".join(f'<span><i class="swatch op-{op}"></i>{esc(OPERATOR_LABELS[op])}</span>' for op in present)
    parts.append(f'<p class="legend">{legend} — hover a cell for the token\'s entropy and the layer\'s thresholds.</p>')
    parts.append(_summary_table(view, esc))
    for line in wrap_tokens(view.tokens, chars_per_line):
        labels = "".join(f"<div>{esc(layer_label(view, layer))}</div>" for layer in range(view.num_layers))
        parts.append(f'<div class="line"><div class="labels"><div class="tokrow">token</div>{labels}</div>')
        for i in line:
            entropies = ", ".join(f"L{layer} {view.entropy[layer][i]:.4f}" for layer in range(view.num_layers))
            tip = f"token {i}, id {view.token_ids[i]}: {display_label(view.tokens[i])!r}; entropy {entropies}"
            cells = "".join(
                f'<div class="cell op-{esc(view.operators[layer][i])}" title="{esc(token_tooltip(view, i, layer))}"></div>'
                for layer in range(view.num_layers)
            )
            parts.append(f'<div class="col"><div class="tok" title="{esc(tip)}">{esc(display_label(view.tokens[i]))}</div>{cells}</div>')
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_table(view, esc):
    rows = ["<table class='summary'><tr><th>layer</th><th>kind</th><th>thresholds</th><th>shares of this text's tokens</th>"
            "<th>mean entropy</th></tr>"]
    for layer in range(view.num_layers):
        shares = ", ".join(f"{op} {share:.0%}" for op, share in view.shares(layer).items())
        thresholds = ", ".join(f"{t:.5f}" for t in view.thresholds[layer]) if view.thresholds[layer] else "—"
        mean = sum(view.entropy[layer]) / max(len(view.entropy[layer]), 1)
        rows.append(f"<tr><td>{layer}</td><td>{esc(view.layer_kinds[layer])}</td><td>{thresholds}</td><td>{esc(shares)}</td>"
                    f"<td>{mean:.4f}</td></tr>")
    return "".join(rows) + "</table>"


def save_html(view, path, chars_per_line=100):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(routing_html(view, chars_per_line), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# the one call most users need


def render_routing(model, tokenizer, text, png_path=None, html_path=None, max_length=None, chars_per_line=100):
    """Route `text` through `model` (object, folder or Hub id) and write a PNG and/or an HTML page.

    Texts longer than the model's max_position_embeddings (or `max_length`) are truncated with a
    warning. Returns the RoutingView, so callers can inspect or re-render it.
    """
    view = route_text(model, tokenizer, text, max_length=max_length)
    if png_path is not None:
        save_png(view, png_path, chars_per_line=chars_per_line)
    if html_path is not None:
        save_html(view, html_path, chars_per_line=chars_per_line)
    return view


__all__ = ["RoutingView", "route_text", "render_routing", "routing_figure", "routing_html", "save_png",
           "save_html", "token_pieces", "OPERATOR_COLORS"]
