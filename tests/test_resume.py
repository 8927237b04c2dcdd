"""Exact resume after a crash: `kill -9` at a random step, or a crash between a checkpoint's write and rename.

Each resumed `model=tiny` run (16 steps, checkpoints every 4, dropout 0.1 so every step draws random
numbers, shuffled data order) must reproduce an uninterrupted run bitwise: the same loss at every
step, the same final weights and optimizer state (`torch.equal`), and one MLflow run whose metric
history has every step exactly once. The resume repeats none of the original options.
Run: python -m pytest -q tests/test_resume.py   (about a minute on 2 cores; marked slow)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

from ncn.training import checkpoint as ckpt

from conftest import REPO, run_cli
from faults import CRASH_EXIT_CODE

STEPS, EVERY = 16, 4
# One CPU thread: bitwise-reproducible and, on a busy 2-core machine, several times faster than two.
RESUME = [
    "model=tiny",
    "model.dropout=0.1",
    "trainer=smoke",
    f"trainer.max_steps={STEPS}",
    f"trainer.checkpoint_every={EVERY}",
    "trainer.eval_every=8",  # and at every checkpoint: steps 0, 4, 8, 12, 16
    "trainer.eval_batches=1",
    "trainer.probe_tokens=0",
    "trainer.threads=1",
    "trainer.skip_nonfinite=1",
]
# The loss of step 2 is NaN once (tests/faults.py): the step is skipped and retried on the next
# batch, so the data position and the skip count are state a resume must carry too.
FAULTS = ["--nan-steps", "2"]
RESTORED = ("step", "tokens_seen", "data", "nonfinite_skipped", "val_loss")  # TrainState fields a resume must keep

pytestmark = pytest.mark.slow


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """{step: value} of `key` in run_dir/metrics.jsonl; a last line cut short by `kill -9` is ignored."""
    lines = (run_dir / "metrics.jsonl").read_text().split("\n")
    records = [json.loads(line) for line in lines[:-1]]  # a complete line ends with "\n"
    steps = [r["step"] for r in records if key in r]
    assert len(steps) == len(set(steps)), f"{run_dir}: {key} logged twice for a step"
    return {r["step"]: r[key] for r in records if key in r}


def tensors(node: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint object, keyed by its path."""
    if isinstance(node, torch.Tensor):
        return {prefix: node}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def assert_same_checkpoint(ours: Path, theirs: Path) -> None:
    for name in ("model.pt", "optim.pt"):
        a = tensors(torch.load(ours / name, weights_only=True))
        b = tensors(torch.load(theirs / name, weights_only=True))
        assert a.keys() == b.keys() and len(a) > 0
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert unequal == [], f"{name}: {unequal[:5]} differ"


def assert_same_state(ours: Path, theirs: Path) -> None:
    """Every checkpoint the resumed run wrote (folder `ours`) holds the TrainState of the uninterrupted
    run's checkpoint of the same step (folder `theirs`): data position, skips, tokens, last val loss."""
    written = sorted(p.name for p in ours.glob("step_*"))
    assert written and written[-1] == f"step_{STEPS:06d}"
    for name in written:
        a, b = (json.loads((folder / name / "train_state.json").read_text()) for folder in (ours, theirs))
        assert {k: a[k] for k in RESTORED} == {k: b[k] for k in RESTORED}, name
    assert (a["step"], a["nonfinite_skipped"], a["data"]) == (STEPS, 1, {"epoch": 0, "position": (STEPS + 1) * 4})


def assert_one_continuous_history(uri: str, reference: Path) -> None:
    """A single FINISHED MLflow run whose train/loss and val/loss equal the reference's at every step, once."""
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]
    for key, steps in (("train/loss", list(range(1, STEPS + 1))), ("val/loss", [0, 4, 8, 12, 16])):
        history = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key))
        expected = losses(reference, key)
        assert [s for s, _ in history] == steps == sorted(expected)  # no step missing, none twice
        assert history == [(s, expected[s]) for s in steps]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run dir of the uninterrupted run (metrics.jsonl only: its MLflow run is not needed)."""
    base = tmp_path_factory.mktemp("uninterrupted")
    done = run_cli([*RESUME, "tracking=none", f"hydra.run.dir={base / 'run'}"], cwd=base, faults=FAULTS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(losses(base / "run")) == list(range(1, STEPS + 1))
    return base / "run"


def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(reference: Path, tmp_path: Path, mlflow_store) -> None:
    kill_at = random.randint(EVERY + 1, STEPS - 3)  # after the first checkpoint, before the end
    uri = mlflow_store(tmp_path / "mlflow.db")
    first, second = tmp_path / "outputs" / "first", tmp_path / "outputs" / "second"
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests" / "faults.py"),
                *FAULTS,
                "--",
                *RESUME,
                f"tracking.uri={uri}",
                f"hydra.run.dir={first}",
            ],
            cwd=tmp_path,
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (first / "metrics.jsonl").is_file() and max(losses(first), default=0) >= kill_at:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        assert proc.wait(timeout=60) == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    killed = max(losses(first))
    saved = int((first / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    context = f"killed at step {killed} (aimed at {kill_at}), latest checkpoint step {saved}"
    assert kill_at <= killed < STEPS and saved % EVERY == 0 and EVERY <= saved <= killed, context
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["RUNNING"]  # SIGKILL cannot be caught: the resume finishes it

    resumed = run_cli(["trainer.resume=latest", f"hydra.run.dir={second}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = losses(reference)
    before, after = losses(first), losses(second)
    assert before == {s: expected[s] for s in before}, context  # the killed attempt matched too
    assert sorted(after) == list(range(saved + 1, STEPS + 1)), context  # continued right after the checkpoint
    assert {**before, **after} == expected, context
    assert_one_continuous_history(uri, reference)
    assert_same_checkpoint(second / "checkpoints" / "step_000016", reference / "checkpoints" / "step_000016")
    assert_same_state(second / "checkpoints", reference / "checkpoints")


def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(
    reference: Path, tmp_path: Path, mlflow_store
) -> None:
    uri = mlflow_store(tmp_path / "mlflow.db")
    first, second = tmp_path / "outputs" / "first", tmp_path / "outputs" / "second"
    crashed = run_cli(
        [*RESUME, f"tracking.uri={uri}", f"hydra.run.dir={first}"],
        cwd=tmp_path,
        faults=[*FAULTS, "--crash-before-rename", "12"],
    )
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-3000:]

    checkpoints = first / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_000008\n"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".tmp-")) == [
        "latest",
        "step_000004",
        "step_000008",
    ]
    [unfinished] = checkpoints.glob(".tmp-step_000012-*")  # written, never renamed, never pointed at
    assert {p.name for p in unfinished.iterdir()} == {"model.pt", "optim.pt", "train_state.json", "config.yaml"}
    previous = ckpt.load(ckpt.resolve("latest", tmp_path))
    assert previous.path == checkpoints / "step_000008"
    assert (previous.state.step, previous.state.data) == (8, {"epoch": 0, "position": (8 + 1) * 4})  # 1 skipped
    assert sorted(losses(first)) == list(range(1, 13))

    resumed = run_cli(["trainer.resume=latest", f"hydra.run.dir={second}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = losses(reference)
    assert losses(second) == {s: expected[s] for s in range(9, STEPS + 1)}
    assert_one_continuous_history(uri, reference)
    assert_same_checkpoint(second / "checkpoints" / "step_000016", reference / "checkpoints" / "step_000016")
    assert_same_state(second / "checkpoints", reference / "checkpoints")


def test_checkpoints_hold_their_own_val_loss_and_a_finished_run_is_left_alone(tmp_path: Path, mlflow_store) -> None:
    """Checkpoints every 2 steps, evals every 4: each checkpoint is evaluated at its own step and records
    that loss (not step 0's). Resuming the finished run, with its budget or a smaller one, says so, exits
    0 and changes nothing: no new folder, the MLflow run's status, tags and history as they were."""
    uri = mlflow_store(tmp_path / "mlflow.db")
    first = tmp_path / "outputs" / "first"
    args = ["model=tiny", "trainer=smoke", "trainer.checkpoint_every=2", "trainer.eval_every=4"]
    done = run_cli([*args, "trainer.probe_tokens=0", f"tracking.uri={uri}", f"hydra.run.dir={first}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    evals = losses(first, "val/loss")
    assert sorted(evals) == [0, 2, 4, 6]  # 0, 4: the cadence; 2, 6: checkpoints
    states = {p.name: json.loads((p / "train_state.json").read_text()) for p in (first / "checkpoints").glob("step_*")}
    assert sorted(states) == ["step_000002", "step_000004", "step_000006"]
    assert all(s["val_loss"] == evals[s["step"]] for s in states.values())
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("ncn").experiment_id])
    history = sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id, "val/loss"))
    for extra in ([], ["trainer.max_steps=4"]):
        again = tmp_path / "outputs" / f"again{len(extra)}"
        resumed = run_cli(["trainer.resume=latest", *extra, f"hydra.run.dir={again}"], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        budget = extra[0] if extra else "trainer.max_steps=6"
        line = (
            f"run tiny-full-s0 already reached {budget} (val loss {evals[6]:.4f}): raise trainer.max_steps to continue"
        )
        assert line in resumed.stdout + resumed.stderr
        assert not again.exists()
        now = client.get_run(run.info.run_id)
        assert (now.info.status, now.data.tags, now.info.end_time) == (
            run.info.status,
            run.data.tags,
            run.info.end_time,
        )
        assert (
            sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id, "val/loss"))
            == history
        )
    assert (first / "checkpoints" / "latest").read_text().strip() == "step_000006"
