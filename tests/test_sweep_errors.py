"""A sweep that cannot start stops before any job runs, and a sweep with failed jobs ends with its account.

Cases (docs/errors.md "Sweeps"): `sweep_resume=` of a deleted parent run or of a parent in a deleted
experiment (the restore command, exit 2, no job folder, no run changed); any other exception in the
sweep callback's start (one `error:` line, exit 2, a parent it opened is FAILED); the SLURM launcher
without SLURM; SLURM variables of several tasks without a node list; a grid given without `-m`; the
summary line of a sweep with failed jobs. Run: python -m pytest -q tests/test_sweep_errors.py (~1 min).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ncn.config import python_command
from ncn.errors import NCNConfigError
from ncn.tasks.sweep import SweepCallback
from ncn.tracking import MLflowTracker
from ncn.training.runtime import distributed_env

from conftest import REPO, run_cli

SWEEP = ["-cd", str(REPO / "sweeps"), "-cn", "ablation", "model=tiny", "trainer=smoke", "ncn=none,full", "seed=0"]


def _last(done) -> str:
    return done.stderr.strip().splitlines()[-1]


def _parent(tracker: MLflowTracker, folder: Path) -> str:
    """A finished sweep's parent run, as a launch of `SWEEP` leaves it (its folder exists, no job ran)."""
    folder.mkdir(parents=True)
    tags = {"ncn.sweep": "ablation", "ncn.sweep.grid": '{"ncn": ["none", "full"]}', "ncn.sweep.dir": str(folder)}
    run_id = tracker.start("ablation", tags=tags)
    tracker.terminate(run_id, "FINISHED")
    return run_id


def test_resume_of_a_deleted_parent_run_stops_before_any_job(tmp_path: Path, mlflow_store) -> None:
    uri = mlflow_store(tmp_path / "mlflow.db")
    tracker = MLflowTracker(uri)
    folder = tmp_path / "multirun" / "ablation" / "d" / "t"
    parent = _parent(tracker, folder)
    tracker.client.delete_run(parent)
    done = run_cli([*SWEEP, f"tracking.uri={uri}", f"sweep_resume={parent}"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert _last(done) == (
        f"error: sweep_resume={parent}: the sweep's parent MLflow run {parent} is deleted in {uri}: restore it "
        f"(MLFLOW_TRACKING_URI={uri} mlflow runs restore --run-id {parent}) and rerun this command, or start a new "
        "sweep (without sweep_resume)"
    )
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "mlflow.db",
        "mlflow.db.lock",
        "multirun",
    ]
    runs = tracker.client.search_runs([tracker.experiment_id], run_view_type=3)  # 3: active and deleted
    assert [(r.info.run_id, r.info.status, r.info.lifecycle_stage) for r in runs] == [(parent, "FINISHED", "deleted")]


def test_resume_of_a_parent_in_a_deleted_experiment_stops_before_any_job(tmp_path: Path, mlflow_store) -> None:
    uri = mlflow_store(tmp_path / "mlflow.db")
    other = MLflowTracker(uri, "other")
    parent = _parent(other, tmp_path / "multirun" / "x")
    other.client.delete_experiment(other.experiment_id)
    restore = f"MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {other.experiment_id}"
    done = run_cli([*SWEEP, f"tracking.uri={uri}", f"sweep_resume={parent}"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert _last(done) == (
        f"error: sweep_resume={parent}: the sweep's parent MLflow run {parent} is in experiment other (id "
        f"{other.experiment_id}), which is deleted in {uri}: restore it ({restore}) and rerun this command"
    )
    same = run_cli([*SWEEP, f"tracking.uri={uri}", "tracking.experiment=other", f"sweep_resume={parent}"], cwd=tmp_path)
    assert same.returncode == 2, same.stderr[-3000:]
    assert _last(same) == (
        f"error: experiment other (id {other.experiment_id}) is deleted in {uri}: restore it ({restore}) or use "
        "tracking.experiment=<new name>"
    )
    assert not (tmp_path / "multirun" / "x" / "0").exists()
    assert MlflowClient(uri).get_run(parent).info.status == "FINISHED"


def test_any_exception_in_the_sweep_start_stops_the_launch(
    tmp_path: Path, mlflow_store, capsys, monkeypatch, compose_config
) -> None:
    """A failure that is not a user mistake (here a store write that raises) also ends the launch, with one
    `error:` line as the last of stderr and exit 2, and the parent run it opened ends FAILED."""
    tracker = MLflowTracker(mlflow_store(tmp_path / "mlflow.db"))
    callback = SweepCallback()

    def start(config, config_name: str) -> None:
        callback.uri, callback.experiment = tracker.uri, "ncn"
        callback.parent_run_id = tracker.start("ablation", tags={"ncn.sweep": "ablation"})
        raise RuntimeError("database is locked\nsecond line")

    monkeypatch.setattr(callback, "_start", start)
    with pytest.raises(SystemExit) as stopped:
        callback.on_multirun_start(compose_config(["model=tiny"], hydra=True))
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the sweep could not start (RuntimeError: database is locked): no job ran; fix the cause above and "
        "rerun the same command"
    )
    assert tracker.get_run(callback.parent_run_id).status == "FAILED"


def test_slurm_launcher_without_slurm_is_one_line(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent  # python only: no srun on PATH
    done = run_cli(
        ["-m", "hydra/launcher=slurm", "model=tiny", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert _last(done) == (
        "error: hydra/launcher=slurm submits each job to SLURM, but SLURM was not found (no srun on PATH): launch "
        "from a SLURM login node, or run the sweep on this machine with hydra/launcher=basic (one job after "
        "another) or hydra/launcher=joblib"
    )
    assert "Traceback" not in done.stderr and not (tmp_path / "multirun").exists()
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store and a parent run were made


SLURM_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


def test_slurm_tasks_without_a_node_list_are_refused(tmp_path: Path) -> None:
    """World size > 1 from SLURM but no host for the rendezvous: refused (127.0.0.1 would hang across nodes);
    MASTER_ADDR or either node list makes it a job again."""
    message = (
        "SLURM_STEP_NUM_TASKS=2 asks for a job of 2 processes, but neither SLURM_STEP_NODELIST, SLURM_JOB_NODELIST "
        "nor MASTER_ADDR names the host of rank 0: start the tasks with srun (which sets the node list), or set "
        "MASTER_ADDR=<rank 0's host>"
    )
    with pytest.raises(NCNConfigError) as refused:
        distributed_env(SLURM_STEP)
    assert str(refused.value) == message
    assert distributed_env({**SLURM_STEP, "MASTER_ADDR": "gpu3"}).master_addr == "gpu3"
    assert distributed_env({**SLURM_STEP, "SLURM_JOB_NODELIST": "gpu[4-5]"}).master_addr == "gpu4"
    assert distributed_env({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "1"}).world_size == 1  # one task: no rendezvous
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "WORLD_SIZE", "RANK"))}
    done = run_cli(["model=tiny", "tracking=none", "--cfg", "job"], cwd=tmp_path, env={**clean, **SLURM_STEP})
    assert done.returncode == 2 and _last(done) == f"error: {message}", done.stderr[-2000:]


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        (
            "model=tiny,small",
            "model=tiny,small is a grid of values, and a grid needs -m or a sweep config: add -m (python run.py -m "
            "... model=tiny,small) or launch a sweep (python run.py -cd sweeps -cn <sweep> model=tiny,small)",
        ),
        (
            "prompt=a,b",
            "prompt=a,b is a grid of values, and a grid needs -m or a sweep config: add -m (python run.py -m ... "
            "prompt=a,b) or launch a sweep (python run.py -cd sweeps -cn <sweep> prompt=a,b); for one value that "
            "holds a comma, quote it, e.g. \"prompt='a,b'\"",
        ),
        (
            "seed=range(3)",
            "seed=range(3) is a grid of values, and a grid needs -m or a sweep config: add -m (python run.py -m ... "
            "seed=range(3)) or launch a sweep (python run.py -cd sweeps -cn <sweep> seed=range(3))",
        ),
    ],
)
def test_a_grid_without_multirun_says_it_needs_m(tmp_path: Path, override: str, expect: str) -> None:
    done = run_cli(["model=tiny", "tracking=none", override], cwd=tmp_path)
    assert done.returncode == 2 and _last(done) == f"error: {expect}", done.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()


def test_the_summary_names_each_failed_job_the_parent_and_the_report(tmp_path: Path) -> None:
    callback = SweepCallback()
    callback.parent_run_id, callback.uri = "ab" * 16, f"sqlite:///{tmp_path}/mlflow.db"
    report = python_command(
        os.path.abspath(sys.argv[0]), "task=report", f"sweep_run={'ab' * 16}", f"\"tracking.uri='{callback.uri}'\""
    )
    details = {2: "seed=1: run failed (exit 3), DivergenceError: x", 0: "seed=0: usage error (exit 2), E: " + "y" * 300}
    assert callback.summary(2, 3, details) == (
        f"2 of 3 jobs failed (job 0: seed=0: usage error (exit 2), E: {'y' * 167}; job 2: seed=1: run failed "
        f"(exit 3), DivergenceError: x); parent run {'ab' * 16}; report: {report}"
    )
    many = {n: f"seed={n}: crash" for n in range(5)}
    assert callback.summary(5, 5, many).startswith(
        "5 of 5 jobs failed (job 0: seed=0: crash; job 1: seed=1: crash; job 2: seed=2: crash; 2 more in the "
        "parent's ncn.sweep.failed.* tags); parent run "
    )
    assert callback.summary(1, 2, {}).startswith("1 of 2 jobs failed; parent run ")  # a job that went missing


def test_a_sweeps_folder_given_relative_to_another_folder_names_the_real_one(tmp_path: Path) -> None:
    """`-cd sweeps` outside the clone: the message gives the repository's sweeps folder, and that command works."""
    done = run_cli(["-cd", "sweeps", "-cn", "ablation", "model=tiny"], cwd=tmp_path)
    names = ", ".join(sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml")))
    assert "ablation, " in names  # every sweep file is listed
    assert done.returncode == 2 and _last(done) == (
        f"error: config folder {tmp_path / 'sweeps'} (-cd) not found: a relative -cd is read from the folder you run "
        f"in ({tmp_path}); give the sweeps' folder by its path, e.g. python {REPO / 'run.py'} -cd {REPO / 'sweeps'} "
        f"-cn <sweep> (sweeps: {names})"
    ), done.stderr[-2000:]
    fixed = run_cli(["-cd", str(REPO / "sweeps"), "-cn", "ablation", "model=tiny", "--cfg", "job"], cwd=tmp_path)
    assert fixed.returncode == 0 and "d_model: 32" in fixed.stdout, fixed.stderr[-2000:]
