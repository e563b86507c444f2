"""Data, the one home for what the scripts and the routing tools read: which file formats, how a
file is opened, its records and documents (or a Hub dataset's rows), and the checks that turn a bad
file into one line naming it (the file, the row, the column, and what is allowed) instead of a
traceback from `datasets`. Batching for the tooling is in chiar/batching.py.

The checks cost nothing on good data: a file is examined only when `datasets` fails to read it,
and a loaded column is checked from its Arrow metadata (type, null count), not row by row.
"""

import bz2
import gzip
import json
import lzma
from pathlib import Path

FORMATS = {"txt": "text", "tokens": "text", "raw": "text", "text": "text", "json": "json", "jsonl": "json", "csv": "csv"}
COMPRESSIONS = {"gz": gzip.open, "gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}
SPLITS = ("train", "validation", "test")


class ArgumentError(SystemExit):
    """A bad command-line argument or data file, reported as one line before any work starts."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


def file_format(path, default=None):
    """`text`, `json` (JSON lines or one JSON list) or `csv`, from the name; compressed files by their
    inner suffix; any other name is `default`, or an error without one."""
    suffixes = [s.lstrip(".").lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in FORMATS:
        if default is not None:
            return default
        compressed = "/".join(f".{c}" for c in COMPRESSIONS)
        raise ArgumentError(f"cannot tell the format of {str(path)!r}: use .txt/.tokens, .json/.jsonl or .csv (optionally {compressed}).")
    return FORMATS[suffixes[-1]]


def open_text(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {str(path)!r}.")
    suffix = path.suffix.lstrip(".").lower()
    return COMPRESSIONS.get(suffix, open)(path, "rt", encoding="utf-8")


def json_rows(text):
    """The rows of a JSON-lines file or of one JSON list, or raise ValueError naming the bad line."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"is not valid JSON ({error.msg} at line {error.lineno})") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"line {number} is not valid JSON ({error.msg}); JSON lines need one object per line") from None
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"row {number} is a {type(row).__name__}, not an object with named fields")
    return rows


def read_records(paths, text_column="text", label_column=None, whole_file=False):
    """Dicts {"text": ..., ["label": ...]} from local files.

    Plain text (and any unknown suffix): one document per non-empty line, or the whole file as one document with
    `whole_file=True`. JSON lines / a JSON list / CSV: `text_column` (and `label_column`) of each row.
    Compressed files (.gz, .bz2, .xz) are read as they are.
    """
    import csv

    for path in paths:
        kind = file_format(path, default="text")
        with open_text(path) as handle:
            if kind == "text":
                if whole_file:
                    text = handle.read()
                    rows = [{text_column: text}] if text.strip() else []
                else:
                    rows = ({text_column: line.rstrip("\n")} for line in handle if line.strip())
            elif kind == "json":
                try:
                    rows = json_rows(handle.read())
                except ValueError as error:
                    raise ValueError(f"{path}: {error}.") from None
            else:
                rows = csv.DictReader(handle)
            for n, row in enumerate(rows):
                if text_column not in row:
                    raise KeyError(f"{path}: row {n} has no column {text_column!r} (columns: {sorted(row)}).")
                record = {"text": row[text_column]}
                if label_column is not None:
                    if label_column not in row:
                        raise KeyError(f"{path}: row {n} has no label column {label_column!r} (columns: {sorted(row)}).")
                    record["label"] = row[label_column]
                yield record


# --------------------------------------------------------------------------------------------
# the scripts' datasets: local files or the Hub, checked


def read_documents(paths, whole_file=False, text_column="text"):
    """The texts of local files (see `read_records`)."""
    for record in read_records(paths, text_column=text_column, whole_file=whole_file):
        if record["text"] and record["text"].strip():
            yield record["text"]


def hub_records(name, config_name=None, split="validation", text_column="text", label_column=None):
    """Rows of a Hugging Face dataset (needs network or a local datasets cache)."""
    from datasets import load_dataset

    data = load_dataset(name, config_name, split=split)
    for column in (text_column, label_column):
        if column is not None and column not in data.column_names:
            raise KeyError(f"Dataset {name!r} has no column {column!r}; columns: {data.column_names}.")
    for row in data:
        record = {"text": row[text_column]}
        if label_column is not None:
            record["label"] = row[label_column]
        yield record


def load_raw_datasets(data_args, cache_dir=None, hub_hint="", token=None):
    """Hub dataset (`dataset_name`) or local files (train/validation/test), as a DatasetDict (an
    IterableDatasetDict with `data_args.streaming`, whose files are read only as training goes)."""
    from datasets import load_dataset

    streaming = getattr(data_args, "streaming", False)

    files = {split: getattr(data_args, f"{split}_file") for split in SPLITS if getattr(data_args, f"{split}_file", None)}
    if files:
        missing = [f"--{split}_file {path}" for split, path in files.items() if not Path(path).is_file()]
        if missing:
            raise ArgumentError(f"file not found: {', '.join(missing)}")
        formats = {split: file_format(path) for split, path in files.items()}
        if len(set(formats.values())) > 1:
            shown = ", ".join(f"--{split}_file is {kind}" for split, kind in formats.items())
            raise ArgumentError(f"all data files must have one format ({shown}).")
        builder = formats.popitem()[1]
        kwargs = {"keep_linebreaks": getattr(data_args, "keep_linebreaks", True)} if builder == "text" else {}
        try:
            return load_dataset(builder, data_files=files, cache_dir=cache_dir, streaming=streaming, **kwargs)
        except Exception as error:  # datasets says "An error occurred while generating the dataset": find out which
            raise ArgumentError(files_problem(files, builder) or f"cannot read the data files ({root_cause(error)}).") from error
    if not data_args.dataset_name:
        raise ArgumentError("pass --dataset_name or --train_file/--validation_file.")
    try:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir, token=token, streaming=streaming)
    except Exception as error:  # no network, unknown name: say what to do instead
        raise ArgumentError(
            f"could not load the dataset {data_args.dataset_name!r} ({data_args.dataset_config_name}) from the Hugging Face "
            f"Hub: {type(error).__name__}: {str(error)[:200]}. Offline, point to local files instead{hub_hint}."
        ) from error


def root_cause(error):
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def files_problem(files, builder):
    """What is wrong with the data files {split: path}, as one sentence, or None if nothing is found."""
    columns = {}
    for split, path in files.items():
        flag = f"--{split}_file {path}"
        opener = COMPRESSIONS.get(Path(path).suffix.lstrip(".").lower(), open)
        try:
            with opener(path, "rb") as handle:
                raw = handle.read()
        except (OSError, EOFError, lzma.LZMAError) as error:
            return f"{flag} cannot be decompressed ({error})."
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return f"{flag} is not UTF-8 text (byte {error.start} is {raw[error.start]:#04x})."
        if not text.strip():
            return f"{flag} is empty."
        if builder == "json":
            try:
                rows = json_rows(text)
            except ValueError as error:
                return f"{flag}: {error}."
            if not any(rows):
                return f"{flag} has no fields: each row needs at least a text column."
            columns[split] = {key: _json_kinds(row.get(key) for row in rows) for key in {k for row in rows for k in row}}
    for key in {k for found in columns.values() for k in found}:
        kinds = {split: found[key] for split, found in columns.items() if key in found}
        if len({frozenset(k) for k in kinds.values()}) > 1:
            shown = ", ".join(f"--{split}_file has {' and '.join(sorted(k))}" for split, k in kinds.items())
            return f"column {key!r} holds different types in different files ({shown}); every file needs the same types."
    return None


def _json_kinds(values):
    names = {str: "text", bool: "booleans", int: "integers", float: "numbers", list: "lists", dict: "objects"}
    return {names.get(type(value), type(value).__name__) for value in values if value is not None} or {"only nulls"}


def source_of(data_args, split):
    """How a split was given, for error messages: `--train_file PATH` or the dataset's split."""
    path = getattr(data_args, f"{split}_file", None)
    return f"--{split}_file {path}" if path else f"the {split} split of {data_args.dataset_name!r}"


def check_text_column(dataset, column, source, flag="--text_column_name"):
    """The column exists, holds strings, and no row is null (a stream: what its features say, if any)."""
    if not hasattr(dataset, "data"):  # streamed: no table to look at
        if dataset.features is not None:
            check_column(dataset, column, flag)
        return
    check_column(dataset, column, flag)
    kind = getattr(dataset.features[column], "dtype", None)
    if kind not in ("string", "large_string"):
        raise ArgumentError(f"{source}: column {column!r} ({flag}) holds {_describe(dataset.features[column])}, not text.")
    _check_no_nulls(dataset, column, source)


def label_task(dataset, column, do_regression=None):
    """`single_label`, `multi_label` (the column holds lists) or `regression` (floats, or asked for)."""
    feature = dataset.features[column]
    if type(feature).__name__ in ("Sequence", "List", "LargeList"):
        if do_regression:
            raise ArgumentError(f"--do_regression: column {column!r} holds lists of labels (multi-label), not numbers.")
        return "multi_label"
    if do_regression or (do_regression is None and getattr(feature, "dtype", "") in ("float16", "float32", "float64")):
        return "regression"
    return "single_label"


def check_label_column(dataset, column, source, task="single_label", flag="--label_column_name"):
    """The column exists and no row is null; for classification it holds class names (strings) or
    integer ids, one kind (in lists, for multi-label); for regression, numbers."""
    check_column(dataset, column, flag)
    _check_no_nulls(dataset, column, source)
    feature = dataset.features[column]
    if task == "multi_label":
        feature = getattr(feature, "feature", feature)
    kind = getattr(feature, "dtype", None) or ""
    if task == "regression":
        if kind.startswith(("float", "int", "uint")) or kind == "bool":
            return
        raise ArgumentError(f"{source}: column {column!r} ({flag}) holds {_describe(feature)}; regression needs numbers.")
    if kind in ("string", "large_string", "bool") or kind.startswith(("int", "uint")) or type(feature).__name__ == "ClassLabel":
        return
    values = dataset[column]
    if task == "multi_label":
        values = [label for row in values for label in row]
    kinds = sorted({type(value).__name__ for value in values})
    if kinds in (["str"], ["int"], ["bool"], ["bool", "int"]):
        return
    raise ArgumentError(
        f"{source}: column {column!r} ({flag}) holds {', '.join(kinds) if kinds else _describe(feature)}; "
        "labels must be all class names (strings) or all integer ids (floats: pass --do_regression for regression)."
    )


def check_column(dataset, column, flag):
    if column not in dataset.column_names:
        raise ArgumentError(f"{flag} {column!r} is not a column of the data; columns: {dataset.column_names}.")


def _check_no_nulls(dataset, column, source):
    import pyarrow.compute as pc

    values = dataset.data.column(column)
    if values.null_count:
        first = pc.index(pc.is_null(values), True).as_py()
        raise ArgumentError(
            f"{source}: {values.null_count} row(s) have no value in column {column!r} (the first is row {first + 1}); "
            "drop or fill them."
        )


def _describe(feature):
    dtype = getattr(feature, "dtype", None)
    return f"{dtype} values" if dtype else type(feature).__name__
