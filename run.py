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
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ncn import cli
from ncn.errors import NCNConfigError, RunFailedError, exit_code
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
    run_cfg, ctx = cli.typed(cfg)
    return importlib.import_module(f"ncn.tasks.{TASK_MODULES[run_cfg.task]}").main(run_cfg, ctx)


if __name__ == "__main__":
    os.environ["HYDRA_FULL_ERROR"] = "1"  # config errors reach us as exceptions, not as a printed report
    try:
        if distributed_env().rank > 0:  # torchrun or srun: only rank 0 writes a run dir and logs
            sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled"]
        if (help_text := cli.app_help(sys.argv[1:], Path(__file__).parent / "conf", "config")) is not None:
            print(help_text)
        else:
            main()
    except (NCNConfigError, RunFailedError, HydraException, OmegaConfBaseException, KeyboardInterrupt) as exc:
        print(f"error: {cli.one_line(exc)}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, (HydraException, OmegaConfBaseException)) else exit_code(exc))
    except OSError as exc:
        if exc.filename is None:  # not a bad path: a real failure, keep its traceback
            raise
        print(f"error: {cli.os_error_line(exc)}", file=sys.stderr)
        sys.exit(2)
