"""`python run.py task=prepare data=<option>`: build (or verify) the token cache of a data config, print its summary."""

from __future__ import annotations

from ncn.config import RunConfig, RunContext
from ncn.data.loader import DataModule


def main(cfg: RunConfig, ctx: RunContext) -> None:
    """Build or verify the token cache of `cfg.data` (NCN paper §6); prints one summary line.

    Raises:
        NCNConfigError: the source cannot be loaded, or `data.total_tokens` disagrees with it.
    """
    DataModule(cfg.data).prepare()
