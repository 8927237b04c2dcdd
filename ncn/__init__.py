"""Neuromodulatory Control Networks (NCN paper; the method in our words: docs/method.md).

A GPT-style language model whose attention temperature, residual gains and FFN activation are
set token by token and layer by layer by a small controller network. The model API below is
imported on first use (PEP 562), so `import ncn.config` stays free of torch; nothing here
imports Hydra or MLflow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "ncn.config",
    "ModulationConfig": "ncn.config",
    "ControlConfig": "ncn.config",
    "ModulatedGPT": "ncn.model.gpt",
    "ModelOutput": "ncn.model.gpt",
    "ParamCount": "ncn.model.gpt",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ncn' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
