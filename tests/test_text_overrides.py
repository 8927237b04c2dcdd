"""Text settings keep the text typed on the command line (`prompt=1.10` stays "1.10", not 1.1).

Hydra's override grammar types `1.10`, `true`, `1e3` before the typed schema turns them back into
text; `ncn.cli.keep_typed_text` restores what was typed for every `str` setting (prompt, run_name,
tracking.experiment, paths). A list or a mapping given to a text key is refused with the quoting that
passes it as text. Run: python -m pytest -q tests/test_text_overrides.py (~1 min).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ncn.cli import keep_typed_text

from conftest import run_cli

TEXT = {"1.10": "1.10", "true": "true", "1e3": "1e3", "False": "False", "0x1F": "0x1F", "007": "007", "-0.0": "-0.0"}


@pytest.mark.parametrize("key", ["prompt", "run_name", "tracking.experiment", "checkpoint", "data.path"])
@pytest.mark.parametrize("typed", sorted(TEXT))
def test_every_text_key_keeps_the_typed_text(compose_config, key: str, typed: str) -> None:
    overrides = [f"{key}={typed}"]
    cfg = compose_config(overrides)
    keep_typed_text(cfg, OverridesParser.create().parse_overrides(overrides))
    assert OmegaConf.select(cfg, key) == TEXT[typed]


def test_numbers_null_and_quoted_text_are_left_alone(compose_config) -> None:
    overrides = ["seed=7", "trainer.max_steps=300", "optim.lr=1.10e-3", "prompt=null", "run_name='1.10'", "top_k=5"]
    cfg = compose_config(overrides)
    keep_typed_text(cfg, OverridesParser.create().parse_overrides(overrides))
    assert (cfg.seed, cfg.trainer.max_steps, cfg.optim.lr, cfg.prompt, cfg.run_name, cfg.top_k) == (
        7,
        300,
        0.00110,
        None,
        "1.10",
        5,
    )


def test_a_run_records_the_typed_text(tmp_path: Path) -> None:
    """Through run.py: the run's name and its checkpoint's config hold the text as typed."""
    done = run_cli(
        [
            "model=tiny",
            "tracking=none",
            "trainer=smoke",
            "trainer.max_steps=1",
            "trainer.probe_tokens=0",
            "run_name=1.10",
            "tracking.experiment=true",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "] - 1.10: " in (tmp_path / "run" / "run.log").read_text()
    [config] = (tmp_path / "run" / "checkpoints").glob("step_*/config.yaml")
    saved = yaml.safe_load(config.read_text())
    assert (saved["run_name"], saved["tracking"]["experiment"]) == ("1.10", "true")


@pytest.mark.parametrize(
    ("typed", "expect"),
    [
        (
            "prompt=[a,b]",
            "prompt=[a,b] is not text (Cannot convert 'list' to string: '['a', 'b']'): prompt takes text; to pass it "
            "as typed, quote it, e.g. \"prompt='[a,b]'\"",
        ),
        (
            "run_name={a:1}",
            "run_name={a:1} is not text (Cannot convert 'dict' to string: '{'a': 1}'): run_name takes text; to pass "
            "it as typed, quote it, e.g. \"run_name='{a:1}'\"",
        ),
    ],
)
def test_a_list_for_a_text_key_suggests_its_quoting(tmp_path: Path, typed: str, expect: str) -> None:
    done = run_cli(["model=tiny", "tracking=none", typed], cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == f"error: {expect}", done.stderr[-2000:]
    quoted = expect.rsplit("e.g. ", 1)[1]
    fixed = run_cli(["model=tiny", "tracking=none", *shlex.split(quoted), "--cfg", "job"], cwd=tmp_path)
    key, text = typed.split("=", 1)
    assert fixed.returncode == 0 and yaml.safe_load(fixed.stdout)[key] == text, fixed.stderr[-2000:]
