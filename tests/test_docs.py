"""The docs and the committed results agree: every result file the docs cite exists, and every
committed result is cited (a result nobody cites is one nobody can tell is current)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def docs_text():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


def test_every_cited_result_exists():
    text = docs_text()
    cited = set(re.findall(r"benchmarks/results/([\w.\-]+\.(?:json|png|log))", text))
    named = {name for name in re.findall(r"`([\w.\-]+\.(?:json|png|log))`", text) if re.search(r"-(cpu|cuda)\b|fraction|quick|full", name)}
    missing = sorted(name for name in cited | named if not (RESULTS / name).is_file())
    assert not missing, f"docs cite results that are not in benchmarks/results/: {missing}"


def test_every_committed_result_is_cited():
    text = docs_text()
    uncited = sorted(path.name for path in RESULTS.iterdir() if path.is_file() and path.name not in text)
    assert not uncited, f"results in benchmarks/results/ that no page cites: {uncited}"
