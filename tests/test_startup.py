"""Command-line start-up: the fast `--help` prints exactly Hydra's own help text, and
benchmarks/startup.py reports its medians and the `ratio help/torch` line (no timing thresholds).

Run: python -m pytest -q tests/test_startup.py   (about 15 s on 2 cores)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "benchmarks"))

import startup  # noqa: E402  (benchmarks/startup.py)


@pytest.mark.parametrize(
    "overrides", [[], ["model=gpt2_124m", "ncn=none", "trainer.max_steps=5"]], ids=["plain", "overrides"]
)
def test_fast_help_prints_hydra_s_own_help_text(tmp_path: Path, overrides: list[str]):
    """`-cn config` is another Hydra flag, so that command goes through Hydra's own `--help`."""
    fast = run_cli(["--help", *overrides], cwd=tmp_path)
    hydra = run_cli(["-cn", "config", "--help", *overrides], cwd=tmp_path)
    assert fast.returncode == hydra.returncode == 0, fast.stderr[-2000:] + hydra.stderr[-2000:]
    assert fast.stdout == hydra.stdout
    assert "model: byte_small, gpt2, gpt2_124m, gpt2_medium, medium, paper_18m, small, tiny\n" in fast.stdout
    assert list(tmp_path.iterdir()) == []  # help writes no run directory


def test_fast_help_fails_like_hydra_on_a_bad_override(tmp_path: Path):
    fast = run_cli(["--help", "model=nope"], cwd=tmp_path)
    hydra = run_cli(["-cn", "config", "--help", "model=nope"], cwd=tmp_path)
    assert fast.returncode == hydra.returncode == 2
    last = fast.stderr.strip().splitlines()[-1]
    assert last == hydra.stderr.strip().splitlines()[-1]
    assert last == (
        "error: model=nope is not an option of model: check the spelling, valid options are byte_small, gpt2, "
        "gpt2_124m, gpt2_medium, medium, paper_18m, small, tiny"
    )


def test_startup_benchmark_reports_positive_medians_and_the_ratio_as_last_line(tmp_path: Path, capsys):
    report = startup.main(["--repeats", "1", "--out", str(tmp_path)])
    rows = {r["name"]: r for r in report["results"]}
    assert sorted(rows) == sorted(["torch", "help", "cfg_job", "rejected", "prepare_warm"])
    assert all(r["median_s"] > 0 and len(r["times_s"]) == 1 for r in rows.values())
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio help/torch: \d+\.\d\d", last)
    assert float(last.split()[-1]) == round(rows["help"]["median_s"] / rows["torch"]["median_s"], 2)
    assert len(list(tmp_path.glob("startup-*.json"))) == 1
