"""benchmarks/decode.py prints its result table once, one row per context (and threshold), and the same rows as JSON.

Run: python -m pytest -q tests/test_decode_benchmark.py (~30 s: a tiny model, two short contexts, one repeat).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, time_left
from tiny_checkpoint import TinyRun, tiny_run

DENSE_HEADER = " context  cached ms/tok  cached tok/s  uncached ms/tok  uncached tok/s  speed-up"
SKIP_HEADER = " context   tau  prefill ms   ms/tok    tok/s  FFN skipped  all skipped"


def _decode(tmp_path: Path, *args: str) -> tuple[list[str], dict]:
    done = subprocess.run(
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
        capture_output=True,
        text=True,
        timeout=time_left(),
    )
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
