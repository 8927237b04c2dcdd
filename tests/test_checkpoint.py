"""Checkpoint tests: atomic folder + `latest` pointer, retention, `resolve` (latest, best, run name,
MLflow run id, paths), a crash between write and rename, corrupt / foreign / malicious files and
metadata of any shape (one-line CheckpointError naming the file), the resume config, RNG.

Run: python -m pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.config import RunConfig
from ncn.errors import CheckpointError
from ncn.training import checkpoint as ckpt

from conftest import REPO, time_left

TINY = {"vocab_size": 128, "block_size": 16, "d_model": 32, "n_layer": 2, "n_head": 2}
CONFIG = dataclasses.asdict(RunConfig(model=ModelConfig(**TINY), run_name="tiny-run"))
RUN_ID = "0123456789abcdef0123456789abcdef"


def _model(**overrides: int) -> ModulatedGPT:
    torch.manual_seed(0)
    return ModulatedGPT(ModelConfig(**{**TINY, **overrides}), ModulationConfig())


def _save(
    directory: Path,
    step: int,
    model: ModulatedGPT,
    keep: int = 3,
    val_loss: float | None = None,
    run_name: str = "tiny-run",
    run_id: str = RUN_ID,
) -> Path:
    state = ckpt.TrainState(step=step, val_loss=val_loss, mlflow_run_id=run_id, run_name=run_name)
    snapshot = ckpt.Snapshot(
        state=state,
        model=model.state_dict(),
        optim={"optimizer": {}, "scaler": {}},
        config=CONFIG,
        extra={"world_size": 1},
    )
    return ckpt.save(directory, snapshot, keep=keep)


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
        "config.yaml",
        "model.pt",
        "optim.pt",
        "train_state.json",
    ]
    loaded = ckpt.load(directory / "step_000005")
    assert loaded.state == ckpt.TrainState(step=5, val_loss=4.2, mlflow_run_id=RUN_ID, run_name="tiny-run")
    assert (
        loaded.extra == {"world_size": 1, **{}} and json.loads((path / "train_state.json").read_text())["format"] == 2
    )
    assert all(torch.equal(loaded.model[k], v) for k, v in model.state_dict().items())
    assert loaded.config.model.d_model == 32 and loaded.config == RunConfig(
        model=ModelConfig(**TINY), run_name="tiny-run"
    )
    assert loaded.describe() == (
        f"checkpoint of run tiny-run at step 5 (val loss 4.2000, ppl 66.69): {path} (MLflow run {RUN_ID})"
    )


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
    with pytest.raises(CheckpointError, match="nowhere/step_000001: no checkpoint folder, run name or MLflow run id"):
        ckpt.resolve("nowhere/step_000001", tmp_path)


def test_resolve_a_run_name_or_mlflow_run_id_gives_that_runs_newest_checkpoint(tmp_path: Path) -> None:
    smoke = tmp_path / "outputs" / "d" / "smoke" / "checkpoints"
    real = tmp_path / "outputs" / "d" / "real" / "checkpoints"
    other_id = "f" * 32
    _save(real, 100, _model(), run_name="small-full-s0", run_id=RUN_ID)
    _save(real, 250, _model(), run_name="small-full-s0", run_id=RUN_ID)
    _save(smoke, 6, _model(), run_name="tiny-full-s0", run_id=other_id)  # the newest checkpoint overall
    assert ckpt.resolve("latest", tmp_path) == smoke / "step_000006"
    assert ckpt.resolve("small-full-s0", tmp_path) == real / "step_000250"
    assert ckpt.resolve(RUN_ID, tmp_path) == real / "step_000250"
    assert ckpt.resolve(other_id, tmp_path) == smoke / "step_000006"
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint=a{32}: no checkpoint folder, run name or MLflow run id matches "
        r"this MLflow run id",
    ):
        ckpt.resolve("a" * 32, tmp_path)
    with pytest.raises(CheckpointError, match="trainer.resume=no-such-run: no checkpoint folder, run name"):
        ckpt.resolve("no-such-run", tmp_path, key="trainer.resume")


def test_a_run_name_several_runs_share_says_which_it_picked(tmp_path: Path) -> None:
    """Two runs named small-full-s0 (the same command run twice): the one that checkpointed last is used, and a
    warning names it and gives the folder and run id of the other."""
    first, second = (tmp_path / "outputs" / "d" / t / "checkpoints" for t in ("first", "second"))
    _save(first, 3, _model(), run_name="small-full-s0", run_id="a" * 32)
    _save(second, 6, _model(), run_name="small-full-s0", run_id="b" * 32)
    with pytest.warns(UserWarning) as caught:
        assert ckpt.resolve("small-full-s0", tmp_path, key="trainer.resume") == second / "step_000006"
    assert [str(w.message) for w in caught] == [
        f"trainer.resume=small-full-s0 names 2 runs: using the newest, {second.parent} (MLflow run {'b' * 32}); to "
        f"pick another, pass its folder or MLflow run id: trainer.resume={first.parent} (MLflow run {'a' * 32})"
    ]
    assert ckpt.resolve(str(first.parent), tmp_path) == first / "step_000003"  # the way to pick the other


CRASH_SCRIPT = """
import sys; from pathlib import Path; sys.path.insert(0, {tests!r})
import faults, test_checkpoint as t
faults.crash_before_rename(2)
model = t._model()
t._save(Path({directory!r}), 1, model)
t._save(Path({directory!r}), 2, model)
"""


def test_crash_between_write_and_rename_keeps_previous(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    script = CRASH_SCRIPT.format(tests=str(REPO / "tests"), directory=str(directory))
    done = subprocess.run([sys.executable, "-c", script], timeout=time_left())
    assert done.returncode == 70  # tests/faults.py CRASH_EXIT_CODE
    assert (directory / "latest").read_text().strip() == "step_000001"
    assert [p.name for p in directory.glob(".tmp-step_000002-*")]  # fully written, never renamed
    assert ckpt.resolve(directory) == directory / "step_000001"
    assert ckpt.load(directory / "step_000001").state.step == 1
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
        torch.save({"weight": _Exploit(marker)}, saved / "optim.pt")
    else:
        (saved / "optim.pt").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match=r"optim\.pt") as info:
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


def test_resume_config_takes_the_checkpoints_settings_and_refuses_contradictions(saved: Path) -> None:
    loaded = ckpt.load(saved)
    current = RunConfig(trainer=dataclasses.replace(RunConfig().trainer, max_steps=20, resume="latest"), seed=5)
    # nothing overridden but the resume key and max_steps: model, ncn, data, seed come from the checkpoint
    cfg = ckpt.resume_config(current, loaded, frozenset({"trainer.resume", "trainer.max_steps"}))
    assert cfg.model == ModelConfig(**TINY) and cfg.seed == 0 and cfg.run_name == "tiny-run"
    assert (cfg.trainer.max_steps, cfg.trainer.resume, cfg.trainer.batch_size) == (20, "latest", 8)
    # an override equal to the checkpoint's value, or of a key that may change, is accepted
    same = dataclasses.replace(current, model=ModelConfig(**{**TINY, "dropout": 0.1}))
    cfg = ckpt.resume_config(same, loaded, frozenset({"model.dropout", "model.d_model", "trainer.resume"}))
    assert (cfg.model.dropout, cfg.model.d_model) == (0.1, 32)
    other = dataclasses.replace(current, model=ModelConfig(**{**TINY, "d_model": 64}))
    for overridden in ({"model.d_model"}, {"model"}):
        with pytest.raises(CheckpointError) as info:
            ckpt.resume_config(other, loaded, frozenset(overridden))
        assert str(info.value) == (
            f"model.d_model=64 differs from the checkpoint's model.d_model=32 ({saved}): a resume "
            "continues the checkpoint's model, ncn and data settings; drop the override, or "
            "start a new run"
        )
    with pytest.raises(CheckpointError, match="seed=5 differs from the checkpoint's seed=0"):
        ckpt.resume_config(current, loaded, frozenset({"seed"}))


def test_a_refused_resume_names_the_key_typed_not_the_one_it_derives(saved: Path) -> None:
    """`model=tiny data.tokenizer=bytes` over a gpt2 checkpoint: model.vocab_size differs too (it follows the
    tokenizer, and the model group was set), but the message blames data.tokenizer, the key the user typed."""
    loaded = ckpt.load(saved)
    assert (loaded.config.data.tokenizer, loaded.config.model.vocab_size) == ("gpt2", TINY["vocab_size"])
    current = dataclasses.replace(
        loaded.config,
        model=dataclasses.replace(loaded.config.model, vocab_size=320),
        data=dataclasses.replace(loaded.config.data, tokenizer="bytes"),
    )
    with pytest.raises(CheckpointError) as info:
        ckpt.resume_config(current, loaded, frozenset({"model", "data.tokenizer", "trainer.resume"}))
    assert str(info.value) == (
        f"data.tokenizer=bytes differs from the checkpoint's data.tokenizer=gpt2 ({saved}) (and with it "
        "model.vocab_size): a resume continues the checkpoint's model, ncn and data settings; drop the override, "
        "or start a new run"
    )
    with pytest.raises(CheckpointError, match=r"^data\.tokenizer=bytes differs .* \(and with it model\.vocab_size\)"):
        ckpt.resume_config(current, loaded, frozenset({"model", "data"}))  # groups only: still the tokenizer
    with pytest.raises(CheckpointError, match=r"^model\.vocab_size=320 differs .* \(and with it data\.tokenizer\)"):
        ckpt.resume_config(current, loaded, frozenset({"model.vocab_size", "data"}))  # typed itself: named


def test_load_model_rebuilds_from_saved_config(saved: Path) -> None:
    loaded = ckpt.load(ckpt.resolve(saved.parent.parent))  # a run dir works too
    model = ckpt.load_model(loaded)
    assert not model.training and loaded.config.model.n_layer == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in _model().state_dict().items())


def test_a_format_1_config_with_hydra_targets_is_upgraded(saved: Path) -> None:
    old = {
        "model": {"_target_": "ncn.ModelConfig", **TINY},
        "ncn": {"_target_": "ncn.ModulationConfig"},
        "tracking": {"_target_": "ncn.tracking.NullTracker"},
        "data": {"_target_": "ncn.data.loader.DataModule", "_convert_": "all", "source": "shakespeare"},
        "prompt": "",
        "seed": 3,
    }
    (saved / "config.yaml").write_text(yaml.safe_dump(old))
    state = json.loads((saved / "train_state.json").read_text())
    (saved / "train_state.json").write_text(json.dumps({**state, "format": 1}))
    loaded = ckpt.load(saved)
    assert (loaded.config.tracking.backend, loaded.config.model.d_model, loaded.config.prompt, loaded.config.seed) == (
        "none",
        32,
        None,
        3,
    )


GOOD_STATE = {
    "format": 2,
    "step": 1,
    "tokens_seen": 0,
    "data": {"epoch": 0, "position": 4},
    "nonfinite_skipped": 0,
    "val_loss": 5.0,
    "mlflow_run_id": None,
}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("null", "holds a NoneType, not a training state"),
        ("[1, 2]", "holds a list, not a training state"),
        ('"step_000001"', "holds a str, not a training state"),
        ("{}", "has format None, expected 2"),
        (json.dumps({"format": 99, "step": 1}), "has format 99, expected 2"),
        (json.dumps({**GOOD_STATE, "step": "1"}), "step=1 is not a valid training state"),
        (json.dumps({**GOOD_STATE, "step": None}), "step=None is not a valid training state"),
        (
            json.dumps({k: v for k, v in GOOD_STATE.items() if k != "tokens_seen"}),
            "tokens_seen=<missing> is not a valid",
        ),
        (json.dumps({**GOOD_STATE, "data": [0, 4]}), "data=[0, 4] is not a valid training state"),
        (json.dumps({**GOOD_STATE, "data": {"position": "4"}}), "is not a valid training state"),
        (json.dumps({**GOOD_STATE, "val_loss": "low"}), "val_loss=low is not a valid training state"),
        (json.dumps({**GOOD_STATE, "step": -3}), "step=-3, data="),
        ("{not json", "is corrupt (JSONDecodeError)"),
        ("\udcff", "is corrupt"),
    ],
)
def test_train_state_json_of_any_shape_is_a_one_line_error_naming_it(saved: Path, text: str, message: str) -> None:
    (saved / "train_state.json").write_text(text, errors="surrogateescape")
    with pytest.raises(CheckpointError) as info:
        ckpt.load(saved)
    assert str(saved / "train_state.json") in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)
    assert ckpt._val_loss(saved) == float("inf")  # never the best checkpoint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("null", "holds a NoneType, not a run config"),
        ("- model\n- ncn\n", "holds a list, not a run config"),
        ("model: [1, 2]\n", "does not describe a valid run"),
        ("model: {d_model: 100, n_head: 3}\n", "model.d_model=100 is not divisible by model.n_head=3"),
        ("model: {bogus: 1}\n", "model.bogus"),
        ("trainer: {batch_size: many}\n", "trainer.batch_size"),
        ("model: {d_model: [unclosed\n", "is corrupt (ParserError)"),
    ],
)
def test_config_yaml_of_any_shape_is_a_one_line_error_naming_it(saved: Path, text: str, message: str) -> None:
    (saved / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError) as info:
        ckpt.load(saved)
    assert str(saved / "config.yaml") in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "does not name a checkpoint folder"),
        ("../../etc\n", "does not name a checkpoint folder"),
        ("step_000009\n", "points to"),
        ("step_000001\nstep_000002\n", "does not name a checkpoint folder"),
    ],
)
def test_latest_pointer_of_any_shape_is_a_one_line_error_naming_it(saved: Path, text: str, message: str) -> None:
    pointer = saved.parent / "latest"
    pointer.write_text(text)
    with pytest.raises(CheckpointError) as info:
        ckpt.resolve(saved.parent)
    assert str(pointer) in str(info.value) and message in str(info.value) and "\n" not in str(info.value)
    pointer.write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="is unreadable"):
        ckpt.resolve(saved.parent)


def test_checkpoint_run_finds_the_run_that_trained_a_checkpoint(tmp_path, mlflow_store, typed_config, capsys) -> None:
    """eval and analyze add results to the checkpoint's run: in its own store unless tracking.* is overridden."""
    from mlflow import MlflowClient

    own, other = mlflow_store(tmp_path / "own.db"), mlflow_store(tmp_path / "other.db")
    client = MlflowClient(own)
    run_id = client.create_run(client.create_experiment("ncn")).info.run_id
    config = typed_config([f"tracking.uri={own}"])

    def checkpoint(run: str | None, cfg: RunConfig = config) -> ckpt.Checkpoint:
        return ckpt.Checkpoint(tmp_path, {}, {}, ckpt.TrainState(mlflow_run_id=run), cfg)

    tracker, found = ckpt.checkpoint_run(checkpoint(run_id), typed_config().tracking, frozenset(), tmp_path)
    assert (found, tracker.uri) == (run_id, own)
    assert ckpt.checkpoint_run(checkpoint(None), typed_config().tracking, frozenset(), tmp_path) is None
    untracked = typed_config(["tracking=none"])
    assert ckpt.checkpoint_run(checkpoint(run_id, untracked), config.tracking, frozenset(), tmp_path) is None
    assert capsys.readouterr().err == ""
    elsewhere = typed_config(
        [f"tracking.uri={other}"]
    ).tracking  # the run is not in the store named on the command line
    assert ckpt.checkpoint_run(checkpoint(run_id), elsewhere, frozenset({"tracking.uri"}), tmp_path) is None
    assert capsys.readouterr().err == f"warning: MLflow run {run_id} is not in {other}: results are only local\n"
