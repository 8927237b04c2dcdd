"""Resuming an interrupted sweep (`sweep_resume=<parent run id | sweep dir>`) and counting each job once.

The main test SIGKILLs a 3-job `ablation` sweep (basic launcher, model=tiny trainer=smoke, dropout 0.1
so every step draws random numbers) during job 2, then reruns it with `sweep_resume=<parent id>`:
job 1 is not trained again (same run, FINISHED, its files untouched), job 2 resumes from its latest
checkpoint into its own child run, job 3 runs; every child's per-step losses (MLflow history and
metrics.jsonl) and job 2's final weights equal those of an uninterrupted sweep of the same grid.
Also: a finished joblib sweep resumed by its folder skips its jobs, another grid is refused; the
per-job decision (`ncn.training.job_resume.plan_job`, what a requeued SLURM job
runs) on prepared folders; the report and the parent's counts take each job's current run once.

Run: python -m pytest -q tests/test_sweep_resume.py   (about 3 minutes on 2 cores; marked slow)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from ncn.errors import NCNConfigError
from ncn.tasks.report import collect
from ncn.tracking import MLflowTracker
from ncn.training import checkpoint, job_resume

from conftest import REPO, run_cli
from tiny_checkpoint import tiny_run

GRID = ["ncn=none,full,gain_only", "seed=0"]
FAST = [
    "model=tiny",
    "model.dropout=0.1",
    "trainer=smoke",
    "trainer.probe_tokens=0",
    "trainer.threads=1",
    "data=text_files",
    "data.val_fraction=0.2",
]
STEPS = [1, 2, 3, 4, 5, 6]  # trainer=smoke: 6 steps, eval and checkpoint every 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small text_files corpus: 6 files of seeded pseudo-words."""
    root = tmp_path_factory.mktemp("corpus")
    words = [
        "the",
        "a",
        "king",
        "queen",
        "night",
        "day",
        "sword",
        "crown",
        "love",
        "death",
        "speak",
        "hear",
        "my",
        "lord",
        "lady",
        "fair",
        "foul",
    ]
    for i in range(6):
        (root / f"doc{i}.txt").write_text(" ".join(words[(i * 7 + j * j) % len(words)] for j in range(1500)) + "\n")
    return root


def _args(corpus: Path, tmp: Path, *extra: str, grid: list[str] = GRID, tracked: bool = True) -> list[str]:
    """`python run.py` arguments of the test sweep, recorded in tmp/mlflow.db (tracked) or nowhere."""
    tracking = f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}" if tracked else "tracking=none"
    return ["-cd", str(REPO / "sweeps"), "-cn", "ablation", *FAST, f"data.path={corpus}", *grid, tracking, *extra]


def _jsonl(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of `key` in run_dir/metrics.jsonl; fails if a step was logged twice."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if key in r]
    assert len(steps) == len(set(steps)), f"{run_dir}: {key} logged twice for a step: {steps}"
    return {r["step"]: r[key] for r in records if key in r}


def _files(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """(mtime_ns, bytes) of every file a training run wrote (Hydra's .hydra/ and run.log aside)."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.parts[len(run_dir.parts)] not in (".hydra", "run.log")
    }


def _sweep_dir(tmp: Path) -> Path:
    [folder] = (tmp / "multirun" / "ablation").glob("*/*")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """Sweep folder of the uninterrupted sweep of the same grid (tracking=none: only its files are compared)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    done = run_cli(_args(corpus, tmp, tracked=False), cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return _sweep_dir(tmp)


@pytest.mark.slow
def test_sigkilled_sweep_resumes_exactly(reference: Path, corpus: Path, tmp_path: Path, mlflow_store) -> None:
    uri = mlflow_store(tmp_path / "mlflow.db")
    killed = run_cli(_args(corpus, tmp_path), cwd=tmp_path, faults=["--sigkill-at", "2:4"])
    assert killed.returncode == -9, killed.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ncn").experiment_id
    [parent] = client.search_runs([exp], "tags.`ncn.sweep` = 'ablation'")
    children = {r.data.tags["ncn.run_dir"]: r for r in client.search_runs([exp], "tags.mlflow.parentRunId != ''")}
    folder = _sweep_dir(tmp_path)
    assert parent.info.status == "RUNNING"  # SIGKILL: nobody closed anything
    assert {Path(d).name: r.info.status for d, r in children.items()} == {"0": "FINISHED", "1": "RUNNING"}
    assert (folder / "1" / "checkpoints" / "latest").read_text() == "step_000003\n"
    assert sorted(_jsonl(folder / "1", "train/loss")) == [1, 2, 3, 4]  # step 4 ran after the checkpoint
    first = _files(folder / "0")
    ids = {Path(d).name: r.info.run_id for d, r in children.items()}

    resumed = run_cli(_args(corpus, tmp_path, f"sweep_resume={parent.info.run_id}"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "sweep job 0 already finished" in resumed.stderr + resumed.stdout
    runs = client.search_runs([exp])
    assert len(runs) == 4 and _sweep_dir(tmp_path) == folder  # one parent, three children, one folder
    parent = client.get_run(parent.info.run_id)
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and tags["ncn.sweep.resumes"] == "1"
    assert "sweep_resume=" in tags["ncn.sweep.resume.1"]
    assert (tags["ncn.sweep.jobs"], tags["ncn.sweep.jobs_finished"], tags["ncn.sweep.jobs_failed"]) == ("3", "3", "0")
    children = {Path(r.data.tags["ncn.run_dir"]).name: r for r in runs if r.info.run_id != parent.info.run_id}
    assert {k: r.info.status for k, r in children.items()} == {"0": "FINISHED", "1": "FINISHED", "2": "FINISHED"}
    assert (children["0"].info.run_id, children["1"].info.run_id) == (ids["0"], ids["1"])  # the same child runs
    assert _files(folder / "0") == first  # job 1 was not trained again: its checkpoints and metrics untouched
    for job in ("0", "1", "2"):
        for key, steps in (("train/loss", STEPS), ("val/loss", [0, 3, 6])):
            expected = _jsonl(reference / job, key)
            history = sorted((m.step, m.value) for m in client.get_metric_history(children[job].info.run_id, key))
            assert [s for s, _ in history] == steps == sorted(expected), (job, key)  # every step once
            assert history == sorted(expected.items()), (job, key)  # bitwise: dropout masks and data order
            assert _jsonl(folder / job, key) == expected, (job, key)
    ours = torch.load(folder / "1" / "checkpoints" / "step_000006" / "model.pt", weights_only=True)
    theirs = torch.load(reference / "1" / "checkpoints" / "step_000006" / "model.pt", weights_only=True)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    results, _, failed = collect(MLflowTracker(uri), MLflowTracker(uri).get_run(parent.info.run_id))
    assert (sorted(r.variant for r in results), failed) == (["full", "gain_only", "none"], [])

    # tracking=none: no parent run, the folder alone says what ran; the uninterrupted sweep, resumed, skips all
    files = {job: _files(reference / job) for job in ("0", "1", "2")}
    launch = reference.parents[3]
    done = run_cli(_args(corpus, launch, f"sweep_resume={reference}", tracked=False), cwd=launch)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stderr + done.stdout).count("already finished") == 3
    assert all(files[job] == _files(reference / job) for job in files)
    assert [p.name for p in (launch / "multirun" / "ablation").glob("*/*")] == [reference.name]  # no new folder


@pytest.mark.slow
def test_joblib_resume_by_folder_skips_finished_jobs(corpus: Path, tmp_path: Path, mlflow_store) -> None:
    """A finished 2-job joblib sweep resumed by its folder (relative to the launch dir): both jobs are skipped
    in their workers (no new run, files untouched, the recorded val loss returned); a resume with another
    grid is refused before any job starts."""
    uri = mlflow_store(tmp_path / "mlflow.db")
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    grid = ["ncn=full", "seed=0,1"]
    first = run_cli(_args(corpus, tmp_path, *joblib, grid=grid), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ncn").experiment_id
    before = {r.info.run_id: r for r in client.search_runs([exp])}
    folder = _sweep_dir(tmp_path)
    files = {job: _files(folder / job) for job in ("0", "1")}
    [parent] = [r for r in before.values() if "ncn.sweep" in r.data.tags]

    resume = f"sweep_resume={folder.relative_to(tmp_path)}"
    again = run_cli(_args(corpus, tmp_path, *joblib, resume, grid=grid), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {r.info.run_id: r for r in client.search_runs([exp])}
    assert after.keys() == before.keys()  # no new child run
    assert all(files[job] == _files(folder / job) for job in files)
    children = [r for r in after.values() if "mlflow.parentRunId" in r.data.tags]
    assert [r.info.status for r in children] == ["FINISHED", "FINISHED"]
    for run in children:  # each skipped job returned its recorded val loss and said so in its job log
        log = (Path(run.data.tags["ncn.run_dir"]) / "run.log").read_text()
        assert f"val loss {run.data.metrics['val/loss']:.4f}): not trained again" in log
    parent = client.get_run(parent.info.run_id)
    assert (parent.info.status, parent.data.tags["ncn.sweep.resumes"]) == ("FINISHED", "1")
    assert sorted(p.name for p in folder.glob("multirun*.yaml")) == ["multirun.before_resume_1.yaml", "multirun.yaml"]

    another_sweep = [a if a != "ablation" else "leave_one_out" for a in _args(corpus, tmp_path, resume, grid=grid)]
    other = run_cli(another_sweep, cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f'error: {resume} is sweep ablation with grid {{"seed": ["0", "1"]}}, this launch is leave_one_out with '
        'grid {"seed": ["0", "1"]}: resume with the sweep\'s own -cn and its swept keys (their values may grow, '
        "shrink or be reordered)"
    )
    assert len(client.search_runs([exp])) == 3 and client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_sweep_grows_shrinks_and_reorders_under_its_parent(corpus: Path, tmp_path: Path, mlflow_store) -> None:
    """ncn=none,full, then resumed with ncn=full,none,gain_only (reordered, one value added): the finished jobs
    are skipped in their own folders, gain_only runs in a new folder under the same parent, whose grid becomes
    the union; then resumed with ncn=gain_only alone: the two dropped jobs are named as left out, nothing runs."""
    uri = mlflow_store(tmp_path / "mlflow.db")
    first = run_cli(_args(corpus, tmp_path, grid=["ncn=none,full", "seed=0"]), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = _sweep_dir(tmp_path)
    files = {job: _files(folder / job) for job in ("0", "1")}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ncn").experiment_id
    [parent] = [r.info.run_id for r in client.search_runs([exp]) if "ncn.sweep" in r.data.tags]

    grown = run_cli(
        _args(corpus, tmp_path, f"sweep_resume={parent}", grid=["ncn=full,none,gain_only", "seed=0"]),
        cwd=tmp_path,
    )
    assert grown.returncode == 0, grown.stderr[-3000:]
    out = grown.stdout + grown.stderr
    assert out.count("already finished") == 2
    assert "jobs new to the sweep's folder (added values, or never started): 1, in folders 2" in out
    assert all(files[job] == _files(folder / job) for job in files)  # the finished jobs are untouched
    assert sorted(p.name for p in folder.iterdir() if p.name.isdigit()) == ["0", "1", "2"]
    children = [r for r in client.search_runs([exp]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted((r.data.tags["ncn.sweep.job"], r.info.status) for r in children) == [
        ("0: ncn=none", "FINISHED"),
        ("1: ncn=full", "FINISHED"),
        ("2: ncn=gain_only", "FINISHED"),
    ]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent}
    tags = client.get_run(parent).data.tags
    assert json.loads(tags["ncn.sweep.grid"]) == {"ncn": ["none", "full", "gain_only"]}
    assert (tags["ncn.sweep.jobs"], tags["ncn.sweep.jobs_finished"], tags["ncn.sweep.jobs_expected"]) == ("3", "3", "3")
    assert json.loads((folder / "ncn_jobs.json").read_text())["folders"] == {
        '{"ncn": "full"}': "1",
        '{"ncn": "none"}': "0",
        '{"ncn": "gain_only"}': "2",
    }

    shrunk = run_cli(_args(corpus, tmp_path, f"sweep_resume={parent}", grid=["ncn=gain_only", "seed=0"]), cwd=tmp_path)
    assert shrunk.returncode == 0, shrunk.stderr[-3000:]
    out = shrunk.stdout + shrunk.stderr
    assert (
        "this launch's grid leaves out 2 of the sweep's jobs (job 0: ncn=none; job 1: ncn=full): they are not run; "
        "their folders and runs stay" in out
    )
    assert out.count("already finished") == 1
    assert len(client.search_runs([exp])) == 4 and client.get_run(parent).info.status == "FINISHED"


@pytest.mark.slow
def test_moved_jobs_find_their_folders_in_joblib_workers(corpus: Path, tmp_path: Path, mlflow_store) -> None:
    """ncn=none, resumed with ncn=gain_only,none in two joblib workers: the new job (launch number 0) runs in
    folder 1, the finished one is skipped in folder 0; each worker reads its folder from the table."""
    uri = mlflow_store(tmp_path / "mlflow.db")
    first = run_cli(_args(corpus, tmp_path, grid=["ncn=none", "seed=0"]), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = _sweep_dir(tmp_path)
    files = _files(folder / "0")
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    again = run_cli(
        _args(corpus, tmp_path, *joblib, f"sweep_resume={folder}", grid=["ncn=gain_only,none", "seed=0"]), cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert files == _files(folder / "0")
    assert {"ncn=gain_only", "seed=0"} <= set(yaml.safe_load((folder / "1" / ".hydra" / "overrides.yaml").read_text()))
    client = MlflowClient(uri)
    children = [
        r
        for r in client.search_runs([client.get_experiment_by_name("ncn").experiment_id])
        if "mlflow.parentRunId" in r.data.tags
    ]
    assert sorted((r.data.tags["ncn.sweep.job"], r.info.status) for r in children) == [
        ("0: ncn=none", "FINISHED"),
        ("1: ncn=gain_only", "FINISHED"),
    ]


@pytest.mark.slow
def test_a_job_that_lost_its_checkpoints_says_it_restarts(corpus: Path, tmp_path: Path, mlflow_store) -> None:
    """A one-job sweep whose job folder lost its checkpoints and final metrics: the resumed sweep trains it again
    from step 0 into a new run tagged ncn.restarted, warns with the same text, and keeps the old metrics aside."""
    uri = mlflow_store(tmp_path / "mlflow.db")
    grid = ["ncn=full", "seed=0"]
    first = run_cli(_args(corpus, tmp_path, grid=grid), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    job = _sweep_dir(tmp_path) / "0"
    before = (job / "metrics.jsonl").read_text()
    shutil.rmtree(job / "checkpoints")
    (job / "metrics.json").unlink()
    again = run_cli(_args(corpus, tmp_path, f"sweep_resume={_sweep_dir(tmp_path)}", grid=grid), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    note = (
        f"sweep job 0: its folder {job} holds an earlier attempt's metrics.jsonl but no checkpoint (no "
        "checkpoints/latest): training it again from step 0 (the earlier metrics are kept as "
        "metrics.before_restart.jsonl)"
    )
    assert note in (job / "run.log").read_text()
    assert (job / "metrics.before_restart.jsonl").read_text() == before
    old = {r["step"]: r["train/loss"] for r in map(json.loads, before.splitlines()) if "train/loss" in r}
    assert sorted(old) == STEPS and _jsonl(job, "train/loss") == old  # every step once, as the first attempt's
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ncn").experiment_id])
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.start_time)
    assert [(r.info.status, r.data.tags.get("ncn.restarted")) for r in children] == [
        ("FINISHED", None),
        ("FINISHED", note),
    ]
    assert children[0].data.tags["ncn.superseded_by"] == children[1].info.run_id


def test_plan_folders_matches_jobs_by_their_swept_values(tmp_path: Path) -> None:
    """Folders of a sweep ncn=none,full x seed=0,1 (jobs 0-3; job 2 died before writing its overrides): a grid
    with seed 2 added continues every earlier job in its folder; a new job takes its launch number's folder
    unless a job holds it, else the next free number; a reordered grid is the same jobs; a smaller one names
    the jobs it leaves out."""
    from ncn.tasks.sweep import grid_jobs, job_key, plan_folders

    grid = {"ncn": ["none", "full"], "seed": ["0", "1"]}
    assert grid_jobs(grid) == [
        ["ncn=none", "seed=0"],
        ["ncn=none", "seed=1"],
        ["ncn=full", "seed=0"],
        ["ncn=full", "seed=1"],
    ]
    for n, job in enumerate(grid_jobs(grid)):
        (tmp_path / str(n) / ".hydra").mkdir(parents=True)
        if n != 2:
            (tmp_path / str(n) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=tiny", *job]))
    keys = ["ncn", "seed"]

    def key(ncn: str, seed: int) -> str:
        return job_key([f"ncn={ncn}", f"seed={seed}"], keys)

    same = plan_folders(tmp_path, {**grid, "model": ["tiny"]}, keys)
    assert (same.in_place, same.new, same.left_out) == (True, ["2"], {})
    grown = plan_folders(tmp_path, {"ncn": ["none", "full"], "seed": ["0", "1", "2"]}, keys)
    assert grown.folders == {
        key("none", 0): "0",
        key("none", 1): "1",
        key("none", 2): "2",  # launch number 2: no job holds folder 2
        key("full", 0): "4",  # launch number 3: folder 3 is full seed 1's, 4 is the next free one
        key("full", 1): "3",
        key("full", 2): "5",
    }
    assert (grown.new, grown.in_place) == (["2", "4", "5"], False)
    reordered = plan_folders(tmp_path, {"seed": ["1", "0"], "ncn": ["full", "none"]}, ["seed", "ncn"])
    assert reordered.folders == {key("full", 1): "3", key("none", 1): "1", key("full", 0): "2", key("none", 0): "0"}
    assert (reordered.new, reordered.left_out, reordered.in_place) == (["2"], {}, False)
    shrunk = plan_folders(tmp_path, {"ncn": ["full"], "seed": ["1"]}, keys)
    assert (shrunk.folders, shrunk.new) == ({key("full", 1): "3"}, [])
    assert shrunk.left_out == {"0": key("none", 0), "1": key("none", 1)}


# --- the per-job decision (what a resumed or requeued job does), on prepared folders ---


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, _mlflow_template: Path) -> Path:
    """Run dir of the session's tiny training run (6 steps, checkpoints at 3 and 6, metrics.json written)."""
    return tiny_run(tmp_path_factory, _mlflow_template).checkpoint.parents[1]


def _job_config(run_dir: Path):
    return checkpoint.load(checkpoint.read_pointer(run_dir / "checkpoints" / "latest"), tensors=False).config


def test_plan_skips_a_finished_job_with_its_recorded_val_loss(finished: Path, tmp_path: Path) -> None:
    run_dir, metrics = finished, json.loads((finished / "metrics.json").read_text())
    cfg = _job_config(run_dir)
    plan = job_resume.plan_job(run_dir, dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, threads=2)))
    assert (plan.action, plan.checkpoint, plan.val_loss) == (
        "skip",
        run_dir / "checkpoints" / "step_000006",
        metrics["val/loss"],
    )
    assert job_resume.plan_job(tmp_path, cfg) == job_resume.JobPlan("fresh")  # an empty folder: a new job


def test_plan_resumes_a_preempted_job_into_its_run(finished: Path, tmp_path: Path) -> None:
    """What a requeued SLURM job (submitit reruns the same job in the same folder) decides: without
    metrics.json the latest checkpoint is resumed, into the MLflow run it records."""
    run_dir = finished
    copy = tmp_path / "0"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    (copy / "checkpoints" / "latest").write_text("step_000003\n")
    state = json.loads((copy / "checkpoints" / "step_000003" / "train_state.json").read_text())
    state["mlflow_run_id"] = "0123456789abcdef0123456789abcdef"
    (copy / "checkpoints" / "step_000003" / "train_state.json").write_text(json.dumps(state))
    plan = job_resume.plan_job(copy, _job_config(run_dir), job=1)
    assert plan == job_resume.JobPlan("resume", copy / "checkpoints" / "step_000003", None, state["mlflow_run_id"])


def test_plan_refuses_another_config_or_another_sweep(finished: Path, tmp_path: Path) -> None:
    run_dir = finished
    cfg = _job_config(run_dir)
    other = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.01))
    with pytest.raises(NCNConfigError, match=r"^sweep job 4: its folder .* holds a run trained with optim.lr=0.0006, "):
        job_resume.plan_job(run_dir, other, job=4)
    copy = tmp_path / "0"
    shutil.copytree(run_dir, copy)
    theirs = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, parent_run_id="a" * 32))
    ours = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, parent_run_id="b" * 32))
    (copy / "checkpoints" / "step_000006" / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(theirs)))
    with pytest.raises(NCNConfigError, match=f"holds a run of another sweep .*sweep_resume={'a' * 32}"):
        job_resume.plan_job(copy, ours, job=0)


def test_plan_says_when_a_job_that_trained_restarts_from_scratch(finished: Path, tmp_path: Path) -> None:
    """A folder with the earlier attempt's metrics.jsonl but its checkpoints gone: fresh, with the reason (the
    train task logs it, tags the new run ncn.restarted with it and keeps the old metrics aside)."""
    copy = tmp_path / "3"
    shutil.copytree(finished, copy)
    shutil.rmtree(copy / "checkpoints")
    plan = job_resume.plan_job(copy, _job_config(finished), job=3)
    assert plan == job_resume.JobPlan(
        "fresh",
        restart=f"sweep job 3: its folder {copy} holds an earlier attempt's metrics.jsonl but no checkpoint (no "
        "checkpoints/latest): training it again from step 0 (the earlier metrics are kept as "
        "metrics.before_restart.jsonl)",
    )
    (copy / "metrics.jsonl").unlink()
    assert job_resume.plan_job(copy, _job_config(finished), job=3) == job_resume.JobPlan()  # never trained


def test_trim_metrics_log_keeps_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text(
        "".join(json.dumps({"step": s, "train/loss": s / 10}) + "\n" for s in range(1, 6)) + '{"step": 6, "tr'
    )
    assert job_resume.trim_metrics_log(log, 3) == 3  # steps 4, 5 and the line cut short by a kill
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert job_resume.trim_metrics_log(tmp_path / "none.jsonl", 3) == 0


def test_each_job_counts_once_by_its_newest_attempt(tmp_path: Path, mlflow_store) -> None:
    """A FAILED placeholder (job died before its run existed) superseded by a finished rerun in the same
    folder, and a run killed before its first checkpoint superseded by a FAILED rerun: the report takes
    one result per job and lists only jobs whose current run did not finish."""
    tracker = MLflowTracker(mlflow_store(tmp_path / "mlflow.db"))
    parent = tracker.start("ablation", tags={"ncn.sweep": "ablation", "ncn.sweep.grid": '{"ncn": ["none", "full"]}'})
    child = {"mlflow.parentRunId": parent}

    def run(name: str, job: str, status: str, loss: float | None = None, ncn: str = "none") -> str:
        time.sleep(0.01)  # distinct start times (ms): attempts are ordered by them
        run_id = tracker.create_run(name, tags={**child, "ncn.run_dir": f"/sweep/{job}", "hydra.choices.ncn": ncn})
        if loss is not None:
            tracker.client.log_param(run_id, "seed", "0")
            tracker.client.log_metric(run_id, "val/loss", loss, step=6)
        tracker.terminate(run_id, status)
        return run_id

    run("job0", "0", "FAILED")  # placeholder of a config error
    finished = run("tiny-none-s0", "0", "FINISHED", 6.5)
    run("tiny-full-s0", "1", "KILLED", ncn="full")  # killed before its first checkpoint
    rerun = run("tiny-full-s0", "1", "FAILED", ncn="full")
    assert [r.run_id for r in tracker.sweep_jobs(parent)] == [finished, rerun]
    results, labels, failed = collect(tracker, tracker.get_run(parent))
    assert [(r.variant, r.val_loss) for r in results] == [("none", 6.5)]
    assert (labels, failed) == (["none"], ["tiny-full-s0 (FAILED)"])


def test_sweep_resume_outside_a_sweep_is_refused(task_config) -> None:
    from ncn.tasks import train

    cfg, ctx = task_config(["model=tiny", "tracking=none", "sweep_resume=0123abcd"])
    with pytest.raises(NCNConfigError, match=r"^sweep_resume=0123abcd continues a sweep: launch it as one, e\.g\. "):
        train.main(cfg, ctx)


def test_resume_target_by_parent_id_or_folder(tmp_path: Path, mlflow_store) -> None:
    from ncn.tasks.sweep import resume_target

    tracker = MLflowTracker(mlflow_store(tmp_path / "mlflow.db"))
    folder = tmp_path / "multirun" / "ablation" / "d" / "t"
    folder.mkdir(parents=True)
    parent = tracker.start("ablation", tags={"ncn.sweep": "ablation", "ncn.sweep.dir": str(folder)})
    child = tracker.create_run("tiny-full-s0", tags={"mlflow.parentRunId": parent})
    assert resume_target(tracker, parent, tmp_path)[0].run_id == parent
    found, where = resume_target(tracker, "multirun/ablation/d/t", tmp_path)  # relative to the launch dir
    assert (found.run_id, where) == (parent, folder)
    assert resume_target(None, str(folder), tmp_path) == (None, folder)  # tracking=none: the folder alone
    with pytest.raises(NCNConfigError, match=f"^sweep_resume={child} is MLflow run 'tiny-full-s0', not a sweep's"):
        resume_target(tracker, child, tmp_path)
    with pytest.raises(NCNConfigError, match="^sweep_resume=nope is neither an MLflow run of this store nor a folder"):
        resume_target(tracker, "nope", tmp_path)
    with pytest.raises(
        NCNConfigError, match=f"^sweep_resume=multirun: no sweep of experiment ncn in .* ran in {tmp_path}"
    ):
        resume_target(tracker, "multirun", tmp_path)
