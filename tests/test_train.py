"""Training job tests, each a real `python run.py model=tiny trainer=smoke` subprocess recording into a
temporary MLflow sqlite store: recorded params/metrics/artifacts, exact resume after a crash into
the same run (without repeating the original options), NaN handling (FAILED, or skipped), no
checkpoint of a diverged model, and Ctrl-C (KILLED). Faults come from tests/faults.py.

Run: python -m pytest -q tests/test_train.py   (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.config import TrainerConfig
from ncn.errors import RUN_FAILED_EXIT, NCNConfigError
from ncn.tasks.train import resume_notes
from ncn.training.checkpoint import TrainState
from ncn.training.loop import total_steps, train_line
from ncn.training.optim import lr_at

from conftest import REPO, run_cli, time_left
from faults import CRASH_EXIT_CODE

SMOKE = ["model=tiny", "trainer=smoke"]


def _only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ncn").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, _mlflow_template: Path) -> tuple[Path, str]:
    """An uninterrupted smoke run: (run dir, tracking URI)."""
    base = tmp_path_factory.mktemp("reference")
    shutil.copyfile(_mlflow_template, base / "mlflow.db")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    done = run_cli([*SMOKE, f"tracking.uri={uri}", f"hydra.run.dir={base / 'run'}"], cwd=base)
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "run", uri


def test_smoke_run_records_params_metrics_and_artifacts(reference: tuple[Path, str]) -> None:
    run_dir, uri = reference
    client, run = _only_run(uri)
    assert (run.info.status, run.info.run_name) == ("FINISHED", "tiny-full-s0")
    params = run.data.params
    count = ModulatedGPT(
        ModelConfig(vocab_size=50304, block_size=32, d_model=32, n_layer=2, n_head=2), ModulationConfig()
    ).num_parameters()
    assert params["model.vocab_size"] == "50304"
    assert params["ncn.targets"] == "[temperature, gain, activation]"
    assert params["trainer.max_steps"] == "6" and params["optim.lr"] == "0.0006"
    assert params["tracking.uri"] == uri and params["run_name"] == "tiny-full-s0"
    assert (params["n_params"], params["n_params_controller"]) == (str(count.total), str(count.controller))
    assert float(params["controller_share_pct"]) == pytest.approx(count.controller_share_pct, abs=1e-3)
    assert int(params["dataset.train_tokens"]) > 1_000_000 and int(params["dataset.val_tokens"]) > 10_000
    assert [s for s, _ in _history(client, run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in _history(client, run.info.run_id, "val/loss")] == [0, 3, 6]
    assert [s for s, _ in _history(client, run.info.run_id, "val/signals/precision/L1/std")] == [0, 3, 6]
    assert _history(client, run.info.run_id, "train/lr")[0] == (
        1,
        pytest.approx(lr_at(0, lr=6e-4, min_lr=6e-5, warmup_steps=100, total_steps=6)),
    )
    val0 = _history(client, run.info.run_id, "val/ppl")[0][1]
    assert 30_000 < val0 < 80_000  # a fresh model is near uniform over 50k tokens
    assert set(run.data.metrics) >= {
        "train/ce_loss",
        "train/reg_loss",
        "train/ppl",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/tokens_seen",
        "val/signals/gain/L0/mean",
        "val/signals/ffn_gate/L1/mean",
    }
    assert run.data.metrics["train/tokens_seen"] == 6 * 4 * 32
    # sample efficiency, logged once at the end: 6 log rows are too few for the SEI's line and 2
    # evaluations past step 0 too few for a power law (both left out); the settling step is the last row's
    assert _history(client, run.info.run_id, "sample_efficiency/settling_step_95") == [(6, 6.0)]
    assert not {"sample_efficiency/sei_95", "sample_efficiency/fit_alpha"} & set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "hydra", "metrics.json", "probe"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "probe")} == {
        "probe/signals_step_000000.png",
        "probe/signals_step_000003.png",
        "probe/signals_step_000006.png",
    }
    assert {a.path for a in client.list_artifacts(run.info.run_id, "hydra")} == {
        "hydra/config.yaml",
        "hydra/hydra.yaml",
        "hydra/overrides.yaml",
    }
    tags = run.data.tags
    assert (
        "model=tiny" in tags["ncn.command"]
        and tags["hydra.choices.model"] == "tiny"
        and tags["hydra.choices.ncn"] == "full"
    )
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["val/loss"] == pytest.approx(run.data.metrics["val/loss"]) and final["step"] == 6
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_000003", "step_000006"]
    state = json.loads((run_dir / "checkpoints" / "step_000006" / "train_state.json").read_text())
    assert (state["step"], state["tokens_seen"], state["mlflow_run_id"]) == (6, 6 * 4 * 32, run.info.run_id)
    assert state["data"] == {"epoch": 0, "position": 6 * 4}


@pytest.mark.slow
def test_resume_after_crash_is_exact_and_continues_the_run(
    reference: tuple[Path, str], tmp_path: Path, mlflow_store
) -> None:
    ref_dir, ref_uri = reference
    uri = mlflow_store(tmp_path / "mlflow.db")
    crashed = run_cli(
        [*SMOKE, f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'outputs' / 'a'}"],
        cwd=tmp_path,
        faults=["--crash-before-rename", "6"],
    )  # dies while writing the final checkpoint
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-3000:]
    client, run = _only_run(uri)
    assert run.info.status == "RUNNING"
    # the original options are not repeated: model, ncn, data, trainer and the store come from the checkpoint
    resumed = run_cli(["trainer.resume=latest", f"hydra.run.dir={tmp_path / 'outputs' / 'b'}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step3 = tmp_path / "outputs" / "a" / "checkpoints" / "step_000003"
    assert f"resuming run tiny-full-s0 (MLflow run {run.info.run_id}) at step 3 from {step3}" in resumed.stdout
    client, run = _only_run(uri)  # the same run, continued
    assert run.info.status == "FINISHED"
    _, ref_run = _only_run(ref_uri)
    ref_client = MlflowClient(ref_uri)
    for key in ("train/loss", "val/loss", "train/lr"):  # one continuous history, bitwise equal values
        assert _history(client, run.info.run_id, key) == _history(ref_client, ref_run.info.run_id, key)
    final = tmp_path / "outputs" / "b" / "checkpoints" / "step_000006"
    ours = torch.load(final / "model.pt", weights_only=True)
    theirs = torch.load(ref_dir / "checkpoints" / "step_000006" / "model.pt", weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    state = json.loads((final / "train_state.json").read_text())
    assert (state["step"], state["data"], state["mlflow_run_id"]) == (6, {"epoch": 0, "position": 24}, run.info.run_id)
    # params are immutable in MLflow: what the resume changed is a tag and an artifact
    assert run.data.params["trainer.resume"] == "null"
    assert run.data.tags["ncn.resume/step_000003"] == "trainer.resume=latest"
    changed = client.list_artifacts(run.info.run_id, "resume/step_000003")
    assert {a.path for a in changed} >= {"resume/step_000003/changed_params.json", "resume/step_000003/config.yaml"}


def _jsonl(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.mark.slow
def test_a_resume_with_other_settings_is_what_the_runs_history_holds(tmp_path: Path, mlflow_store) -> None:
    """The crashed attempt logged steps 4-6 after its last checkpoint (step 3); the resume with another
    learning rate trains steps 4-6 again. Each step's newest value in the MLflow history is the
    resumed attempt's (its metrics.jsonl), not the crashed attempt's; steps 1-3 are logged once."""
    uri = mlflow_store(tmp_path / "mlflow.db")
    crashed = run_cli(
        [*SMOKE, f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'outputs' / 'a'}"],
        cwd=tmp_path,
        faults=["--crash-before-rename", "6"],
    )
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-3000:]
    resumed = run_cli(
        ["trainer.resume=latest", "optim.lr=3e-3", f"hydra.run.dir={tmp_path / 'outputs' / 'b'}"], cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, run = _only_run(uri)
    old, new = (_jsonl(tmp_path / "outputs" / name, "train/loss") for name in ("a", "b"))
    assert sorted(old) == [1, 2, 3, 4, 5, 6] and sorted(new) == [4, 5, 6]
    assert all(new[s] != old[s] for s in (5, 6))  # the new rate changed the losses after step 4's update
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: (m.step, m.timestamp))
    newest = {m.step: m.value for m in history}
    assert newest == {**{s: old[s] for s in (1, 2, 3)}, **new}
    assert [m.step for m in history].count(2) == 1
    assert run.data.metrics["train/loss"] == new[6]


def test_nonfinite_loss_stops_failed_or_is_skipped(tmp_path: Path, mlflow_store) -> None:
    uri = mlflow_store(tmp_path / "stop.db")
    stop = run_cli(
        [*SMOKE, f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'stop'}"], cwd=tmp_path, faults=["--nan-steps", "5"]
    )
    assert stop.returncode == RUN_FAILED_EXIT == 3
    assert stop.stderr.strip().splitlines()[-1] == (
        f"error: non-finite loss or gradient at step 5: training diverged (newest good checkpoint: "
        f"{tmp_path / 'stop' / 'checkpoints' / 'step_000003'}); lower optim.lr, use trainer.precision=fp32, "
        "or set trainer.skip_nonfinite=N to skip up to N bad steps"
    )
    assert _only_run(uri)[1].info.status == "FAILED"
    assert (tmp_path / "stop" / "checkpoints" / "latest").read_text().strip() == "step_000003"

    uri = mlflow_store(tmp_path / "skip.db")
    skip = run_cli(
        [*SMOKE, f"tracking.uri={uri}", "trainer.skip_nonfinite=1", f"hydra.run.dir={tmp_path / 'skip'}"],
        cwd=tmp_path,
        faults=["--nan-steps", "2"],
    )
    assert skip.returncode == 0, skip.stderr[-3000:]
    client, run = _only_run(uri)
    assert run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "train/nonfinite_skipped") == [(2, 1.0)]
    assert [s for s, _ in _history(client, run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("overrides", "any_good"),
    [
        (["optim.lr=1e6", "optim.warmup_steps=0"], False),  # the eval at step 3 is NaN: nothing is ever saved
        # no eval until the end, but every checkpoint is evaluated: checkpoints while the val loss is finite
        # (steps 1 and 2; step 2's weights are already huge), none once it is not
        (["optim.lr=1e6", "optim.warmup_steps=0", "trainer.eval_every=1000", "trainer.checkpoint_every=1"], True),
    ],
)
def test_a_diverged_model_is_never_checkpointed(
    tmp_path: Path, mlflow_store, overrides: list[str], any_good: bool
) -> None:
    uri = mlflow_store(tmp_path / "mlflow.db")
    run_dir = tmp_path / "run"
    done = run_cli([*SMOKE, *overrides, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert done.returncode == 3, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "training diverged" in last and "lower optim.lr" in last
    saved = (
        sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").exists() else []
    )
    if not any_good:
        assert "no good checkpoint was written" in last and saved == []
    else:
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        assert saved and latest == saved[-1] and f"newest good checkpoint: {run_dir / 'checkpoints' / latest})" in last
    evals = _jsonl(run_dir, "val/loss")
    for folder in saved:  # every checkpoint on disk is finite, and `latest` / `best` point at one of them
        weights = torch.load(run_dir / "checkpoints" / folder / "model.pt", weights_only=True)
        assert all(torch.isfinite(w).all() for w in weights.values())
        # evaluated at its own step, finite: the named good checkpoint gives a finite loss
        state = json.loads((run_dir / "checkpoints" / folder / "train_state.json").read_text())
        assert state["val_loss"] == evals[state["step"]] < float("inf")
    assert _only_run(uri)[1].info.status == "FAILED"


def test_a_full_disk_while_checkpointing_is_one_error_line(tmp_path: Path, mlflow_store) -> None:
    """ENOSPC while the step-6 checkpoint is written (its model.pt already is): exit 2, one error line
    naming the folder, the space needed and the newest good checkpoint; no temporary folder left,
    step 3 and `latest` as they were, the MLflow run FAILED."""
    uri = mlflow_store(tmp_path / "mlflow.db")
    run_dir = tmp_path / "run"
    done = run_cli(
        [*SMOKE, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"], cwd=tmp_path, faults=["--disk-full-at", "6"]
    )
    assert done.returncode == 2, done.stderr[-3000:]
    folder = run_dir / "checkpoints"
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: no space left in {re.escape(str(folder))} for checkpoint step_000006: it needs about [\d.,]+ MB, "
        rf"[\d.,]+ MB free; free some space or set hydra.run.dir=<folder on a disk with space> "
        rf"\(newest good checkpoint: {re.escape(str(folder / 'step_000003'))}\)",
        last,
    ), last
    assert "Traceback" not in done.stderr and done.stderr.count("error: ") == 1
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_000003"]
    assert (folder / "latest").read_text().strip() == "step_000003"
    assert _only_run(uri)[1].info.status == "FAILED"


def test_ctrl_c_marks_the_run_killed(tmp_path: Path, mlflow_store) -> None:
    uri = mlflow_store(tmp_path / "mlflow.db")
    cmd = [
        sys.executable,
        str(REPO / "run.py"),
        *SMOKE,
        "trainer.max_steps=10000",
        "trainer.log_every=1",
        "trainer.checkpoint_every=1",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # as from a terminal: Ctrl-C's default action, whatever another test left in this worker
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + time_left(margin=120)  # leaves time for the two waits below
    for line in proc.stdout:  # wait until training is under way
        if "step 2/10000" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # a user whose first Ctrl-C seems lost presses it again
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=time_left())
    assert proc.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]  # where it stopped and how to resume
    checkpoints = re.escape(str(tmp_path / "run" / "checkpoints"))
    assert re.fullmatch(
        rf"error: interrupted at step \d+ \(last checkpoint: ({checkpoints}/step_\d{{6}})\): "
        rf"resume with python {re.escape(str(REPO / 'run.py'))} trainer.resume=\1",
        last,
    ), last
    assert _only_run(uri)[1].info.status == "KILLED"


def test_step_bounds_and_their_resume() -> None:
    epochs = TrainerConfig(max_steps=None, epochs=1.0, batch_size=4, grad_accum=2)
    assert total_steps(epochs, TrainState(), blocks_per_epoch=100, global_batch=4, tokens_per_step=256) == 13
    # resumed after 5 steps = 10 micro-batches = 40 blocks: the same budget remains
    resumed = TrainState(step=5, tokens_seen=1280, data={"epoch": 0, "position": 40})
    assert total_steps(epochs, resumed, blocks_per_epoch=100, global_batch=4, tokens_per_step=256) == 13
    # ... and with a doubled batch size it takes half as many steps for the rest
    assert total_steps(epochs, resumed, blocks_per_epoch=100, global_batch=8, tokens_per_step=512) == 5 + 4
    tokens = TrainerConfig(max_steps=None, max_tokens=1000)
    assert total_steps(tokens, TrainState(), 100, 4, tokens_per_step=128) == 8
    assert total_steps(tokens, TrainState(step=4, tokens_seen=512), 100, 4, tokens_per_step=128) == 8
    both = TrainerConfig(max_steps=3, epochs=2.0)
    assert total_steps(both, TrainState(), 100, 4, tokens_per_step=128) == 3
    with pytest.raises(NCNConfigError, match="are all null: set one"):
        TrainerConfig(max_steps=None)
    with pytest.raises(NCNConfigError, match="trainer.precision=fp8 is unknown"):
        TrainerConfig(max_steps=1, precision="fp8")


def test_a_resume_says_what_changes_tokens_per_step_and_the_schedule(typed_config) -> None:
    """The numbers a resume logs: tokens per step of the checkpoint and now, with the grad_accum that
    keeps them; the learning rate at the resume step on the new and on the checkpoint's schedule."""
    saved_cfg = typed_config(["trainer.max_steps=250"])
    saved = {"world_size": 2, "batch_size": 8, "grad_accum": 1, "tokens_per_step": 2 * 8 * 128}
    now = {"world_size": 1, "batch_size": 8, "grad_accum": 1, "tokens_per_step": 8 * 128}
    cfg = typed_config(["trainer.max_steps=300"])
    tokens, schedule = resume_notes(saved, saved_cfg, now, cfg, step=250, last=300)
    assert tokens == (
        "tokens per step change from 2,048 (world size 2, batch 8, grad_accum 1) to 1,024 (world size 1, "
        "batch 8, grad_accum 1): trainer.grad_accum=2 keeps 2,048"
    )
    o = cfg.optim
    new = lr_at(250, lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps, total_steps=300)
    assert new > o.min_lr == lr_at(250, lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps, total_steps=250)
    assert schedule == (
        f"the learning-rate schedule now ends at step 300 instead of 250: lr {new:.2e} at step 250 "
        f"(the checkpoint's schedule: {o.min_lr:.2e}); trainer.max_steps=250 keeps the old schedule"
    )
    assert resume_notes(saved, saved_cfg, saved, saved_cfg, step=100, last=250) == []  # nothing changed


STEP = {
    "train/loss": 10.8375,
    "train/ce_loss": 10.8280,
    "train/reg_loss": 0.0,
    "train/lr": 5.94e-06,
    "train/grad_norm": 1.354,
    "train/tokens_per_s": 452.4,
}


def _terms(line: str) -> dict[str, float]:
    fields = [f.split(" ") for f in line.split(" | ")[1:-4]]  # loss up to lr
    return {name: float(value) for name, value in fields}


def test_the_training_line_shows_every_term_of_the_loss() -> None:
    """loss = ce + reg (+ mode under control=mode) (+ compute with ncn.compute_lambda > 0), each shown when active."""
    eta = "elapsed 00:00:02, eta 00:00:11"
    plain = train_line(1, 6, {**STEP, "train/loss": 10.8280}, eta)
    assert plain == (
        "step 1/6 | loss 10.8280 | ce 10.8280 | reg 0.00000 | lr 5.94e-06 | grad 1.354 | 452 tok/s | "
        "elapsed 00:00:02, eta 00:00:11"
    )
    compute = train_line(1, 6, {**STEP, "train/compute_loss": 0.0095}, eta)
    assert _terms(compute) == {"loss": 10.8375, "ce": 10.828, "reg": 0.0, "compute": 0.0095}
    both = {
        **STEP,
        "train/loss": 10.9,
        "train/reg_loss": 0.0005,
        "train/mode_loss": 0.062,
        "train/compute_loss": 0.0095,
    }
    terms = _terms(train_line(1, 6, both, eta))
    assert list(terms) == ["loss", "ce", "reg", "mode", "compute"]
    assert terms["loss"] == pytest.approx(terms["ce"] + terms["reg"] + terms["mode"] + terms["compute"], abs=1e-4)
