"""Tracker tests on real temporary sqlite stores: the experiment tag and address of the UI's runs
table, the pre-flight `check()` refusing deleted, half-made and unusable stores, experiments and
runs (exit 2, one line, before any data work) with fixes that work when pasted, a store created
whole or not at all under Ctrl-C, and printed commands that work from a folder named with spaces
and quotes.

Run: python -m pytest -q tests/test_tracking.py   (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from ncn.config import RunConfig, RunContext
from ncn.errors import NCNConfigError
from ncn.tasks.sweep import SweepCallback
from ncn.tasks.train import _interrupted
from ncn.tracking import EXPERIMENT_KIND, MLflowTracker

from conftest import REPO, time_left
from tiny_checkpoint import tiny_run

KIND = EXPERIMENT_KIND["mlflow.experimentKind"]
ODD = 'it\'s a "quoted" dir'  # a folder name that breaks unquoted and naively quoted commands
BASH_ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _bash(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`command` pasted into bash in `cwd`, with this interpreter's `python` and `mlflow` first on PATH."""
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=BASH_ENV, capture_output=True, text=True, timeout=time_left()
    )


def _fix(message: str) -> str:
    """The command in parentheses of a one-line error, e.g. `(rm /x/mlflow.db)` -> `rm /x/mlflow.db`."""
    return re.search(r"\((?:MLFLOW_TRACKING_URI=|rm |mv |mlflow )[^()]*\)", message).group(0)[1:-1]


def _refusal(uri: str, **kwargs) -> str:
    with pytest.raises(NCNConfigError) as caught:
        MLflowTracker(uri).check(**kwargs)
    return str(caught.value)


def test_experiment_is_created_or_tagged_for_the_runs_table(tmp_path: Path, mlflow_store) -> None:
    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    old = client.create_experiment("old")  # made by an earlier version, without the tag
    tracker = MLflowTracker(uri)
    tracker.check()
    made = client.get_experiment_by_name("ncn")
    assert made.tags["mlflow.experimentKind"] == KIND == "custom_model_development"
    assert made.artifact_location == (tmp_path / "mlartifacts" / "ncn").as_uri()
    reused = MLflowTracker(uri, "old")
    reused.check()
    assert reused.experiment_id == old and client.get_experiment(old).tags["mlflow.experimentKind"] == KIND
    assert (
        tracker.ui_url()
        == f"http://127.0.0.1:5000/#/experiments/{made.experiment_id}/runs?workflowType=machine_learning"
    )


def test_a_deleted_experiment_is_refused_with_a_restore_that_works(tmp_path: Path, mlflow_store) -> None:
    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("ncn", tags=EXPERIMENT_KIND)
    client.delete_experiment(exp)
    message = _refusal(uri)
    assert message == (
        f"experiment ncn (id {exp}) is deleted in {uri}: restore it (MLFLOW_TRACKING_URI={uri} mlflow experiments "
        f"restore --experiment-id {exp}) or use tracking.experiment=<new name>"
    )
    assert _bash(_fix(message), tmp_path).returncode == 0
    MLflowTracker(uri).check()
    assert client.get_experiment(exp).lifecycle_stage == "active"


def test_a_deleted_run_is_not_resumed_into(tmp_path: Path, mlflow_store) -> None:
    uri = mlflow_store(tmp_path / "mlflow.db")
    tracker = MLflowTracker(uri)
    run_id = tracker.start("tiny-full-s0")
    tracker.end("KILLED")
    MlflowClient(uri).delete_run(run_id)
    message = _refusal(uri, resume_run_id=run_id)
    assert message == (
        f"MLflow run {run_id}, which this resume continues, is deleted in {uri}: restore it (MLFLOW_TRACKING_URI="
        f"{uri} mlflow runs restore --run-id {run_id}), or purge it to resume into a new run (mlflow gc "
        f"--backend-store-uri {uri} --run-ids {run_id})"
    )
    assert _bash(_fix(message), tmp_path).returncode == 0
    MLflowTracker(uri).check(resume_run_id=run_id)  # restored: the resume continues it
    MLflowTracker(uri).check(resume_run_id="0" * 32)  # not in the store: start() opens a new run


def test_half_migrated_stores_are_refused_before_mlflow_touches_them(tmp_path: Path, mlflow_store) -> None:
    empty = tmp_path / "empty.db"
    uri = mlflow_store(empty)
    with sqlite3.connect(empty) as con:  # what Ctrl-C during MLflow's migrations leaves behind
        con.execute("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)")
    message = _refusal(uri)
    assert message == (
        f"tracking.uri={uri} is a half-created MLflow store with no runs (an interrupted migration left table "
        f"_alembic_tmp_experiments): delete it (rm {empty}) and rerun"
    )
    assert _bash(_fix(message), tmp_path).returncode == 0 and not empty.exists()
    MLflowTracker(uri).check()  # a new store
    kept = tmp_path / "kept.db"
    uri = mlflow_store(kept)
    MLflowTracker(uri).start("r0")
    with sqlite3.connect(kept) as con:
        con.execute("CREATE TABLE _alembic_tmp_runs (run_uuid TEXT)")
    message = _refusal(uri)
    assert message == (
        f"tracking.uri={uri} cannot be opened (an interrupted migration left table _alembic_tmp_runs) and holds 1 "
        f"runs: restore it from a backup, or move it away (mv {kept} {kept}.broken) to start a new store"
    )
    assert _bash(_fix(message), tmp_path).returncode == 0 and (tmp_path / "kept.db.broken").is_file()
    MLflowTracker(uri).check()


def test_unusable_store_files_are_refused(tmp_path: Path, mlflow_store) -> None:
    (tmp_path / "folder.db").mkdir()
    uri = f"sqlite:///{tmp_path / 'folder.db'}"
    assert _refusal(uri) == (
        f"tracking.uri={uri} names a folder, not a store file: point tracking.uri at a file in it "
        f"(sqlite:///{tmp_path / 'folder.db' / 'mlflow.db'})"
    )
    (tmp_path / "notes.db").write_text("not a database, just notes\n" * 100)
    uri = f"sqlite:///{tmp_path / 'notes.db'}"
    assert _refusal(uri) == (
        f"tracking.uri={uri} is not an MLflow store (file is not a database): point tracking.uri at a new file "
        f"(e.g. sqlite:///{tmp_path / 'mlflow.db'}) or move {tmp_path / 'notes.db'} away"
    )
    assert (tmp_path / "notes.db").read_text() == "not a database, just notes\n" * 100
    old = tmp_path / "old.db"
    uri = mlflow_store(old)
    with sqlite3.connect(old) as con:
        head = con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        con.execute("UPDATE alembic_version SET version_num = '0000'")  # all tables there, an older revision
    assert _refusal(uri) == (
        f"tracking.uri={uri} has an older MLflow schema (found version 0000, but expected {head}): back it up, "
        f"then run mlflow db upgrade {uri}"
    )
    (tmp_path / "new.db").write_bytes(b"")  # an empty file is an empty sqlite database: made a store
    MLflowTracker(f"sqlite:///{tmp_path / 'new.db'}").check()
    assert MlflowClient(f"sqlite:///{tmp_path / 'new.db'}").get_experiment_by_name("ncn").tags["mlflow.experimentKind"]


@pytest.mark.slow
def test_preflight_refusals_end_run_py_before_any_data_work(
    tmp_path: Path, tmp_path_factory, _mlflow_template: Path, mlflow_store
) -> None:
    """Each unusable store, experiment or run: exit 2, the one-line message last, no token cache made."""
    tiny = tiny_run(tmp_path_factory, _mlflow_template)
    cases: dict[str, tuple[list[str], str]] = {}
    uri = mlflow_store(tmp_path / "deleted_exp.db")
    exp = MlflowClient(uri).create_experiment("ncn")
    MlflowClient(uri).delete_experiment(exp)
    cases["deleted experiment"] = (
        [f"tracking.uri={uri}"],
        f"experiment ncn (id {exp}) is deleted in {uri}: restore it (MLFLOW_TRACKING_URI={uri} mlflow experiments "
        f"restore --experiment-id {exp}) or use tracking.experiment=<new name>",
    )
    copy = tmp_path / "deleted_run.db"
    shutil.copyfile(tiny.mlflow_uri[len("sqlite:///") :], copy)
    run_id = MlflowClient(f"sqlite:///{copy}").search_runs(["1"])[0].info.run_id
    MlflowClient(f"sqlite:///{copy}").delete_run(run_id)
    cases["deleted run"] = (
        [f"trainer.resume={tiny.checkpoint}", f"tracking.uri=sqlite:///{copy}"],
        f"MLflow run {run_id}, which this resume continues, is deleted in sqlite:///{copy}: restore it "
        f"(MLFLOW_TRACKING_URI=sqlite:///{copy} mlflow runs restore --run-id {run_id}), or purge it to resume into "
        f"a new run (mlflow gc --backend-store-uri sqlite:///{copy} --run-ids {run_id})",
    )
    half = tmp_path / "half.db"
    uri = mlflow_store(half)
    with sqlite3.connect(half) as con:
        con.execute("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)")
    cases["half-migrated"] = (
        [f"tracking.uri={uri}"],
        f"tracking.uri={uri} is a half-created MLflow store with no runs (an interrupted migration left table "
        f"_alembic_tmp_experiments): delete it (rm {half}) and rerun",
    )
    (tmp_path / "junk.db").write_text("junk")
    cases["not a database"] = (
        [f"tracking.uri=sqlite:///{tmp_path / 'junk.db'}"],
        f"tracking.uri=sqlite:///{tmp_path / 'junk.db'} is not an MLflow store (file is not a database): point "
        f"tracking.uri at a new file (e.g. sqlite:///{tmp_path / 'mlflow.db'}) or move {tmp_path / 'junk.db'} away",
    )
    (tmp_path / "dir.db").mkdir()
    cases["a folder"] = (
        [f"tracking.uri=sqlite:///{tmp_path / 'dir.db'}"],
        f"tracking.uri=sqlite:///{tmp_path / 'dir.db'} names a folder, not a store file: point tracking.uri at a "
        f"file in it (sqlite:///{tmp_path / 'dir.db' / 'mlflow.db'})",
    )
    procs = {}
    for i, (name, (args, _)) in enumerate(cases.items()):  # in parallel: each spends its time importing
        env = {**os.environ, "NCN_CACHE_DIR": str(tmp_path / f"cache{i}")}
        procs[name] = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "run.py"),
                "model=tiny",
                "trainer=smoke",
                *args,
                f"hydra.run.dir={tmp_path / f'run{i}'}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    for i, (name, (_, expected)) in enumerate(cases.items()):
        stderr = procs[name].communicate(timeout=time_left())[1]
        last = stderr.strip().splitlines()[-1]
        assert procs[name].returncode == 2, (name, stderr[-2000:])
        assert last == f"error: {expected}" and "Traceback" not in stderr, (name, last)
        assert not (tmp_path / f"cache{i}").exists(), name  # refused before the token cache
    assert [r.info.status for r in MlflowClient(f"sqlite:///{copy}").search_runs(["1"], run_view_type=3)] == [
        "FINISHED"
    ]


@pytest.mark.slow
def test_ctrl_c_while_creating_a_store_leaves_no_store(tmp_path: Path) -> None:
    folder = tmp_path / ODD
    folder.mkdir()
    db, creating = folder / "mlflow.db", folder / "mlflow.db.creating"
    # Ctrl-C at the worst moment: the schema is whole in `.creating`, not yet moved into place
    code = (
        "import os\n"
        "def ctrl_c(*args): raise KeyboardInterrupt\n"
        "os.replace = ctrl_c\n"
        "from ncn.tracking import MLflowTracker\n"
        f"MLflowTracker({f'sqlite:///{db}'!r}).check()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True, timeout=time_left()
    )
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert not creating.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["mlflow.db.lock"]  # no store, no half-made file
    tracker = MLflowTracker(f"sqlite:///{db}")
    tracker.check()  # the next run creates it whole
    assert MlflowClient(f"sqlite:///{db}").get_experiment(tracker.experiment_id).name == "ncn"


def _sweep_config(overrides: list[str]):
    with initialize_config_dir(str(REPO / "sweeps"), version_base="1.3"):
        return compose("ablation", overrides=overrides, return_hydra_config=True)


@pytest.mark.slow
def test_printed_commands_work_from_a_folder_with_spaces_and_quotes(
    tmp_path: Path, tmp_path_factory, _mlflow_template: Path, monkeypatch, caplog
) -> None:
    folder = tmp_path / ODD
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", [str(REPO / "run.py"), "-cd", "sweeps", "-cn", "ablation"])
    # the sweep: its callback creates the store (through MLflowTracker.check), tagged, whole
    callback = SweepCallback()
    callback.on_multirun_start(
        _sweep_config(["model=tiny", "hydra.sweeper.params.ncn='none,full'", "hydra.sweeper.params.seed=0"])
    )
    db = folder / "mlflow.db"
    assert callback.uri == f"sqlite:///{db}" and db.is_file() and not (folder / "mlflow.db.creating").exists()
    client = MlflowClient(callback.uri)
    assert client.get_experiment_by_name("ncn").tags["mlflow.experimentKind"] == KIND
    for variant, loss in (("none", 5.0), ("full", 4.5)):
        job = MLflowTracker(callback.uri, parent_run_id=callback.parent_run_id)
        job.start(f"tiny-{variant}-s0", tags={"hydra.choices.ncn": variant})
        job.log_params({"seed": "0", "n_params": "1000", "controller_share_pct": "0.0", "tokens_per_step": "128"})
        job.log_metrics({"val/loss": loss, "train/tokens_per_s": 100.0}, step=6)
        job.end("FINISHED")
    with caplog.at_level(logging.INFO, logger="ncn.tasks.sweep"):
        assert callback._finish(True) is False
    report = re.search(r"\(report: (.*)\)$", caplog.records[-1].getMessage()).group(1)
    done = _bash(report, folder)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"(and to run {callback.parent_run_id})" in done.stdout and "| full |" in done.stdout
    # `mlflow ui ...`: bash reads the same store back
    tracker = MLflowTracker(callback.uri)
    words = shlex.split(tracker.browse_hint().split(", then open ")[0])
    assert words == ["mlflow", "ui", "--backend-store-uri", callback.uri, "--host", "127.0.0.1", "--port", "5000"]
    assert MlflowClient(words[3]).get_run(callback.parent_run_id).info.status == "FINISHED"
    # the resume hint after Ctrl-C: resumes the checkpoint (copied into the odd folder)
    tiny = tiny_run(tmp_path_factory, _mlflow_template)
    checkpoint = folder / "run 1" / "step_000006"
    shutil.copytree(tiny.checkpoint, checkpoint)
    ctx = RunContext(run_dir=folder, launch_dir=folder, command=shlex.join([str(REPO / "run.py"), "model=tiny"]))
    hint = _interrupted(6, SimpleNamespace(last_good=checkpoint), RunConfig(), ctx)
    assert hint.startswith(f"interrupted at step 6 (last checkpoint: {checkpoint}): resume with python ")
    again = hint.split(": resume with ")[1]
    assert shlex.split(again)[:2] == ["python", str(REPO / "run.py")]
    done = _bash(f"{again} tracking=none trainer.max_steps=7", folder)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at step 6 from {checkpoint}" in done.stdout + done.stderr and "step 7/7" in done.stdout + done.stderr
