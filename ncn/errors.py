"""User-facing errors of `ncn`.

Every mistake a user can make in a config, a file or a command line ends in one of
these exceptions; `run.py` prints its one-line message as the last line of stderr and
exits with status 2, instead of a traceback.
"""

from hydra.errors import OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

# Example values of the keys that a group option leaves mandatory (`???`), for the fix of a missing one.
MISSING_EXAMPLES = {
    "data.path": "data.path=<folder|glob|file> for data=text_files, data.path=<hub id|folder> for data=hf",
}
# Appended to Hydra's error for a command-line override it cannot parse (an unquoted space or comma).
QUOTE_HINT = ("quote a value with spaces or commas, e.g. \"prompt='To be, or not'\" "
              "(the double quotes are for the shell, the single quotes for Hydra)")


class NCNConfigError(ValueError):
    """A bad config value, file or command-line choice.

    The message is one line: the offending value, then how to fix it, e.g.
    ``model.d_model=100 is not divisible by model.n_head=3: choose d_model as a multiple
    of n_head (e.g. d_model=96)``.
    """


class CheckpointError(NCNConfigError):
    """A checkpoint that cannot be used: missing, truncated, not a checkpoint, unsafe to
    unpickle, or made for a different model shape. The message names the file."""


def one_line(exc: BaseException) -> str:
    """Our own message if the cause chain holds an NCNConfigError, else Hydra's/OmegaConf's, on one line."""
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    first = [str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__ for e in chain]
    for e, line in zip(chain, first):
        if isinstance(e, NCNConfigError):
            return line
        if isinstance(e, OverrideParseException) or line.startswith("Ambiguous value for argument"):
            return f"{line}: {QUOTE_HINT}"
        if isinstance(e, MissingMandatoryValue) and e.full_key:  # a `???` the chosen option needs
            example = MISSING_EXAMPLES.get(e.full_key)
            fix = f" (e.g. {example})" if example else ""
            return f"{e.full_key} is required here: set {e.full_key}=<value>{fix}"
        if getattr(e, "options", None):  # Hydra's MissingConfigException: an unknown group option
            return f"{line}: choose one of {', '.join(e.options)}"
        if isinstance(e, (ConfigAttributeError, ConfigKeyError)) and e.parent_node is not None:  # a typo'd key
            keys = [str(k) for k in e.parent_node if str(k) != "hydra" and not str(k).startswith("_")]
            return f"{e.full_key} is not a setting: check the spelling, valid keys here are {', '.join(keys)}"
        if isinstance(e, ValidationError) and e.child_node is not None:  # a value of the wrong type
            return f"{e.full_key}={e.value} is invalid ({line}): use a value like {e.full_key}={e.child_node}"
    return ": ".join(dict.fromkeys(line for line in first[:2] if "$VALUE" not in line))
