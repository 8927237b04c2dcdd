"""Sweeps: one MLflow parent run per Hydra multirun, a nested child run per job, honest failure.

`SweepCallback` (enabled in conf/config.yaml `hydra.callbacks`) creates the sqlite store, the
experiment and a parent run once in the launching process, before any (parallel) job starts;
each job's training run nests under it through the `mlflow.parentRunId` tag (NCN_PARENT_RUN_ID).
`iso_d_ff` sizes the iso-parameter baseline `ncn=none_iso` (NCN paper §7). See docs/sweeps.md.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
PARENT_ENV = "NCN_PARENT_RUN_ID"  # read by conf/tracking/mlflow.yaml: tracking.parent_run_id
MLFLOW_TRACKER = "ncn.tracking.MLflowTracker"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def conf_dir() -> str:
    """Absolute path of this repository's conf/ (resolver `${conf_dir:}`): sweeps/*.yaml put it on
    Hydra's search path, so `-cd <repo>/sweeps` works from any launch directory."""
    return str(Path(__file__).resolve().parents[1] / "conf")


def iso_d_ff(*targets: str, _root_: DictConfig) -> int:
    """FFN width that gives the plain Transformer the parameter count of the NCN with `targets`.

    Resolver `${iso_d_ff:temperature,gain,activation}` (conf/ncn/none_iso.yaml). Widening d_ff
    by one adds n_layer·(2·d_model + 1) parameters (fc weight row + bias, proj weight column),
    so d_ff = 4·d_model + round(controller params / (n_layer·(2·d_model + 1))); the residual
    mismatch is at most n_layer·(d_model + 1) parameters (< 0.01 % for the presets). The
    controller is built on the meta device (no memory, no init cost) with the run's own
    `ncn.*` settings and `targets`.
    """
    import torch

    from ncn import ModelConfig, ModulatedGPT, ModulationConfig

    m, settings = _root_.model, OmegaConf.to_container(_root_.ncn, resolve=True)
    settings.pop("_target_", None)
    settings["targets"] = list(targets)
    shape = ModelConfig(vocab_size=1, block_size=1, d_model=int(m.d_model), n_layer=int(m.n_layer), n_head=int(m.n_head))
    with torch.device("meta"):
        controller = ModulatedGPT(shape, ModulationConfig(**settings)).num_parameters().controller
    return 4 * shape.d_model + round(controller / (shape.n_layer * (2 * shape.d_model + 1)))


def sweep_grid(params: dict[str, Any], arguments: list[str]) -> "OrderedDict[str, list[str] | str]":
    """Effective grid of a multirun: `hydra.sweeper.params` overridden key by key by the command
    line, as Hydra's BasicSweeper merges them. Value: the list of swept values in launch order,
    or the raw string for a non-enumerable sweep (Optuna's interval/tag)."""
    parser = OverridesParser.create()
    grid: OrderedDict[str, list[str] | str] = OrderedDict()
    for override in parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(arguments)):
        key = override.get_key_element()
        if override.is_sweep_override() and override.is_discrete_sweep():
            grid[key] = list(override.sweep_string_iterator())
        elif override.is_sweep_override():
            grid[key] = override.input_line.split("=", 1)[1]
        else:
            grid[key] = [override.get_value_element_as_str()]
    return grid


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:500]


class SweepCallback(Callback):
    """Hydra callback that groups a multirun's MLflow runs and makes job failures visible.

    on_multirun_start (launching process): create store + experiment (under a file lock, see
        `MLflowTracker.check`) and the parent run, tagged `ncn.sweep` (sweep name),
        `ncn.sweep.grid` (JSON grid), `ncn.sweep.overrides`, `ncn.sweep.dir`.
    on_job_start (job process, any launcher): export NCN_PARENT_RUN_ID so the job's tracker
        nests its run (`mlflow.parentRunId`) under the parent.
    on_job_end (job process): tag the child `ncn.sweep.job` (its overrides); a failed job tags
        the parent `ncn.sweep.failed.<job>` and, if it died before creating its run, gets a
        FAILED placeholder child so no job goes missing.
    on_multirun_end, or at process exit when the sweeper re-raised a job's exception (Hydra
        1.3.8's BasicSweeper runs the whole batch, then raises the first failure and skips
        on_multirun_end): the parent ends FINISHED only if every job's run FINISHED; else
        FAILED (KILLED after Ctrl-C). Runs left RUNNING by a dead worker are marked FAILED.
        A failure that the sweeper tolerated (Optuna's max_failure_rate) exits with status 1.

    The instance is pickled to joblib/submitit workers: it holds only strings.
    """

    def __init__(self) -> None:
        self.uri: str | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.sweep_name = ""
        self.expected_jobs: int | None = None
        self.swept: list[str] = []  # keys with more than one value: a job's label
        self._finished = True

    def _client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "tracking._target_") != MLFLOW_TRACKER:
            return  # tracking=none: nothing to group
        from ncn.runtime import build, git_commit

        tracker = build(config.tracking)  # tracking.parent_run_id resolves to null here: a top-level run
        tracker.check()  # creates the sqlite store and the experiment once, before any job
        self.uri, self.experiment_id = tracker.uri, tracker.experiment_id
        name = str(kwargs.get("config_name") or config.hydra.job.config_name)
        self.sweep_name = "multirun" if name == "config" else name
        sweeper = config.hydra.sweeper
        params = OmegaConf.to_container(sweeper.params, resolve=True) if OmegaConf.select(sweeper, "params") else {}
        grid = sweep_grid(params, list(config.hydra.overrides.task))
        self.swept = [k for k, v in grid.items() if not isinstance(v, list) or len(v) > 1]
        if sweeper._target_ == BASIC_SWEEPER and all(isinstance(v, list) for v in grid.values()):
            self.expected_jobs = math.prod(len(v) for v in grid.values())
        tags = {
            "ncn.sweep": self.sweep_name,
            "ncn.sweep.grid": json.dumps({k: grid[k] for k in self.swept}),
            "ncn.sweep.overrides": " ".join(config.hydra.overrides.task),
            "ncn.sweep.dir": os.path.abspath(config.hydra.sweep.dir),
            "ncn.sweep.launcher": str(config.hydra.launcher._target_).rsplit(".", 1)[-1],
            "ncn.command": " ".join(sys.argv),
            "mlflow.source.name": "run.py",
        }
        if self.expected_jobs is not None:
            tags["ncn.sweep.jobs_expected"] = str(self.expected_jobs)
        commit = git_commit(os.getcwd())
        if commit:
            tags["mlflow.source.git.commit"] = commit
        self.parent_run_id = tracker.start(self.sweep_name, tags=tags)
        tracker.log_dict({"grid": dict(grid), "overrides": list(config.hydra.overrides.task)}, "sweep.json")
        os.environ[PARENT_ENV] = self.parent_run_id
        self._finished = False
        atexit.register(self._finish, False)
        log.info("sweep %s: parent MLflow run %s in %s", self.sweep_name, self.parent_run_id, self.uri)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is not None:
            os.environ[PARENT_ENV] = self.parent_run_id  # workers may predate on_multirun_start

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.parent_run_id is None:
            return
        from mlflow.entities import RunStatus

        client = self._client()
        job = config.hydra.job
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        overrides = " ".join(f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed
                             if o.get_key_element() in self.swept)
        run_dir = config.hydra.runtime.output_dir
        children = client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.`ncn.run_dir` = '{run_dir}'",
        )
        if job_return.status == JobStatus.FAILED:
            error = _first_line(job_return._return_value)  # .return_value would re-raise it
            client.set_tag(self.parent_run_id, f"ncn.sweep.failed.{job.num}", f"{overrides}: {error}"[:5000])
            if not children:  # died before its training run existed (e.g. a config error)
                run = client.create_run(self.experiment_id, run_name=f"job{job.num}", tags={
                    "mlflow.parentRunId": self.parent_run_id, "ncn.run_dir": run_dir, "ncn.error": error})
                client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
                children = [client.get_run(run.info.run_id)]
        for child in children:
            client.set_tag(child.info.run_id, "ncn.sweep.job", f"{job.num}: {overrides}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is not None and self._finish(True):
            raise SystemExit(1)  # a BaseException: Hydra's callback wrapper only swallows Exception

    def _finish(self, normal: bool) -> bool:
        """Close the parent run; returns True when some job failed or went missing."""
        if self._finished:
            return False
        self._finished = True
        atexit.unregister(self._finish)
        os.environ.pop(PARENT_ENV, None)
        client = self._client()
        children = client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
                                      max_results=50000)
        for child in children:
            if child.info.status in ("RUNNING", "SCHEDULED"):
                client.set_tag(child.info.run_id, "ncn.error", "the job ended without closing its run")
                client.set_terminated(child.info.run_id, "FAILED")
        statuses = [c.info.status if c.info.status not in ("RUNNING", "SCHEDULED") else "FAILED" for c in children]
        failed = [c.info.run_name for c, s in zip(children, statuses) if s != "FINISHED"]
        failed_jobs = [k for k in client.get_run(self.parent_run_id).data.tags if k.startswith("ncn.sweep.failed.")]
        missing = max(0, (self.expected_jobs or 0) - len(children)) if normal else 0
        bad = bool(failed or failed_jobs or missing)
        interrupted = not normal and "KILLED" in statuses and "FAILED" not in statuses and not failed_jobs
        status = "KILLED" if interrupted else "FAILED" if bad or not normal else "FINISHED"
        client.set_tag(self.parent_run_id, "ncn.sweep.jobs", str(len(children)))
        client.set_tag(self.parent_run_id, "ncn.sweep.jobs_finished", str(statuses.count("FINISHED")))
        client.set_tag(self.parent_run_id, "ncn.sweep.jobs_failed", str(len(statuses) - statuses.count("FINISHED")))
        if missing:
            client.set_tag(self.parent_run_id, "ncn.sweep.jobs_missing", str(missing))
        client.set_terminated(self.parent_run_id, status)
        if normal:  # at exit, run.py's `error: ...` line must stay the last line on stderr
            log.info("sweep %s: %d of %d job runs FINISHED%s; parent run %s %s%s", self.sweep_name,
                     statuses.count("FINISHED"), len(children), f", {missing} missing" if missing else "",
                     self.parent_run_id, status, f" (failed: {', '.join(failed)})" if failed else "")
        return bad
