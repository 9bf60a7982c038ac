"""A tiny real study, trained once per test session and shared by the report tests."""

from __future__ import annotations

import pytest

from pnnh.report.study import plan_study, run_study

# 2 families x depth 8, 12 steps on 1,024 images at a quarter width: a few seconds on one core
TINY = dict(families=["plain", "resnet"], depths=[8], seeds=1, threads=1,
            train={"steps": 12, "train_subset": 1024, "test_subset": 256, "checkpoint_every": 4},
            model_kwargs={"width": 0.25})


@pytest.fixture(scope="session")
def tiny_spec() -> dict:
    """The plan_study keyword arguments of the tiny study (besides preset and out)."""
    return TINY


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """(study directory, results dict, the progress lines it logged)."""
    out = tmp_path_factory.mktemp("study")
    lines: list[str] = []
    results = run_study(plan_study("quick", out=out, **TINY), log=lines.append)
    return out, results, lines
