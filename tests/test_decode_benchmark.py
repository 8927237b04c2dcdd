"""benchmarks/decode.py prints its result table once, one row per context (and threshold), and the same rows as JSON.

Run: python -m pytest -q tests/test_decode_benchmark.py (~30 s: a tiny model, two short contexts, one repeat).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ncn.training.checkpoint import read_train_state

from conftest import REPO, time_left
from tiny_checkpoint import TinyRun, tiny_run

DENSE_HEADER = " context  cached ms/tok  cached tok/s  uncached ms/tok  uncached tok/s  speed-up"
SKIP_HEADER = " context   tau  prefill ms   ms/tok    tok/s  FFN skipped  all skipped"


def _run(tmp_path: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "decode.py"),
            "--contexts",
            "16,24",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=time_left(),
    )


def _decode(tmp_path: Path, *args: str) -> tuple[list[str], dict]:
    done = _run(tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = tmp_path.glob("*.json")
    return done.stdout.splitlines(), json.loads(written.read_text())


def test_the_dense_table_is_printed_once(tmp_path: Path) -> None:
    lines, report = _decode(tmp_path, "--model", "tiny", "--ncn", "full")
    assert lines.count(DENSE_HEADER) == 1 and sum(line.startswith("decode benchmark:") for line in lines) == 1
    start = lines.index(DENSE_HEADER) + 1
    assert (
        [int(line.split()[0]) for line in lines[start : start + 2]]
        == [16, 24]
        == [r["context"] for r in report["results"]]
    )
    assert lines[start + 2].startswith("flat_cached_16_to_24: ")  # the table ends after its two rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, _mlflow_template: Path) -> TinyRun:
    return tiny_run(tmp_path_factory, _mlflow_template)


def test_the_skipping_table_is_printed_once(tmp_path: Path, trained: TinyRun) -> None:
    lines, report = _decode(tmp_path, "--checkpoint", str(trained.checkpoint), "--skip-thresholds", "0.5")
    assert lines.count(SKIP_HEADER) == 1
    start = lines.index(SKIP_HEADER) + 1
    rows = [(int(c), float(t)) for c, t, *_ in (line.split() for line in lines[start : start + 4])]
    assert rows == [(16, 0.0), (16, 0.5), (24, 0.0), (24, 0.5)] == [(r["context"], r["tau"]) for r in report["results"]]
    assert lines[start + 4].startswith("wrote ") and len(lines) == start + 5


@pytest.mark.parametrize(
    ("thresholds", "line"),
    [
        (
            "0.5",
            "error: --checkpoint=nosuch: no checkpoint folder, run name or MLflow run id matches this path or run name "
            "under {cwd}: pass --checkpoint=latest, --checkpoint=best, a run name, or an existing checkpoint folder",
        ),
        ("1.5", "error: --skip-thresholds 1.5: 1.5 is outside [0, 1]: use 0 (dense) or a gate value such as 0.5"),
        ("0.3,x", "error: --skip-thresholds 0.3,x: 'x' is not a number: list gate thresholds, e.g. 0.3,0.5"),
    ],
)
def test_bad_input_ends_in_one_error_line_with_exit_2(tmp_path: Path, thresholds: str, line: str) -> None:
    done = _run(tmp_path, "--checkpoint", "nosuch", "--skip-thresholds", thresholds, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [line.format(cwd=tmp_path)]
    assert not list(tmp_path.glob("*.json"))


def test_a_warning_is_one_line(tmp_path: Path, trained: TinyRun) -> None:
    """A run name that two runs share: the checkpoint module's warning, in run.py's one-line format."""
    state = read_train_state(trained.checkpoint / "train_state.json")
    for name in ("a", "b"):
        shutil.copytree(trained.checkpoint.parent, tmp_path / "outputs" / name / "checkpoints")
    pointer = tmp_path / "outputs" / "b" / "checkpoints" / "latest"
    os.utime(pointer, ns=(pointer.stat().st_mtime_ns + 10**9,) * 2)  # b checkpointed last
    done = _run(tmp_path, "--checkpoint", state.run_name, "--skip-thresholds", "0.5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = f"(MLflow run {state.mlflow_run_id})"
    warning = (
        f"warning: --checkpoint={state.run_name} names 2 runs: using the newest, {tmp_path / 'outputs' / 'b'} {run}; "
        f"to pick another, pass its folder or MLflow run id: --checkpoint={tmp_path / 'outputs' / 'a'} {run}"
    )
    assert [x for x in done.stderr.splitlines() if "warning" in x.lower()] == [warning]
