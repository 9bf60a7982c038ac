"""The import contract of docs/design.md, checked by import-linter: lower layers (models, data)
never import upper ones (train, analysis, bench, report, cli)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(exe), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contract_is_kept():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_import_contract_catches_a_model_importing_the_cli(tmp_path):
    shutil.copytree(ROOT / "pnnh", tmp_path / "pnnh", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    resnet = tmp_path / "pnnh" / "models" / "resnet.py"
    resnet.write_text(resnet.read_text() + "\n\ndef _late():\n    from ..cli import main\n    return main\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "pnnh.models.resnet -> pnnh.cli" in proc.stdout
