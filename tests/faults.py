"""Fault injection for subprocess tests: `python tests/faults.py [FAULTS] -- <run.py overrides>`.

FAULTS: `--nan-steps 3,5` makes the loss of each listed optimizer step NaN once (the step is
then skipped or stops the run, as a real divergence would); `--crash-before-rename STEP` ends
the process (exit status `CRASH_EXIT_CODE`) after the checkpoint of STEP is fully written to its
temporary folder, before it is renamed into place; `--sigkill-at RUN:STEP` SIGKILLs the process
(like the OOM killer or a lost node: nothing can clean up) when its RUN-th training run is about to
start optimizer step STEP + 1. `--disk-full-at STEP`: writing the checkpoint of STEP fails with
ENOSPC (no space left on device) after its model.pt is written. The faults patch ncn's functions
in this process only (a basic-launcher sweep runs its jobs in it), then run run.py as `__main__`:
nothing of this lives in the product.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CRASH_EXIT_CODE = 70


def inject_nan(steps: set[int]) -> None:
    """Make the loss NaN once at each optimizer step in `steps` (counted from the run's TrainState),
    in every training run of this process (each job of an in-process multirun)."""
    import ncn.training.loop

    original_train, original_step = ncn.training.loop.train, ncn.training.loop.optimizer_step
    current: dict[str, Any] = {}

    def train(job: Any, state: Any, cfg: Any, total: int) -> Any:
        current["state"], current["pending"] = state, set(steps)
        return original_train(job, state, cfg, total)

    def optimizer_step(job: Any, batches: Any, cfg: Any, index: int) -> Any:
        step = current["state"].step + 1
        if step not in current["pending"]:
            return original_step(job, batches, cfg, index)
        current["pending"].discard(step)
        forward = job.train_model.forward

        def nan_forward(*args: Any, **kwargs: Any) -> Any:
            out = forward(*args, **kwargs)
            out.loss = out.loss * float("nan")
            return out

        job.train_model.forward = nan_forward
        try:
            return original_step(job, batches, cfg, index)
        finally:
            del job.train_model.forward

    ncn.training.loop.train, ncn.training.loop.optimizer_step = train, optimizer_step
    import ncn.tasks.train

    ncn.tasks.train.train = train


def crash_before_rename(step: int) -> None:
    """Exit the process when the checkpoint of `step` is about to be renamed into place."""
    original = os.rename

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(src).name.startswith(f".tmp-step_{step:06d}-"):
            os._exit(CRASH_EXIT_CODE)
        original(src, dst, *args, **kwargs)

    os.rename = rename


def disk_full_at(step: int) -> None:
    """The disk is full when the checkpoint of `step` writes its optimizer state (its model.pt is
    already in the temporary folder): torch.save raises OSError(ENOSPC), as the OS does."""
    import errno

    import torch

    original = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        path = Path(f) if isinstance(f, str | os.PathLike) else None
        if path is not None and path.name == "optim.pt" and path.parent.name.startswith(f".tmp-step_{step:06d}-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original(obj, f, *args, **kwargs)

    torch.save = save


def sigkill_at(run: int, step: int) -> None:
    """SIGKILL this process when training run `run` (1-based, counted in this process) has done and
    logged optimizer step `step`, before it starts the next one."""
    import ncn.tasks.train
    import ncn.training.loop

    original_train, original_step = ncn.tasks.train.train, ncn.training.loop.optimizer_step
    runs = [0]

    def train(job: Any, state: Any, cfg: Any, total: int) -> Any:
        runs[0] += 1
        return original_train(job, state, cfg, total)

    def optimizer_step(job: Any, batches: Any, cfg: Any, index: int) -> Any:
        if runs[0] == run and index == step:  # index: steps done so far
            os.kill(os.getpid(), signal.SIGKILL)
        return original_step(job, batches, cfg, index)

    ncn.tasks.train.train, ncn.training.loop.optimizer_step = train, optimizer_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nan-steps", default="", help="comma-separated optimizer steps whose loss becomes NaN once")
    parser.add_argument("--crash-before-rename", type=int, help="step whose checkpoint is never renamed into place")
    parser.add_argument("--sigkill-at", help="RUN:STEP: SIGKILL when the RUN-th training run has done STEP steps")
    parser.add_argument("--disk-full-at", type=int, help="step whose checkpoint finds the disk full")
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.nan_steps:
        inject_nan({int(s) for s in args.nan_steps.split(",")})
    if args.crash_before_rename is not None:
        crash_before_rename(args.crash_before_rename)
    if args.sigkill_at:
        sigkill_at(*(int(n) for n in args.sigkill_at.split(":")))
    if args.disk_full_at is not None:
        disk_full_at(args.disk_full_at)
    overrides = args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides
    sys.argv = [str(REPO / "run.py"), *overrides]
    runpy.run_path(str(REPO / "run.py"), run_name="__main__")


if __name__ == "__main__":
    main()
