"""Error types of `ncn`, one per way a run can end badly, each with its exit status.

| class | meaning | exit status of run.py |
|---|---|---|
| `NCNConfigError` | a user mistake: a bad config value, file, path or command-line choice | 2 |
| `CheckpointError` | a checkpoint that cannot be used (a kind of user mistake) | 2 |
| `DiskFullError` | no space left where a checkpoint, the token cache or another file is written | 2 |
| `RunFailedError` | the run itself failed although the input was valid, e.g. `DivergenceError` | 3 |
| `KeyboardInterrupt` | Ctrl-C or SIGTERM (preemption) | 130 |

Each message is one line: what is wrong, then how to fix it; a warning is one `warning: <message>`
line (`show_warning`). This module imports nothing but the standard library; the entry point
(`ncn.cli`) formats Hydra's and OmegaConf's errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

USAGE_EXIT = 2
RUN_FAILED_EXIT = 3
INTERRUPTED_EXIT = 130


class NCNConfigError(ValueError):
    """A bad config value, file or command-line choice (exit status 2).

    The message is one line: the offending value, then how to fix it, e.g.
    ``model.d_model=100 is not divisible by model.n_head=3: choose d_model as a multiple
    of n_head (e.g. d_model=96)``.
    """

    exit_code = USAGE_EXIT


class CheckpointError(NCNConfigError):
    """A checkpoint that cannot be used: missing, truncated, not a checkpoint, unsafe to
    unpickle, or made for a different model shape. The message names the file."""


class DiskFullError(NCNConfigError):
    """No space left on the device a file is written to (ENOSPC, EDQUOT, or a write that failed
    with less free space than it needed): the message names the folder, the space needed and free,
    and what survives. Exit status 2: freeing space or choosing another folder fixes it."""


NO_SPACE = frozenset({28, 122})  # errno.ENOSPC, errno.EDQUOT (Linux)


def fixed(x: float, spec: str) -> str:
    """format(x, spec) without a negative zero: -0.00001 with "+.4f" is "+0.0000", not "-0.0000"."""
    text = format(x, spec)
    return format(0.0, spec) if text.lstrip("+-").strip("0.,%") == "" and text.startswith("-") else text


def mb(n_bytes: float) -> str:
    """Bytes as megabytes for a message: "12.3 MB"."""
    return f"{n_bytes / 1e6:,.1f} MB"


class RunFailedError(RuntimeError):
    """A run that failed on its own with a valid config: a result, not a usage error (exit status 3)."""

    exit_code = RUN_FAILED_EXIT


class DivergenceError(RunFailedError):
    """Training diverged: a NaN/Inf loss or gradient beyond `trainer.skip_nonfinite` skips.

    The message names the step and the newest checkpoint whose weights and eval are finite.
    """


def exit_code(exc: BaseException) -> int:
    """Exit status of run.py for an exception that ends a run (see the table above); 1 otherwise."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED_EXIT
    return int(getattr(exc, "exit_code", 1))


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """`warnings.showwarning` of run.py and `python -m ncn.tasks.report`: one `warning: <message>` line on
    stderr instead of Python's `<file>:<line>: UserWarning: <message>` and the source line below it; a
    warning of another kind than UserWarning names its kind and origin, e.g. `warning: ... (FutureWarning,
    torch/amp.py:12)`."""
    text = " ".join(str(message).split())
    if category is not UserWarning:
        text = f"{text} ({category.__name__}, {'/'.join(Path(filename).parts[-2:])}:{lineno})"
    print(f"warning: {text}", file=sys.stderr, flush=True)
