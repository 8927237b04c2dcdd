"""Sweep tests: every sweeps/*.yaml composes; the iso-parameter baseline matches `full` within 0.5 %;
real `python run.py -cd sweeps ...` multiruns (model=tiny trainer=smoke on a small synthetic
text_files corpus) checked in a temporary MLflow store: parent/child nesting, identical param
keys, the report, the joblib launcher on a fresh store and cold cache, failing jobs (also in a
launch folder and with a run_name full of quotes, spaces and non-ASCII), the Optuna search that
goes on after a diverging trial and stops once more than its share failed; the SLURM launcher's
settings and requeue contract, and non-zero SLURM ranks leaving bookkeeping to rank 0.

Run: python -m pytest -q tests/test_sweeps.py   (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from ncn import ModulatedGPT
from ncn.errors import RunFailedError
from ncn.tasks.report import collect as report_collect
from ncn.tasks.report import report
from ncn.tasks.sweep import hydra_quoted, sweep_grid
from ncn.tracking import MLflowTracker

from conftest import REPO, run_cli, time_left

SWEEPS = {
    "ablation": {"ncn": "none,none_iso,temperature_only,gain_only,activation_only,full", "seed": "0,1,2"},
    "leave_one_out": {"ncn": "full,no_temperature,no_gain,no_activation", "seed": "0,1,2"},
    "pooling": {"ncn.pooling": "causal,none,global", "seed": "0,1,2"},
    "homeostasis": {"ncn.homeostatic_lambda": "0.0,0.001,0.01,0.1", "seed": "0,1"},
    "scale": {"model": "tiny,small", "ncn": "none,full", "seed": "0"},
    "lr_search": {"optim.lr": "tag(log, interval(1e-4, 1e-2))"},
    "compute": {"ncn.compute_lambda": "0.0,0.05,0.2,0.5", "seed": "0,1,2"},
}
# tiny and fast: threads=1 keeps 2-core CI machines from oversubscribing
FAST = ["model=tiny", "trainer=smoke", "trainer.probe_tokens=0", "trainer.threads=1", "trainer.checkpoint_every=6"]


def _compose_sweep(name: str, overrides: list[str] = ()):
    with initialize_config_dir(str(REPO / "sweeps"), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_every_sweep_file_composes(name: str) -> None:
    cfg = _compose_sweep(name, ["model=tiny"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == SWEEPS[name]
    assert cfg.hydra.sweep.dir.startswith(f"multirun/{name}/")  # unresolved: ${now:...} per launch
    assert cfg.hydra.callbacks.sweep._target_ == "ncn.tasks.sweep.SweepCallback"
    steps = 1000 if name == "compute" else 300  # compute: the byte-level CPU budget (trainer=cpu_sweep)
    assert (cfg.trainer.max_steps, cfg.trainer.probe_tokens, cfg.model.d_model) == (steps, 0, 32)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper" if name == "lr_search" else "BasicSweeper")
    # the command line beats the file: trainer=smoke replaces the sweep budget
    assert _compose_sweep(name, ["trainer=smoke"]).trainer.max_steps == 6


def test_sweep_grid_merges_like_hydra() -> None:
    """Command-line values replace the file's grid key by key, keeping the file's order."""
    grid = sweep_grid({"ncn": "none,full,gain_only", "seed": "0,1,2"}, ["model=tiny", "seed=0", "ncn=none,full"])
    assert list(grid.items()) == [("ncn", ["none", "full"]), ("seed", ["0"]), ("model", ["tiny"])]
    assert sweep_grid({"optim.lr": "tag(log, interval(1e-4, 1e-2))"}, []) == {
        "optim.lr": "tag(log, interval(1e-4, 1e-2))"
    }


def test_slurm_launcher_config_composes(compose_config) -> None:
    cfg = compose_config(["hydra/launcher=slurm"], hydra=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.timeout_min) == (1, 240)
    assert cfg.hydra.launcher.max_num_timeout == 3  # a job that hits its time limit is requeued (and resumes)
    multi = ["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4"]
    launcher = compose_config([*multi, "hydra.launcher.nodes=2"], hydra=True).hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


def test_a_requeued_slurm_job_reruns_the_same_job() -> None:
    """What resuming a preempted or timed-out SLURM job relies on: submitit calls the launcher's
    `checkpoint` and requeues what it returns, the same call with the same job number and sweep dir key,
    so the rerun lands in the same folder, where `ncn.training.job_resume.plan_job` finds its checkpoint
    (tests/test_sweep_resume.py: test_plan_resumes_a_preempted_job_into_its_run)."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    launcher = SlurmLauncher(submitit_folder="x", timeout_min=1, max_num_timeout=3)
    args = (["ncn=full", "seed=1"], "hydra.sweep.dir", 7, "job_id_for_7", {})
    delayed = launcher.checkpoint(*args)
    assert (delayed.function, delayed.args, delayed.kwargs) == (launcher, args, {})


def test_non_zero_slurm_rank_leaves_logging_and_bookkeeping_to_rank_0(monkeypatch, tmp_path: Path) -> None:
    """Every task of a multi-task SLURM job runs the job; the callback keeps tasks > 0 out of the job's log
    file and out of the store (rank 0 tags the runs), as run.py does for torchrun's ranks."""
    import logging

    from ncn.tasks.sweep import SweepCallback

    callback = SweepCallback()
    callback.parent_run_id = "0" * 32  # no store behind it: any store access would fail
    monkeypatch.setenv("NCN_PARENT_RUN_ID", "unset")  # recorded as absent: the teardown removes what the callback sets
    monkeypatch.setenv("NCN_SWEPT_KEYS", "unset")  # the same for the swept keys
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[1-2]")  # srun sets it: without it the job is refused
    log_file = logging.FileHandler(tmp_path / "run.log")
    root = logging.getLogger()
    root.addHandler(log_file)
    try:
        callback.on_job_start(config=None)
        assert log_file not in root.handlers
        assert os.environ["NCN_PARENT_RUN_ID"] == "0" * 32
        callback.on_job_end(config=None, job_return=None)  # returns before touching the store
    finally:
        root.removeHandler(log_file)


# d_ff = 4·d + round(controller params / (n_layer·(2d + 1))), worked out by hand:
# tiny 128 + round(6758 / 130), small 512 + round(75212 / 1028), paper_18m 1024 + round(281042 / 3084)
@pytest.mark.parametrize(("model", "d_ff"), [("tiny", 180), ("small", 585), ("paper_18m", 1115)])
def test_iso_parameter_baseline_matches_full(typed_config, model: str, d_ff: int) -> None:
    counts = {}
    for option in ("none", "none_iso", "full"):
        cfg = typed_config([f"model={model}", f"ncn={option}"])
        with torch.device("meta"):
            counts[option] = ModulatedGPT(cfg.model, cfg.ncn).num_parameters()
        if option == "none_iso":
            assert (cfg.model.d_ff, cfg.ncn.targets) == (d_ff, [])
    iso, full, plain = counts["none_iso"].total, counts["full"].total, counts["none"].total
    assert counts["none_iso"].controller == 0
    assert abs(iso - full) / full < 0.005 and abs(iso - full) < abs(plain - full)
    n_layer, d_model = cfg.model.n_layer, cfg.model.d_model
    assert abs(iso - full) <= n_layer * (d_model + 1)  # rounding d_ff to an integer, nothing more


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 small .txt files (~1,000 words each) of seeded pseudo-English."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
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
    for i in range(10):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(1000)) + ".\n")
    return root


def _sweep(
    tmp: Path, corpus: Path, name: str, *overrides: str, env: dict[str, str] | None = None, faults: list[str] = ()
):
    uri = f"sqlite:///{tmp / 'mlflow.db'}"  # the default store of the launch dir `tmp` (no tracking.uri override)
    done = run_cli(
        [
            "-cd",
            str(REPO / "sweeps"),
            "-cn",
            name,
            *FAST,
            "data=text_files",
            f"data.path={corpus}",
            "data.val_fraction=0.2",
            *overrides,
        ],
        cwd=tmp,
        env=env,
        timeout=time_left(),
        faults=faults,
    )
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ncn").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.run_name)
    assert len(parents) == 1, [r.info.run_name for r in runs]
    return done, client, parents[0], children


@pytest.fixture(scope="module")
def two_variant(tmp_path_factory: pytest.TempPathFactory, corpus: Path, _mlflow_template: Path):
    """`ablation ncn=none,full seed=0` at model=tiny trainer=smoke: (tmp dir, result, client, parent, children)."""
    tmp = tmp_path_factory.mktemp("two_variant")
    shutil.copyfile(_mlflow_template, tmp / "mlflow.db")
    return (tmp, *_sweep(tmp, corpus, "ablation", "ncn=none,full", "seed=0"))


def test_two_variant_sweep_nests_runs_and_reports(two_variant) -> None:
    tmp_path, done, client, parent, children = two_variant
    assert done.returncode == 0, done.stderr[-3000:]
    assert [c.info.run_name for c in children] == ["tiny-full-text_files-s0", "tiny-none-text_files-s0"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert [c.info.status for c in [parent, *children]] == ["FINISHED"] * 3
    tags = parent.data.tags
    assert (parent.info.run_name, tags["ncn.sweep"], json.loads(tags["ncn.sweep.grid"])) == (
        "ablation",
        "ablation",
        {"ncn": ["none", "full"]},
    )
    assert (tags["ncn.sweep.jobs"], tags["ncn.sweep.jobs_finished"], tags["ncn.sweep.jobs_expected"]) == ("2", "2", "2")
    assert Path(tags["ncn.sweep.dir"]).parent.parent == tmp_path / "multirun" / "ablation"
    assert sorted(c.data.tags["ncn.sweep.job"] for c in children) == ["0: ncn=none", "1: ncn=full"]
    full, none = children
    assert set(full.data.params) == set(none.data.params)  # the compare view lines them up
    assert len(full.data.params) > 50
    assert (full.data.params["n_params_controller"], none.data.params["n_params_controller"]) == ("6758", "0")

    tracker = MLflowTracker(client.tracking_uri)
    rows, _ = report(tracker, tracker.get_run(parent.info.run_id), tmp_path / "report")
    assert [r["variant"] for r in rows] == ["none", "full"]
    for row, run in zip(rows, [none, full], strict=True):
        speed = [m.value for m in client.get_metric_history(run.info.run_id, "train/tokens_per_s")]
        assert row["val_loss_mean"] == pytest.approx(run.data.metrics["val/loss"])
        assert row["val_ppl_mean"] == pytest.approx(run.data.metrics["val/ppl"])
        assert (row["params"], row["seeds"]) == (int(run.data.params["n_params"]), "0")
        assert row["tokens_per_s"] == pytest.approx(sum(speed) / len(speed))
    assert rows[1]["delta_val_loss"] == pytest.approx(full.data.metrics["val/loss"] - none.data.metrics["val/loss"])
    assert rows[1]["controller_share_pct"] == float(full.data.params["controller_share_pct"])

    # the same report through the CLI task, into its Hydra run dir and printed
    shown = run_cli(
        [
            "task=report",
            f"sweep_run={parent.info.run_id}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"hydra.run.dir={tmp_path / 'report_run'}",
        ],
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"| full | 1 (0) | {int(full.data.params['n_params']):,} |" in shown.stdout
    assert (tmp_path / "report_run" / "report" / "report.csv").read_text().count("\n") == 3  # header + 2 rows


def test_joblib_parallel_jobs_on_fresh_store_and_cold_cache(tmp_path: Path, corpus: Path) -> None:
    cache = tmp_path / "cold_cache"  # neither the sqlite file nor the token cache exists yet
    done, client, parent, children = _sweep(
        tmp_path,
        corpus,
        "ablation",
        "ncn=full",
        "seed=0,1",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        env={"NCN_CACHE_DIR": str(cache)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(c.info.run_name, c.info.status) for c in children] == [
        ("tiny-full-text_files-s0", "FINISHED"),
        ("tiny-full-text_files-s1", "FINISHED"),
    ]
    assert parent.info.status == "FINISHED" and parent.data.tags["ncn.sweep.launcher"] == "JoblibLauncher"
    assert [c.data.params["seed"] for c in children] == ["0", "1"] and all(
        "val/loss" in c.data.metrics for c in children
    )
    assert len({c.data.tags["ncn.run_dir"] for c in children}) == 2
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # one token cache, built once
    # the store is still usable: a new run can be written and read back
    exp = client.get_experiment_by_name("ncn").experiment_id
    extra = client.create_run(exp, run_name="after").info.run_id
    client.log_metric(extra, "x", 1.0)
    assert len(client.search_runs([exp])) == 4 and client.get_run(extra).data.metrics == {"x": 1.0}


def test_failing_job_fails_parent_and_exit_code(tmp_path: Path, corpus: Path, mlflow_store) -> None:
    """Job 0 diverges (NaN at step 2, no skips allowed), job 1 skips that step and finishes, job 2
    has a config error before its training run exists: it still gets a FAILED child run."""
    mlflow_store(tmp_path / "mlflow.db")
    done, client, parent, children = _sweep(
        tmp_path, corpus, "ablation", "ncn=full", "seed=0", "trainer.skip_nonfinite=0,5,-1", faults=["--nan-steps", "2"]
    )
    assert done.returncode == 3, done.stderr[-3000:]  # the first failure: a run that failed on its own
    *_, first, summary = done.stderr.strip().splitlines()
    assert first.startswith("error: non-finite loss or gradient at step 2")  # the first failed job's own line
    by_job = {c.data.tags["ncn.sweep.job"]: c for c in children}
    assert {k: c.info.status for k, c in by_job.items()} == {
        "0: trainer.skip_nonfinite=0": "FAILED",
        "1: trainer.skip_nonfinite=5": "FINISHED",
        "2: trainer.skip_nonfinite=-1": "FAILED",
    }
    assert (
        by_job["2: trainer.skip_nonfinite=-1"]
        .data.tags["ncn.error"]
        .startswith("usage error (exit 2), NCNConfigError: trainer.skip_nonfinite=-1 must be >= 0")
    )
    assert (
        by_job["0: trainer.skip_nonfinite=0"]
        .data.tags["ncn.error"]
        .startswith("run failed (exit 3), DivergenceError: non-finite loss or gradient at step 2")
    )
    tags = parent.data.tags
    assert parent.info.status == "FAILED"
    assert (tags["ncn.sweep.jobs"], tags["ncn.sweep.jobs_finished"], tags["ncn.sweep.jobs_failed"]) == ("3", "1", "2")
    assert sorted(k for k in tags if k.startswith("ncn.sweep.failed.")) == ["ncn.sweep.failed.0", "ncn.sweep.failed.2"]
    assert tags["ncn.sweep.failed.0"].startswith("trainer.skip_nonfinite=0: run failed (exit 3), DivergenceError")
    assert tags["ncn.sweep.failed.2"].startswith("trainer.skip_nonfinite=-1: usage error (exit 2), NCNConfigError")
    report = (
        f"python {REPO / 'run.py'} task=report sweep_run={parent.info.run_id} \"tracking.uri='{client.tracking_uri}'\""
    )
    assert (
        summary
        == (  # the sweep's account is the last line
            f"error: 2 of 3 jobs failed (job 0: {tags['ncn.sweep.failed.0'][:200]}; job 2: "
            f"{tags['ncn.sweep.failed.2'][:200]}); parent run {parent.info.run_id}; report: {report}"
        )
    )


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt install chromium)")
def test_mlflow_ui_compare_view_renders_the_sweep(two_variant) -> None:
    """scripts/mlflow_screenshot.py against the two-variant store: run names and columns in the runs table."""
    tmp_path = two_variant[0]
    shot = tmp_path / "compare.png"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "mlflow_screenshot.py"),
            "--uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--out",
            str(shot),
            "--budget-ms",
            "15000",
        ],
        capture_output=True,
        text=True,
        timeout=time_left(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "table view of 2 runs of sweep ablation" in done.stdout and "ncn.targets" in done.stdout
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


# --- Optuna: a failing trial (hydra/sweeper=ncn_optuna, max_failure_rate over all trials) ---

LR_SEARCH = ["hydra.sweeper.n_trials=4", "optim.lr=choice(1e30,1e-3)"]  # 1e30 diverges at step 2


@pytest.mark.slow
def test_lr_search_goes_on_after_a_diverging_trial(tmp_path: Path, corpus: Path, mlflow_store) -> None:
    """4 trials, TPE seed 0 draws lr 1e30 for trial 1 only: 1 of 4 failed is within max_failure_rate 0.25,
    so all 4 run; trial 1 is FAILED in MLflow and FAIL in the study, the best lr is saved, exit 3."""
    mlflow_store(tmp_path / "mlflow.db")
    done, client, parent, children = _sweep(tmp_path, corpus, "lr_search", *LR_SEARCH)
    assert done.returncode == 3, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: 1 of 4 trials failed (first: trial 1, optim.lr=1e+30: run failed (exit 3), DivergenceError: "
        "non-finite loss or gradient at step 2"
    ), last
    assert "); best: trial 0 (optim.lr=0.001) = " in last and "(within max_failure_rate=0.25: at most 1 of 4" in last
    by_job = {c.data.tags["ncn.sweep.job"]: c.info.status for c in children}
    assert by_job == {
        "0: optim.lr=0.001": "FINISHED",
        "1: optim.lr=1e+30": "FAILED",
        "2: optim.lr=0.001": "FINISHED",
        "3: optim.lr=0.001": "FINISHED",
    }
    tags = parent.data.tags
    assert (parent.info.status, tags["ncn.sweep.jobs_finished"], tags["ncn.sweep.jobs_failed"]) == ("FAILED", "3", "1")
    # the plugin logs "Failed experiment" exactly where it tells Optuna the trial's state is FAIL
    assert (done.stdout + done.stderr).count("Failed experiment: non-finite loss or gradient at step 2") == 1
    [results] = (tmp_path / "multirun" / "lr_search").glob("*/*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert best["best_params"] == {"optim.lr": 0.001}
    assert best["best_value"] == pytest.approx(min(c.data.metrics["val/loss"] for c in finished))


@pytest.mark.slow
def test_lr_search_stops_once_more_than_its_share_failed(tmp_path: Path, corpus: Path, mlflow_store) -> None:
    """TPE seed 6 draws lr 1e30 for trials 0 and 1: 2 failures > 25 % of 4, the study stops before trial 2."""
    mlflow_store(tmp_path / "mlflow.db")
    done, _, parent, children = _sweep(tmp_path, corpus, "lr_search", *LR_SEARCH, "hydra.sweeper.sampler.seed=6")
    assert done.returncode == 3, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 of 2 trials failed (first: trial 0, optim.lr=1e+30: run failed (exit 3)"), last
    assert last.endswith(
        "no trial finished: more than hydra.sweeper.max_failure_rate=0.25 of 4 trials (at most 1) may fail, so the "
        "study stopped; narrow the search space (e.g. a lower optim.lr bound) or raise hydra.sweeper.max_failure_rate"
    ), last
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]
    assert (parent.info.status, parent.data.tags["ncn.sweep.jobs_failed"]) == ("FAILED", "2")
    assert not list((tmp_path / "multirun" / "lr_search").glob("*/*/2"))  # trial 2 never launched


def test_failure_budget_counts_over_all_trials() -> None:
    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.ncn_optuna_sweeper.ncn_optuna_sweeper import FailureBudget, trial_of

    def job(value: object, overrides: list[str], failed: bool = False) -> JobReturn:
        ret = JobReturn(overrides=overrides, status=JobStatus.FAILED if failed else JobStatus.COMPLETED)
        ret._return_value = value  # what a launcher stores: the value, or the exception the job raised
        return ret

    budget = FailureBudget(0.25, 8)  # at most 2 of 8 may fail
    budget.searched = ["optim.lr"]
    budget.trials = [
        trial_of(0, job(6.5, ["optim.lr=0.001", "model=tiny"])),
        trial_of(1, job(RuntimeError("boom"), ["optim.lr=0.1", "model=tiny"], failed=True)),
        trial_of(2, job(float("nan"), ["optim.lr=0.05", "model=tiny"])),
        trial_of(3, job(6.25, ["optim.lr=0.002", "model=tiny"])),
    ]
    assert budget.allowed == 2 and [t.number for t in budget.failed] == [1, 2]
    budget.check()  # 2 of at most 2
    assert budget.summary(Path("o.yaml")).startswith(
        "2 of 4 trials failed (first: trial 1, optim.lr=0.1: crash (exit 1), RuntimeError: boom); "
        "best: trial 3 (optim.lr=0.002) = 6.25 (within max_failure_rate=0.25: at most 2 of 8"
    )
    budget.trials.append(trial_of(4, job(None, ["optim.lr=0.2"])))
    with pytest.raises(RunFailedError, match=r"^3 of 5 trials failed .* so the study stopped"):
        budget.check()


# --- user text in paths and names: quotes, spaces, non-ASCII (runs are found by id, matched in Python) ---

ODD_FOLDER = 'it\'s a "quoted" földer, ünïcode'
ODD_NAME = "o'brien's \"best\" rün"


@pytest.mark.slow
def test_failing_jobs_in_an_odd_folder_with_an_odd_run_name(tmp_path: Path, corpus: Path, mlflow_store) -> None:
    """A sweep launched from a folder whose name has quotes, spaces and non-ASCII, with such a run_name: job 0
    diverges, job 1 finishes, job 2 fails before its run exists. Each failure has its FAILED child and the
    counts are right; then the sweep resumed by its (odd) folder reruns job 0 (now without the fault) into a
    new run that supersedes the failed one, skips job 1 and fails job 2 again on the same placeholder."""
    launch = tmp_path / ODD_FOLDER
    launch.mkdir()
    mlflow_store(launch / "mlflow.db")
    grid = ["ncn=full", "seed=0", "trainer.skip_nonfinite=0,5,-1", f"run_name={hydra_quoted(ODD_NAME)}"]
    done, client, parent, children = _sweep(launch, corpus, "ablation", *grid, faults=["--nan-steps", "2"])
    assert done.returncode == 3, done.stderr[-3000:]
    by_job = {c.data.tags["ncn.sweep.job"]: c for c in children}
    assert {k: (c.info.run_name, c.info.status) for k, c in by_job.items()} == {
        "0: trainer.skip_nonfinite=0": (ODD_NAME, "FAILED"),
        "1: trainer.skip_nonfinite=5": (ODD_NAME, "FINISHED"),
        "2: trainer.skip_nonfinite=-1": ("job2", "FAILED"),  # the placeholder of a job that died before its run
    }
    folder = Path(parent.data.tags["ncn.sweep.dir"])
    assert folder.parent.parent.parent.parent == launch and ODD_FOLDER in str(folder)
    assert {c.data.tags["ncn.run_dir"] for c in children} == {str(folder / n) for n in "012"}
    tags = parent.data.tags
    assert (parent.info.status, tags["ncn.sweep.jobs"], tags["ncn.sweep.jobs_failed"]) == ("FAILED", "3", "2")
    assert sorted(k for k in tags if k.startswith("ncn.sweep.failed.")) == ["ncn.sweep.failed.0", "ncn.sweep.failed.2"]
    diverged = by_job["0: trainer.skip_nonfinite=0"].info.run_id

    resume = f"sweep_resume={folder.relative_to(launch)}"  # relative to the launch dir: no quoting needed
    again, _, parent, children = _sweep(launch, corpus, "ablation", *grid, resume)
    assert again.returncode == 2, again.stderr[-3000:]  # job 2's config error, again
    *_, first, summary = again.stderr.strip().splitlines()
    assert first.startswith("error: trainer.skip_nonfinite=-1 must be >= 0")
    assert summary.startswith(  # the sweep's account last: one job of three failed, on this parent
        "error: 1 of 3 jobs failed (job 2: trainer.skip_nonfinite=-1: usage error (exit 2), NCNConfigError: "
        "trainer.skip_nonfinite=-1 must be >= 0"
    )
    assert f"; parent run {parent.info.run_id}; report: python " in summary
    tracker = MLflowTracker(client.tracking_uri)
    current = tracker.sweep_jobs(parent.info.run_id)  # one run per job: its newest attempt
    assert [(j.tags["ncn.sweep.job"], j.status) for j in current] == [
        ("0: trainer.skip_nonfinite=0", "FINISHED"),
        ("1: trainer.skip_nonfinite=5", "FINISHED"),
        ("2: trainer.skip_nonfinite=-1", "FAILED"),
    ]
    assert len(children) == 4 and current[1].run_id == by_job["1: trainer.skip_nonfinite=5"].info.run_id
    old = client.get_run(diverged)
    assert (old.info.status, old.data.tags["ncn.superseded_by"]) == ("FAILED", current[0].run_id)
    tags = parent.data.tags
    assert (
        parent.info.status,
        tags["ncn.sweep.jobs"],
        tags["ncn.sweep.jobs_finished"],
        tags["ncn.sweep.jobs_failed"],
    ) == (
        "FAILED",
        "3",
        "2",
        "1",
    )
    assert sorted(k for k in tags if k.startswith("ncn.sweep.failed.")) == ["ncn.sweep.failed.2"]
    results, _, failed = report_collect(tracker, tracker.get_run(parent.info.run_id))
    assert (len(results), failed) == (2, ["job2 (FAILED)"])


def test_a_sweep_is_found_by_a_name_with_quotes(tmp_path: Path, mlflow_store) -> None:
    """The screenshot script and task=report look a sweep up by user text through the tracker."""
    tracker = MLflowTracker(mlflow_store(tmp_path / "mlflow.db"))
    parent = tracker.start("o'brien", tags={"ncn.sweep": 'o\'brien "ü"'})
    child = tracker.create_run("run", tags={"mlflow.parentRunId": parent})
    found = tracker.find_sweep('o\'brien "ü"')
    assert (found.run_id, [c.run_id for c in tracker.child_runs(found.run_id)]) == (parent, [child])


@pytest.mark.slow  # a real multirun of two jobs
def test_the_keys_a_sweep_varies_are_in_its_run_names(tmp_path: Path, corpus: Path) -> None:
    """The pooling sweep varies ncn.pooling, which is no config group: each job's run name shows it."""
    done = run_cli(
        [
            "-cd",
            str(REPO / "sweeps"),
            "-cn",
            "pooling",
            *FAST,
            "trainer.max_steps=1",
            "trainer.eval_every=1",
            "data=text_files",
            f"data.path={corpus}",
            "data.val_fraction=0.2",
            "tracking=none",
            "ncn.pooling=causal,global",
            "seed=0",
        ],
        cwd=tmp_path,
        timeout=time_left(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [folder] = (tmp_path / "multirun" / "pooling").glob("*/*")
    names = [re.search(r"\] - (\S+): [\d,]+ params", (folder / job / "run.log").read_text()).group(1) for job in "01"]
    assert names == ["tiny-full-text_files-pooling_causal-s0", "tiny-full-text_files-pooling_global-s0"]
