"""The docs and the committed results agree: every result file the docs cite exists, and every
committed result is cited (a result nobody cites is one nobody can tell is current)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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


def test_links_and_cited_paths_exist():
    """Relative links, and the repository files and tests the pages name, exist (a page that points to
    a file outside the repository, or to a test that was renamed, is wrong for a newcomer)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists():
                problems.append(f"{page.name}: link {target}")
        for match in re.finditer(r"`((?:tests|chiar|benchmarks|modeling_chiar|configs)/[\w./\-]+)(?:::(\w+))?`( of commit)?", text):
            path, test, historical = match.groups()
            if historical:  # removed code, cited with the commit that had it
                continue
            if not (ROOT / path).exists():
                problems.append(f"{page.name}: {path}")
            elif test and f"def {test}" not in (ROOT / path).read_text(encoding="utf-8"):
                problems.append(f"{page.name}: {path}::{test}")
    assert not problems, problems
