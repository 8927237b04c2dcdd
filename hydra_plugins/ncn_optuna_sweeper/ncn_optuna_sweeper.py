"""Hydra sweeper `hydra/sweeper=ncn_optuna`: the Optuna sweeper with `max_failure_rate` counted over the whole study.

hydra-optuna-sweeper 1.3.0 applies `max_failure_rate` to each batch of `n_jobs` trials, so with
`n_jobs: 1` a single failed trial (a diverging learning rate) is a 100 % failure rate and ends
the study. This subclass turns that per-batch check off and keeps a budget over all trials
instead: a failed trial is told to Optuna as FAIL (its MLflow run is FAILED, see
ncn/tasks/sweep.py) and the study goes on until more than floor(max_failure_rate * n_trials)
trials have failed. Hydra only loads plugins from the `hydra_plugins` package; this module
registers nothing when the optional `optuna` extra is not installed. docs/sweeps.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hydra.core.utils import JobReturn
from omegaconf import OmegaConf

from ncn.errors import RunFailedError
from ncn.tasks.sweep import describe_failure, job_error, sweep_grid

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as PluginOptunaSweeper
except ImportError:  # pip install -e '.[optuna]' adds it
    PluginOptunaSweeper = None


class Trial(NamedTuple):  # no dataclass: Hydra's plugin scan runs this module before it is in sys.modules
    """One launched trial: its job number, overrides, objective value (None if it failed or has
    several objectives) and failure (None if it succeeded)."""

    number: int
    overrides: tuple[str, ...]
    value: float | None
    failure: str | None


def trial_of(number: int, job: JobReturn) -> Trial:
    """The outcome of a finished job: failed when it raised or returned anything but finite numbers."""
    overrides = tuple(job.overrides or ())
    if (error := job_error(job)) is not None:
        return Trial(number, overrides, None, describe_failure(error))
    returned = job.return_value
    try:
        values = [float(v) for v in (returned if isinstance(returned, (list, tuple)) else [returned])]
    except (TypeError, ValueError):
        return Trial(number, overrides, None, f"returned {returned!r}, not a number")
    if not all(math.isfinite(v) for v in values):
        return Trial(number, overrides, None, f"returned {returned}")
    return Trial(number, overrides, values[0] if len(values) == 1 else None, None)


class FailureBudget:
    """Failed trials of a study against `floor(max_failure_rate * n_trials)` allowed ones.

    `check()` raises once more trials failed than allowed; `summary()` is the one-line account
    of a study that ended with failures. direction: "minimize" or "maximize" (the best trial).
    """

    def __init__(self, max_failure_rate: float, n_trials: int, direction: str = "minimize") -> None:
        self.max_failure_rate, self.n_trials, self.direction = max_failure_rate, n_trials, direction
        self.allowed = math.floor(max_failure_rate * n_trials + 1e-9)
        self.trials: list[Trial] = []
        self.searched: list[str] = []  # keys the study searches: what a trial is named by

    def _name(self, trial: Trial) -> str:
        shown = [o for o in trial.overrides if o.split("=", 1)[0] in self.searched] or list(trial.overrides)
        return " ".join(shown)

    @property
    def failed(self) -> list[Trial]:
        return [t for t in self.trials if t.failure is not None]

    def _account(self) -> str:
        first = self.failed[0]
        values = [t for t in self.trials if t.value is not None]
        best = (min if self.direction == "minimize" else max)(values, key=lambda t: t.value) if values else None
        found = f"best: trial {best.number} ({self._name(best)}) = {best.value:.6g}" if best else "no trial finished"
        return (
            f"{len(self.failed)} of {len(self.trials)} trials failed (first: trial {first.number}, "
            f"{self._name(first)}: {first.failure}); {found}"
        )

    def check(self) -> None:
        """Raises RunFailedError when more trials failed than the budget allows."""
        if len(self.failed) > self.allowed:
            raise RunFailedError(
                f"{self._account()}: more than hydra.sweeper.max_failure_rate={self.max_failure_rate} of "
                f"{self.n_trials} trials (at most {self.allowed}) may fail, so the study stopped; narrow the search "
                "space (e.g. a lower optim.lr bound) or raise hydra.sweeper.max_failure_rate"
            )

    def summary(self, results: Path) -> str:
        """One line for a study that ran to its end with failures (within the budget)."""
        return (
            f"{self._account()} (within max_failure_rate={self.max_failure_rate}: at most {self.allowed} of "
            f"{self.n_trials}; best parameters in {results}): see the failed trials' runs, or narrow the search space"
        )


class _CountingLauncher:
    """Launches through the configured launcher and records every trial's outcome in a `FailureBudget`;
    refuses to launch more trials once the budget is spent."""

    def __init__(self, launcher: Any, budget: FailureBudget) -> None:
        self.launcher, self.budget = launcher, budget

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        self.budget.check()
        returns = self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        self.budget.trials += [trial_of(initial_job_idx + i, job) for i, job in enumerate(returns)]
        return returns


if PluginOptunaSweeper is not None:

    class OptunaSweeper(PluginOptunaSweeper):
        """hydra-optuna-sweeper's OptunaSweeper (same settings) with `max_failure_rate` over all n_trials.

        The plugin runs its study with a per-batch rate of 1.0 (a batch never stops it); its launcher
        (the one the plugin instantiated from `hydra.launcher`, reached as `self.sweeper.launcher`:
        hydra-optuna-sweeper is pinned to 1.3.0) is wrapped to count failed trials. The study stops
        before the next batch once more than floor(max_failure_rate * n_trials) trials failed. A study
        with failures ends, after the plugin logged and saved the best parameters, in RunFailedError
        (run.py: `error: <n> of <m> trials failed ...`, exit status 3).

        Raises:
            RunFailedError: from `sweep`, when any trial failed.
        """

        def __init__(
            self,
            sampler: Any,
            direction: Any,
            storage: Any,
            study_name: str | None,
            n_trials: int,
            n_jobs: int,
            max_failure_rate: float,
            search_space: Any,
            custom_search_space: str | None,
            params: Any,
        ) -> None:
            super().__init__(
                sampler,
                direction,
                storage,
                study_name,
                n_trials,
                n_jobs,
                1.0,
                search_space,
                custom_search_space,
                params,
            )
            name = getattr(direction, "name", str(direction))
            self.budget = FailureBudget(max_failure_rate, n_trials, "maximize" if name == "maximize" else "minimize")
            self.params: dict[str, Any] = OmegaConf.to_container(params, resolve=True) if params else {}
            self.sweep_dir: Path | None = None

        def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
            super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
            self.sweeper.launcher = _CountingLauncher(self.sweeper.launcher, self.budget)
            self.sweep_dir = Path(str(config.hydra.sweep.dir))

        def sweep(self, arguments: list[str]) -> None:
            grid = sweep_grid(self.params, arguments)
            self.budget.searched = [k for k, v in grid.items() if not isinstance(v, list) or len(v) > 1]
            super().sweep(arguments)
            self.budget.check()  # the last batch may have spent the budget
            if self.budget.failed:
                raise RunFailedError(self.budget.summary(self.sweep_dir / "optimization_results.yaml"))
