"""Config validation: every impossible model/NCN config fails with a one-line message naming the fix.

`python -m pytest -q tests/test_model_config.py`.
"""

import pytest
import torch

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.errors import NCNConfigError


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(NCNConfigError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_d_model_not_divisible_by_n_head():
    msg = _raises(r"model\.d_model=100 is not divisible by model\.n_head=3", ModelConfig, d_model=100, n_head=3)
    assert "e.g. model.d_model=99" in msg


def test_d_model_not_divisible_by_salience_heads():
    msg = _raises(
        r"ncn\.heads=3 does not divide model\.d_model=32",
        ModulatedGPT,
        ModelConfig(vocab_size=97, block_size=8, d_model=32, n_layer=1, n_head=4),
        ModulationConfig(heads=3),
    )
    assert "e.g. ncn.heads=2" in msg


def test_salience_heads_irrelevant_without_salience_pool():
    mc = ModelConfig(vocab_size=97, block_size=8, d_model=32, n_layer=1, n_head=4)
    assert ModulatedGPT(mc, ModulationConfig(heads=3, pooling="none")).controller.salience is None
    assert ModulatedGPT(mc, ModulationConfig(targets=[], heads=3)).controller is None


def test_unknown_target():
    msg = _raises(r"ncn\.targets contains unknown target 'attention'", ModulationConfig, targets=["gain", "attention"])
    assert msg.endswith("choose from temperature, gain, activation, head_gate, layer_gate")


def test_unknown_pooling():
    _raises(r"ncn\.pooling=mean is unknown: choose one of causal, global, none", ModulationConfig, pooling="mean")


def test_unknown_activation():
    _raises(r"ncn\.activation=relu is unknown: choose one of gate, swish_beta", ModulationConfig, activation="relu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": "gain"}, r"ncn\.targets='gain' must be a list: write ncn\.targets=\[gain\]"),
        ({"targets": ["gain", "gain"]}, r"repeats a target"),
        ({"precision_max": 0.5}, r"ncn\.precision_max=0\.5 is below the neutral precision 1"),
        ({"homeostatic_lambda": -0.1}, r"ncn\.homeostatic_lambda=-0\.1 is negative"),
        ({"hidden_dim": 0}, r"ncn\.hidden_dim=0 must be a positive integer: set e\.g\. ncn\.hidden_dim=64$"),
        ({"heads": 0}, r"ncn\.heads=0 must be a positive integer: set e\.g\. ncn\.heads=2$"),
        ({"controller_activation": "swish"}, r"ncn\.controller_activation=swish is unknown: choose one of tanh, relu"),
        ({"controller_norm": "layer"}, r"ncn\.controller_norm=layer is unknown: choose one of rms, none$"),
    ],
)
def test_other_modulation_errors(kwargs, match):
    _raises(match, ModulationConfig, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout": 1.0}, r"model\.dropout=1\.0 is outside \[0, 1\)"),
        ({"block_size": 0}, r"model\.block_size=0 must be a positive integer: set e\.g\. model\.block_size=256$"),
        ({"n_layer": 0}, r"model\.n_layer=0 must be a positive integer: set e\.g\. model\.n_layer=6$"),  # its default
        ({"d_ff": -4}, r"model\.d_ff=-4 must be a positive integer: set e\.g\. model\.d_ff=null$"),
        ({"norm_eps": 0.0}, r"model\.norm_eps=0\.0 is not positive: use e\.g\. model\.norm_eps=1e-5, or null"),
    ],
)
def test_other_model_errors(kwargs, match):
    _raises(match, ModelConfig, **kwargs)


def test_norm_eps_reaches_every_norm():
    model = ModulatedGPT(ModelConfig(d_model=8, n_layer=2, n_head=2, vocab_size=16, norm_eps=1e-5), ModulationConfig())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm) and m is not model.controller.norm]
    assert len(norms) == 5 and {m.eps for m in norms} == {1e-5}  # 2 per block + the final norm
    assert ModulatedGPT(ModelConfig(d_model=8, n_layer=1, n_head=2, vocab_size=16)).norm.eps is None


def test_sequence_longer_than_block_size():
    model = ModulatedGPT(ModelConfig(vocab_size=97, block_size=8, d_model=32, n_layer=1, n_head=4), ModulationConfig())
    msg = _raises(r"sequence length T=9 exceeds model\.block_size=8", model, torch.zeros(1, 9, dtype=torch.long))
    assert "crop the input to the last 8 tokens" in msg


def test_typed_conversion_gives_plain_lists_and_default_d_ff(typed_config):
    cfg = typed_config(["model=tiny", "ncn=no_activation"])
    assert type(cfg.ncn.targets) is list and cfg.ncn.targets == ["temperature", "gain"]
    assert cfg.model.ffn_dim == 128 and cfg.model.d_ff is None
