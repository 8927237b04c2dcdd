"""Hydra registration that must happen before `conf/` is composed (imported by ncn.cli and tests).

The schema: `RunConfig` (ncn/config.py) stored as the config `ncn_schema`, which
conf/config.yaml extends, so every group (`model`, `ncn`, `data`, ...) is typed: a typo'd key
or a wrongly typed value fails at compose time, and `ncn=glob(*)` sweeps only real options. It
is not a config group, so `--help` lists only the groups a user picks.

OmegaConf resolvers: `${vocab_size:<tokenizer>,<multiple>}` (the tokenizer's vocabulary padded
to a multiple), `${launch_dir:}` (absolute launch directory), `${conf_dir:}` (this repository's
conf/, which sweeps/*.yaml put on the search path) and `${iso_d_ff:<targets>}` (the
iso-parameter baseline's FFN width; it builds a controller on the meta device, so only configs
that use it import torch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ncn.config import ModelConfig, ModulationConfig, RunConfig, vocab_size

SCHEMA_NAME = "ncn_schema"


def launch_dir() -> str:
    """Directory `run.py` was started in (Hydra 1.3 jobs do not chdir; multirun jobs may)."""
    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def conf_dir() -> str:
    """Absolute path of this repository's conf/ (resolver `${conf_dir:}`): sweeps/*.yaml put it on
    Hydra's search path, so `-cd <repo>/sweeps` works from any launch directory."""
    return str(Path(__file__).resolve().parents[1] / "conf")


def iso_d_ff(*targets: str, _root_: DictConfig) -> int:
    """FFN width that gives the plain Transformer the parameter count of the NCN with `targets`.

    Resolver `${iso_d_ff:temperature,gain,activation}` (conf/ncn/none_iso.yaml, NCN paper §7).
    Widening d_ff by one adds n_layer·(2·d_model + 1) parameters (fc weight row + bias, proj
    weight column), so d_ff = 4·d_model + round(controller params / (n_layer·(2·d_model + 1)));
    the residual mismatch is at most n_layer·(d_model + 1) parameters (< 0.01 % for the presets).
    The controller is built on the meta device (no memory, no init cost) with the run's own
    `ncn.*` settings and `targets`.
    """
    import torch

    from ncn.model.gpt import ModulatedGPT

    m, settings = _root_.model, OmegaConf.to_container(_root_.ncn, resolve=True)
    settings["targets"] = list(targets)
    shape = ModelConfig(
        vocab_size=1, block_size=1, d_model=int(m.d_model), n_layer=int(m.n_layer), n_head=int(m.n_head)
    )
    with torch.device("meta"):
        controller = ModulatedGPT(shape, ModulationConfig(**settings)).num_parameters().controller
    return 4 * shape.d_model + round(controller / (shape.n_layer * (2 * shape.d_model + 1)))


def _vocab_size(tokenizer: Any, multiple: Any) -> int:
    return vocab_size(str(tokenizer), int(multiple))


def register() -> None:
    """Register the resolvers and the schema config (idempotent)."""
    for name, fn in (
        ("vocab_size", _vocab_size),
        ("launch_dir", launch_dir),
        ("iso_d_ff", iso_d_ff),
        ("conf_dir", conf_dir),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


register()
