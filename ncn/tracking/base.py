"""The tracker interface: one run's params, metrics and artifacts, and the store queries sweeps and reports ask.

`Tracker` appends metrics to a local `metrics.jsonl` and is a no-op for every store operation;
`NullTracker` (`tracking=none`) is just that; `ncn.tracking.mlflow_tracker.MLflowTracker` records
into MLflow. `RunRecord` is a run as a store holds it, `RunSource` where a training run comes
from; `flatten` turns a nested config into MLflow params, `default_run_name` names a run (with the
overrides `name_overrides` picks).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ncn.errors import NCNConfigError

MAX_PARAM_VALUE = 6000  # MLflow silently truncates longer values
MAX_PARAM_VALUE = 6000  # MLflow silently truncates longer values


# Group options whose default is not worth repeating in every run name.
NAME_DEFAULTS = {"data": "shakespeare", "optim": "adamw"}


# Keys whose command-line value goes into a run's name: what the model is (its shape, its controller,
# its tokenizer, its control input). A sweep's varied keys go in as well, whatever they are.
NAME_KEY_PREFIXES = ("model.", "ncn.", "data.tokenizer", "control.")
NAME_MAX_PARTS, NAME_MAX_CHARS = 3, 48  # more named overrides than this: a short hash of them instead


def name_overrides(config: Mapping[str, Any], overridden: Iterable[str], swept: Iterable[str] = ()) -> dict[str, str]:
    """{key: value} of the overrides a run's name shows: the keys of `overridden` (as typed on the command
    line) that start with `NAME_KEY_PREFIXES`, and every key of `swept` (a sweep's varied keys), with their
    values in the resolved `config`; config groups (`model=tiny`, in the name already) and `seed` left out."""
    flat = flatten(config)
    swept = set(swept)
    keys = {k for k in overridden if k.startswith(NAME_KEY_PREFIXES)} | swept
    return {k: flat[k] for k in sorted(keys) if k in flat and k != "seed"}


def _name_part(key: str, value: str) -> str:
    """`<leaf key>_<value>` with the value reduced to characters a shell and Hydra take unquoted, e.g.
    model.d_model 96 -> d_model_96, ncn.targets [temperature, gain] -> targets_temperature+gain."""
    text = re.sub(r"[^\w.+-]", "", value.replace(", ", "+"))
    return f"{key.rsplit('.', 1)[-1]}_{text}"


def default_run_name(choices: Mapping[str, str], seed: int, overrides: Mapping[str, str] | None = None) -> str:
    """`<model>-<ncn>[-<control>][-<data>][-<optim>][-<overrides>]-s<seed>`: the control option only when not
    none, data/optim only when not the default option;
    `overrides` (`name_overrides`) as `<leaf key>_<value>` parts, e.g. small-full-d_model_96-n_layer_2-s0, or
    as `c<6 hex digits>` (sha1 of the sorted overrides) when more than `NAME_MAX_PARTS` or longer than
    `NAME_MAX_CHARS` characters, so runs with different overrides get different names."""
    parts = [choices.get("model", "model"), choices.get("ncn", "ncn")]
    if choices.get("control", "none") != "none":
        parts.append(choices["control"])
    parts += [choices[g] for g, default in NAME_DEFAULTS.items() if choices.get(g, default) != default]
    named = [_name_part(k, v) for k, v in sorted((overrides or {}).items())]
    if len(named) > NAME_MAX_PARTS or len("-".join(named)) > NAME_MAX_CHARS:
        text = json.dumps(sorted((overrides or {}).items()))
        named = [f"c{hashlib.sha1(text.encode('utf-8')).hexdigest()[:6]}"]
    return "-".join([*parts, *named, f"s{seed}"])


def git_commit(directory: Path) -> str | None:
    """HEAD commit of the git checkout containing `directory`, or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Leaves of a nested dict as {"a.b.c": "value"}; lists become "[x, y]", None "null"."""
    if isinstance(node, Mapping):
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: _format(node)}


def _format(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class RunRecord:
    """A run as the store holds it: ids, name, status (RUNNING, FINISHED, FAILED, KILLED), start
    time (ms since the epoch), and its params, tags and latest metric values."""

    run_id: str
    name: str
    status: str
    experiment_id: str
    start_time: int
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSource:
    """Where a training run comes from: the command line as typed, its run folder, the folder it
    was launched in (for the git commit) and the Hydra group choices (`model`: `small`, ...)."""

    command: str
    run_dir: Path
    launch_dir: Path
    choices: Mapping[str, str] = field(default_factory=dict)


class Tracker:
    """Base tracker: appends metrics to `<run_dir>/metrics.jsonl` (nothing when run_dir is None).

    Every store operation is a no-op here, and every query raises: `MLflowTracker` overrides them.
    `enabled` tells whether runs are recorded in a store.
    """

    enabled = False
    run_id: str | None = None
    uri: str | None = None

    def __init__(self, run_dir: Path | None = None) -> None:
        self.metrics_file = None if run_dir is None else Path(run_dir) / "metrics.jsonl"

    def check(self, resume_run_id: str | None = None) -> None:
        """Fail fast (NCNConfigError) when the store, the experiment or the run `resume_run_id` (which
        a resume continues) is unusable; before any data work."""

    def start(
        self,
        run_name: str,
        run_id: str | None = None,
        resume_step: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str | None:
        """Open a new run, or continue `run_id` (resume at `resume_step`); returns the run id."""
        return None

    def log_params(self, params: Mapping[str, str]) -> None:
        """Record params (flattened, string values); see `flatten`."""

    def log_metrics(self, metrics: Mapping[str, float], step: int, run_id: str | None = None) -> None:
        """Record metrics at optimizer step `step`; non-finite values only go to metrics.jsonl.

        run_id: record them on that run (whose status stays as it is) instead of this one.
        """
        if self.metrics_file is not None and run_id is None:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def log_artifact(self, path: Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
        """Copy a file or folder into the artifacts of this run (or of `run_id`, whose status stays as it is)."""

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Store `data` as a JSON/YAML artifact (by the file's extension)."""

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """Store a matplotlib figure as an image artifact."""

    def set_tags(self, tags: Mapping[str, str], run_id: str | None = None) -> None:
        """Set (mutable) tags on this run, or on run `run_id`."""

    def end(self, status: str) -> None:
        """Close this run with status "FINISHED", "FAILED" or "KILLED"."""

    def start_training_run(
        self,
        run_name: str,
        config: Mapping[str, Any],
        sizes: Mapping[str, Any],
        source: RunSource,
        run_id: str | None = None,
        resume_step: int | None = None,
    ) -> str | None:
        """Open (or continue, at `resume_step`) a training run and record what it is.

        Params: the flattened `config` plus `sizes` (parameter and token counts, as strings).
        Tags: the command, the run folder, the Hydra choices and the git commit of `source`.
        Artifacts: `config.yaml` and the run folder's `.hydra/`, under `resume/step_<N>/` on a
        resume (MLflow params are immutable; the changed values live there). Returns the run id.
        """
        tags = {
            "mlflow.source.name": "run.py",
            "ncn.command": source.command,
            "ncn.run_dir": str(source.run_dir),
            **{f"hydra.choices.{k}": v for k, v in source.choices.items()},
        }
        if commit := git_commit(source.launch_dir):
            tags["mlflow.source.git.commit"] = commit
        run_id = self.start(run_name, run_id=run_id, resume_step=resume_step, tags=tags)
        self.log_params({**flatten(config), **{k: str(v) for k, v in sizes.items()}})
        prefix = f"resume/step_{resume_step:06d}/" if resume_step is not None else ""
        self.log_dict(config, f"{prefix}config.yaml")
        if (source.run_dir / ".hydra").is_dir():
            self.log_artifact(source.run_dir / ".hydra", f"{prefix}hydra")
        return run_id

    def _needs_store(self, what: str) -> NCNConfigError:
        return NCNConfigError(
            f"{what} reads runs from MLflow but tracking=none: use tracking=mlflow (and tracking.uri=<the store>)"
        )

    def browse_hint(self) -> str:
        """The `mlflow ui` command that browses this store, and the address of the runs table."""
        raise self._needs_store("browsing runs")

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with id `run_id`, or None when the store has no such run."""
        raise self._needs_store("looking up a run")

    def child_runs(self, parent_id: str) -> list[RunRecord]:
        """Every run tagged `mlflow.parentRunId = parent_id` (a sweep's jobs), oldest first."""
        raise self._needs_store("a sweep")

    def find_sweep(self, spec: str | None) -> RunRecord:
        """A sweep's parent run: `spec` as a run id, else the newest sweep of experiment `spec`
        (None: of this tracker's experiment), else the newest sweep named `spec`."""
        raise self._needs_store("task=report")

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of metric `key` of run `run_id`, in step order."""
        raise self._needs_store("a metric history")

    def create_run(self, run_name: str, tags: Mapping[str, str], status: str | None = None) -> str:
        """A new run in this tracker's experiment (closed with `status` if given); returns its id."""
        raise self._needs_store("a sweep")

    def terminate(self, run_id: str, status: str) -> None:
        """Set the end status of run `run_id`."""
        raise self._needs_store("a sweep")

    # --- sweep bookkeeping: resumed sweeps, one run per job (ncn/tasks/sweep.py, ncn/tasks/report.py) ---

    def sweeps(self) -> list[RunRecord]:
        """The sweeps' parent runs (tagged `ncn.sweep`) of this tracker's experiment, oldest first."""
        raise self._needs_store("a sweep")

    def delete_tags(self, keys: Iterable[str], run_id: str) -> None:
        """Remove the tags `keys` of run `run_id` (absent ones are ignored)."""
        raise self._needs_store("a sweep")

    def sweep_jobs(self, parent_id: str) -> list[RunRecord]:
        """One run per job of the sweep `parent_id`, in the order the jobs first ran.

        A job is its run dir (tag `ncn.run_dir`; a child without one is a job of its own). A job
        run again in the same folder (a resumed sweep, a requeued SLURM job) may own several
        children: a run killed before its first checkpoint, a FAILED placeholder of a job that
        died before its run existed, then the run of the new attempt. Its current state is its
        newest attempt (latest start time); earlier ones are history, never counted twice.
        """
        jobs: dict[str, RunRecord] = {}
        for run in self.child_runs(parent_id):  # oldest first: a later attempt replaces an earlier one in place
            jobs[run.tags.get("ncn.run_dir") or run.run_id] = run
        return list(jobs.values())


class NullTracker(Tracker):
    """No tracking server (`tracking=none`): only the local metrics.jsonl."""
