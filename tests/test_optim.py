"""Optimizer tests: parameter groups, the warm-up + cosine schedule as a pure function and through
LambdaLR (also started mid-run, as a resume does), config validation, restoring optimizer state, and
one optimizer step: accumulated gradients equal the full batch's, dropout seeds never repeat.

Run: python -m pytest -q tests/test_optim.py
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.config import OptimConfig, TrainerConfig
from ncn.errors import NCNConfigError
from ncn.tracking import NullTracker
from ncn.training.loop import Job, micro_batch_seed, optimizer_step
from ncn.training.optim import apply_settings, build_optimizer, build_scheduler, lr_at, param_groups

TINY = ModelConfig(vocab_size=128, block_size=16, d_model=32, n_layer=2, n_head=2)


@pytest.fixture
def model() -> ModulatedGPT:
    torch.manual_seed(0)
    return ModulatedGPT(TINY, ModulationConfig())


def test_every_parameter_in_exactly_one_group(model: ModulatedGPT) -> None:
    decay, no_decay = param_groups(model, 0.1)
    params = list(model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == len(params)
    assert {id(p) for p in decay["params"]} | {id(p) for p in no_decay["params"]} == {id(p) for p in params}
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    # the tied output head is the token embedding: counted once, and it decays
    assert sum(p.numel() for p in params) == model.num_parameters().total
    assert any(p is model.lm_head.weight for p in decay["params"])


def test_schedule_values() -> None:
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(1e-3 / 11)
    assert lr_at(9, **kw) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # peak right after warm-up
    assert lr_at(60, **kw) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way through the cosine
    assert lr_at(110, **kw) == lr_at(10_000, **kw) == 1e-4  # floor
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert lr_at(3, lr=1e-3, min_lr=0.0, warmup_steps=0, total_steps=4) == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4))
    )


def test_lambda_lr_follows_the_pure_function(model: ModulatedGPT) -> None:
    cfg = OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=3, weight_decay=0.1)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=12)
    for step in range(15):
        expected = lr_at(step, lr=2e-3, min_lr=2e-4, warmup_steps=3, total_steps=12)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected, expected])
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"lr": 0.0}, "optim.lr=0.0"),
        ({"lr": -1.0}, "optim.lr=-1.0"),
        ({"min_lr": 1.0}, "optim.min_lr=1.0"),
        ({"beta2": 1.0}, "optim.beta2=1.0"),
        ({"warmup_steps": -1}, "optim.warmup_steps=-1"),
    ],
)
def test_bad_values_name_the_key(override: dict, key: str) -> None:
    with pytest.raises(NCNConfigError, match=key.replace(".", r"\.")):
        OptimConfig(**override)


def test_fused_needs_cuda(model: ModulatedGPT) -> None:
    with pytest.raises(NCNConfigError, match="optim.fused=true"):
        build_optimizer(model, OptimConfig(fused=True))
    assert build_optimizer(model, OptimConfig()).defaults["fused"] is False


def _trained(
    model: ModulatedGPT, cfg: OptimConfig, steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    idx = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(idx, idx).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return optimizer, scheduler


def test_schedule_started_mid_run_equals_the_uninterrupted_one(model: ModulatedGPT) -> None:
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2)
    optimizer, _ = _trained(model, cfg, steps=4)
    resumed = build_optimizer(model, cfg)
    scheduler = build_scheduler(resumed, cfg, total_steps=10, start_step=4)
    assert scheduler.last_epoch == 4
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in optimizer.param_groups]
    for step in range(4, 12):  # bitwise the pure function from the resume step on
        assert resumed.param_groups[0]["lr"] == lr_at(step, lr=1e-3, min_lr=1e-4, warmup_steps=2, total_steps=10)
        resumed.step()
        scheduler.step()


def test_resume_restores_moments_and_applies_the_new_settings(model: ModulatedGPT) -> None:
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, weight_decay=0.0)
    optimizer, _ = _trained(model, cfg, steps=4)
    state = optimizer.state_dict()
    new = OptimConfig(lr=5e-4, min_lr=1e-4, warmup_steps=2, weight_decay=0.05, beta2=0.95, eps=1e-6)
    other = build_optimizer(model, new)
    other.load_state_dict(state)
    assert [g["weight_decay"] for g in other.param_groups] == [0.0, 0.0]  # the checkpoint's settings came back
    apply_settings(other, new)
    build_scheduler(other, new, total_steps=10, start_step=4)
    for p in model.parameters():
        assert torch.equal(other.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])
    assert other.param_groups[0]["lr"] == pytest.approx(lr_at(4, lr=5e-4, min_lr=1e-4, warmup_steps=2, total_steps=10))
    assert [g["weight_decay"] for g in other.param_groups] == [0.05, 0.0]
    assert [(g["betas"], g["eps"]) for g in other.param_groups] == [((0.9, 0.95), 1e-6)] * 2


def _job(model: ModulatedGPT) -> Job:
    optimizer = build_optimizer(model, OptimConfig())
    return Job(
        model=model,
        train_model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, OptimConfig(), total_steps=10),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loader=None,
        val_batches=[],
        tracker=NullTracker(),
        device=torch.device("cpu"),
        checkpoints=Path("unused"),
        config={},
        tokens_per_step=4 * TINY.block_size,
    )


@pytest.mark.parametrize("grad_accum", [2, 4])
def test_accumulated_gradient_is_the_full_batch_gradient(grad_accum: int) -> None:
    """grad_accum micro-batches of 4 / grad_accum blocks give train/grad_norm = the norm of one batch
    of 4 blocks' gradient (each micro-batch's loss divided by grad_accum), and the same logged loss;
    the clipping at grad_clip=1.0 then acts on that norm."""
    torch.manual_seed(0)
    model = ModulatedGPT(dataclasses.replace(TINY, dropout=0.0), ModulationConfig())
    x, y = torch.randint(0, 128, (2, 4, 16), generator=torch.Generator().manual_seed(1))
    out = model(x, y)
    out.loss.backward()
    full = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    model.zero_grad(set_to_none=True)
    size = 4 // grad_accum
    micro = iter([(x[i : i + size], y[i : i + size]) for i in range(0, 4, size)])
    cfg = TrainerConfig(batch_size=size, grad_accum=grad_accum, grad_clip=1.0)
    result = optimizer_step(_job(model), micro, cfg, step=0)
    assert result["train/loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert result["train/grad_norm"] == pytest.approx(full, rel=1e-4)
    assert full > 1.0  # clipping is active: a wrong norm would change the update


def test_micro_batch_seeds_are_distinct_over_steps_and_micro_batches() -> None:
    """Every (step, global micro-batch) of a run draws its own dropout seed, for any split of the global
    batch; the seed is a function of (seed, step * per_step + index) only, so 2 ranks x 1 micro-batch
    and 1 rank x 2 micro-batches draw the same ones; another run seed gives other seeds."""
    for per_step in (1, 2, 3, 8):
        seeds = [micro_batch_seed(0, step, i, per_step) for step in range(200) for i in range(per_step)]
        assert len(set(seeds)) == len(seeds) == 200 * per_step
        assert all(0 <= s < 2**63 for s in seeds)
    assert micro_batch_seed(0, 5, 1, 2) == micro_batch_seed(0, 5, 1, 2)
    assert micro_batch_seed(0, 5, 1, 2) != micro_batch_seed(1, 5, 1, 2)
    assert {micro_batch_seed(0, s, i, 2) for s in range(50) for i in range(2)}.isdisjoint(
        {micro_batch_seed(1, s, i, 2) for s in range(50) for i in range(2)}
    )
