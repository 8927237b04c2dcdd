"""The MLflow implementation of the tracker interface (`ncn.tracking.base.Tracker`).

`ncn.tracking.open_tracker(cfg, launch_dir, run_dir)` gives an `MLflowTracker` or a `NullTracker`. A tracker
writes one run (`start`, `log_*`, `end`) and answers the questions the sweep, the report and
the analysis ask of the store (`get_run`, `child_runs`, `find_sweep`, `metric_history`, ...);
nothing outside `ncn.tracking` talks to MLflow. `MLflowTracker` uses `MlflowClient` only (no
fluent global run, so a crashed job can never leave an "active run" for the next one), creates
the experiment with an absolute artifact location, continues the same run on resume without
re-logging changed params, and never builds a search filter from user text: runs are found by
the ids recorded for them and matched in Python. Metric keys are namespaced (`train/loss`,
`val/ppl`, `val/signals/precision/L3/mean`): MLflow 3.17's UI puts each key's chart in the section
named by the key without its last `/` part and orders sections alphabetically (keys without `/`
last), so the loss sections `train` and `val` come before the per-layer `val/signals/...` ones
(docs/mlflow_ui.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from ncn.errors import NCNConfigError
from ncn.tracking.base import MAX_PARAM_VALUE, RunRecord, Tracker
from ncn.tracking.store import (
    broken_store,
    create_sqlite_store,
    deleted_experiment,
    sqlite_path,
    usable_sqlite_tables,
)

log = logging.getLogger(__name__)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on the runs table


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _record(run: Any) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        info.run_id,
        info.run_name or "",
        info.status,
        info.experiment_id,
        int(info.start_time or 0),
        dict(data.params),
        dict(data.tags),
        dict(data.metrics),
    )


class MLflowTracker(Tracker):
    """MLflow tracking through `MlflowClient` (NCN runs as MLflow runs).

    uri: tracking URI (`sqlite:////abs/mlflow.db`, `http://host:port`, ...).
    experiment: experiment name, created on first use with artifacts under `artifact_location`
        (default: `mlartifacts/<experiment>` next to a sqlite store) and tagged so the MLflow UI
        opens on its training-runs table (`EXPERIMENT_KIND`).
    parent_run_id: id of a sweep's parent run; the run is tagged `mlflow.parentRunId` (works
        across processes, unlike `nested=True`).
    run_dir: where metrics.jsonl goes.

    Raises:
        NCNConfigError: from `check()` when the store cannot be reached or written.
    """

    enabled = True

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
        db = sqlite_path(uri)
        if artifact_location is None and db is not None:
            artifact_location = (db.parent / "mlartifacts" / experiment).as_uri()
        self.artifact_location = artifact_location
        self.client: Any = None  # created in check(): creating it already creates a sqlite store
        self.experiment_id: str | None = None
        self._seen_params: dict[str, str] = {}
        self._logged: dict[str, dict[int, float]] = {}  # on resume: key -> step -> the value the run holds
        self._resume_step: int | None = None

    def check(self, resume_run_id: str | None = None) -> None:
        """Make sure the store, the experiment and (on resume) the run can be used; before any data work.

        A missing sqlite store is created whole or not at all (`create_sqlite_store`); the
        experiment is created, or tagged `EXPERIMENT_KIND` if it lacks the tag. `resume_run_id`:
        the MLflow run a resume continues (None: a new run).

        Raises:
            NCNConfigError: an unreachable server, a missing folder, a path that is a folder or
                not an MLflow store, a half-migrated store, a deleted experiment or a deleted
                `resume_run_id`; the message names the fix.
        """
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
        db = sqlite_path(self.uri)
        if db is not None and not db.parent.is_dir():
            raise NCNConfigError(
                f"tracking.uri={self.uri}: folder {db.parent} does not exist: create it or point tracking.uri at an "
                "existing folder (sqlite:////abs/path/mlflow.db)"
            )
        # Parallel jobs on a fresh sqlite file race on schema creation; a file lock serializes
        # checking, creating and migrating the store.
        lock = FileLock(str(db) + ".lock", timeout=120) if db is not None else contextlib.nullcontext()
        with lock:
            if db is not None and not usable_sqlite_tables(self.uri, db):
                create_sqlite_store(db)  # no file yet, or an empty one
            try:  # opening a sqlite store runs MLflow's pending schema migrations
                self.client = MlflowClient(tracking_uri=self.uri)
                experiment = self.client.get_experiment_by_name(self.experiment)
            except Exception as exc:  # MLflow/SQLAlchemy/OS errors all mean "cannot use this store"
                first = _first_line(exc)
                if "mlflow db upgrade" in first:  # a store of an older MLflow: its schema can be upgraded
                    found = first.split("(", 1)[-1].split(")", 1)[0]
                    raise NCNConfigError(
                        f"tracking.uri={self.uri} has an older MLflow schema ({found}): back it up, then "
                        f"run mlflow db upgrade {shlex.quote(self.uri)}"
                    ) from None
                if db is not None and "locked" not in first:
                    raise broken_store(self.uri, db, first) from None
                raise NCNConfigError(
                    f"tracking.uri={self.uri} is unusable ({first}): fix the URI (e.g. "
                    "sqlite:////abs/path/mlflow.db) or use tracking=none"
                ) from None
            if experiment is not None and experiment.lifecycle_stage == "deleted":
                raise deleted_experiment(self.uri, self.experiment, experiment.experiment_id)
            try:
                if experiment is None:
                    self.experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=self.artifact_location, tags=EXPERIMENT_KIND
                    )
                else:
                    self.experiment_id = experiment.experiment_id
                    if experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
                        for key, value in EXPERIMENT_KIND.items():
                            self.client.set_experiment_tag(self.experiment_id, key, value)
            except Exception as exc:
                raise NCNConfigError(
                    f"tracking.uri={self.uri}: cannot create or tag experiment {self.experiment} "
                    f"({_first_line(exc)}): check that the store is writable, or use tracking=none"
                ) from None
        if resume_run_id is not None:
            self._check_resume_run(resume_run_id)

    def _check_resume_run(self, run_id: str, sweep_resume: str | None = None) -> None:
        """Refuse to continue a deleted run, or a run of a deleted experiment (MLflow rejects every write to it).

        sweep_resume: the `sweep_resume=` value when `run_id` is the parent run a sweep continues
        (the fix is then to restore it: purging it would lose the sweep).
        """
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return  # not in this store: `start` opens a new run tagged ncn.resumed_from_run
        env = f"MLFLOW_TRACKING_URI={shlex.quote(self.uri)}"
        # deleting an experiment marks its runs deleted too: the experiment is what to restore then
        experiment = self.client.get_experiment(run.info.experiment_id)
        if sweep_resume is not None:
            what = f"sweep_resume={sweep_resume}: the sweep's parent MLflow run {run_id}"
            if experiment.lifecycle_stage == "deleted":
                raise NCNConfigError(
                    f"{what} is in experiment {experiment.name} (id {experiment.experiment_id}), which is deleted in "
                    f"{self.uri}: restore it ({env} mlflow experiments restore --experiment-id "
                    f"{experiment.experiment_id}) and rerun this command"
                )
            if run.info.lifecycle_stage == "deleted":
                raise NCNConfigError(
                    f"{what} is deleted in {self.uri}: restore it ({env} mlflow runs restore --run-id {run_id}) "
                    "and rerun this command, or start a new sweep (without sweep_resume)"
                )
            return
        if experiment.lifecycle_stage == "deleted":
            raise deleted_experiment(self.uri, experiment.name, experiment.experiment_id)
        if run.info.lifecycle_stage == "deleted":
            raise NCNConfigError(
                f"MLflow run {run_id}, which this resume continues, is deleted in {self.uri}: restore it "
                f"({env} mlflow runs restore --run-id {run_id}), or purge it to resume into a new run "
                f"(mlflow gc --backend-store-uri {shlex.quote(self.uri)} --run-ids {run_id})"
            )

    def check_sweep_parent(self, run_id: str, spec: str) -> None:
        """Refuse to continue the sweep `sweep_resume=<spec>` whose parent run `run_id`, or its
        experiment, is deleted: the message gives the restore command.

        Raises:
            NCNConfigError: the parent run or its experiment is deleted.
        """
        self._ready()
        self._check_resume_run(run_id, sweep_resume=spec)

    def ui_url(self, base: str = "http://127.0.0.1:5000") -> str:
        """Address of this experiment's runs table in `mlflow ui` served at `base`.

        `workflowType=machine_learning` selects the UI's "Model training" layout: MLflow 3.17.2's
        UI picks it from this parameter (else from the browser's last choice, by default GenAI,
        whose experiment page is a traces overview) and no longer from the experiment tag.
        """
        self._ready()
        return f"{base}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"

    def browse_hint(self) -> str:
        """`mlflow ui ...` for this store (shell-quoted, to paste into bash), then the address of the runs table."""
        command = f"mlflow ui --backend-store-uri {shlex.quote(self.uri)} --host 127.0.0.1 --port 5000"
        return f"{command}, then open {self.ui_url()}"

    def _ready(self) -> Any:
        if self.experiment_id is None:
            self.check()
        return self.client

    def start(
        self,
        run_name: str,
        run_id: str | None = None,
        resume_step: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        client = self._ready()
        if run_id is not None and self.get_run(run_id) is not None:
            self.run_id, self._resume_step = run_id, resume_step
            self._seen_params = dict(client.get_run(run_id).data.params)
            # A killed attempt may have logged steps after its last checkpoint. A resumed value equal
            # to the one logged is not logged again (an exact resume keeps one continuous history);
            # a different one (other settings on resume) is, so the newest value of each step is
            # always the resumed run's.
            for key in client.get_run(run_id).data.metrics:
                history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
                self._logged[key] = {m.step: m.value for m in history}
            client.update_run(run_id, status="RUNNING")
            self.set_tags(dict(tags or {}))
            return run_id
        all_tags = dict(tags or {})
        if run_id is not None:
            log.warning("MLflow run %s of the checkpoint is not in %s: starting a new run", run_id, self.uri)
            all_tags["ncn.resumed_from_run"] = run_id
        if self.parent_run_id:
            all_tags["mlflow.parentRunId"] = self.parent_run_id
        self.run_id = client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
        return self.run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        fresh = {k: str(v)[:MAX_PARAM_VALUE] for k, v in params.items() if k not in self._seen_params}
        changed = {
            k: {"was": self._seen_params[k], "now": str(v)}
            for k, v in params.items()
            if k in self._seen_params and self._seen_params[k] != str(v)[:MAX_PARAM_VALUE]
        }
        items = [Param(k, v) for k, v in fresh.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self._seen_params.update(fresh)
        if changed:
            # params are immutable in MLflow: record what a resume changed as a tag + artifact
            where = f"resume/step_{self._resume_step or 0:06d}"
            self.log_dict(changed, f"{where}/changed_params.json")
            self.set_tags({f"ncn.{where}": ", ".join(f"{k}={v['now']}" for k, v in changed.items())[:5000]})

    def log_metrics(self, metrics: Mapping[str, float], step: int, run_id: str | None = None) -> None:
        from mlflow.entities import Metric

        super().log_metrics(metrics, step, run_id)
        now = int(time.time() * 1000)
        logged = self._logged if run_id is None else {}
        items = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if math.isfinite(float(v)) and logged.get(k, {}).get(step) != float(v)
        ]
        client = self.client if run_id is None else self._ready()
        for i in range(0, len(items), 1000):  # MLflow's batch limit for metrics
            client.log_batch(run_id or self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
        client, target = self._ready(), run_id or self.run_id
        if Path(path).is_dir():
            client.log_artifacts(target, str(path), artifact_path)
        else:
            client.log_artifact(target, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, fig, artifact_file)

    def set_tags(self, tags: Mapping[str, str], run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        if tags:
            self._ready().log_batch(run_id or self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def end(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)

    def get_run(self, run_id: str) -> RunRecord | None:
        from mlflow.exceptions import MlflowException

        try:
            return _record(self._ready().get_run(run_id))
        except MlflowException:
            return None

    def _search(self, experiment_ids: Iterable[str], filter_string: str = "") -> list[RunRecord]:
        runs = self._ready().search_runs(
            list(experiment_ids), filter_string, max_results=50000, order_by=["attributes.start_time ASC"]
        )
        return [_record(r) for r in runs]

    def child_runs(self, parent_id: str) -> list[RunRecord]:
        parent = self.get_run(parent_id)
        if parent is None:
            return []
        assert all(c in "0123456789abcdef" for c in parent_id), parent_id  # an id, never user text
        return self._search([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")

    def find_sweep(self, spec: str | None) -> RunRecord:
        client = self._ready()
        if spec and (run := self.get_run(spec)) is not None:
            return run
        if spec and all(c in "0123456789abcdef" for c in spec) and len(spec) == 32:
            raise NCNConfigError(
                f"sweep_run={spec} is not a run in {self.uri}: pass the parent run id printed at the "
                "sweep's start and end (and tracking.uri=<its store>), or an experiment or sweep name"
            )
        name = spec or self.experiment
        experiment = client.get_experiment_by_name(name)
        ids = (
            [experiment.experiment_id]
            if experiment is not None
            else [e.experiment_id for e in client.search_experiments()]
        )
        sweeps = [
            r
            for r in self._search(ids)
            if "ncn.sweep" in r.tags and (experiment is not None or r.tags["ncn.sweep"] == name)
        ]
        if sweeps:
            return max(sweeps, key=lambda r: r.start_time)
        if experiment is not None:
            raise NCNConfigError(
                f"experiment {name} has no sweep runs: launch one with python run.py -cd sweeps -cn ablation"
            )
        raise NCNConfigError(
            f"sweep_run={name} is neither a run id, an experiment nor a sweep name in {self.uri}: "
            "pass the parent run id (printed at the sweep's start and end), an experiment or a "
            "sweep name (e.g. ablation)"
        )

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self._ready().get_metric_history(run_id, key))

    def create_run(self, run_name: str, tags: Mapping[str, str], status: str | None = None) -> str:
        run_id = self._ready().create_run(self.experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
        if status is not None:
            self.client.set_terminated(run_id, status)
        return run_id

    def terminate(self, run_id: str, status: str) -> None:
        self._ready().set_terminated(run_id, status)

    # --- sweep bookkeeping (see Tracker) ---

    def sweeps(self) -> list[RunRecord]:
        self._ready()
        return [r for r in self._search([self.experiment_id]) if "ncn.sweep" in r.tags]

    def delete_tags(self, keys: Iterable[str], run_id: str) -> None:
        client = self._ready()
        present = client.get_run(run_id).data.tags
        for key in keys:
            if key in present:
                client.delete_tag(run_id, key)
