"""Experiment tracking: the tracker interface, its MLflow implementation and the health of a sqlite store.

Owns every conversation with MLflow: nothing outside this package imports `mlflow`. Modules:
`base` (the `Tracker` interface, `NullTracker`, `RunRecord`, `RunSource`, run names),
`mlflow_tracker` (`MLflowTracker`, through `MlflowClient` only), `store` (sqlite store checks
and atomic creation). May import `ncn.config` and `ncn.errors`, never the model, the data or
training; `mlflow` itself is imported on first use, so importing this package stays light.
The public names are re-exported here; `open_tracker` builds the tracker a config describes.
"""

from __future__ import annotations

from pathlib import Path

from ncn.config import TrackingConfig
from ncn.tracking.base import (
    NAME_DEFAULTS,
    NullTracker,
    RunRecord,
    RunSource,
    Tracker,
    default_run_name,
    flatten,
    git_commit,
    name_overrides,
)
from ncn.tracking.mlflow_tracker import EXPERIMENT_KIND, MLflowTracker
from ncn.tracking.store import default_uri

__all__ = [
    "EXPERIMENT_KIND",
    "NAME_DEFAULTS",
    "MLflowTracker",
    "NullTracker",
    "RunRecord",
    "RunSource",
    "Tracker",
    "default_run_name",
    "name_overrides",
    "default_uri",
    "flatten",
    "git_commit",
    "open_tracker",
]


def open_tracker(cfg: TrackingConfig, launch_dir: Path, run_dir: Path | None = None) -> Tracker:
    """The tracker `cfg` describes; an MLflow store defaults to `default_uri(launch_dir)`. Not yet checked."""
    if cfg.backend == "none":
        return NullTracker(run_dir)
    return MLflowTracker(
        cfg.uri or default_uri(launch_dir), cfg.experiment, cfg.parent_run_id, cfg.artifact_location, run_dir
    )
