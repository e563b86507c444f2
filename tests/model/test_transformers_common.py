"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, `TrainingTesterMixin`) run on CHIAR.

Those tests ship in transformers' source distribution, not in the wheel. This module downloads
the sdist of the installed version from the package index (once, into a cache folder), builds a
test tree from its `tests/` folder plus our tester (`transformers_common/`),
and runs pytest there once per variant. Offline and without a cached copy it skips, saying why;
`CHIAR_TRANSFORMERS_SDIST` may name a downloaded `transformers-X.tar.gz` instead.

The sdist lacks three modules the common tests import. They are replaced by stand-ins:
- `exporters/test_export.py`: `ExportTesterMixin`, empty (no torch.export tests are run);
- `generation/test_utils.py`: `GenerationTesterMixin`, empty (no generate() tests from there;
  tests/model/test_generation.py covers generate with and without a cache, beams and sampling);
- `utils/test_configuration_utils.py`: `config_common_kwargs`, common config keyword arguments.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import transformers
from transformers_common.common_variants import VARIANTS

REPO = Path(__file__).resolve().parents[2]
OURS = Path(__file__).resolve().parent / "transformers_common"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chiar" / "transformers-sdist"

STANDINS = {
    "exporters/test_export.py": "class ExportTesterMixin:  # stand-in: no export tests\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:  # stand-in: no generate() tests\n    pass\n",
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "output_attentions": True,\n'
        '    "dtype": "float16",\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["BertModel"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
}


def transformers_sdist():
    """The sdist of the installed transformers: named by CHIAR_TRANSFORMERS_SDIST, cached, or downloaded."""
    version = transformers.__version__
    if os.environ.get("CHIAR_TRANSFORMERS_SDIST"):
        named = Path(os.environ["CHIAR_TRANSFORMERS_SDIST"])
        if not named.is_file():
            pytest.fail(f"CHIAR_TRANSFORMERS_SDIST={named} is not a file")
        return named
    cache = CACHE
    cached = cache / f"transformers-{version}.tar.gz"
    if cached.exists():
        return cached
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home: download for this session only
        cache = Path(tempfile.mkdtemp(prefix="chiar-transformers-sdist-"))
        cached = cache / cached.name
    command = [sys.executable, "-m", "pip", "download", f"transformers=={version}",
               "--no-binary", ":all:", "--no-deps", "--quiet", "-d", str(cache)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not cached.exists():
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()[-1:]
        pytest.skip(f"transformers {version} sdist not available (offline?): {' '.join(errors)[:300]}")
    return cached


@pytest.fixture(scope="module")
def common_tests_tree(tmp_path_factory):
    """transformers' tests/ folder, the stand-ins for what the sdist lacks, and our tester."""
    root = tmp_path_factory.mktemp("transformers_common")
    with tarfile.open(transformers_sdist()) as archive:
        members = [m for m in archive.getmembers() if m.name.split("/")[1:2] == ["tests"] and m.isfile()]
        if not any(m.name.endswith("/tests/test_modeling_common.py") for m in members):
            pytest.fail("the transformers sdist has no tests/test_modeling_common.py")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
        archive.extractall(root, members=members, **safe)
    tests = next(root.glob("*/tests"))
    for name, text in STANDINS.items():
        if not (tests / name).exists():
            (tests / name).parent.mkdir(parents=True, exist_ok=True)
            (tests / name).write_text(text)
    (tests / "models" / "chiar").mkdir(parents=True)
    shutil.copy(OURS / "chiar_common_tester.py", tests / "models" / "chiar" / "test_modeling_chiar.py")
    shutil.copy(OURS / "common_variants.py", tests / "models" / "chiar" / "common_variants.py")
    for folder in [tests, *[p for p in tests.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    (tests.parent / "pytest.ini").write_text("[pytest]\n")  # not our setup.cfg's options
    return tests


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_common_model_tests_pass(common_tests_tree, variant):
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "CHIAR_COMMON_VARIANT": variant, "PYTHONPATH": path}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", "-rf",
               "tests/models/chiar/test_modeling_chiar.py"]
    done = subprocess.run(command, cwd=common_tests_tree.parent, env=env, capture_output=True, text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"{variant}: {summary}\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert " passed" in summary, summary  # something ran
