"""A sweep job run again in its own folder continues its earlier attempt instead of starting over.

This happens when a sweep is resumed (`sweep_resume=<parent run id | sweep dir>`) or a SLURM job
is requeued after preemption or a timeout: the job's run dir (`<sweep dir>/<job number>`) still
holds what the earlier attempt wrote. `plan_job` reads only that folder, so every DDP rank
decides alike without a store: finished -> skip (return the recorded val loss), a checkpoint ->
resume from it into the same MLflow run, nothing -> start. docs/sweeps.md "Resuming a sweep".
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ncn.config import RunConfig
from ncn.errors import NCNConfigError
from ncn.tracking import flatten
from ncn.training import checkpoint

# Keys that do not change what a training run computes: a resumed job may set them differently.
RUNTIME_KEYS = frozenset(
    {
        "tracking",
        "sweep_resume",
        "run_name",
        "task",
        "checkpoint",
        "prompt",
        "max_new_tokens",
        "temperature",
        "top_k",
        "sweep_run",
        "reference_log",
        "baseline",
        "trainer.resume",
        "trainer.progress",
        "trainer.threads",
        "data.cache_dir",
        "data.num_proc",
        "data.num_workers",
        "data.pin_memory",
    }
)
SKIP, RESUME, FRESH = "skip", "resume", "fresh"
RESTARTED_METRICS = "metrics.before_restart.jsonl"  # a restarted job's earlier metrics.jsonl


@dataclass(frozen=True)
class JobPlan:
    """What a sweep job does about its earlier attempt.

    action: "fresh" (nothing to continue), "resume" (train on from `checkpoint`) or "skip" (the
    attempt finished: return `val_loss`, nats/token, without training). checkpoint: the run
    dir's latest checkpoint folder. run_id: the MLflow run the attempt recorded into (None
    without tracking); a resume continues it. restart: why a job that had trained starts over (its
    folder holds a metrics.jsonl but no checkpoint), None otherwise.
    """

    action: str = FRESH
    checkpoint: Path | None = None
    val_loss: float | None = None
    run_id: str | None = None
    restart: str | None = None


def config_differences(saved: RunConfig, current: RunConfig) -> list[str]:
    """The flattened keys whose values differ between two run configs, `RUNTIME_KEYS` left out."""
    old, new = flatten(asdict(saved)), flatten(asdict(current))

    def runtime(key: str) -> bool:
        return any(key == r or key.startswith(r + ".") for r in RUNTIME_KEYS)

    return sorted(k for k in old.keys() | new.keys() if not runtime(k) and old.get(k) != new.get(k))


def plan_job(run_dir: Path, cfg: RunConfig, job: int | None = None) -> JobPlan:
    """Decide how sweep job `job` continues what its run dir holds from an earlier attempt.

    Finished (`metrics.json`, written when training returned, with a finite val/loss) -> skip;
    a `checkpoints/latest` -> resume from it; else fresh (with `restart` saying so when the folder
    shows that an earlier attempt trained). The earlier attempt's config (its
    latest checkpoint's config.yaml) must equal `cfg` up to `RUNTIME_KEYS`, and it must belong
    to this sweep (same `tracking.parent_run_id`, when both are set).

    Raises:
        NCNConfigError: the folder holds another config's run, or a run of another sweep.
        CheckpointError: its latest checkpoint is unreadable.
    """
    pointer = run_dir / "checkpoints" / checkpoint.POINTER
    what = f"sweep job {job}" if job is not None else "this job"
    if not pointer.is_file():
        if (run_dir / "metrics.jsonl").is_file():  # it trained, but its checkpoints are gone (or never written)
            return JobPlan(
                restart=f"{what}: its folder {run_dir} holds an earlier attempt's metrics.jsonl but no checkpoint "
                f"(no checkpoints/{checkpoint.POINTER}): training it again from step 0 (the earlier metrics are "
                f"kept as {RESTARTED_METRICS})"
            )
        return JobPlan()
    latest = checkpoint.read_pointer(pointer)
    earlier = checkpoint.load(latest, tensors=False)
    ours, theirs = cfg.tracking.parent_run_id, earlier.config.tracking.parent_run_id
    if ours and theirs and ours != theirs:
        raise NCNConfigError(
            f"{what}: its folder {run_dir} holds a run of another sweep (parent MLflow run {theirs}, this sweep's "
            f"is {ours}): continue that sweep with sweep_resume={theirs}, or give this one a new hydra.sweep.dir"
        )
    differs = config_differences(earlier.config, cfg)
    if differs:
        key = differs[0]
        old, new = flatten(asdict(earlier.config)).get(key), flatten(asdict(cfg)).get(key)
        raise NCNConfigError(
            f"{what}: its folder {run_dir} holds a run trained with {key}={old}, this launch sets {key}={new}"
            f"{f' (and {len(differs) - 1} more keys)' if len(differs) > 1 else ''}: resume a sweep with its own "
            "sweep file, grid and overrides, or start a new sweep (without sweep_resume)"
        )
    run_id = earlier.state.mlflow_run_id
    final = run_dir / "metrics.json"
    if final.is_file():
        val_loss = json.loads(final.read_text(encoding="utf-8")).get("val/loss")
        if isinstance(val_loss, (int, float)) and math.isfinite(val_loss):
            return JobPlan(SKIP, latest, float(val_loss), run_id)
    return JobPlan(RESUME, latest, None, run_id)


def trim_metrics_log(path: Path, step: int) -> int:
    """Drop the lines of a metrics.jsonl logged after optimizer step `step` (and a line cut short by a
    kill), so a run resumed from its checkpoint at `step` logs every later step once; returns the
    number of lines dropped. A missing file is left alone."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").split("\n")
    kept = []
    for line in lines[:-1]:  # a complete line ends with "\n"; a last fragment without one is dropped
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            kept.append(line)
    dropped = len([line for line in lines if line]) - len(kept)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped
