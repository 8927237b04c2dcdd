"""Sweeps: one MLflow parent run per Hydra multirun, a nested child run per job, honest failure.

`SweepCallback` (enabled in conf/config.yaml `hydra.callbacks`) creates the sqlite store, the
experiment and a parent run once in the launching process, before any (parallel) job starts;
each job's training run nests under it through the `mlflow.parentRunId` tag (NCN_PARENT_RUN_ID).
Every store access goes through `ncn.tracking`. See docs/sweeps.md.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shlex
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ncn.config import TrackingConfig, python_command, shell_override
from ncn.errors import exit_code
from ncn.tracking import MLflowTracker, git_commit, open_tracker

log = logging.getLogger(__name__)
PARENT_ENV = "NCN_PARENT_RUN_ID"  # read by conf/tracking/mlflow.yaml: tracking.parent_run_id
ERROR_KINDS = {2: "usage error", 3: "run failed", 130: "interrupted"}


def sweep_grid(params: dict[str, Any], arguments: list[str]) -> OrderedDict[str, list[str] | str]:
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


def describe_failure(exc: BaseException) -> str:
    """ "<kind> (exit <code>), <Type>: <first line>" of a job's exception; kinds as in docs/errors.md."""
    code = exit_code(exc)
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{ERROR_KINDS.get(code, 'crash')} (exit {code}), {type(exc).__name__}: {first}"[:500]


def _job_error(job_return: JobReturn) -> BaseException | None:
    """The exception a failed job raised (`JobReturn.return_value` re-raises it), or None."""
    if job_return.status != JobStatus.FAILED:
        return None
    try:
        job_return.return_value  # noqa: B018 (the property raises the job's exception)
    except BaseException as exc:  # noqa: BLE001 (any exception a job raised)
        return exc
    return None


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
        self.experiment: str = ""
        self.parent_run_id: str | None = None
        self.sweep_name = ""
        self.expected_jobs: int | None = None
        self.swept: list[str] = []  # keys with more than one value: a job's label
        self._finished = True

    def _tracker(self) -> MLflowTracker:
        tracker = MLflowTracker(self.uri, self.experiment)
        tracker.check()
        return tracker

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))
        if tracking.backend != "mlflow":
            return  # tracking=none: nothing to group
        tracker = open_tracker(tracking, Path.cwd())  # tracking.parent_run_id resolves to null here: a top-level run
        tracker.check()  # creates the sqlite store and the experiment once, before any job
        self.uri, self.experiment = tracker.uri, tracking.experiment
        name = str(kwargs.get("config_name") or config.hydra.job.config_name)
        self.sweep_name = "multirun" if name == "config" else name
        sweeper = config.hydra.sweeper
        params = OmegaConf.to_container(sweeper.params, resolve=True) if OmegaConf.select(sweeper, "params") else {}
        grid = sweep_grid(params, list(config.hydra.overrides.task))
        self.swept = [k for k, v in grid.items() if not isinstance(v, list) or len(v) > 1]
        # Optuna's sweeper says how many trials it runs; a grid sweeper runs every combination
        if OmegaConf.select(sweeper, "n_trials") is not None:
            self.expected_jobs = int(sweeper.n_trials)
        elif all(isinstance(v, list) for v in grid.values()):
            self.expected_jobs = math.prod(len(v) for v in grid.values())
        tags = {
            "ncn.sweep": self.sweep_name,
            "ncn.sweep.grid": json.dumps({k: grid[k] for k in self.swept}),
            "ncn.sweep.overrides": " ".join(config.hydra.overrides.task),
            "ncn.sweep.dir": os.path.abspath(config.hydra.sweep.dir),
            "ncn.sweep.launcher": str(config.hydra.launcher._target_).rsplit(".", 1)[-1],
            "ncn.command": " ".join(shlex.quote(a) for a in sys.argv),
            "mlflow.source.name": "run.py",
        }
        if self.expected_jobs is not None:
            tags["ncn.sweep.jobs_expected"] = str(self.expected_jobs)
        if commit := git_commit(Path.cwd()):
            tags["mlflow.source.git.commit"] = commit
        self.parent_run_id = tracker.start(self.sweep_name, tags=tags)
        tracker.log_dict({"grid": dict(grid), "overrides": list(config.hydra.overrides.task)}, "sweep.json")
        os.environ[PARENT_ENV] = self.parent_run_id
        self._finished = False
        atexit.register(self._finish, False)
        log.info(
            "sweep %s: parent MLflow run %s in %s (report: %s)",
            self.sweep_name,
            self.parent_run_id,
            self.uri,
            self.report_command(),
        )

    def report_command(self) -> str:
        """The command (to paste into bash in any folder) that reports this sweep: this run.py,
        `task=report`, the parent run and the store, quoted for bash and Hydra."""
        return python_command(
            os.path.abspath(sys.argv[0]),
            "task=report",
            shell_override("sweep_run", self.parent_run_id),
            shell_override("tracking.uri", self.uri),
        )

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is not None:
            os.environ[PARENT_ENV] = self.parent_run_id  # workers may predate on_multirun_start

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.parent_run_id is None:
            return
        tracker = self._tracker()
        job = config.hydra.job
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        overrides = " ".join(
            f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed if o.get_key_element() in self.swept
        )
        run_dir = config.hydra.runtime.output_dir
        children = [c.run_id for c in tracker.child_runs(self.parent_run_id) if c.tags.get("ncn.run_dir") == run_dir]
        error = _job_error(job_return)
        if error is not None:
            text = describe_failure(error)
            tracker.set_tags({f"ncn.sweep.failed.{job.num}": f"{overrides}: {text}"}, run_id=self.parent_run_id)
            if not children:  # died before its training run existed (e.g. a config error)
                children = [
                    tracker.create_run(
                        f"job{job.num}",
                        status="FAILED",
                        tags={"mlflow.parentRunId": self.parent_run_id, "ncn.run_dir": run_dir, "ncn.error": text},
                    )
                ]
            for child in children:
                tracker.set_tags({"ncn.error": text}, run_id=child)
        for child in children:
            tracker.set_tags({"ncn.sweep.job": f"{job.num}: {overrides}"}, run_id=child)

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
        tracker = self._tracker()
        children = tracker.child_runs(self.parent_run_id)
        for child in children:
            if child.status in ("RUNNING", "SCHEDULED"):
                tracker.set_tags({"ncn.error": "the job ended without closing its run"}, run_id=child.run_id)
                tracker.terminate(child.run_id, "FAILED")
        statuses = [c.status if c.status not in ("RUNNING", "SCHEDULED") else "FAILED" for c in children]
        failed = [c.name for c, s in zip(children, statuses, strict=True) if s != "FINISHED"]
        parent = tracker.get_run(self.parent_run_id)
        failed_jobs = [k for k in parent.tags if k.startswith("ncn.sweep.failed.")] if parent else []
        missing = max(0, (self.expected_jobs or 0) - len(children)) if normal else 0
        bad = bool(failed or failed_jobs or missing)
        interrupted = not normal and "KILLED" in statuses and "FAILED" not in statuses and not failed_jobs
        status = "KILLED" if interrupted else "FAILED" if bad or not normal else "FINISHED"
        tags = {
            "ncn.sweep.jobs": len(children),
            "ncn.sweep.jobs_finished": statuses.count("FINISHED"),
            "ncn.sweep.jobs_failed": len(statuses) - statuses.count("FINISHED"),
        }
        if missing:
            tags["ncn.sweep.jobs_missing"] = missing
        tracker.set_tags({k: str(v) for k, v in tags.items()}, run_id=self.parent_run_id)
        tracker.terminate(self.parent_run_id, status)
        if normal:  # at exit, run.py's `error: ...` line must stay the last line on stderr
            log.info(
                "sweep %s: %d of %d job runs FINISHED%s; parent run %s %s%s (report: %s)",
                self.sweep_name,
                statuses.count("FINISHED"),
                len(children),
                f", {missing} missing" if missing else "",
                self.parent_run_id,
                status,
                f" (failed: {', '.join(failed)})" if failed else "",
                self.report_command(),
            )
        return bad
