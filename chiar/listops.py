"""Seeded ListOps data in the Long Range Arena format, as JSON lines for `run_classification.py`.

ListOps (Nangia & Bowman 2018) asks a model for the value (0-9) of a nested list expression such as
`[MAX 2 9 [MIN 4 7 ] 0 ]`: each operator opens with `[OP`, its arguments follow separated by spaces,
and ` ]` closes it. Long Range Arena (Tay et al. 2021) made the expressions long (500-2,000 tokens),
which is what makes it a long-context benchmark; its defaults are the defaults here.

    python -m chiar.listops --output_dir data/listops                       # LRA: 96k/2k/2k, 500-2000
    python -m chiar.listops --output_dir /tmp/lo --num_train 200 --min_length 20 --max_length 200

From Python: `write_listops(output_dir, **settings)`, `generate_listops(**settings)`,
`evaluate_listops(text)`.

Conventions (all written into `settings.json` next to the data):

* Operators: MIN, MAX, MED, SM over digits 0-9. SM is the sum modulo 10. MED is the *lower*
  median, `sorted(values)[(n - 1) // 2]`, so its value is always one of its arguments and always a
  digit. (LRA's script uses `int(np.median(values))`, the truncated mean of the two middle values
  for an even count: `[MED 2 5 ]` is 2 here and 3 there.)
* Length is the number of whitespace-separated tokens of the text: each `[OP`, each digit and each
  `]` counts one, i.e. `len(text.split())` (see `listops_length`). That is LRA's own count (2 per
  operator, 1 per digit); LRA's files also interleave `(` `)` bracket tokens from its binary-tuple
  encoding, which its length does not count and which this format does not contain. The length is
  thus exactly the sequence a whitespace tokenizer gives the model. The band is inclusive,
  `min_length <= length <= max_length` (LRA's filter is strict, 501-1999).
* Depth counts tree levels with the root at 1 and the digits included, as LRA does: an operator may
  only sit at a level below `max_depth`, so with `max_depth=10` operators nest at most 9 deep.
* Each operator takes 2 to `max_args` arguments (uniform, as in LRA); each argument is a sub-tree
  with probability `subtree_prob`, otherwise a digit. The root is always an operator.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path

DIGITS = tuple(str(d) for d in range(10))
CLOSE = "]"


def _lower_median(values):
    """Lower median: with an even count the smaller middle value, so the result is an argument."""
    return sorted(values)[(len(values) - 1) // 2]


OPERATIONS = {
    "[MIN": min,
    "[MAX": max,
    "[MED": _lower_median,
    "[SM": lambda values: sum(values) % 10,
}
OPERATOR_TOKENS = tuple(OPERATIONS)
SPLITS = ("train", "validation", "test")
# Test first, then validation, then train: each split has its own random stream and only has to
# avoid the splits drawn before it, so val/test stay the same when only num_train changes (a small
# debugging run and the full run are evaluated on identical data).
GENERATION_ORDER = ("test", "validation", "train")
SPLIT_SIZE_FIELD = {"train": "num_train", "validation": "num_val", "test": "num_test"}
# Give up after this many draws in a row yield nothing new in the band: a configuration whose
# acceptance rate is this low (or whose distinct expressions are used up) will not finish anyway.
MAX_CONSECUTIVE_REJECTIONS = 100_000
# Show a progress bar by default only when the generation takes noticeable time.
PROGRESS_THRESHOLD = 5_000


@dataclasses.dataclass(frozen=True)
class ListOpsSettings:
    """Everything that determines the data; defaults are Long Range Arena's.

    subtree_prob=0.25 is LRA's own value (its `VALUE_P`, from Nangia & Bowman): with up to 10
    arguments an operator has 1.5 sub-trees on average, so trees grow to a median of ~250 tokens and
    about one root in three lands in 500-2000 at depth 10 (0.2 gives ~8%, 0.3 overshoots, ~35% above
    2000). Keeping it keeps LRA's tree distribution, which length filtering then conditions on.
    """

    num_train: int = 96_000
    num_val: int = 2_000
    num_test: int = 2_000
    max_args: int = 10
    max_depth: int = 10
    min_length: int = 500
    max_length: int = 2_000
    subtree_prob: float = 0.25
    seed: int = 0

    def __post_init__(self):
        for name in ("num_train", "num_val", "num_test", "max_args", "max_depth", "min_length", "max_length", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_args < 2:
            raise ValueError(f"max_args must be >= 2 (an operator takes 2..max_args arguments), got {self.max_args}")
        if self.max_depth < 2:
            raise ValueError(f"max_depth must be >= 2 (the root operator and its digits), got {self.max_depth}")
        if not 0.0 <= self.subtree_prob <= 1.0:
            raise ValueError(f"subtree_prob must be in [0, 1], got {self.subtree_prob}")
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        shortest, longest = length_bounds(self.max_args, self.max_depth, self.subtree_prob)
        if self.max_length < shortest or self.min_length > longest:
            raise ValueError(
                f"no tree can have length in [{self.min_length}, {self.max_length}]: with max_args={self.max_args}, "
                f"max_depth={self.max_depth}, subtree_prob={self.subtree_prob} lengths range over [{shortest}, {longest}]"
            )

    def split_size(self, split):
        return getattr(self, SPLIT_SIZE_FIELD[split])


def length_bounds(max_args, max_depth, subtree_prob=0.25):
    """Shortest and longest possible tree, to reject impossible length bands up front.

    The shortest is a root with two digits (4 tokens); the longest fills every level with max_args
    operators (only max_args digits when subtree_prob is 0).
    """
    if subtree_prob == 0.0:
        return 4, 2 + max_args
    longest = 1  # a digit at the last level
    for _ in range(max_depth - 1):
        longest = 2 + max_args * longest
    return 4, longest


def listops_length(text):
    """The length the band applies to: whitespace tokens (`[OP`, digits and `]` each count one)."""
    return len(text.split())


class _TooLong(Exception):
    """Raised inside the sampler as soon as a tree cannot fit max_length any more."""


class _TreeSampler:
    """Draws LRA-distributed trees, abandoning each one as soon as it outgrows max_length.

    Drawing a tree and then filtering its length (LRA's method) would be exact but wastes the time
    spent on trees that are far too long; stopping the moment the tokens written plus the `]` still
    owed exceed max_length rejects exactly the same trees, so the accepted ones keep LRA's
    distribution and every attempt costs at most max_length tokens.
    """

    def __init__(self, rng, settings):
        self.random = rng.random  # floats only: int(random() * n) is much faster than randrange
        self.max_args = settings.max_args
        self.max_depth = settings.max_depth
        self.max_length = settings.max_length
        self.subtree_prob = settings.subtree_prob
        self.tokens = []

    def sample(self):
        """One tree as (tokens, value), or None if it grew past max_length."""
        self.tokens = []
        try:
            value = self._operator(1)
        except _TooLong:
            return None
        return self.tokens, value

    def _operator(self, depth):
        """Write an operator at tree level `depth` (root = 1) with its arguments; return its value."""
        random, tokens = self.random, self.tokens
        op = OPERATOR_TOKENS[int(random() * len(OPERATOR_TOKENS))]
        tokens.append(op)
        child_may_branch = depth + 1 < self.max_depth
        values = []
        for _ in range(2 + int(random() * (self.max_args - 1))):
            if child_may_branch and random() < self.subtree_prob:
                values.append(self._operator(depth + 1))
            else:
                digit = int(random() * 10)
                tokens.append(DIGITS[digit])
                values.append(digit)
                # `depth` operators are open, each still owes its `]`.
                if len(tokens) + depth > self.max_length:
                    raise _TooLong
        tokens.append(CLOSE)
        return OPERATIONS[op](values)


def _split_rng(seed, split):
    """An independent, reproducible stream per split (str seeds hash with SHA-512, not PYTHONHASHSEED)."""
    return random.Random(f"chiar.listops/{seed}/{split}")


def _digest(text):
    """Uniqueness key: 16-byte hashes keep the set small when 100k texts of ~2 kB are streamed to disk."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def iter_split(split, settings, seen, progress=False):
    """Yield the `split`'s examples as {"text", "label"}, skipping (and recording) digests in `seen`.

    `seen` is shared across the splits of one dataset, which is what keeps them disjoint.
    """
    count = settings.split_size(split)
    sampler = _TreeSampler(_split_rng(settings.seed, split), settings)
    bar = _progress_bar(count, split, progress)
    produced = rejected_in_a_row = 0
    try:
        while produced < count:
            drawn = sampler.sample()
            if drawn is not None and len(drawn[0]) >= settings.min_length:
                text = " ".join(drawn[0])
                key = _digest(text)
                if key not in seen:
                    seen.add(key)
                    produced += 1
                    rejected_in_a_row = 0
                    bar.update(1)
                    yield {"text": text, "label": drawn[1]}
                    continue
            rejected_in_a_row += 1
            if rejected_in_a_row >= MAX_CONSECUTIVE_REJECTIONS:
                raise RuntimeError(
                    f"{split}: {MAX_CONSECUTIVE_REJECTIONS:,} draws in a row gave no new tree with length in "
                    f"[{settings.min_length}, {settings.max_length}] after {produced} examples; widen the band, "
                    f"change subtree_prob/max_args/max_depth, or ask for fewer examples ({settings})"
                )
    finally:
        bar.close()


def _progress_bar(total, split, progress):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"ListOps {split}", unit="ex", disable=not progress)


def _show_progress(progress, settings):
    """None means: only for generations large enough to take a while."""
    if progress is None:
        return sum(settings.split_size(s) for s in SPLITS) >= PROGRESS_THRESHOLD
    return bool(progress)


def generate_listops(progress=None, **settings):
    """All three splits in memory: {"train": [...], "validation": [...], "test": [...]}.

    Each example is {"text": str, "label": int}; texts are unique across the splits. Keyword
    arguments are the `ListOpsSettings` fields.
    """
    config = ListOpsSettings(**settings)
    show, seen = _show_progress(progress, config), set()
    data = {split: list(iter_split(split, config, seen, show)) for split in GENERATION_ORDER}
    return {split: data[split] for split in SPLITS}


def write_listops(output_dir, progress=None, **settings):
    """Write train/validation/test `.jsonl` and `settings.json` into `output_dir`; return their paths.

    Examples stream to temporary files that are renamed only once every split is complete, so an
    error or interruption never leaves a truncated split (or a settings file for data that is not
    there) behind. Returns {"train": Path, "validation": Path, "test": Path, "settings": Path}.
    """
    config = ListOpsSettings(**settings)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    show, seen = _show_progress(progress, config), set()
    paths = {split: output_dir / f"{split}.jsonl" for split in SPLITS}
    paths["settings"] = output_dir / "settings.json"
    temporary = {name: path.with_name(f".{path.name}.tmp-{os.getpid()}") for name, path in paths.items()}
    try:
        stats = {}
        for split in GENERATION_ORDER:
            stats[split] = _write_split(temporary[split], iter_split(split, config, seen, show))
        record = _settings_record(config, {split: stats[split] for split in SPLITS})
        temporary["settings"].write_text(json.dumps(record, indent=2) + "\n")
        for name, path in paths.items():
            os.replace(temporary[name], path)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    return paths


def _write_split(path, examples):
    """Write JSON lines; return count, length range and label histogram for settings.json."""
    count, lengths, labels = 0, [], [0] * 10
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
            count += 1
            lengths.append(listops_length(example["text"]))
            labels[example["label"]] += 1
    return {
        "count": count,
        "min_length": min(lengths, default=None),
        "max_length": max(lengths, default=None),
        "mean_length": round(sum(lengths) / count, 1) if count else None,
        "label_counts": labels,
    }


def _settings_record(config, stats):
    return {
        **dataclasses.asdict(config),
        "counts": {split: stats[split]["count"] for split in SPLITS},
        "stats": stats,
        "operators": [op[1:] for op in OPERATOR_TOKENS],
        "conventions": {
            "length": "whitespace tokens: each [OP, digit and ] counts one (LRA's count); band inclusive",
            "depth": "tree levels, root = 1, digits included (LRA); operators nest at most max_depth - 1 deep",
            "median": "lower median: sorted(values)[(n - 1) // 2]",
            "sum": "SM = sum modulo 10",
            "arguments": "2..max_args per operator, each a sub-tree with probability subtree_prob",
        },
        "generator": "chiar.listops",
    }


def evaluate_listops(text):
    """Value of a ListOps expression, parsed from its tokens with an explicit stack.

    Independent of the generator's trees on purpose, so it can check the labels (and read any file in
    this format). A bare digit is a valid expression; anything else must be one bracketed operator.
    Raises ValueError naming the offending token and position on malformed input.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    tokens = text.split()
    if not tokens:
        raise ValueError("empty ListOps expression")
    stack = []  # one [operator, argument values] frame per open bracket
    result = None
    for position, token in enumerate(tokens):
        if result is not None:
            raise ValueError(f"unexpected token {token!r} at position {position}: the expression already ended")
        if token in OPERATIONS:
            stack.append((token, []))
        elif token == CLOSE:
            if not stack:
                raise ValueError(f"unmatched ']' at position {position}")
            op, values = stack.pop()
            if not values:
                raise ValueError(f"operator {op!r} closed without arguments at position {position}")
            value = OPERATIONS[op](values)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif token in DIGITS:
            if stack:
                stack[-1][1].append(int(token))
            elif position == 0 and len(tokens) == 1:
                result = int(token)
            else:
                raise ValueError(f"digit {token!r} at position {position} is outside any operator")
        else:
            raise ValueError(
                f"unknown token {token!r} at position {position}; expected one of {', '.join(OPERATOR_TOKENS)}, "
                "a digit 0-9 or ']'"
            )
    if stack:
        raise ValueError(f"{len(stack)} operator(s) not closed: missing ']' at the end")
    return result


def main(argv=None):
    """CLI: every `ListOpsSettings` field is a flag with LRA's default."""
    defaults = ListOpsSettings.__dataclass_fields__
    parser = argparse.ArgumentParser(prog="python -m chiar.listops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="where train/validation/test.jsonl and settings.json go")
    help_text = {
        "num_train": "training examples",
        "num_val": "validation examples",
        "num_test": "test examples",
        "max_args": "most arguments per operator (at least 2)",
        "max_depth": "most tree levels, root = 1, digits included",
        "min_length": "shortest kept tree, in whitespace tokens",
        "max_length": "longest kept tree, in whitespace tokens",
        "subtree_prob": "probability that an argument is a sub-tree rather than a digit",
        "seed": "random seed",
    }
    for name, text in help_text.items():
        field = defaults[name]
        parser.add_argument(f"--{name}", type=type(field.default), default=field.default, help=f"{text} (default {field.default})")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = vars(parser.parse_args(argv))
    output_dir, quiet = args.pop("output_dir"), args.pop("no_progress")
    try:
        paths = write_listops(output_dir, progress=False if quiet else None, **args)
    except ValueError as error:
        parser.error(str(error))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


if __name__ == "__main__":
    main()
