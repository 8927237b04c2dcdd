"""Hydra registration that must happen before `conf/` is composed (imported by run.py and tests).

OmegaConf resolvers: `${gpt2_vocab:<multiple>}` (the tokenizer's vocab padded to a multiple, so
the logged `model.vocab_size` is the real one), `${launch_dir:}` (absolute launch directory) and
`${iso_d_ff:<targets>}` (the iso-parameter baseline's FFN width) and `${conf_dir:}` (this
repository's conf/, which sweeps/*.yaml put on the search path); the last two in ncn/sweep.py.
Structured-config schemas in the ConfigStore group `schema/` (`schema/model`, `schema/ncn`,
`schema/optim`, `schema/trainer`): option files extend them, so a typo'd key or a wrongly typed
value fails at compose time, and `ncn=glob(*)` sweeps only real options. `schema/run`
(`RunConfig`) types the top-level keys of conf/config.yaml, which extends it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ncn.config import ModelConfig, ModulationConfig
from ncn.optim import OptimConfig
from ncn.sweep import conf_dir, iso_d_ff
from ncn.train import TrainerConfig


@dataclass
class RunConfig:
    """Types of conf/config.yaml's top-level keys (values and their meaning live there)."""

    seed: int = 0
    task: str = "train"
    run_name: str | None = None
    checkpoint: str | None = None
    prompt: str = ""
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    sweep_run: str | None = None


SCHEMAS: dict[str, type] = {"model": ModelConfig, "ncn": ModulationConfig, "optim": OptimConfig, "trainer": TrainerConfig}


def launch_dir() -> str:
    """Directory `run.py` was started in (Hydra 1.3 jobs do not chdir; multirun jobs may)."""
    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def gpt2_vocab(multiple: Any) -> int:
    """GPT-2's 50,257 tokens rounded up to a multiple of `multiple` (64 -> 50304)."""
    from ncn.data import padded_vocab_size  # the tokenizer loads only when a config needs it

    return padded_vocab_size(int(multiple))


def schema_node(cls: type) -> DictConfig:
    """Typed node of dataclass `cls` plus its `_target_`, so option files can name the target."""
    node = OmegaConf.structured(cls)
    OmegaConf.set_struct(node, False)
    node["_target_"] = f"{cls.__module__}.{cls.__qualname__}"
    OmegaConf.set_struct(node, True)
    return node


def register() -> None:
    """Register the resolvers and the `schema/` configs (idempotent)."""
    for name, fn in (("gpt2_vocab", gpt2_vocab), ("launch_dir", launch_dir), ("iso_d_ff", iso_d_ff),
                     ("conf_dir", conf_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    store = ConfigStore.instance()
    for group, cls in SCHEMAS.items():
        store.store(group="schema", name=group, node=schema_node(cls))
    run = OmegaConf.structured(RunConfig)
    OmegaConf.set_struct(run, False)  # the group nodes (model, ncn, ...) join it; Hydra re-closes the root
    store.store(group="schema", name="run", node=run)


register()
