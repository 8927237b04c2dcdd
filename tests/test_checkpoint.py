"""Checkpoint tests: atomic folder + `latest` pointer, retention, `resolve`, a crash between write
and rename, corrupt / foreign / malicious files (one-line CheckpointError naming the file), RNG.

Run: python -m pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn import checkpoint as ckpt
from ncn.errors import CheckpointError

TINY = {"vocab_size": 128, "block_size": 16, "d_model": 32, "n_layer": 2, "n_head": 2}
CONFIG = {"model": {"_target_": "ncn.ModelConfig", **TINY},
          "ncn": {"_target_": "ncn.ModulationConfig", "targets": ["temperature", "gain", "activation"]}}


def _model(**overrides: int) -> ModulatedGPT:
    torch.manual_seed(0)
    return ModulatedGPT(ModelConfig(**{**TINY, **overrides}), ModulationConfig())


def _save(directory: Path, step: int, model: ModulatedGPT, keep: int = 3, val_loss: float | None = None) -> Path:
    return ckpt.save(
        directory, step, model=model.state_dict(), optim={"optimizer": {}, "scheduler": {}, "scaler": {}},
        rng={"ranks": [ckpt.capture_rng()]}, train_state={"step": step, "val_loss": val_loss, "mlflow_run_id": "abc"},
        config_yaml=OmegaConf.to_yaml(OmegaConf.create(CONFIG)), keep=keep,
    )


def test_layout_pointer_and_retention(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    model = _model()
    losses = {1: 5.0, 2: 3.0, 3: 4.0, 4: 4.5, 5: 4.2}
    for step, loss in losses.items():
        path = _save(directory, step, model, keep=2, val_loss=loss)
        assert path == directory / f"step_{step:06d}"
        assert (directory / "latest").read_text().strip() == path.name
    # last 2 kept, plus the best (step 2) so trainer.resume=best still works
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step_000002", "step_000004", "step_000005"]
    assert sorted(f.name for f in (directory / "step_000005").iterdir()) == [
        "config.yaml", "model.pt", "optim.pt", "rng.pt", "train_state.json"]
    loaded = ckpt.load(directory / "step_000005")
    assert loaded.train_state == {"format": ckpt.FORMAT_VERSION, "step": 5, "val_loss": 4.2, "mlflow_run_id": "abc"}
    assert all(torch.equal(loaded.model[k], v) for k, v in model.state_dict().items())
    assert loaded.config.model.d_model == 32


def test_resolve_latest_best_and_paths(tmp_path: Path) -> None:
    old = tmp_path / "outputs" / "2026-01-01" / "10-00-00" / "checkpoints"
    new = tmp_path / "multirun" / "2026-01-02" / "sweep" / "0" / "checkpoints"
    model = _model()
    _save(old, 7, model, val_loss=1.0)
    _save(new, 1, model, val_loss=3.0)
    _save(new, 2, model, val_loss=2.0)
    _save(new, 3, model, val_loss=2.5)
    os.utime(old / "latest", (1, 1))  # the multirun job's pointer is the most recent
    assert ckpt.resolve("latest", tmp_path) == new / "step_000003"
    assert ckpt.resolve("best", tmp_path) == new / "step_000002"
    assert ckpt.resolve(old.parent, tmp_path) == old / "step_000007"  # a run dir
    assert ckpt.resolve(old, tmp_path) == old / "step_000007"  # its checkpoints dir
    assert ckpt.resolve(str(old / "step_000007" / "model.pt"), tmp_path) == old / "step_000007"
    with pytest.raises(CheckpointError, match="no checkpoint found under"):
        ckpt.resolve("latest", tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.resolve("nowhere/step_000001", tmp_path)


CRASH_SCRIPT = """
import sys; from pathlib import Path; sys.path.insert(0, {tests!r})
import test_checkpoint as t
model = t._model()
t._save(Path({directory!r}), 1, model)
t._save(Path({directory!r}), 2, model)
"""


def test_crash_between_write_and_rename_keeps_previous(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    script = CRASH_SCRIPT.format(tests=str(REPO / "tests"), directory=str(directory))
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, ckpt.CRASH_ENV: "2"}, timeout=120)
    assert done.returncode == ckpt.CRASH_EXIT_CODE
    assert (directory / "latest").read_text().strip() == "step_000001"
    assert [p.name for p in directory.glob(".tmp-step_000002-*")]  # fully written, never renamed
    assert ckpt.resolve(directory) == directory / "step_000001"
    assert ckpt.load(directory / "step_000001").train_state["step"] == 1
    _save(directory, 2, _model())  # the next save clears the leftover
    assert not list(directory.glob(".tmp-*"))
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step_000001", "step_000002"]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return _save(tmp_path / "checkpoints", 1, _model())


def test_truncated_file(saved: Path) -> None:
    data = (saved / "model.pt").read_bytes()
    (saved / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.pt is truncated or corrupt") as info:
        ckpt.load(saved)
    assert str(saved / "model.pt") in str(info.value) and "\n" not in str(info.value)


def test_random_bytes(saved: Path) -> None:
    (saved / "optim.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=r"optim\.pt is (not a PyTorch checkpoint|truncated or corrupt)") as info:
        ckpt.load(saved)
    assert str(saved / "optim.pt") in str(info.value) and "\n" not in str(info.value)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_never_executes(saved: Path, tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    if writer == "torch":
        torch.save({"weight": _Exploit(marker)}, saved / "rng.pt")
    else:
        (saved / "rng.pt").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match=r"rng\.pt") as info:
        ckpt.load(saved)
    assert not marker.exists()
    assert "\n" not in str(info.value)
    if writer == "torch":
        assert "would import" in str(info.value) and "system" in str(info.value)


def test_foreign_shape(saved: Path) -> None:
    bigger = _model(d_model=64)
    with pytest.raises(CheckpointError, match=r"model\.pt does not fit this model \(size mismatch") as info:
        ckpt.load_weights(bigger, ckpt.load(saved).model, saved / "model.pt")
    assert "\n" not in str(info.value)


def test_check_compatible(saved: Path) -> None:
    loaded = ckpt.load(saved)
    same = OmegaConf.create({**CONFIG, "model": {**CONFIG["model"], "dropout": 0.1}})  # dropout may change
    ckpt.check_compatible(loaded, same)
    other = OmegaConf.create({**CONFIG, "model": {**CONFIG["model"], "d_model": 64}})
    with pytest.raises(CheckpointError, match="was trained with model.d_model=32, this run has model.d_model=64"):
        ckpt.check_compatible(loaded, other)


def test_load_model_rebuilds_from_saved_config(saved: Path) -> None:
    model, cfg = ckpt.load_model(saved.parent.parent)  # a run dir works too
    assert not model.training and cfg.model.n_layer == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in _model().state_dict().items())


def test_rng_roundtrip() -> None:
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = ckpt.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.restore_rng(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_train_state_json_is_validated(saved: Path) -> None:
    (saved / "train_state.json").write_text(json.dumps({"format": 99, "step": 1}))
    with pytest.raises(CheckpointError, match="has format 99, expected 1"):
        ckpt.load(saved)
    (saved / "train_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"train_state\.json is corrupt"):
        ckpt.load(saved)
