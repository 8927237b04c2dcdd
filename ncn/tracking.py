"""Experiment tracking behind a small interface: MLflow, or nothing, plus a local metrics.jsonl.

`MLflowTracker` talks to one store through `MlflowClient` only (no fluent global run, so a
crashed job can never leave an "active run" for the next one), creates the experiment with an
absolute artifact location, and continues the same run on resume without re-logging changed
params. `NullTracker` keeps only the local `metrics.jsonl`. Metric keys are namespaced
(`train/loss`, `val/ppl`, `signals/precision/L3/mean`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from ncn.errors import NCNConfigError

log = logging.getLogger(__name__)
MAX_PARAM_VALUE = 6000  # MLflow silently truncates longer values


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


class Tracker:
    """Base tracker: appends metrics to `<run_dir>/metrics.jsonl` (nothing when run_dir is None).

    Every remote operation is a no-op here; `MLflowTracker` overrides them.
    """

    run_id: str | None = None

    def __init__(self, run_dir: Path | None = None) -> None:
        self.metrics_file = None if run_dir is None else Path(run_dir) / "metrics.jsonl"

    def check(self) -> None:
        """Fail fast (NCNConfigError) when the store is unusable; before any training work."""

    def start(self, run_name: str, run_id: str | None = None, resume_step: int | None = None, tags: Mapping[str, str] | None = None) -> str | None:
        """Open a new run, or continue `run_id` (resume at `resume_step`); returns the run id."""
        return None

    def log_params(self, params: Mapping[str, str]) -> None:
        """Record params (flattened, string values); see `flatten`."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metrics at optimizer step `step`; non-finite values only go to metrics.jsonl."""
        if self.metrics_file is not None:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts."""

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Store `data` as a JSON/YAML artifact (by the file's extension)."""

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """Store a matplotlib figure as an image artifact."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (mutable) tags on the run."""

    def end(self, status: str) -> None:
        """Close the run with status "FINISHED", "FAILED" or "KILLED"."""


class NullTracker(Tracker):
    """No tracking server (`tracking=none`): only the local metrics.jsonl."""


def _sqlite_path(uri: str) -> Path | None:
    """File of a sqlite URI (`sqlite:///rel` is relative to the cwd, `sqlite:////abs` absolute)."""
    return Path(uri[len("sqlite:///"):]).absolute() if uri.startswith("sqlite:///") else None


class MLflowTracker(Tracker):
    """MLflow tracking through `MlflowClient` (NCN runs as MLflow runs).

    uri: tracking URI; `sqlite:////abs/mlflow.db` (default: mlflow.db in the launch directory).
    experiment: experiment name, created on first use with artifacts under `artifact_location`
        (default: `mlartifacts/<experiment>` next to a sqlite store).
    parent_run_id: id of a sweep's parent run; the run is tagged `mlflow.parentRunId` (works
        across processes, unlike `nested=True`).
    run_dir: where metrics.jsonl goes.

    Raises:
        NCNConfigError: from `check()` when the store cannot be reached or written.
    """

    def __init__(
        self,
        uri: str,
        experiment: str = "ncn",
        parent_run_id: str | None = None,
        artifact_location: str | None = None,
        run_dir: Path | None = None,
    ) -> None:
        super().__init__(run_dir)
        self.uri, self.experiment, self.parent_run_id = uri, experiment, parent_run_id
        db = _sqlite_path(uri)
        if artifact_location is None and db is not None:
            artifact_location = (db.parent / "mlartifacts" / experiment).as_uri()
        self.artifact_location = artifact_location
        self.client: Any = None  # created in check(): creating it already creates a sqlite store
        self.experiment_id: str | None = None
        self._seen_params: dict[str, str] = {}
        self._metric_until: dict[str, int] = {}
        self._resume_step: int | None = None

    def check(self) -> None:
        # mlflow takes ~2 s to import; only runs that track pay for it
        from mlflow import MlflowClient

        if self.uri.startswith(("http://", "https://")):
            try:
                urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5)
            except urllib.error.HTTPError:
                pass  # the server answered: reachable
            except (urllib.error.URLError, OSError) as exc:
                raise NCNConfigError(
                    f"tracking.uri={self.uri} is unreachable ({getattr(exc, 'reason', exc)}): start the server, "
                    "fix the URI, or use tracking=none"
                ) from None
        db = _sqlite_path(self.uri)
        if db is not None and not db.parent.is_dir():
            raise NCNConfigError(
                f"tracking.uri={self.uri}: folder {db.parent} does not exist: create it or point tracking.uri at an "
                "existing folder (sqlite:////abs/path/mlflow.db)"
            )
        # Parallel jobs on a fresh sqlite file race on schema creation; a file lock serializes it.
        lock = FileLock(str(db) + ".lock", timeout=120) if db is not None else contextlib.nullcontext()
        try:
            with lock:
                self.client = MlflowClient(tracking_uri=self.uri)
                experiment = self.client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    self.experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=self.artifact_location
                    )
                else:
                    self.experiment_id = experiment.experiment_id
        except Exception as exc:  # MLflow/SQLAlchemy/OS errors all mean "cannot use this store"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NCNConfigError(
                f"tracking.uri={self.uri} is unusable ({first}): fix the URI (e.g. sqlite:////abs/path/mlflow.db) "
                "or use tracking=none"
            ) from None

    def start(self, run_name: str, run_id: str | None = None, resume_step: int | None = None, tags: Mapping[str, str] | None = None) -> str:
        if self.experiment_id is None:
            self.check()
        if run_id is not None and self._exists(run_id):
            self.run_id, self._resume_step = run_id, resume_step
            self._seen_params = dict(self.client.get_run(run_id).data.params)
            # A killed attempt may have logged steps after its last checkpoint; skipping them
            # keeps one continuous history (with exact resume the values are identical anyway).
            for key in self.client.get_run(run_id).data.metrics:
                self._metric_until[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(dict(tags or {}))
            return run_id
        all_tags = dict(tags or {})
        if run_id is not None:
            log.warning("MLflow run %s of the checkpoint is not in %s: starting a new run", run_id, self.uri)
            all_tags["ncn.resumed_from_run"] = run_id
        if self.parent_run_id:
            all_tags["mlflow.parentRunId"] = self.parent_run_id
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
        return self.run_id

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        fresh = {k: str(v)[:MAX_PARAM_VALUE] for k, v in params.items() if k not in self._seen_params}
        changed = {k: {"was": self._seen_params[k], "now": str(v)} for k, v in params.items()
                   if k in self._seen_params and self._seen_params[k] != str(v)[:MAX_PARAM_VALUE]}
        items = [Param(k, v) for k, v in fresh.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self._seen_params.update(fresh)
        if changed:
            # params are immutable in MLflow: record what a resume changed as a tag + artifact
            where = f"resume/step_{self._resume_step or 0:06d}"
            self.log_dict(changed, f"{where}/changed_params.json")
            self.set_tags({f"ncn.{where}": ", ".join(f"{k}={v['now']}" for k, v in changed.items())[:5000]})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        super().log_metrics(metrics, step)
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if math.isfinite(float(v)) and step > self._metric_until.get(k, -1)
        ]
        for i in range(0, len(items), 1000):  # MLflow's batch limit for metrics
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, fig, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
