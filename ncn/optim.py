"""AdamW with decoupled weight decay on matrices only, and a cosine schedule with linear warm-up.

`param_groups` splits parameters (weight decay only on >= 2-D weights), `lr_at` is the schedule as
a pure function of the optimizer step, `build_optimizer` / `build_scheduler` wire both into
`torch.optim.AdamW` and `LambdaLR`. Defaults follow the reference run (NCN paper §6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ncn.errors import NCNConfigError


@dataclass
class OptimConfig:
    """AdamW and learning-rate schedule settings (`conf/optim/adamw.yaml`).

    lr: peak learning rate (> 0), reached after `warmup_steps` optimizer steps.
    min_lr: floor of the cosine decay, in [0, lr]; held after the last scheduled step.
    warmup_steps: linear warm-up length in optimizer steps (>= 0).
    weight_decay: decoupled AdamW decay (>= 0), applied to >= 2-D weights only.
    beta1, beta2: Adam moment coefficients in [0, 1). eps: Adam epsilon (> 0).
    fused: fused AdamW kernel; None = on when the parameters live on CUDA.

    Raises:
        NCNConfigError: a value outside the ranges above.
    """

    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    fused: bool | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise NCNConfigError(f"optim.lr={self.lr} must be > 0: use e.g. optim.lr=6e-4")
        if not 0 <= self.min_lr <= self.lr:
            raise NCNConfigError(
                f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]: use e.g. optim.min_lr={self.lr / 10:g}"
            )
        if self.warmup_steps < 0:
            raise NCNConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0: use e.g. optim.warmup_steps=100")
        if not self.weight_decay >= 0:
            raise NCNConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0: use e.g. optim.weight_decay=0.1")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise NCNConfigError(f"optim.{name}={getattr(self, name)} must be in [0, 1): use e.g. optim.{name}=0.9")
        if not self.eps > 0:
            raise NCNConfigError(f"optim.eps={self.eps} must be > 0: use e.g. optim.eps=1e-8")


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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """`LambdaLR` that applies `lr_at` (as a factor of `cfg.lr`) after every optimizer step."""

    def factor(step: int) -> float:
        return lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=total_steps) / cfg.lr

    return LambdaLR(optimizer, factor)


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, scheduler: LambdaLR, state: dict[str, Any], cfg: OptimConfig
) -> None:
    """Restore Adam moments and the schedule position from a checkpoint, keeping the current config.

    The hyperparameters (lr, betas, eps, weight decay) come from `cfg`, not from the checkpoint,
    so a resume with e.g. `optim.lr=3e-4` really uses the new value; with an unchanged config the
    result is bitwise identical to the uninterrupted run.
    """
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, settings in zip(optimizer.param_groups, fresh):
        # also restores device-specific flags (fused, foreach), so a GPU checkpoint resumes on CPU
        group.update(settings)
        group["lr"] = cfg.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
