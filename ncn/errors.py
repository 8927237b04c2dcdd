"""User-facing errors of `ncn`.

Every mistake a user can make in a config, a file or a command line ends in one of
these exceptions; `run.py` prints its one-line message as the last line of stderr and
exits with status 2, instead of a traceback.
"""


class NCNConfigError(ValueError):
    """A bad config value, file or command-line choice.

    The message is one line: the offending value, then how to fix it, e.g.
    ``model.d_model=100 is not divisible by model.n_head=3: choose d_model as a multiple
    of n_head (e.g. d_model=96)``.
    """


class CheckpointError(NCNConfigError):
    """A checkpoint that cannot be used: missing, truncated, not a checkpoint, unsafe to
    unpickle, or made for a different model shape. The message names the file."""
