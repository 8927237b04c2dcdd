"""Sweeps: one MLflow parent run per Hydra multirun, a nested child run per job, honest failure, resume.

`SweepCallback` (enabled in conf/config.yaml `hydra.callbacks`) creates the sqlite store, the
experiment and a parent run once in the launching process, before any (parallel) job starts;
each job's training run nests under it through the `mlflow.parentRunId` tag (NCN_PARENT_RUN_ID).
`sweep_resume=<parent run id | sweep dir>` continues an earlier sweep in its own folder and
parent run. Every store access goes through `ncn.tracking`. See docs/sweeps.md.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ncn.config import SWEPT_ENV, TrackingConfig, python_command, shell_override
from ncn.errors import USAGE_EXIT, NCNConfigError, exit_code
from ncn.tracking import MLflowTracker, RunRecord, Tracker, git_commit, open_tracker
from ncn.training.runtime import distributed_env

log = logging.getLogger(__name__)
PARENT_ENV = "NCN_PARENT_RUN_ID"  # read by conf/tracking/mlflow.yaml: tracking.parent_run_id
ERROR_KINDS = {2: "usage error", 3: "run failed", 130: "interrupted"}
JOBS_FILE = "ncn_jobs.json"  # a resumed sweep's {job: folder} table, when its jobs moved (plan_folders)


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


def job_error(job_return: JobReturn) -> BaseException | None:
    """The exception a failed job raised, or None. Read from the job's result directly, as Hydra's own
    LogJobReturnCallback does: the `return_value` property writes "Error executing job with overrides:
    [...]" to stderr on every access before re-raising, so each reader added that line once more."""
    if job_return.status != JobStatus.FAILED:
        return None
    error = job_return._return_value
    return error if isinstance(error, BaseException) else None


def hydra_quoted(value: str) -> str:
    """`value` as a quoted value of Hydra's override grammar, read back unchanged: single quotes,
    with a backslash before each quote and doubled backslashes where they precede a quote or the end."""
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return f"'{escaped}'"


def _abort(exc: Exception) -> NoReturn:
    """End the launch with run.py's `error:` line and exit status 2: an exception raised in a callback
    would only be warned about by Hydra, and the sweep would run on without its parent run or folder.
    An exception that is not a user mistake (a store that fails, a bug) keeps its traceback in the log."""
    if isinstance(exc, NCNConfigError):
        message = str(exc)
    else:
        log.error("the sweep's setup failed", exc_info=exc)
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        message = (
            f"the sweep could not start ({type(exc).__name__}: {first}): no job ran; fix the cause above and "
            "rerun the same command"
        )
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_EXIT)


def resume_target(tracker: Tracker | None, spec: str, launch_dir: Path) -> tuple[RunRecord | None, Path]:
    """(parent run, sweep dir) of the sweep `sweep_resume=<spec>` continues.

    spec: the parent run id (printed at the sweep's start and end), or the sweep's folder
    (absolute or relative to the launch dir; its parent run is the sweep of this tracker's
    experiment that ran there, the newest if several). tracker None (tracking=none): a folder
    only, no parent run.

    Raises:
        NCNConfigError: no such run or folder, a run that is not a sweep's parent.
    """
    if tracker is not None and (run := tracker.get_run(spec)) is not None:
        if "ncn.sweep" not in run.tags or "ncn.sweep.dir" not in run.tags:
            raise NCNConfigError(
                f"sweep_resume={spec} is MLflow run {run.name!r}, not a sweep's parent run: pass the parent run id "
                "printed at the sweep's start and end, or the sweep's folder (multirun/...)"
            )
        return run, Path(run.tags["ncn.sweep.dir"])
    folder = Path(spec).expanduser()
    folder = folder if folder.is_absolute() else launch_dir / folder
    if not folder.is_dir():
        example = "sweep_resume=multirun/ablation/<date>/<time>"
        if tracker is None:
            raise NCNConfigError(
                f"sweep_resume={spec} is not a folder (with tracking=none a sweep is resumed by its folder): pass "
                f"the sweep's folder, e.g. {example}"
            )
        raise NCNConfigError(
            f"sweep_resume={spec} is neither an MLflow run of this store nor a folder: pass the parent run id printed "
            f"at the sweep's start and end (with tracking.uri=<its store>), or the sweep's folder, e.g. {example}"
        )
    if tracker is None:
        return None, folder.resolve()
    ran_there = [r for r in tracker.sweeps() if Path(r.tags.get("ncn.sweep.dir", "")).resolve() == folder.resolve()]
    if not ran_there:
        raise NCNConfigError(
            f"sweep_resume={spec}: no sweep of experiment {tracker.experiment} in {tracker.uri} ran in {folder}: "
            "pass the parent run id printed at the sweep's start (and tracking.uri / tracking.experiment of its "
            "store)"
        )
    parent = max(ran_there, key=lambda r: r.start_time)
    return parent, Path(parent.tags["ncn.sweep.dir"])


class SweepCallback(Callback):
    """Hydra callback that groups a multirun's MLflow runs, makes job failures visible, resumes sweeps.

    on_multirun_start (launching process): create store + experiment (under a file lock, see
        `MLflowTracker.check`) and the parent run, tagged `ncn.sweep` (sweep name),
        `ncn.sweep.grid` (JSON grid), `ncn.sweep.overrides`, `ncn.sweep.dir`. With
        `sweep_resume=<parent run id | sweep dir>`: reuse that sweep's parent run (RUNNING
        again, tagged `ncn.sweep.resumes` and `ncn.sweep.resume.<n>` = the command) and its
        folder (`hydra.sweep.dir`), after checking that the sweep name and swept keys are the
        same (their values may differ: each job keeps its folder, `plan_folders`); each job then
        continues its earlier attempt (`ncn.training.job_resume`). Any exception here ends the
        launch before a job runs (one `error:` line, exit 2).
    on_job_start (job process, any launcher): export NCN_PARENT_RUN_ID so the job's tracker
        nests its run (`mlflow.parentRunId`) under the parent, and NCN_SWEPT_KEYS (the keys the
        sweep varies) so the job's run name shows them (`RunContext.swept`). A non-zero rank of a
        multi-task SLURM job (DDP) stops writing the job's log file: rank 0 logs.
    on_job_end (job process, rank 0): tag the job's run `ncn.sweep.job` (its overrides). A job
        run again in its folder may own several runs; the newest is its current one (see
        `Tracker.sweep_jobs`), earlier ones get `ncn.superseded_by`. A failed job
        tags the parent `ncn.sweep.failed.<job>` and, if this attempt created no run (it died
        before), gets a FAILED placeholder run so no job goes missing; a job that succeeds
        clears the tag an earlier attempt left.
    on_multirun_end, or at process exit when the sweeper re-raised a job's exception (Hydra
        1.3.8's BasicSweeper runs the whole batch, then raises the first failure and skips
        on_multirun_end): the parent ends FINISHED only if every job's current run FINISHED;
        else FAILED (KILLED after Ctrl-C). Runs left RUNNING by a dead worker are marked
        FAILED. A failure that the sweeper tolerated exits with status 1. A sweep with failed
        jobs ends stderr with `summary` (the Optuna sweeper, which counts failed trials in its
        own last line, aside).

    The instance is pickled to joblib/submitit workers: it holds only strings.
    """

    def __init__(self) -> None:
        self.uri: str | None = None
        self.experiment: str = ""
        self.parent_run_id: str | None = None
        self.sweep_name = ""
        self.expected_jobs: int | None = None
        self.swept: list[str] = []  # keys with more than one value: a job's label
        self.sweeper_summarizes = False  # the Optuna sweeper ends a study with failed trials in its own line
        self._finished = True

    def _tracker(self) -> MLflowTracker:
        tracker = MLflowTracker(self.uri, self.experiment)
        tracker.check()
        return tracker

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._start(config, str(kwargs.get("config_name") or config.hydra.job.config_name))
        except Exception as exc:  # noqa: BLE001 (any failure: stop before a job runs, see _abort)
            if self.parent_run_id is not None:  # created or reopened before the failure
                self._finished = True
                atexit.unregister(self._finish)
                with contextlib.suppress(Exception):
                    self._tracker().terminate(self.parent_run_id, "FAILED")
            _abort(exc)

    def _start(self, config: DictConfig, config_name: str) -> None:
        """on_multirun_start: the store, the parent run (new or resumed) and the sweep folder.

        Raises:
            NCNConfigError: the SLURM launcher where SLURM is not installed; see `_resume`.
        """
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
        if launcher.endswith(".SlurmLauncher") and shutil.which("srun") is None:  # submitit's own check, earlier
            raise NCNConfigError(
                "hydra/launcher=slurm submits each job to SLURM, but SLURM was not found (no srun on PATH): launch "
                "from a SLURM login node, or run the sweep on this machine with hydra/launcher=basic (one job after "
                "another) or hydra/launcher=joblib"
            )
        sweeper = config.hydra.sweeper
        params = OmegaConf.to_container(sweeper.params, resolve=True) if OmegaConf.select(sweeper, "params") else {}
        grid = sweep_grid(params, list(config.hydra.overrides.task))
        self.swept = [k for k, v in grid.items() if not isinstance(v, list) or len(v) > 1]
        tracking = TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))
        resume = OmegaConf.select(config, "sweep_resume")
        if tracking.backend != "mlflow":  # tracking=none: nothing to group; a resume only reuses the folder
            if resume:
                _, folder = resume_target(None, str(resume), Path.cwd())
                _place_jobs(config, folder, grid, self.swept)
            return
        tracker = open_tracker(tracking, Path.cwd())  # tracking.parent_run_id resolves to null here: a top-level run
        tracker.check()  # creates the sqlite store and the experiment once, before any job
        self.uri, self.experiment = tracker.uri, tracking.experiment
        self.sweep_name = "multirun" if config_name == "config" else config_name
        # Optuna's sweeper says how many trials it runs; a grid sweeper runs every combination
        if OmegaConf.select(sweeper, "n_trials") is not None:
            self.expected_jobs = int(sweeper.n_trials)
            self.sweeper_summarizes = True
        elif all(isinstance(v, list) for v in grid.values()):
            self.expected_jobs = math.prod(len(v) for v in grid.values())
        swept_grid = json.dumps({k: grid[k] for k in self.swept})
        if resume:
            self.parent_run_id = self._resume(tracker, config, str(resume), grid)
        else:
            tags = {
                "ncn.sweep": self.sweep_name,
                "ncn.sweep.grid": swept_grid,
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
            "sweep %s: parent MLflow run %s in %s, folder %s (report: %s; continue an interrupted sweep with "
            "its command and sweep_resume=%s)",
            self.sweep_name,
            self.parent_run_id,
            self.uri,
            config.hydra.sweep.dir,
            self.report_command(),
            self.parent_run_id,
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

    def _resume(self, tracker: MLflowTracker, config: DictConfig, spec: str, grid: Mapping[str, Any]) -> str:
        """Reopen the parent run of the sweep `spec` names and move this launch into its folder; returns its id.

        The grid may differ from the sweep's in its values (added, dropped, reordered: `_place_jobs`)
        and may vary a key the sweep held at one value, but must sweep every key the sweep swept; the
        parent's `ncn.sweep.grid` becomes the union of both.

        Raises:
            NCNConfigError: see `resume_target`; a parent of another experiment or sweep, or of a
                grid with other swept keys.
        """
        parent, folder = resume_target(tracker, spec, Path.cwd())
        assert parent is not None
        tracker.check_sweep_parent(parent.run_id, spec)
        if parent.experiment_id != tracker.experiment_id:
            raise NCNConfigError(
                f"sweep_resume={spec} is a sweep of another experiment (id {parent.experiment_id}) than "
                f"tracking.experiment={self.experiment}: set tracking.experiment to the sweep's experiment"
            )
        theirs: dict[str, Any] = json.loads(parent.tags.get("ncn.sweep.grid", "{}"))
        ours = {k: grid[k] for k in grid if k in theirs or k in self.swept}  # a key cut to one value is still swept
        # the sweep's keys must all be swept here (a key it held at one value may vary now)
        values_only = set(theirs) <= set(ours) and all(
            ours[k] == theirs[k] or (isinstance(ours[k], list) and isinstance(theirs[k], list)) for k in theirs
        )
        if parent.tags["ncn.sweep"] != self.sweep_name or not values_only:
            raise NCNConfigError(
                f"sweep_resume={spec} is sweep {parent.tags['ncn.sweep']} with grid {json.dumps(theirs)}, this launch "
                f"is {self.sweep_name} with grid {json.dumps(ours)}: resume with the sweep's own -cn and its swept "
                "keys (their values may grow, shrink or be reordered)"
            )
        count = int(parent.tags.get("ncn.sweep.resumes", "0")) + 1
        self.swept = list(ours)
        union = {
            k: theirs[k] + [v for v in ours[k] if v not in theirs[k]]
            if k in theirs and isinstance(ours[k], list)
            else ours[k]
            for k in ours
        }
        tags = {
            "ncn.sweep.resumes": str(count),
            f"ncn.sweep.resume.{count}": " ".join(shlex.quote(a) for a in sys.argv),
            "ncn.sweep.grid": json.dumps(union),
        }
        if self.expected_jobs is not None:
            tags["ncn.sweep.jobs_expected"] = str(self.expected_jobs)
        run_id = self.parent_run_id = tracker.start(parent.name, run_id=parent.run_id, tags=tags)  # RUNNING again
        tracker.log_dict({"overrides": list(config.hydra.overrides.task)}, f"resume/{count}/sweep.json")
        _place_jobs(config, folder, grid, self.swept)
        log.info("sweep %s: resuming parent run %s (resume %d) in %s", self.sweep_name, run_id, count, folder)
        return run_id

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEPT_ENV] = ",".join(self.swept)  # the job's run name shows the keys the sweep varies
        if self.parent_run_id is not None:
            os.environ[PARENT_ENV] = self.parent_run_id  # workers may predate on_multirun_start
        if distributed_env().rank > 0:  # one task of a multi-task SLURM job: rank 0 writes the job's log
            root = logging.getLogger()
            for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
                root.removeHandler(handler)
                handler.close()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.parent_run_id is None or distributed_env().rank > 0:
            return
        tracker = self._tracker()
        job = config.hydra.job
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        overrides = " ".join(
            f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed if o.get_key_element() in self.swept
        )
        run_dir = config.hydra.runtime.output_dir
        number = job_number(run_dir, int(job.num))
        # runs are found by the parent's id and matched to the job's folder in Python: never a filter of user text
        attempts = [c for c in tracker.child_runs(self.parent_run_id) if c.tags.get("ncn.run_dir") == run_dir]
        error = job_error(job_return)
        if error is not None:
            text = describe_failure(error)
            failure = f"{overrides}: {text}" if overrides else text  # a sweep of one job varies no key
            tracker.set_tags({f"ncn.sweep.failed.{number}": failure}, run_id=self.parent_run_id)
            if not attempts or attempts[-1].status == "FINISHED":  # this attempt died before its run existed
                placeholder = tracker.create_run(
                    f"job{number}",
                    status="FAILED",
                    tags={"mlflow.parentRunId": self.parent_run_id, "ncn.run_dir": run_dir},
                )
                attempts.append(tracker.get_run(placeholder))
            tracker.set_tags({"ncn.error": text}, run_id=attempts[-1].run_id)
        else:
            tracker.delete_tags([f"ncn.sweep.failed.{number}"], run_id=self.parent_run_id)
        if attempts:
            current = attempts[-1].run_id
            tracker.set_tags({"ncn.sweep.job": f"{number}: {overrides}"}, run_id=current)
            for earlier in attempts[:-1]:
                tracker.set_tags({"ncn.superseded_by": current}, run_id=earlier.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is not None and self._finish(True):
            raise SystemExit(1)  # a BaseException: Hydra's callback wrapper only swallows Exception

    def summary(self, failed: int, total: int, details: dict[int, str]) -> str:
        """The last line of a sweep with failed jobs: `<failed> of <total> jobs failed (job <n>: <its
        overrides>: <its error>; ...); parent run <id>; report: <command>`. details: {job number: the
        `ncn.sweep.failed.<job>` tag}; the first three jobs are named, each cut to 200 characters."""
        named = [f"job {job}: {details[job][:200]}" for job in sorted(details)[:3]]
        if len(details) > 3:
            named.append(f"{len(details) - 3} more in the parent's ncn.sweep.failed.* tags")
        what = f" ({'; '.join(named)})" if named else ""
        report = self.report_command()
        return f"{failed} of {total} jobs failed{what}; parent run {self.parent_run_id}; report: {report}"

    def _finish(self, normal: bool) -> bool:
        """Close the parent run; returns True when some job failed or went missing."""
        if self._finished:
            return False
        self._finished = True
        atexit.unregister(self._finish)
        os.environ.pop(PARENT_ENV, None)
        tracker = self._tracker()
        for child in tracker.child_runs(self.parent_run_id):
            if child.status in ("RUNNING", "SCHEDULED"):
                tracker.set_tags({"ncn.error": "the job ended without closing its run"}, run_id=child.run_id)
                tracker.terminate(child.run_id, "FAILED")
        jobs = tracker.sweep_jobs(self.parent_run_id)  # one (the current) run per job
        statuses = [j.status if j.status not in ("RUNNING", "SCHEDULED") else "FAILED" for j in jobs]
        failed = [j.name for j, s in zip(jobs, statuses, strict=True) if s != "FINISHED"]
        parent = tracker.get_run(self.parent_run_id)
        failed_jobs = [k for k in parent.tags if k.startswith("ncn.sweep.failed.")] if parent else []
        missing = max(0, (self.expected_jobs or 0) - len(jobs)) if normal else 0
        bad = bool(failed or failed_jobs or missing)
        interrupted = not normal and "KILLED" in statuses and "FAILED" not in statuses and not failed_jobs
        status = "KILLED" if interrupted else "FAILED" if bad or not normal else "FINISHED"
        tags = {
            "ncn.sweep.jobs": len(jobs),
            "ncn.sweep.jobs_finished": statuses.count("FINISHED"),
            "ncn.sweep.jobs_failed": len(statuses) - statuses.count("FINISHED"),
        }
        if missing:
            tags["ncn.sweep.jobs_missing"] = missing
        else:
            tracker.delete_tags(["ncn.sweep.jobs_missing"], run_id=self.parent_run_id)  # left by an earlier launch
        tracker.set_tags({k: str(v) for k, v in tags.items()}, run_id=self.parent_run_id)
        tracker.terminate(self.parent_run_id, status)
        if bad and not interrupted and not self.sweeper_summarizes:
            failed_count = max(len(failed), len(failed_jobs)) + missing
            details = {int(k.rsplit(".", 1)[1]): parent.tags[k] for k in failed_jobs} if parent else {}
            # at exit this comes after run.py's line for the first failed job: the sweep's account is the last line
            print(f"error: {self.summary(failed_count, self.expected_jobs or len(jobs), details)}", file=sys.stderr)
        if normal:  # at exit, run.py's `error: ...` line must stay the last line on stderr
            log.info(
                "sweep %s: %d of %d job runs FINISHED%s; parent run %s %s%s (report: %s)",
                self.sweep_name,
                statuses.count("FINISHED"),
                len(jobs),
                f", {missing} missing" if missing else "",
                self.parent_run_id,
                status,
                f" (failed: {', '.join(failed)})" if failed else "",
                self.report_command(),
            )
        return bad


def job_number(run_dir: str | Path, num: int) -> int:
    """A sweep job's number: its folder's (the same in every launch of the sweep, `plan_folders`), else
    Hydra's launch number `num` (a `hydra.sweep.subdir` that is not a number)."""
    name = Path(run_dir).name
    return int(name) if name.isdigit() else num


def job_key(overrides: Iterable[str], keys: Iterable[str]) -> str:
    """A job's identity within a sweep: JSON of {key: value as in its override} for the swept `keys`, from
    its override strings (`key=value`, as Hydra's sweeper writes them into `.hydra/overrides.yaml`)."""
    values = {}
    for override in overrides:
        key, _, value = str(override).partition("=")
        values[key.lstrip("+~")] = value
    return json.dumps({k: values.get(k) for k in sorted(keys)})


def grid_jobs(grid: Mapping[str, list[str] | str]) -> list[list[str]]:
    """Each job's overrides (`key=value`) in the order Hydra's basic sweeper launches them: the product of
    the grid's values, keys in grid order (`sweep_grid`)."""
    lists = [[f"{k}={v}" for v in (values if isinstance(values, list) else [values])] for k, values in grid.items()]
    return [list(job) for job in itertools.product(*lists)]


@dataclass(frozen=True)
class FolderPlan:
    """Where each job of a resumed sweep runs. keys: the swept keys that tell its jobs apart (`job_key`);
    folders: {job_key: folder name} for every job of this launch; new: folder names of jobs no earlier
    launch started; left_out: {folder name: job_key} of the sweep's earlier jobs this launch's grid
    drops; in_place: job N runs in folder N (Hydra's own layout)."""

    keys: list[str]
    folders: dict[str, str]
    new: list[str]
    left_out: dict[str, str]
    in_place: bool


def plan_folders(folder: Path, grid: Mapping[str, list[str] | str], swept: list[str]) -> FolderPlan:
    """Match this launch's jobs to the job folders of the sweep in `folder` by their swept values, so a grid
    that adds values, drops some or lists them in another order continues each earlier job in its own
    folder. An earlier job is known by its `.hydra/overrides.yaml` (a folder without one holds no job).
    Jobs are told apart by `swept` and by every key whose value differs among the earlier jobs (a key
    this launch cuts to one value). A new job takes folder N (its launch number) when no job holds it,
    else the next number none has."""
    import yaml

    written = sorted(folder.glob("*/.hydra/overrides.yaml")) if folder.is_dir() else []
    numbers = {int(f.parents[1].name) for f in written if f.parents[1].name.isdigit()}
    earlier = {
        n: yaml.safe_load((folder / str(n) / ".hydra/overrides.yaml").read_text(encoding="utf-8")) or []
        for n in numbers
    }
    values: dict[str, set[str]] = {}
    for overrides in earlier.values():
        for override in overrides:
            key, _, value = str(override).partition("=")
            values.setdefault(key.lstrip("+~"), set()).add(value)
    swept = sorted(set(swept) | {k for k, v in values.items() if len(v) > 1})  # a key cut to one value stays one
    existing: dict[str, str] = {}
    for n in sorted(numbers):
        existing.setdefault(job_key(earlier[n], swept), str(n))
    keys = [job_key(job, swept) for job in grid_jobs(grid)]
    folders = {k: existing[k] for k in keys if k in existing}
    used, free = set(numbers), max(numbers, default=-1) + 1
    new = []
    for n, k in enumerate(keys):
        if k in folders:
            continue
        if n not in used:
            folders[k] = str(n)
        else:
            folders[k], free = str(free), free + 1
        used.add(int(folders[k]))
        new.append(folders[k])
    left_out = {name: k for k, name in existing.items() if k not in folders}
    return FolderPlan(swept, folders, new, left_out, all(folders[k] == str(n) for n, k in enumerate(keys)))


def sweep_subdir(*, _root_: DictConfig) -> str:
    """Resolver `${ncn_sweep_subdir:}` (`hydra.sweep.subdir` of a resumed sweep whose jobs moved): the folder
    `plan_folders` gave this job, read from `<sweep dir>/ncn_jobs.json` by the job's own overrides."""
    hydra = _root_.hydra
    table = json.loads((Path(str(hydra.sweep.dir)) / JOBS_FILE).read_text(encoding="utf-8"))
    return table["folders"][job_key(hydra.overrides.task, table["keys"])]


if not OmegaConf.has_resolver("ncn_sweep_subdir"):  # every process that runs a job imports this callback
    OmegaConf.register_new_resolver("ncn_sweep_subdir", sweep_subdir)


def _place_jobs(config: DictConfig, folder: Path, grid: Mapping[str, list[str] | str], swept: list[str]) -> None:
    """Reuse the sweep's `folder` for this launch and say how its grid relates to the sweep's jobs: jobs
    added (their folders), jobs left out (not run; their folders and runs stay). When a job's folder is
    not its launch number, `hydra.sweep.subdir` becomes `${ncn_sweep_subdir:}` with the table in
    `<folder>/ncn_jobs.json`."""
    plan = plan_folders(folder, grid, swept)
    _reuse_sweep_dir(config, folder)
    table = folder / JOBS_FILE
    if plan.in_place:
        table.unlink(missing_ok=True)
    else:
        table.write_text(json.dumps({"keys": plan.keys, "folders": plan.folders}, indent=2) + "\n", encoding="utf-8")
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append("hydra.sweep.subdir=${ncn_sweep_subdir:}")
    if plan.new and len(plan.new) < len(plan.folders):
        log.info(
            "jobs new to the sweep's folder (added values, or never started): %d, in folders %s",
            len(plan.new),
            ", ".join(plan.new),
        )
    if plan.left_out:
        values = "; ".join(
            f"job {name}: " + " ".join(f"{k}={v}" for k, v in json.loads(key).items())
            for name, key in sorted(plan.left_out.items(), key=lambda item: int(item[0]))
        )
        log.warning(
            "this launch's grid leaves out %d of the sweep's jobs (%s): they are not run; their folders and runs stay",
            len(plan.left_out),
            values,
        )


def _reuse_sweep_dir(config: DictConfig, folder: Path) -> None:
    """Point this launch at `folder`: the sweeper and launcher read `hydra.sweep.dir` of `config`; each
    job's config is composed again from `hydra.overrides.hydra` (Hydra's `load_sweep_config`), so the
    folder goes there too, as an override, and job N runs in `<folder>/N` again. The sweeper writes
    this launch's multirun.yaml there: the earlier one is kept as multirun.before_resume_<n>.yaml."""
    previous = folder / "multirun.yaml"
    if previous.is_file():
        n = 1 + len(list(folder.glob("multirun.before_resume_*.yaml")))
        shutil.copy2(previous, folder / f"multirun.before_resume_{n}.yaml")
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.sweep.dir = str(folder)
        config.hydra.overrides.hydra.append(f"hydra.sweep.dir={hydra_quoted(str(folder))}")
