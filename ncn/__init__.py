"""Neuromodulatory Control Networks (NCN paper, see ../shared/spec/ncn.md).

A GPT-style language model whose attention temperature, residual gains and FFN
activation are set token by token and layer by layer by a small controller network.
"""

from ncn.config import ModelConfig, ModulationConfig
from ncn.gpt import ModelOutput, ModulatedGPT, ParamCount

__all__ = ["ModelConfig", "ModulationConfig", "ModulatedGPT", "ModelOutput", "ParamCount"]
