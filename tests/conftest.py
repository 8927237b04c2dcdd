"""Shared test fixtures: one token cache per test session, composing the real `conf/`, running `run.py`,
and each test's time budget.

The embedded corpus takes seconds to tokenize, so every test (and every `run.py` subprocess,
which inherits the environment) uses one session-wide `NCN_CACHE_DIR`.

Time budget: a test may run for its pytest-timeout (pyproject's `timeout`, or its own
`@pytest.mark.timeout(N)`; a test marked `slow` gets SLOW_TIMEOUT_S unless it names its own).
A subprocess a test starts waits at most `time_left()`, the rest of that budget, so it stops
with its output captured before pytest-timeout kills the test, and no test allows a child more
time than it has itself (tests/test_timeouts.py checks the literal timeouts).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from ncn import cli
from ncn.config import RunConfig, RunContext

REPO = Path(__file__).resolve().parents[1]
# A slow test (several processes, a sweep, a kill and a resume) takes 1-3 min on the 2 idle cores and
# up to 6x that at load average 10; the budget is a guard against hangs, not a speed target.
SLOW_TIMEOUT_S = 900
_deadline = math.inf  # monotonic time at which the running test's pytest-timeout fires


def budget_of(item: pytest.Item) -> float:
    """Seconds the test `item` may run: its timeout marker, else SLOW_TIMEOUT_S if marked slow (the
    marker is added at collection), else the suite's timeout (`--timeout`, PYTEST_TIMEOUT or
    pyproject); math.inf when timeouts are off (0)."""
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        seconds = marker.args[0] if marker.args else marker.kwargs["timeout"]
    else:
        seconds = (
            item.config.getvalue("timeout") or os.environ.get("PYTEST_TIMEOUT") or item.config.getini("timeout") or 0
        )
    return float(seconds) or math.inf


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # before any fixture: a module fixture set up for this test spends this test's budget
    global _deadline
    _deadline = time.monotonic() + budget_of(item)


def time_left(margin: float = 10.0) -> float | None:
    """Seconds left of the running test's budget less `margin` (at least 1), for a subprocess's
    `timeout=`; None (no limit) when timeouts are off."""
    if math.isinf(_deadline):
        return None
    return max(1.0, _deadline - time.monotonic() - margin)


@pytest.fixture(scope="session", autouse=True)
def ncn_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session-wide token cache directory, exported as NCN_CACHE_DIR."""
    path = tmp_path_factory.mktemp("ncn_cache")
    os.environ["NCN_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the schema (~5 s of migrations) once
    return path


@pytest.fixture
def mlflow_store(_mlflow_template: Path) -> Callable[[Path], str]:
    """mlflow_store(db_path) -> "sqlite:////abs/db_path": a real, empty, already migrated sqlite store."""

    def _make(db: Path) -> str:
        shutil.copyfile(_mlflow_template, db)
        return f"sqlite:///{db}"

    return _make


@pytest.fixture
def compose_config() -> Callable[..., DictConfig]:
    """compose_config(overrides, hydra=False) -> the composed real config (hydra node optional)."""

    def _compose(overrides: Sequence[str] = (), hydra: bool = False) -> DictConfig:
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=hydra)

    return _compose


@pytest.fixture
def task_config(compose_config, tmp_path: Path) -> Callable[..., tuple[RunConfig, RunContext]]:
    """task_config(overrides) -> (RunConfig, RunContext) as run.py hands them to a task's `main`:
    run dir `tmp_path`, launch dir the current directory, the overridden keys parsed like Hydra's."""

    def _make(overrides: Sequence[str] = ()) -> tuple[RunConfig, RunContext]:
        cfg = cli.typed(compose_config(overrides))[0]
        keys = frozenset(o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides)))
        return cfg, RunContext(run_dir=tmp_path, launch_dir=Path.cwd(), overridden=keys)

    return _make


@pytest.fixture
def typed_config(compose_config) -> Callable[..., RunConfig]:
    """typed_config(overrides) -> the real config composed and converted as run.py does (`ncn.cli.typed`)."""

    def _typed(overrides: Sequence[str] = ()) -> RunConfig:
        return cli.typed(compose_config(overrides))[0]

    return _typed


def run_cli(
    args: Sequence[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    faults: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """`python run.py *args` in `cwd` (the launch dir), capturing text output; `faults` are
    `tests/faults.py` options (e.g. ["--nan-steps", "3"]) that run it under fault injection.
    `timeout` defaults to the rest of the test's budget (`time_left()`)."""
    command = [str(REPO / "tests" / "faults.py"), *faults, "--"] if faults else [str(REPO / "run.py")]
    return subprocess.run(
        [sys.executable, *command, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=time_left() if timeout is None else timeout,
    )
