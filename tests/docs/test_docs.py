"""The user documentation: docstring examples run, and the site (API reference included) builds
with no warnings (mkdocs strict mode)."""

import doctest
import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pnnh

ROOT = Path(__file__).resolve().parents[2]


def _modules_with_examples():
    names = ["pnnh"] + [m.name for m in pkgutil.walk_packages(pnnh.__path__, "pnnh.")]
    for name in names:
        path = importlib.util.find_spec(name).origin
        if path and path.endswith(".py") and ">>>" in Path(path).read_text():
            yield name


@pytest.mark.parametrize("name", list(_modules_with_examples()))
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_docs_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is part of the test extra (pip install -e '.[test]')"
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "TrainConfig" in api and "find_residual_connections" in api


def test_coder_path_script_reads_the_identity_of_a_fresh_pnnh_vit(tmp_path):
    """docs/results/vit_coder_path.py: every number of an untrained block-coder PNNH ViT is 1."""
    from pnnh.train.checkpoint import save_weights

    for param in ("init", "param"):
        save_weights(tmp_path / f"{param}.safetensors", pnnh.create_model("pnnh_vit_mini_d6", path_param=param))
    proc = subprocess.run([sys.executable, str(ROOT / "docs/results/vit_coder_path.py"),
                           str(tmp_path / "init.safetensors"), str(tmp_path / "param.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("1.000         1.000      1.000   1.000") == 6
    assert proc.stdout.count("min 1, median 1, max 1") == 2 and "path_param='param'" in proc.stdout
