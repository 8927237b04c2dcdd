"""Entry point: `python run.py [group=option ...] [key=value ...]` composes conf/ and runs `task`.

Tasks: train (default), prepare, generate, analyze, eval, report, import; each is
`ncn.tasks.<module>.main(cfg, ctx)` with a typed `RunConfig` and `RunContext`, imported only when
chosen. A user mistake ends with `error: <message>` as the last stderr line and exit status 2, a
run that failed on its own (divergence) with 3, an interrupt with 130 (docs/errors.md). The
returned value (final val loss for train) is a sweeper's objective.
"""

import importlib
import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ncn import cli
from ncn.errors import show_warning
from ncn.training.runtime import distributed_env

TASK_MODULES = {
    "train": "train",
    "prepare": "prepare",
    "generate": "generate",
    "analyze": "analyze",
    "eval": "evaluate",
    "report": "report",
    "import": "import_reference",
}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    warnings.showwarning = show_warning  # also in a sweep's worker processes
    run_cfg, ctx = cli.typed(cfg)
    return importlib.import_module(f"ncn.tasks.{TASK_MODULES[run_cfg.task]}").main(run_cfg, ctx)


if __name__ == "__main__":
    os.environ["HYDRA_FULL_ERROR"] = "1"  # config errors reach us as exceptions, not as a printed report
    warnings.showwarning = show_warning  # one `warning: <message>` line, no `<file>:<line>: UserWarning:`
    try:
        if distributed_env().rank > 0:  # torchrun or srun: only rank 0 writes a run dir and logs
            sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled"]
        if (help_text := cli.app_help(sys.argv[1:], Path(__file__).parent / "conf", "config")) is not None:
            print(help_text)
        else:
            main()
    except cli.REPORTED as exc:
        if (status := cli.report_error(exc)) is None:  # not a user mistake: keep its traceback
            raise
        sys.exit(status)
