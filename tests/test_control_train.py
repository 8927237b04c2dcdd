"""Training with a control input through `run.py`: exact resume of a labelled run, the label vocabulary on
resume, and the mode slider's measured precision curve.

Subprocess runs of `model=tiny` on byte-level Shakespeare (one thread, no MLflow); about two minutes on 2 cores.
`python -m pytest -q tests/test_control_train.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ncn.config import MODE_GRID, ControlConfig, RunConfig
from ncn.errors import NCNConfigError
from ncn.tasks.train import _with_vocabulary
from ncn.training import checkpoint as ckpt
from ncn.training.evaluation import mode_key

from conftest import run_cli

GENRES = ["comedies", "histories", "problems", "roman", "romances", "tragedies"]
BASE = [
    "model=tiny",
    "data.tokenizer=bytes",
    "trainer=smoke",
    "trainer.eval_batches=1",
    "trainer.probe_tokens=0",
    "tracking=none",
]


def _run(tmp: Path, *args: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    result = run_cli([*BASE, *args], cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent.parent for p in tmp.glob("outputs/*/*/checkpoints/latest")]
    return run_dir


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # three training runs
def test_resumed_labelled_run_is_bitwise_equal(tmp_path):
    """8 steps at once vs 4 + a resume to 8: same weights, same optimizer state, same losses, same vocabulary."""
    whole = _run(tmp_path / "whole", "control=genre", "trainer.max_steps=8", "trainer.checkpoint_every=4")
    first = _run(tmp_path / "part", "control=genre", "trainer.max_steps=4", "trainer.checkpoint_every=4")
    resumed = run_cli(
        [*BASE, f"trainer.resume={first / 'checkpoints' / 'step_000004'}", "trainer.max_steps=8"],
        cwd=tmp_path / "part",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (second,) = {p.parent.parent for p in (tmp_path / "part").glob("outputs/*/*/checkpoints/latest")} - {first}
    a = ckpt.load(whole / "checkpoints" / "step_000008")
    b = ckpt.load(second / "checkpoints" / "step_000008")
    assert a.config.control.vocabulary == b.config.control.vocabulary == GENRES
    assert a.model.keys() == b.model.keys() and "control.weight" in a.model
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    assert torch.equal(a.optim["optimizer"]["state"][0]["exp_avg"], b.optim["optimizer"]["state"][0]["exp_avg"])
    losses = {r["step"]: r["train/loss"] for r in _metrics(whole) if "train/loss" in r}
    again = {r["step"]: r["train/loss"] for run in (first, second) for r in _metrics(run) if "train/loss" in r}
    assert losses == again and sorted(losses) == list(range(1, 9))
    evals = {r["step"]: r["val/control/gain"] for r in _metrics(whole) if "val/control/gain" in r}
    assert sorted(evals) == [0, 3, 4, 6, 8]  # every eval (eval_every=3, the checkpoint at 4, the end) measures it
    assert all(math.isfinite(g) for g in evals.values())


def test_resume_refuses_another_label_vocabulary(tmp_path):
    saved = RunConfig(control=ControlConfig(kind="genre", vocabulary=GENRES))
    fake = ckpt.Checkpoint(tmp_path, {}, {}, ckpt.TrainState(), saved)
    with pytest.raises(NCNConfigError, match="a resume keeps the label vocabulary"):
        _with_vocabulary(RunConfig(control=ControlConfig(kind="genre")), GENRES[:5], fake)
    kept = _with_vocabulary(RunConfig(control=ControlConfig(kind="genre")), GENRES, fake)
    assert kept.control.vocabulary == GENRES


def test_mode_slider_orders_precision_at_every_layer(tmp_path):
    """A short control=mode run: at its last eval the mean precision is strictly increasing in m at every layer,
    and train/mode_loss is logged apart from the homeostatic term."""
    run_dir = _run(
        tmp_path,
        "control=mode",
        "control.mode_lambda=1.0",
        "trainer.max_steps=30",
        "trainer.eval_every=30",
        "optim.warmup_steps=5",
        "optim.lr=3e-3",
    )
    records = _metrics(run_dir)
    last = [r for r in records if mode_key(0.0, "entropy") in r][-1]
    assert last["step"] == 30
    for layer in range(2):
        curve = [last[mode_key(m, f"precision/L{layer}")] for m in MODE_GRID]
        assert all(b > a for a, b in zip(curve, curve[1:], strict=False)), (layer, curve)
    assert any("train/mode_loss" in r and r["train/mode_loss"] > 0 for r in records)
