"""A minimal re-implementation of the reference implementation's `ModulatedLLM` forward pass: the import tests' oracle.

Written from the reference repository (github.com/Mmorgan-ML/Neuromodulatory-Control-Networks):
`ncn_architecture/config.py` (`NCNConfig`, all fields and defaults), `ncn_architecture/model.py`
(`ModulatedLLM.__init__` and `forward`: embeddings, `ncn(control_input=x, current_hidden_state=x)`,
per-layer signal slices `v[:, :, i, :]`, final norm, head), `ncn/ncn.py`
(`NeuromodulatoryControlNetwork`: learned query, `nn.MultiheadAttention` salience pooling,
`layer1`/`layer2`, the CPU transforms gain = sigmoid + 0.5, precision = softplus + 0.01,
ffn_gate = sigmoid, the neutral output biases), `transformer_layer.py` (`RMSNorm` with float
accumulation, `ModulatedTransformerLayer`: gain on both residual branches),
`attention.py` (bias-free projections, q *= precision clamped at 4, causal SDPA) and
`feedforward.py` (linear1 -> exact GELU -> linear2, times ffn_gate). Parameter names and shapes
are the reference's, so its state dict is this module's. Only the uncached eval-mode forward.
`save_reference_checkpoint` writes the dict the reference's `train.py` saves (its `ckpt_state`).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class NCNConfig:
    """The reference's `NCNConfig` (ncn_architecture/config.py), pickled under its own module name."""

    vocab_size: int = 50257
    d_model: int = 768
    nhead: int = 12
    num_layers: int = 12
    dim_feedforward: int | None = None
    dropout: float = 0.1
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_weights: bool = True
    ncn_input_dim: int | None = None
    ncn_hidden_dim: int = 128
    ncn_heads: int = 4
    num_mod_signals: int = 3
    modulation_signal_names: list[str] = field(default_factory=lambda: ["gain", "precision", "ffn_gate"])
    ncn_activation_fn: str = "relu"
    homeostatic_lambda: float = 0.01
    gradient_checkpointing: bool = False
    ncn_output_dim: int | None = None

    def __post_init__(self) -> None:
        self.dim_feedforward = self.dim_feedforward or 4 * self.d_model
        self.ncn_input_dim = self.ncn_input_dim or self.d_model
        self.ncn_output_dim = self.num_mod_signals * self.num_layers


NCNConfig.__module__ = "ncn_architecture.config"
_ACT = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
_TRANSFORMS = {
    "gain": lambda z: torch.sigmoid(z) + 0.5,
    "precision": lambda z: F.softplus(z) + 0.01,
    "ffn_gate": torch.sigmoid,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).type_as(x) * self.weight


class NeuromodulatoryControlNetwork(nn.Module):
    def __init__(self, c: NCNConfig) -> None:
        super().__init__()
        self.c = c
        self.control_query = nn.Parameter(torch.randn(1, 1, c.ncn_input_dim))
        self.pooling_attn = nn.MultiheadAttention(embed_dim=c.ncn_input_dim, num_heads=c.ncn_heads, batch_first=True)
        self.layer1 = nn.Linear(c.ncn_input_dim, c.ncn_hidden_dim)
        self.layer2 = nn.Linear(c.ncn_hidden_dim, c.ncn_output_dim)
        with torch.no_grad():  # _init_output_biases
            self.layer2.bias.zero_()
            view = self.layer2.bias.view(c.num_layers, c.num_mod_signals)
            for i, name in enumerate(c.modulation_signal_names):
                view[:, i].fill_({"precision": 0.525, "ffn_gate": 3.0}.get(name, 0.0))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        B, T, _ = x.shape
        pooled, _ = self.pooling_attn(self.control_query.expand(B, -1, -1), x, x)  # (B, 1, D): global salience
        hidden = _ACT[self.c.ncn_activation_fn](self.layer1(pooled + x))  # phasic integration (B, T, D)
        raw = self.layer2(hidden).view(B, T, self.c.num_layers, self.c.num_mod_signals)
        return {n: _TRANSFORMS[n](raw[:, :, :, i].unsqueeze(-1)) for i, n in enumerate(self.c.modulation_signal_names)}


class MultiHeadAttention(nn.Module):
    def __init__(self, c: NCNConfig) -> None:
        super().__init__()
        self.nhead, self.head_dim = c.nhead, c.d_model // c.nhead
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.out_proj = nn.Linear(c.d_model, c.d_model, bias=False)

    def forward(self, x: Tensor, precision: Tensor | None) -> Tensor:
        B, T, D = x.shape
        heads = (B, T, self.nhead, self.head_dim)
        q, k, v = (p(x).view(heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        if precision is not None:  # (B, T, 1) -> (B, 1, T, 1), clamped at 4
            q = q * precision.unsqueeze(1).clamp(max=4.0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).contiguous().view(B, T, D))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, c: NCNConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(c.d_model, c.dim_feedforward)
        self.linear2 = nn.Linear(c.dim_feedforward, c.d_model)

    def forward(self, x: Tensor, ffn_gate: Tensor | None) -> Tensor:
        x = self.linear2(F.gelu(self.linear1(x)))
        return x if ffn_gate is None else x * ffn_gate


class ModulatedTransformerLayer(nn.Module):
    def __init__(self, c: NCNConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(c)
        self.feed_forward = PositionwiseFeedForward(c)
        self.norm1 = RMSNorm(c.d_model, c.layer_norm_eps)
        self.norm2 = RMSNorm(c.d_model, c.layer_norm_eps)

    def forward(self, x: Tensor, s: dict[str, Tensor]) -> Tensor:
        gain = s.get("gain")
        a = self.self_attn(self.norm1(x), s.get("precision"))
        x = x + a if gain is None else a * gain + x
        f = self.feed_forward(self.norm2(x), s.get("ffn_gate"))
        return x + f if gain is None else f * gain + x


class ModulatedLLM(nn.Module):
    def __init__(self, c: NCNConfig) -> None:
        super().__init__()
        self.config = c
        self.token_embeddings = nn.Embedding(c.vocab_size, c.d_model)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.d_model)
        self.ncn = NeuromodulatoryControlNetwork(c)
        self.transformer_layers = nn.ModuleList(ModulatedTransformerLayer(c) for _ in range(c.num_layers))
        self.final_norm = RMSNorm(c.d_model, c.layer_norm_eps)
        self.output_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_weights:
            self.token_embeddings.weight = self.output_head.weight

    def signals(self, idx: Tensor) -> dict[str, Tensor]:
        """Every layer's signals for idx (B, T): name -> (B, T, num_layers, 1)."""
        return self.ncn(self._embed(idx))

    def _embed(self, idx: Tensor) -> Tensor:
        return self.token_embeddings(idx) + self.position_embeddings(torch.arange(idx.shape[1]))

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, T, vocab_size) of token ids idx (B, T)."""
        x = self._embed(idx)
        signals = self.ncn(x)
        for i, layer in enumerate(self.transformer_layers):
            x = layer(x, {k: v[:, :, i, :] for k, v in signals.items()})
        return self.output_head(self.final_norm(x))


def randomise(model: ModulatedLLM, seed: int) -> None:
    """Random weights far from init, so every signal leaves its neutral value (precision reaches the clamp)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "final_norm.weight":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name == "ncn.layer2.weight":
                p.copy_(0.8 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        model.token_embeddings.weight.mul_(8.0)  # embeddings of norm ~ 1, as trained models have


def save_reference_checkpoint(file: Path, model: ModulatedLLM, extra: dict[str, Any] | None = None) -> None:
    """Save `model` as the reference's train.py does: its `ckpt_state` dict, config pickled as
    `ncn_architecture.config.NCNConfig` (the module is registered only while saving)."""
    package, module = types.ModuleType("ncn_architecture"), types.ModuleType("ncn_architecture.config")
    module.NCNConfig = NCNConfig  # type: ignore[attr-defined]
    package.config = module  # type: ignore[attr-defined]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    state = {
        "epoch": 0,
        "sequences_processed_this_epoch": 4000,
        "global_step": 500,
        "processed_tokens": 2_048_000,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0).state_dict(),
        "scaler_state_dict": None,
        "config": model.config,
        "best_val_loss": 5.25,
        "device_type": "cpu",
        **(extra or {}),
    }
    saved = {name: sys.modules.get(name) for name in ("ncn_architecture", "ncn_architecture.config")}
    sys.modules.update({"ncn_architecture": package, "ncn_architecture.config": module})
    try:
        torch.save(state, file)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
