"""The docs and the committed results agree: every result file the docs cite exists, every
committed result is cited (a result nobody cites is one nobody can tell is current) and says which
commit and command produced it, and results the docs cite from history exist in that commit."""

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def docs_text():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


HISTORICAL = r"\b([0-9a-f]{7,40}):benchmarks/results/([\w.\-]+\.(?:json|png|log))"
# The one GPU run's files (model code of 2a29f47) predate the commit and command fields.
BEFORE_PROVENANCE = {"device-check-cuda.json", "generation-cuda.json", "quality-wikitext-full.json", "speed-cuda.json"}


def test_every_cited_result_exists():
    text = re.sub(HISTORICAL, "", docs_text())  # `COMMIT:benchmarks/results/FILE`: a file of the past, checked below
    cited = set(re.findall(r"benchmarks/results/([\w.\-]+\.(?:json|png|log))", text))
    named = {name for name in re.findall(r"`([\w.\-]+\.(?:json|png|log))`", text) if re.search(r"-(cpu|cuda)\b|fraction|quick|full", name)}
    missing = sorted(name for name in cited | named if not (RESULTS / name).is_file())
    assert not missing, f"docs cite results that are not in benchmarks/results/: {missing}"


def test_results_cited_from_history_are_in_their_commits():
    cited = sorted(set(re.findall(HISTORICAL, docs_text())))
    if cited and subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout: the history the docs cite is not here")
    missing = [f"{commit}:{name}" for commit, name in cited
               if subprocess.run(["git", "cat-file", "-e", f"{commit}:benchmarks/results/{name}"], cwd=ROOT, capture_output=True).returncode]
    assert not missing, f"docs cite results of commits that do not hold them: {missing}"


def test_every_committed_result_says_what_produced_it():
    lacking = []
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if path.name not in BEFORE_PROVENANCE and not (record.get("commit") and record.get("command")):
            lacking.append(path.name)
    assert not lacking, f"results without the commit and command that produced them: {lacking}"


def test_every_committed_result_is_cited():
    text = re.sub(HISTORICAL, "", docs_text())
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
