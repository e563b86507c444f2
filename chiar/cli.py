"""`chiar-routing`: see, count and audit where a CHIAR model sends its tokens.

    chiar-routing render MODEL (--text "..." | --text-file F) -o OUT          # OUT.png + OUT.html
    chiar-routing stats  MODEL FILE... -o OUT_DIR                              # report.json + charts
    chiar-routing stats  MODEL --dataset wikitext --dataset-config wikitext-2-raw-v1 -o OUT_DIR
    chiar-routing audit  MODEL FILE... -o audit.json                           # trained vs random vs inverted

MODEL is a saved folder or Hub id; the tokenizer defaults to the model folder (--tokenizer to change).
"""

import argparse
import itertools
import sys
from pathlib import Path


def _add_model_args(parser):
    parser.add_argument("model", help="saved CHIAR model folder or Hub id")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model folder)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per sequence (default: render and stats 512, audit 256, capped by max_position_embeddings)")


def _add_data_args(parser, labels=False):
    parser.add_argument("files", nargs="*", type=Path, help="local data: .txt (one document per line), .jsonl/.json/.csv (optionally .gz)")
    parser.add_argument("--whole-file", action="store_true", help="plain text: each file is one document, not one per line")
    parser.add_argument("--dataset", help="Hugging Face dataset name instead of files (needs network or a local cache)")
    parser.add_argument("--dataset-config", help="dataset configuration, e.g. wikitext-2-raw-v1")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--text-column", default="text")
    if labels:
        parser.add_argument("--label-column", default="label", help="classifiers: the label column")
    parser.add_argument("--max-documents", type=int, default=None, help="use at most this many documents")
    parser.add_argument("--batch-size", type=int, default=8)


def build_parser():
    parser = argparse.ArgumentParser(prog="chiar-routing", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)

    render = commands.add_parser("render", help="one text, layer by layer, as PNG and HTML")
    _add_model_args(render)
    source = render.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to render")
    source.add_argument("--text-file", type=Path, help="read the text from this file")
    render.add_argument("-o", "--output", type=Path, required=True, help="output path without extension (writes .png and .html)")
    render.add_argument("--chars-per-line", type=int, default=100)
    render.add_argument("--no-png", action="store_true")
    render.add_argument("--no-html", action="store_true")

    stats = commands.add_parser("stats", help="routing statistics over a dataset (JSON + PNG charts)")
    _add_model_args(stats)
    _add_data_args(stats)
    stats.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    stats.add_argument("--min-count", type=int, default=5, help="least occurrences for a token to be ranked")
    stats.add_argument("--top-k", type=int, default=20, help="tokens listed as most / least often sent to attention")

    audit = commands.add_parser("audit", help="trained routing vs share-matched random and inverted-entropy routing")
    _add_model_args(audit)
    _add_data_args(audit, labels=True)
    audit.add_argument("-o", "--output", type=Path, required=True, help="output JSON file")
    audit.add_argument("--variants", nargs="+", default=["trained", "random", "inverted"], choices=["trained", "random", "inverted"])
    return parser


def _records(args, labels=False):
    """Records from local files or a Hub dataset, checked before any model work starts."""
    from chiar.data import hub_records, read_records

    label_column = args.label_column if labels else None
    if args.dataset and args.files:
        raise SystemExit("error: give data files or --dataset, not both.")
    if args.dataset:
        records = hub_records(args.dataset, args.dataset_config, args.split, args.text_column, label_column)
    elif args.files:
        missing = [str(f) for f in args.files if not f.is_file()]
        if missing:
            raise SystemExit(f"error: data file not found: {', '.join(missing)}")
        records = read_records(args.files, args.text_column, label_column, whole_file=args.whole_file)
    else:
        raise SystemExit("error: give data files or --dataset.")
    records = (r for r in records if isinstance(r["text"], str) and r["text"].strip())
    return itertools.islice(records, args.max_documents) if args.max_documents else records


def _load(args):
    from chiar.loading import load_model
    from chiar.training import load_config

    load_config(args.model, "MODEL")  # a missing folder, no config.json, an unreadable config: one line
    try:
        return load_model(args.model, args.tokenizer, device=args.device)
    except (FileNotFoundError, TypeError) as error:
        raise SystemExit(f"error: {error}") from error


def run_render(args):
    from chiar.routing_viz import render_routing

    if args.text_file is not None and not args.text_file.is_file():
        raise SystemExit(f"error: text file not found: {args.text_file}")
    text = args.text if args.text is not None else args.text_file.read_text(encoding="utf-8")
    model, tokenizer = _load(args)
    stem = args.output.with_suffix("") if args.output.suffix in (".png", ".html") else args.output
    png = None if args.no_png else stem.with_name(stem.name + ".png")
    page = None if args.no_html else stem.with_name(stem.name + ".html")
    view = render_routing(model, tokenizer, text, png_path=png, html_path=page, max_length=args.max_length,
                          chars_per_line=args.chars_per_line)
    print(f"{len(view.tokens)} tokens, {view.num_layers} layers -> {', '.join(str(p) for p in (png, page) if p)}")


def run_stats(args):
    from chiar.routing_stats import routing_statistics, write_report

    records = _records(args)
    model, tokenizer = _load(args)
    report = routing_statistics(model, tokenizer, (r["text"] for r in records), max_length=args.max_length,
                                batch_size=args.batch_size, min_count=args.min_count, top_k=args.top_k, progress=True)
    path = write_report(report, args.output)
    for layer in report["layers"]:
        shares = ", ".join(f"{op} {s:.3f}" for op, s in layer["shares"].items())
        print(f"layer {layer['layer']} ({layer['kind']}): {shares}; mean entropy {layer['mean_entropy']:.4f}")
    if report.get("categories"):
        print(f"attention share of all tokens: {report['attention_share']['overall']:.4f}")
        for name, category in report["categories"].items():
            share = category["attention_share"]["overall"]
            print(f"  {name.replace('_', ' '):<14} {'n/a' if share is None else f'{share:.4f}'} ({category['occurrences']} tokens)")
    print(f"{report['tokens']} tokens -> {path}")


def run_audit(args):
    from chiar.audit import audit, format_audit, is_classifier, write_audit

    model, tokenizer = _load(args)
    records = list(_records(args, labels=is_classifier(model)))
    report = audit(model, tokenizer, records, max_length=args.max_length, batch_size=args.batch_size,
                   variants=args.variants, progress=True)
    write_audit(report, args.output)
    print(format_audit(report))
    print(f"-> {args.output}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        raise SystemExit("error: --batch-size must be at least 1.")
    try:
        {"render": run_render, "stats": run_stats, "audit": run_audit}[args.command](args)
    except (KeyError, ValueError) as error:  # bad columns, labels, empty data: one clear line
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
