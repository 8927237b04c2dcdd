"""Pretrained bases: GPT-2's architecture, `model.init_from` of HF-format weights, the exact-neutral start.

The oracle is `transformers`' `GPT2LMHeadModel`: each test builds a tiny GPT-2 with random weights
(every tensor, LayerNorms and biases included, so a transposed or misplaced tensor shows), saves
it with `save_pretrained` into `tmp_path` (no network) and compares logits.
Run: python -m pytest -q tests/test_pretrained.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.errors import NCNConfigError
from ncn.integrations.pretrained import load_pretrained, locate

from conftest import time_left

transformers = pytest.importorskip("transformers")

TINY = {"vocab_size": 101, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}
SHAPE = {"vocab_size": 101, "block_size": 64, "d_model": 32, "n_layer": 2, "n_head": 4}
GPT2_BASE = {"norm": "layer", "activation": "gelu_tanh"}


def tiny_gpt2(folder: Path, seed: int = 0, safetensors: bool = True, **overrides) -> torch.nn.Module:
    """A random tiny HF GPT-2 saved to `folder` (model.safetensors, or pytorch_model.bin); returns it in eval mode."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**{**TINY, **overrides})
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # LayerNorm 1/0 and zero biases would hide a misplaced tensor
            p.normal_(0.0, 0.2)
    if safetensors:
        hf.save_pretrained(folder)
    else:
        config.save_pretrained(folder)
        state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        torch.save(state, folder / "pytorch_model.bin")
    return hf


def ours(targets: list[str], parametrisation: str = "exact_neutral", block_size: int = 64) -> ModulatedGPT:
    cfg = ModelConfig(**{**SHAPE, "block_size": block_size}, **GPT2_BASE)
    return ModulatedGPT(cfg, ModulationConfig(targets=targets, parametrisation=parametrisation)).eval()


IDX = (torch.arange(2 * 40) * 37 % 101).view(2, 40)


def test_default_base_computes_the_same_logits_as_before() -> None:
    """The default (RMSNorm, exact GELU, biases) is today's model: logits pinned from before the options existed."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=16, d_model=32, n_layer=2, n_head=2)
    assert (cfg.norm, cfg.activation, cfg.bias, cfg.init_from) == ("rms", "gelu", True, None)
    model = ModulatedGPT(cfg, ModulationConfig()).eval()
    idx = (torch.arange(32) * 7 % 64).view(2, 16)
    with torch.no_grad():
        out = model(idx, idx)
    expected = [0.18894843757152557, 0.08607370406389236, -0.03137299790978432]
    assert out.logits[1, -1, :3].tolist() == pytest.approx(expected, abs=1e-6)
    assert out.loss.item() == pytest.approx(3.786320924758911, abs=1e-6)
    assert len(model.state_dict()) == 37 and isinstance(model.norm, nn.RMSNorm)


def test_gpt2_options_are_gpt2_small_and_medium(typed_config) -> None:
    cfg = typed_config(["model=gpt2"])
    m = cfg.model
    assert (m.vocab_size, m.block_size, m.d_model, m.n_layer, m.n_head) == (50257, 1024, 768, 12, 12)
    assert (m.norm, m.activation, m.bias, m.tie_weights, cfg.data.pad_vocab_to) == ("layer", "gelu_tanh", True, True, 1)
    with torch.device("meta"):
        small = ModulatedGPT(m, ModulationConfig(targets=[])).num_parameters().total
        medium = ModulatedGPT(typed_config(["model=gpt2_medium"]).model, ModulationConfig(targets=[]))
    assert small == 124_439_808  # HF gpt2's parameter count (tied head counted once)
    assert medium.num_parameters().total == 354_823_168  # HF gpt2-medium's
    assert isinstance(medium.blocks[0].norm1, nn.LayerNorm) and medium.blocks[0].norm1.bias is not None
    assert medium.blocks[0].mlp.approximate == "tanh"
    old = typed_config(["model=gpt2_124m"]).model  # the RMSNorm scaling-study shape is unchanged
    assert (old.vocab_size, old.norm, old.activation) == (50304, "rms", "gelu")


def test_bias_false_drops_every_linear_and_norm_bias() -> None:
    cfg = ModelConfig(vocab_size=101, block_size=8, d_model=32, n_layer=1, n_head=4, norm="layer", bias=False)
    model = ModulatedGPT(cfg, ModulationConfig(targets=[]))
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert model.num_parameters().total == 101 * 32 + 8 * 32 + 3 * 32 + 12 * 32 * 32  # emb, pos, 3 LN, attn+FFN


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_plain_base_from_hf_weights_matches_transformers(tmp_path: Path, safetensors: bool) -> None:
    hf = tiny_gpt2(tmp_path, safetensors=safetensors)
    model = ours([])
    assert load_pretrained(model, str(tmp_path)) == tmp_path
    with torch.no_grad():
        delta = (model(IDX).logits - hf(IDX).logits).abs().max().item()
    assert delta <= 1e-4
    assert torch.equal(model.lm_head.weight, hf.transformer.wte.weight)  # tied head


@pytest.mark.parametrize(
    "targets",
    [["temperature"], ["gain"], ["activation"], ["temperature", "gain", "activation"]],
    ids=["temperature", "gain", "activation", "full"],
)
def test_exact_neutral_start_keeps_the_pretrained_logits(tmp_path: Path, targets: list[str]) -> None:
    hf = tiny_gpt2(tmp_path)
    plain, model = ours([]), ours(targets)
    load_pretrained(plain, str(tmp_path))
    torch.manual_seed(1)
    load_pretrained(model, str(tmp_path))
    with torch.no_grad():
        out, reference = model(IDX), plain(IDX).logits
        delta = (out.logits - hf(IDX).logits).abs().max().item()
    assert delta <= 1e-4
    assert torch.equal(out.logits, reference)  # signals of exactly 1: bit for bit the plain base
    assert all(torch.equal(s, torch.ones_like(s)) for s in out.signals.values()) and out.signals
    assert out.reg_loss.item() == 0.0


def test_paper_parametrisation_does_not_start_at_the_pretrained_logits(tmp_path: Path) -> None:
    """The control: the paper's near-neutral start (gate 0.953, precision 0.9997) moves the logits."""
    hf = tiny_gpt2(tmp_path)
    model = ours(["temperature", "gain", "activation"], parametrisation="paper")
    load_pretrained(model, str(tmp_path))
    with torch.no_grad():
        assert (model(IDX).logits - hf(IDX).logits).abs().max().item() > 1e-3


def test_shorter_block_uses_the_first_positions(tmp_path: Path) -> None:
    hf = tiny_gpt2(tmp_path)
    model = ours([], block_size=40)
    load_pretrained(model, str(tmp_path))
    assert torch.equal(model.pos_emb.weight, hf.transformer.wpe.weight[:40])
    with torch.no_grad():
        assert (model(IDX).logits - hf(IDX).logits).abs().max().item() <= 1e-4


def test_mismatches_are_refused_in_one_line(tmp_path: Path) -> None:
    tiny_gpt2(tmp_path)
    deeper = ModelConfig(vocab_size=101, block_size=64, d_model=32, n_layer=3, n_head=4, **GPT2_BASE)
    with pytest.raises(NCNConfigError, match=r"n_layer=2 does not match model.n_layer=3: set model.n_layer=2"):
        load_pretrained(ModulatedGPT(deeper, ModulationConfig(targets=[])), str(tmp_path))
    padded = ModelConfig(vocab_size=128, block_size=64, d_model=32, n_layer=2, n_head=4, **GPT2_BASE)
    with pytest.raises(NCNConfigError, match=r"vocab_size=101 does not match model.vocab_size=128.*pad_vocab_to"):
        load_pretrained(ModulatedGPT(padded, ModulationConfig(targets=[])), str(tmp_path))
    rms = ModelConfig(vocab_size=101, block_size=64, d_model=32, n_layer=2, n_head=4, activation="gelu_tanh")
    with pytest.raises(NCNConfigError, match=r"model.norm=rms, model.bias=True is not GPT-2's base"):
        load_pretrained(ModulatedGPT(rms, ModulationConfig(targets=[])), str(tmp_path))
    with pytest.raises(NCNConfigError, match=r"activation_function=gelu_new does not match model.activation=gelu"):
        load_pretrained(ModulatedGPT(ModelConfig(**SHAPE, norm="layer"), ModulationConfig(targets=[])), str(tmp_path))
    with pytest.raises(NCNConfigError, match=r"n_positions=64 is below model.block_size=65"):
        load_pretrained(ours([], block_size=65), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(NCNConfigError, match=r"model_type=llama cannot be mapped onto ncn's base"):
        load_pretrained(ours([]), str(tmp_path))


def test_bad_sources_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(NCNConfigError, match=r"is neither a folder nor a hub id"):
        locate(str(tmp_path / "missing" / "folder"))
    with pytest.raises(NCNConfigError, match=r"has no config.json"):
        locate(str(tmp_path))
    folder = tmp_path / "w"
    folder.mkdir()
    tiny_gpt2(folder, safetensors=False)
    torch.save({"x": nn.Linear(2, 2)}, folder / "pytorch_model.bin")  # a pickled module: needs full unpickling
    with pytest.raises(NCNConfigError, match=r"pytorch_model.bin cannot be read as tensors only"):
        load_pretrained(ours([]), str(folder))
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(NCNConfigError, match=r"has neither model.safetensors nor pytorch_model.bin"):
        load_pretrained(ours([]), str(folder))


def test_a_hub_id_offline_and_not_cached_is_refused_in_one_line(tmp_path: Path) -> None:
    code = "from ncn.integrations.pretrained import locate; locate('gpt2')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=time_left())
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "ncn.errors.NCNConfigError: model.init_from=gpt2: not in the local hub cache and the hub cannot be reached: "
        "connect to the network once, or pass a local folder of HF-format weights"
    )


def test_exact_neutral_config_and_transforms() -> None:
    from ncn.model.signals import transform

    zero = torch.zeros(3)
    for name in ("gain", "precision", "ffn_gate"):
        assert torch.equal(transform(name, zero, 4.0, "exact_neutral"), torch.ones(3))
    z = torch.tensor([-3.0, 1.0, 5.0])
    assert transform("precision", z, 4.0, "exact_neutral").tolist() == pytest.approx(
        [0.049787, 2.718282, 4.0], abs=1e-6
    )
    assert transform("ffn_gate", z, 4.0, "exact_neutral").tolist() == pytest.approx(
        [0.094851, 1.462117, 1.986614], abs=1e-6
    )
    with pytest.raises(NCNConfigError, match=r"exact_neutral has no neutral Swish-β"):
        ModulationConfig(parametrisation="exact_neutral", activation="swish_beta")
    with pytest.raises(NCNConfigError, match=r"parametrisation=exact is unknown: choose one of paper, exact_neutral"):
        ModulationConfig(parametrisation="exact")
    with pytest.raises(NCNConfigError, match=r"model.norm=batch is unknown: choose one of rms, layer"):
        ModelConfig(norm="batch")
    assert ModulationConfig().parametrisation == "paper"
