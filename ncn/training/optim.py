"""AdamW with decoupled weight decay on matrices only, and a cosine schedule with linear warm-up.

`freeze_base` leaves only the controller trainable (`trainer.freeze=base`), `param_groups` splits
the trainable parameters (weight decay only on >= 2-D weights), `lr_at` is the schedule as
a pure function of the optimizer step, `build_optimizer` / `build_scheduler` wire both into
`torch.optim.AdamW` and `LambdaLR` (which can start at any step, so a resume rebuilds the schedule
instead of restoring it). Settings: `ncn.config.OptimConfig` (defaults of the reference run,
NCN paper §6).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ncn.config import OptimConfig
from ncn.errors import NCNConfigError
from ncn.model.gpt import ModulatedGPT


def freeze_base(model: ModulatedGPT) -> tuple[int, int]:
    """Stop gradients to every parameter outside `model.controller` and the control input's embedding
    `model.control` (NCN paper §3.1: the base θ is fixed, only the controller learns); returns
    (trainable, frozen) parameter counts, tied weights once.

    Raises:
        NCNConfigError: the model has no controller (nothing would train).
    """
    if model.controller is None:
        raise NCNConfigError(
            "trainer.freeze=base leaves nothing to train in a model without a controller (ncn=none): "
            "choose an NCN option (e.g. ncn=full) or trainer.freeze=none"
        )
    learns = [model.controller] + ([model.control] if model.control is not None else [])
    trainable = {id(p) for module in learns for p in module.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return trainable_counts(model)


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of `model`; tied weights counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: >= 2-D weights (matrices, embeddings) decay, the rest (biases, norm
    scales, the salience query vector) does not.

    Every trainable parameter lands in exactly one group (asserted); tied weights count once.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    grouped = [id(p) for p in decay + no_decay]
    assert len(grouped) == len(set(grouped)) == len(params), "a parameter is in zero or two optimizer groups"
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`; fused kernel on CUDA unless `cfg.fused` says otherwise."""
    on_cuda = next(model.parameters()).is_cuda
    fused = on_cuda if cfg.fused is None else cfg.fused
    if fused and not on_cuda:
        raise NCNConfigError("optim.fused=true needs CUDA parameters: use optim.fused=null (auto) on CPU")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused
    )


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to `lr`, cosine to `min_lr`.

    step < warmup_steps: lr * (step + 1) / (warmup_steps + 1) (never 0, as in nanoGPT);
    warmup_steps <= step < total_steps: min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2;
    step >= total_steps: min_lr.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, start_step: int = 0
) -> LambdaLR:
    """`LambdaLR` applying `lr_at` (as a factor of `cfg.lr`), positioned so the next optimizer step is `start_step`.

    A fresh run starts at 0; a resume at the checkpoint's step, with the current `cfg` and
    `total_steps` (so a resume may change lr or the step budget). After construction every
    group's lr is the rate of step `start_step`; call `step()` after each optimizer step.
    """

    def factor(step: int) -> float:
        return (
            lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=total_steps) / cfg.lr
        )

    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr  # LRScheduler's documented start value when last_epoch != -1
    return LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def apply_settings(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Set every param group's hyperparameters (betas, eps, weight decay) from `cfg`.

    `optimizer.load_state_dict` brings back the checkpoint's hyperparameters with the moments;
    this puts the current config's back, so a resume with e.g. `optim.beta2=0.95` uses it. The
    groups are `param_groups`' two: decay (`cfg.weight_decay`), then no decay (0).
    """
    for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0), strict=True):
        group["betas"], group["eps"], group["weight_decay"] = (cfg.beta1, cfg.beta2), cfg.eps, decay
