"""Entry point: `python run.py [group=option ...] [key=value ...]` composes conf/ and runs `task`.

Tasks: train (default), prepare, generate, analyze, eval, report; each is `ncn.<module>.main(cfg)`,
imported only when chosen. A config mistake ends with `error: <message>` as the last stderr
line and exit status 2; the returned value (final val loss for train) is a sweeper's objective.
"""

import importlib
import os
import sys

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import ncn.schema  # noqa: F401  (registers resolvers and schema/ configs before composition)
from ncn.errors import NCNConfigError, one_line

TASKS = {"train": "ncn.train", "prepare": "ncn.data", "generate": "ncn.generate",
         "analyze": "ncn.analysis", "eval": "ncn.evaluate", "report": "ncn.report"}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    if cfg.task not in TASKS:
        raise NCNConfigError(f"task={cfg.task} is unknown: choose one of {', '.join(TASKS)}")
    for key in sorted(OmegaConf.missing_keys(cfg)):  # a `???` left unset: fail before any heavy import
        OmegaConf.select(cfg, key, throw_on_missing=True)  # raises MissingMandatoryValue naming the key
    return importlib.import_module(TASKS[cfg.task]).main(cfg)


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: only rank 0 writes a run dir and logs
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # config errors reach us as exceptions, not as a printed report
    try:
        main()
    except (NCNConfigError, HydraException, OmegaConfBaseException) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.filename is None:  # not a bad path: a real failure, keep its traceback
            raise
        print(f"error: cannot write {exc.filename} ({exc.strerror}): check the path and its permissions "
              "(e.g. hydra.run.dir=<writable folder>)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:  # train says where it stopped and how to resume
        message = str(exc) if str(exc).startswith("interrupted") else (
            "interrupted (a stopped training run resumes from its last checkpoint with trainer.resume=latest)")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(130)
