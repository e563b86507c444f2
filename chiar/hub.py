"""Hub-ready folders for CHIAR checkpoints: weights, config with a complete `auto_map`, the model
code, the tokenizer, and a model card, ready to upload as they are.

    chiar-export MODEL_DIR OUT_DIR [--tokenizer DIR] [--eval-results eval_results.json] [--dataset wikitext]
                 [--routing-stats routing_stats/report.json] [--audit audit.json]
    chiar-export MODEL_DIR OUT_DIR --repo-id user/name --push     # upload with huggingface_hub

From Python: `save_for_hub(model, out_dir, tokenizer=..., evaluation=..., routing_statistics=..., audit=...)`.
"""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from chiar.evaluation import routing_metrics

METRIC_NAMES = {"perplexity": "perplexity", "eval_loss": "loss", "eval_accuracy": "accuracy", "accuracy": "accuracy"}


def save_for_hub(model, path, tokenizer=None, evaluation=None, datasets=None, repo_id=None, license="apache-2.0", tags=None,
                 routing_statistics=None, audit=None):
    """Write everything a Hub repository needs into `path`; return the path.

    evaluation: metrics as written by run_clm.py / run_classification.py (`eval_results.json`), whose
    routing shares and attention-FLOPs fraction go into the card when present.
    routing_statistics: the report of `chiar-routing stats` (`report.json`, as a dict), summarised in
    a "Routing statistics" section.
    audit: the report of `chiar-routing audit` (as a dict): the router's measured signal, its metric
    against share-matched controls, in a "Router signal" section beside the shares.
    """
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    card = build_model_card(model, evaluation=evaluation, datasets=datasets, repo_id=repo_id, license=license, tags=tags,
                            routing_statistics=routing_statistics, audit=audit)
    card.save(path / "README.md")
    return path


def build_model_card(model, evaluation=None, datasets=None, repo_id=None, license="apache-2.0", tags=None, routing_statistics=None,
                     audit=None):
    config = model.config
    causal_lm = type(model).__name__.endswith("ForCausalLM")
    evaluation = dict(evaluation or {})
    metrics = sorted({METRIC_NAMES[k] for k in evaluation if k in METRIC_NAMES})
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=["chiar", "chiaroscuro-attention", "custom_code", *(tags or [])],
        datasets=list(datasets) if datasets else None,
        metrics=metrics or None,
        pipeline_tag="text-generation" if causal_lm else "text-classification",
    )
    sections = [
        f"# {repo_id or 'CHIAR-Former model'}",
        "A CHIAR-Former (Chiaroscuro Attention, arXiv 2606.08327) model: at each routed layer every token "
        "is sent to one of DCT spectral mixing, RBF kernel mixing or full self-attention, chosen from its "
        "spectral entropy, so attention is paid only where it is needed.",
        _architecture(model),
    ]
    if evaluation:
        sections.append(_evaluation(config, evaluation))
    if routing_statistics:
        sections.append(_routing_statistics(routing_statistics))
    if audit:
        sections.append(_router_signal(audit))
    sections.append(_usage(type(model).__name__, repo_id))
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


def _architecture(model):
    config = model.config
    rows = ["| layer | kind | operators | thresholds (eval) |", "|---|---|---|---|"]
    for i, layer in enumerate(getattr(model, "model", model).layers):
        router = layer.mixer.router
        thresholds = getattr(router, "thresholds", None)
        shown = ", ".join(f"{t:.5f}" for t in thresholds.tolist()) if thresholds is not None else ""
        rows.append(f"| {i} | {config.layer_schedule[i]} | {', '.join(layer.mixer.operators)} | {shown} |")
    calibrated = ""
    if config.router_type == "threshold":
        calibrated = (
            " Thresholds were fixed in the config." if config.router_thresholds is not None
            else " Thresholds are entropy quantiles calibrated on training batches (running during training, settled on the"
            " final weights after it when trained with ChiarTrainer) and stored in the checkpoint."
        )
    elif config.router_type == "learned":
        calibrated = (
            f" Shares kept by the share bias (no auxiliary loss; rate {config.router_bias_rate}), stored in the checkpoint."
            if config.router_share_control == "bias"
            else f" Shares kept by the auxiliary loss (weight {config.router_aux_loss_coef})."
        ) + (" Training draws each token's operator from the gate (router_explore)." if config.router_explore else "")
    targets = ", ".join(f"{op} {share:.0%}" for op, share in config.router_target_fractions.items())
    return "\n".join([
        "## Architecture",
        f"- {config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_attention_heads} heads, "
        f"FFN {config.intermediate_size}, vocabulary {config.vocab_size}, {config.norm_position}-norm, "
        f"{'causal' if config.is_causal else 'bidirectional'}",
        f"- schedule `{config.layer_schedule}`; routed operators `{config.routed_operators}`",
        f"- router `{config.router_type}`, target shares: {targets}.{calibrated}",
        f"- MetaRouter: {'on' if config.use_meta_router else 'off'}",
        "",
        *rows,
    ])


def _evaluation(config, evaluation):
    lines = ["## Evaluation", "", "| metric | value |", "|---|---|"]
    for key in sorted(evaluation):
        value = evaluation[key]
        if isinstance(value, (int, float)) and "routing_layer" not in key and "entropy_layer" not in key:
            lines.append(f"| {key} | {value:.4g} |")
    shares = {layer: entry["shares"] for layer, entry in routing_metrics(evaluation).items()
              if "shares" in entry and layer < config.num_hidden_layers}
    if shares:
        operators = [op for op in ("dct", "rbf", "attention") if any(op in s for s in shares.values())]
        lines += ["", "Routing shares of real tokens per layer, on the evaluation set:", "",
                  "| layer | " + " | ".join(operators) + " |", "|---" * (len(operators) + 1) + "|"]
        for layer in sorted(shares):
            cells = [f"{shares[layer].get(op, 0.0):.3f}" for op in operators]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    flops = {k: v for k, v in evaluation.items() if k.endswith("attention_flops_fraction")}
    for key, value in flops.items():
        lines += ["", f"Attention FLOPs executed relative to the full-attention model of the same shape: "
                      f"**{value:.3f}** (`{key}`, counted by the model's own accounting)."]
    return "\n".join(lines)


def _routing_statistics(stats, top=10):
    """Per-layer shares, attention share by token type and the tokens most often sent to attention,
    from a `chiar-routing stats` report."""
    lines = ["## Routing statistics", "",
             f"Measured with `chiar-routing stats` over {stats['tokens']} tokens ({stats.get('sequences', '?')} sequences).", ""]
    operators = [op for op in ("dct", "rbf", "attention") if any(op in layer["shares"] for layer in stats["layers"])]
    lines += ["| layer | kind | " + " | ".join(operators) + " | mean entropy |", "|---" * (len(operators) + 3) + "|"]
    for layer in stats["layers"]:
        cells = [f"{layer['shares'][op]:.3f}" if op in layer["shares"] else "" for op in operators]
        lines.append(f"| {layer['layer']} | {layer['kind']} | " + " | ".join(cells) + f" | {layer['mean_entropy']:.4f} |")
    categories = stats.get("categories")
    if categories:
        overall = stats["attention_share"]["overall"]
        lines += ["", f"Share of (token, routed layer) pairs sent to attention, by token type (all tokens: {overall:.3f}):", "",
                  "| tokens | occurrences | attention share |", "|---|---|---|"]
        labels = {"function_word": "function words", "punctuation": "punctuation", "other": "other tokens"}
        for name, label in labels.items():
            if name in categories:
                share = categories[name]["attention_share"]["overall"]
                shown = "n/a" if share is None else f"{share:.3f}"
                lines.append(f"| {label} | {categories[name]['occurrences']} | {shown} |")
    ranking = [row for row in (stats.get("attention_tokens") or {}).get("most", []) if row["share"] > 0]
    if ranking:
        tokens = ", ".join(f"`{row['token']!r}` {row['share']:.2f} ({row['count']}x)" for row in ranking[:top])
        lines += ["", f"Tokens most often sent to attention (seen at least {stats['attention_tokens']['min_count']} times): {tokens}."]
    return "\n".join(lines)


def _router_signal(audit):
    """The audit's numbers: the metric with the model's own router and with controls that keep its
    measured shares, and what the difference says."""
    metric = audit["metric"]
    higher_is_better = metric == "accuracy"
    variants = audit["variants"]
    lines = ["## Router signal", "",
             f"Measured with `chiar-routing audit` over {audit['tokens']} tokens ({audit['sequences']} sequences): the same "
             f"weights evaluated with the trained router and with routers that keep its measured per-layer shares but choose "
             f"by a position hash (`random`) or by the reversed entropy order (`inverted`); every attention request granted, "
             f"so each runs its own choices.", "",
             f"| routing | {metric} | max share difference from the trained router | attention share per routed layer |",
             "|---|---|---|---|"]
    for name, result in variants.items():
        shares = ", ".join(f"{s.get('attention', 0.0):.3f}" for s in result["shares"].values())
        lines.append(f"| {name} | {result[metric]:.4g} | {result['max_share_deviation']:.4f} | {shares} |")
    if "trained" in variants and "random" in variants:
        gap = variants["trained"][metric] - variants["random"][metric]
        better = gap > 0 if higher_is_better else gap < 0
        lines += ["", f"Trained router minus the share-matched random control: **{gap:+.4g}** {metric} "
                      f"({'the router carries signal the position hash does not' if better else 'no signal beyond the position hash on this set'})."]
    budget = audit.get("budget") or {}
    if metric in budget:
        lines += ["", f"Under its budget (capacity factor {budget['capacity_factor']}, blocks of {budget['block_size']}), the trained "
                      f"model's {metric} is {budget[metric]:.4g}."]
    return "\n".join(lines)


def _usage(class_name, repo_id):
    where = repo_id or "path/to/this/folder"
    auto = "AutoModelForCausalLM" if class_name.endswith("ForCausalLM") else "AutoModelForSequenceClassification"
    return "\n".join([
        "## Usage",
        "",
        "Without installing anything beyond transformers (the model code ships with the weights):",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {auto}",
        f"model = {auto}.from_pretrained(\"{where}\", trust_remote_code=True)",
        f"tokenizer = AutoTokenizer.from_pretrained(\"{where}\")",
        "```",
        "",
        "With the `chiar` project installed (`pip install -e .` in its repository):",
        "",
        "```python",
        "import modeling_chiar  # registers the CHIAR classes with the Auto classes",
        f"from transformers import {auto}",
        f"model = {auto}.from_pretrained(\"{where}\")",
        "outputs = model(**inputs, output_routing=True)  # per-layer operator ids, entropies and shares",
        "```",
    ])


def _load_checkpoint(source, tokenizer_source=None):
    """A saved CHIAR model (folder or Hub id) and its tokenizer, or one line saying why not."""
    from chiar.loading import load_checkpoint, load_tokenizer
    from chiar.training import load_config

    config = load_config(source, "MODEL")  # a missing folder, no config.json, an unreadable config: one line
    if config.model_type != "chiar":
        raise SystemExit(f"error: {source} holds a {config.model_type!r} model; chiar-export writes CHIAR checkpoints only.")
    try:
        model = load_checkpoint(source)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load the model in {source!r}: {str(error).splitlines()[0]}") from error
    try:
        tokenizer = load_tokenizer(tokenizer_source or source)
    except FileNotFoundError as error:
        if tokenizer_source:
            raise SystemExit(f"error: cannot load the tokenizer {tokenizer_source!r}: {error}") from error
        tokenizer = None
    return model, tokenizer


def _read_json(path, flag):
    if path is None:
        return None
    if not path.is_file():
        raise SystemExit(f"error: {flag}: file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: {flag} {path} is not valid JSON ({error}).") from error


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a Hub-ready folder (weights, code, tokenizer, model card) for a CHIAR checkpoint.")
    parser.add_argument("model", help="a saved CHIAR model folder (or Hub id)")
    parser.add_argument("output", type=Path, help="folder to write")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model folder, if it has one)")
    parser.add_argument("--eval-results", type=Path, help="eval_results.json / all_results.json from run_clm.py or run_classification.py")
    parser.add_argument("--dataset", action="append", help="dataset name for the card (repeatable)")
    parser.add_argument("--routing-stats", type=Path, help="report.json written by `chiar-routing stats`, summarised in the card")
    parser.add_argument("--audit", type=Path, help="the JSON written by `chiar-routing audit -o`: the router's signal, in the card")
    parser.add_argument("--repo-id", help="Hub repository id, used in the card and for --push")
    parser.add_argument("--push", action="store_true", help="upload the folder to --repo-id with huggingface_hub")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)

    # Everything is read and checked before anything is written, and the folder is written beside
    # the output and moved into place: a failure leaves no half-written output folder.
    model, tokenizer = _load_checkpoint(args.model, args.tokenizer)
    evaluation = _read_json(args.eval_results, "--eval-results")
    routing_statistics = _read_json(args.routing_stats, "--routing-stats")
    audit = _read_json(args.audit, "--audit")
    for flag, value in (("--eval-results", evaluation), ("--routing-stats", routing_statistics), ("--audit", audit)):
        if value is not None and not isinstance(value, dict):
            raise SystemExit(f"error: {flag} holds a JSON {type(value).__name__}, not the object the scripts write.")
    if audit is not None and not {"metric", "variants", "tokens", "sequences"} <= set(audit):
        raise SystemExit(f"error: --audit {args.audit} is not a `chiar-routing audit` report (no metric / variants).")
    if args.push and not args.repo_id:
        raise SystemExit("error: --push needs --repo-id")
    if args.output.exists() and not args.output.is_dir():
        raise SystemExit(f"error: the output {args.output} is a file, not a folder.")
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=args.output.parent, prefix=f".{args.output.name}.partial-"))
    except OSError as error:
        raise SystemExit(f"error: cannot write the output {args.output} ({error.strerror or error}).") from error
    try:
        save_for_hub(model, staging, tokenizer=tokenizer, evaluation=evaluation, datasets=args.dataset, repo_id=args.repo_id,
                     routing_statistics=routing_statistics, audit=audit)
        args.output.mkdir(exist_ok=True)
        for item in staging.iterdir():
            if (args.output / item.name).is_dir():
                shutil.rmtree(args.output / item.name)
            os.replace(item, args.output / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    path = args.output
    print(f"wrote {path}: {', '.join(sorted(p.name for p in path.iterdir()))}")
    if args.push:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        api.upload_folder(repo_id=args.repo_id, folder_path=str(path))
        print(f"uploaded to {args.repo_id}")


if __name__ == "__main__":
    main()
