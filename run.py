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
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

import ncn.schema  # noqa: F401  (registers resolvers and schema/ configs before composition)
from ncn.errors import NCNConfigError

TASKS = {"train": "ncn.train", "prepare": "ncn.data", "generate": "ncn.generate",
         "analyze": "ncn.analysis", "eval": "ncn.evaluate", "report": "ncn.report"}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    if cfg.task not in TASKS:
        raise NCNConfigError(f"task={cfg.task} is unknown: choose one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[cfg.task]).main(cfg)


def one_line(exc: BaseException) -> str:
    """Our own message if the cause chain holds an NCNConfigError, else Hydra's/OmegaConf's, on one line."""
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    first = [str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__ for e in chain]
    for e, line in zip(chain, first):
        if isinstance(e, NCNConfigError):
            return line
        if getattr(e, "options", None):  # Hydra's MissingConfigException: an unknown group option
            return f"{line}: choose one of {', '.join(e.options)}"
        if isinstance(e, (ConfigAttributeError, ConfigKeyError)) and e.parent_node is not None:  # a typo'd key
            keys = [str(k) for k in e.parent_node if str(k) != "hydra" and not str(k).startswith("_")]
            return f"{e.full_key} is not a setting: check the spelling, valid keys here are {', '.join(keys)}"
        if isinstance(e, ValidationError) and e.child_node is not None:  # a value of the wrong type
            return f"{e.full_key}={e.value} is invalid ({line}): use a value like {e.full_key}={e.child_node}"
    return ": ".join(dict.fromkeys(line for line in first[:2] if "$VALUE" not in line))


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
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
