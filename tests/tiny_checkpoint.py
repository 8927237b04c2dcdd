"""A tiny trained checkpoint shared by the generate / analyze / eval tests, built once per session.

`tiny_run(tmp_path_factory, mlflow_template)` trains `model=tiny trainer=smoke` (6 steps, ~10 s)
into a real temporary MLflow sqlite store, once per pytest session however many test modules
ask for it (a file lock and a marker under the session's basetemp).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from conftest import run_cli


@dataclass(frozen=True)
class TinyRun:
    """The session's tiny training run: its last checkpoint folder and MLflow URI."""

    checkpoint: Path  # <run dir>/checkpoints/step_000006
    mlflow_uri: str  # sqlite:////<tmp>/mlflow.db holding the (FINISHED) run


def tiny_run(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> TinyRun:
    """Train (first call of the session) or reuse the tiny checkpoint under the session's basetemp.

    Needs NCN_CACHE_DIR set (conftest's session fixture) so the subprocess shares the token cache.
    """
    assert "NCN_CACHE_DIR" in os.environ
    base = tmp_path_factory.getbasetemp() / "tiny_run"
    base.mkdir(exist_ok=True)
    db = base / "mlflow.db"
    run_dir = base / "run"
    with FileLock(str(base / "lock")):
        if not (run_dir / "checkpoints" / "latest").is_file():
            shutil.copyfile(mlflow_template, db)
            args = ["model=tiny", "trainer=smoke", f"tracking.uri=sqlite:///{db}", f"hydra.run.dir={run_dir}"]
            done = run_cli(args, cwd=base)
            assert done.returncode == 0, done.stderr[-2000:]
    return TinyRun(run_dir / "checkpoints" / "step_000006", f"sqlite:///{db}")
