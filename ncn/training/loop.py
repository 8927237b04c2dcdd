"""The training loop: one optimizer step, the step budget, and the loop of fixed sections.

`train(job, state, cfg, total)` runs eval -> checkpoint -> step -> log until `state.step ==
total`; all mutable loop state is the `TrainState` (ncn/training/checkpoint.py) a checkpoint carries, all
runtime objects are one `Job`. The random numbers of a micro-batch (dropout) come from a seed
derived from (seed, step, the micro-batch's index in the global batch), so on CPU with
deterministic settings a resumed run is bitwise identical to an uninterrupted one, and N ranks
× 1 micro-batch draw the same dropout masks as 1 rank × N accumulated micro-batches. Under DDP
rank 0 alone evaluates, logs and writes checkpoints. No checkpoint is ever written whose weights
or same-step validation loss are not finite.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ncn.config import TrainerConfig
from ncn.errors import DiskFullError, DivergenceError, fixed
from ncn.model.gpt import ModulatedGPT
from ncn.tracking import Tracker
from ncn.training import checkpoint
from ncn.training.checkpoint import Snapshot, TrainState
from ncn.training.evaluation import VAL_BPB, VAL_CONTROL_GAIN, VAL_LEAK, VAL_LEAK_EARLY, evaluate, uses_future
from ncn.training.runtime import autocast

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Runtime objects of one training run (built by the train task).

    model: the uncompiled module (checkpoints, eval); train_model: what a step calls (compiled
    and/or DDP-wrapped). loader: a `BlockLoader`. val_batches: fixed (x, y) pairs. checkpoints:
    the folder checkpoints go to; config: the resolved run config saved with each. probe: token
    ids of the fixed probe prompt and their labels ([] = no probe heatmaps). extra: descriptive
    values written into every train_state.json. last_good: the newest checkpoint with finite
    weights and val loss (a resume's source until this run saves one). bits_per_byte: val CE
    (nats/token) -> bits per byte of val text (`DataModule.bits_per_byte`; None = not logged).
    control: the control's kind ("none", "genre", "labels", "mode"): labelled batches carry label
    ids, "mode" draws m per sequence. control_names: the label vocabulary (the control matrix's rows).
    probe_control: the labels of the probe's tokens ([] = none).
    """

    model: ModulatedGPT
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    loader: Any
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    tracker: Tracker
    device: torch.device
    checkpoints: Path
    config: dict[str, Any]
    tokens_per_step: int
    probe: list[int] = field(default_factory=list)
    probe_labels: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    last_good: Path | None = None
    bits_per_byte: Callable[[float], float] | None = None
    control: str = "none"
    control_names: list[str] = field(default_factory=list)
    probe_control: list[int] = field(default_factory=list)
    seed: int = 0
    rank: int = 0
    world_size: int = 1


def micro_batch_seed(seed: int, step: int, index: int, per_step: int) -> int:
    """Seed of the random numbers (dropout) of global micro-batch `index` (0 <= index < per_step) of
    optimizer step `step` (0-based): depends on nothing else, so a resume, or another split of the
    same global batch over ranks and accumulation, draws the same numbers. Value in [0, 2**63)."""
    return hash((seed, step * per_step + index)) & (2**63 - 1)


def control_input(kind: str, labels: list[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor | None:
    """The control input of one micro-batch: its label ids (B, T) for a labelled control, m ~ U[-1, 1] per
    sequence (B,) for control=mode (drawn from torch's seeded RNG, so a resume draws the same), else None."""
    if kind == "mode":
        return (torch.rand(batch) * 2.0 - 1.0).to(device)
    if labels:
        return labels[0].to(device, non_blocking=True)
    return None


def optimizer_step(job: Job, batches: Iterator, cfg: TrainerConfig, step: int) -> dict[str, float] | None:
    """Optimizer step `step` (0-based) over cfg.grad_accum micro-batches of (x, y) int64 (B, block_size) from `batches`.

    Each micro-batch seeds the RNG with `micro_batch_seed`; autocast per cfg.precision, backward
    (GradScaler for fp16), grad-norm clipping, AdamW, LR schedule.
    Returns the metrics train/loss, train/ce_loss, train/reg_loss, with ncn.compute_lambda > 0 also
    train/compute_loss, under control=mode also train/mode_loss (sums of the micro-batch means / grad_accum,
    averaged over DDP ranks), train/ppl = exp(ce), train/grad_norm and train/lr, or None when the loss or
    the gradients were NaN/Inf (nothing is updated then).
    """
    model, optimizer, scaler = job.train_model, job.optimizer, job.scaler
    optimizer.zero_grad(set_to_none=True)
    losses = torch.zeros(5, device=job.device)  # loss, ce, reg, compute, mode summed over micro-batches
    for micro in range(cfg.grad_accum):
        x, y, *labels = next(batches)
        x, y = x.to(job.device, non_blocking=True), y.to(job.device, non_blocking=True)
        last = micro == cfg.grad_accum - 1
        # DDP all-reduces gradients only on the last micro-batch of a step
        sync = model.no_sync() if job.world_size > 1 and not last else contextlib.nullcontext()
        per_step = cfg.grad_accum * job.world_size  # global micro-batch index: the loader's data order
        torch.manual_seed(micro_batch_seed(job.seed, step, micro * job.world_size + job.rank, per_step))
        control = control_input(job.control, labels, x.shape[0], job.device)
        with sync:
            with autocast(job.device, cfg.precision):
                out = model(x, y) if control is None else model(x, y, control=control)
            loss = out.loss / cfg.grad_accum
            scaler.scale(loss).backward()
        cost = out.compute_loss.detach() if out.compute_loss is not None else torch.zeros((), device=job.device)
        mode = out.mode_loss.detach() if out.mode_loss is not None else torch.zeros((), device=job.device)
        losses += torch.stack(
            [
                loss.detach(),
                out.ce_loss.detach() / cfg.grad_accum,
                out.reg_loss.detach() / cfg.grad_accum,
                cost / cfg.grad_accum,
                mode / cfg.grad_accum,
            ]
        ).float()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(job.model.parameters(), cfg.grad_clip or float("inf"))
    # fp16: the GradScaler itself skips steps with inf gradients; a NaN loss is still fatal
    bad = (
        torch.stack([~torch.isfinite(losses[0]), ~torch.isfinite(grad_norm) & (cfg.precision != "fp16")]).any().float()
    )
    if job.world_size > 1:
        torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)  # all ranks skip or stop together
    if bad.item():
        optimizer.zero_grad(set_to_none=True)
        return None
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; the scheduler moves it on below
    scaler.step(optimizer)
    scaler.update()
    job.scheduler.step()
    if job.world_size > 1:
        torch_dist.all_reduce(losses)
        losses /= job.world_size
    loss, ce, reg, cost, mode = losses.tolist()
    result = {
        "train/loss": loss,
        "train/ce_loss": ce,
        "train/reg_loss": reg,
        "train/ppl": math.exp(min(ce, 700.0)),
        "train/grad_norm": float(grad_norm),
        "train/lr": lr,
    }
    if job.model.modulation_config.compute_lambda > 0:
        result["train/compute_loss"] = cost
    if job.control == "mode":
        result["train/mode_loss"] = mode
    return result


def train_line(step: int, total: int, result: dict[str, float], eta: str) -> str:
    """The console line of a logged step: `step N/M | loss | ce | reg [| mode] [| compute] | lr | grad | tok/s | eta`.

    `result`: `optimizer_step`'s metrics plus train/tokens_per_s. The loss is the sum of the terms
    shown after it: ce (nats/token), reg (the homeostatic penalty), mode (control=mode's set-point
    loss, only then) and compute (λ times the compute cost, only with ncn.compute_lambda > 0), so
    loss = ce + reg + mode + compute up to the rounding of the line.
    """
    terms = [f"ce {result['train/ce_loss']:.4f}", f"reg {result['train/reg_loss']:.5f}"]
    if "train/mode_loss" in result:
        terms.append(f"mode {result['train/mode_loss']:.5f}")
    if "train/compute_loss" in result:
        terms.append(f"compute {result['train/compute_loss']:.5f}")
    return " | ".join(
        [
            f"step {step}/{total}",
            f"loss {result['train/loss']:.4f}",
            *terms,
            f"lr {result['train/lr']:.2e}",
            f"grad {result['train/grad_norm']:.3f}",
            f"{result['train/tokens_per_s']:.0f} tok/s",
            eta,
        ]
    )


def total_steps(
    cfg: TrainerConfig, state: TrainState, blocks_per_epoch: int, global_batch: int, tokens_per_step: int
) -> int:
    """Last optimizer step: the smallest of the configured bounds, counted on from `state`.

    blocks_per_epoch: training blocks per pass; global_batch: blocks per micro-batch over all
    ranks (the loader drops an epoch's incomplete last global batch). On resume the remaining
    epochs/tokens are divided by the current step size, so a resume with another batch size
    stops at the same data budget.
    """
    bounds = [cfg.max_steps] if cfg.max_steps is not None else []
    if cfg.epochs is not None:
        per_epoch = blocks_per_epoch // global_batch  # micro-batches per epoch
        done = state.data.get("epoch", 0) * per_epoch + state.data.get("position", 0) / global_batch
        bounds.append(state.step + math.ceil(max(0.0, cfg.epochs * per_epoch - done) / cfg.grad_accum))
    if cfg.max_tokens is not None:
        bounds.append(state.step + math.ceil(max(0, cfg.max_tokens - state.tokens_seen) / tokens_per_step))
    return min(bounds)


def _diverged(what: str, step: int, job: Job) -> DivergenceError:
    good = f"newest good checkpoint: {job.last_good}" if job.last_good else "no good checkpoint was written"
    return DivergenceError(
        f"{what} at step {step}: training diverged ({good}); lower optim.lr, use trainer.precision=fp32, "
        "or set trainer.skip_nonfinite=N to skip up to N bad steps"
    )


def save_checkpoint(job: Job, state: TrainState, keep: int) -> Path | None:
    """Checkpoint `state`, keeping the last `keep` (a collective under DDP); returns the folder on rank 0.

    Raises:
        DivergenceError: the weights or this step's val loss are not finite; nothing is written.
        DiskFullError: no space for the checkpoint; the message names the newest good one.
    """
    finite = all(bool(torch.isfinite(p).all()) for p in job.model.parameters())
    finite &= state.val_loss is None or math.isfinite(state.val_loss)
    ok = torch.tensor(float(finite), device=job.device)
    if job.world_size > 1:
        torch_dist.all_reduce(ok, op=torch_dist.ReduceOp.MIN)
    if not ok.item():
        raise _diverged("non-finite weights or validation loss", state.step, job)
    if job.rank != 0:
        return None
    state.data = job.loader.state_dict()
    snapshot = Snapshot(
        state=state,
        model=job.model.state_dict(),
        optim={"optimizer": job.optimizer.state_dict(), "scaler": job.scaler.state_dict()},
        config=job.config,
        extra={**job.extra, "time": time.time()},
    )
    try:
        job.last_good = checkpoint.save(job.checkpoints, snapshot, keep=keep)
    except DiskFullError as exc:
        good = f"newest good checkpoint: {job.last_good}" if job.last_good else "no checkpoint was written before"
        raise DiskFullError(f"{exc} ({good})") from exc.__cause__
    return job.last_good


def _log_probe(job: Job, state: TrainState) -> None:
    """Signal heatmaps of the fixed probe prompt as artifact `probe/signals_step_<step>.png` (NCN paper §8)."""
    from ncn.analysis.plots import signal_heatmaps  # matplotlib loads only when probing
    from ncn.training.evaluation import run_signals

    signals = run_signals(job.model, job.probe, job.probe_control or None)
    if signals:  # {} for the plain-Transformer baseline
        title = f"{state.run_name}, step {state.step}: signals on the probe (first {len(job.probe)} val tokens)"
        figure = signal_heatmaps(signals, job.probe_labels, scale="range", title=title)
        job.tracker.log_figure(figure, f"probe/signals_step_{state.step:06d}.png")


def _val_summary(val: dict[str, float], leaks: bool) -> str:
    """ "val loss 2.1234 | val ppl 8.37 | val bpb 3.063 | leak 0.0137 (early 0.0510)": the eval's log line;
    bits per byte when logged, the leak audit when the model pools globally (`leaks`)."""
    parts = [f"val loss {val['val/loss']:.4f}", f"val ppl {val['val/ppl']:.2f}"]
    if VAL_BPB in val:
        parts.append(f"val bpb {val[VAL_BPB]:.4f}")
    if leaks:
        early = f" (early {fixed(val[VAL_LEAK_EARLY], '.4f')})" if VAL_LEAK_EARLY in val else ""
        parts.append(f"leak {fixed(val[VAL_LEAK], '.4f')}{early}")
    if VAL_CONTROL_GAIN in val:
        parts.append(f"control gain {fixed(val[VAL_CONTROL_GAIN], '.4f')}")
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    return "?" if math.isnan(seconds) else time.strftime("%H:%M:%S", time.gmtime(seconds))


def _eta(started: float, done: int, left: int) -> str:
    """ "elapsed 00:01:02, eta 00:03:04": wall time since `started` and the time `left` steps will take at that pace."""
    elapsed = time.perf_counter() - started
    return f"elapsed {_clock(elapsed)}, eta {_clock(elapsed / done * left if done else float('nan'))}"


def train(job: Job, state: TrainState, cfg: TrainerConfig, total: int) -> dict[str, float]:
    """Train until `state.step == total`; returns the last train and val metrics.

    Each iteration runs fixed sections: eval (every cfg.eval_every steps, at every step that
    checkpoints, and at the end; skipped at the step a resume starts from, which was evaluated
    before the checkpoint) -> checkpoint (every cfg.checkpoint_every steps and at the end) -> step
    -> log. So a checkpoint's val loss is always its own step's, and a checkpoint whose weights
    give a non-finite val loss is never written (`state.val_loss` is None between evals).

    Raises:
        DivergenceError: a NaN/Inf loss or grad norm after cfg.skip_nonfinite skips, or a
            non-finite val loss; the newest good checkpoint is kept and named.
    """
    start_step, last_saved = state.step, state.step
    metrics: dict[str, float] = {}
    batches = iter(job.loader)
    bar = tqdm(
        total=total,
        initial=state.step,
        unit="step",
        dynamic_ncols=True,
        disable=True if job.rank != 0 or not cfg.progress else None,
    )
    started, step_seconds, step_tokens = time.perf_counter(), 0.0, 0  # throughput counts step time only
    with bar, logging_redirect_tqdm():
        while True:
            done = state.step >= total
            saving = state.step > last_saved and (state.step % cfg.checkpoint_every == 0 or done)
            cadence = state.step % cfg.eval_every == 0 or done
            if job.rank == 0 and (cadence or saving) and not (state.step == start_step > 0):
                val = evaluate(
                    job.model,
                    job.val_batches,
                    job.device,
                    cfg.precision,
                    job.bits_per_byte,
                    control_names=job.control_names,
                )
                state.val_loss = val["val/loss"]
                metrics.update(val)
                job.tracker.log_metrics(val, step=state.step)
                log.info(
                    "step %d | %s | %s",
                    state.step,
                    _val_summary(val, uses_future(job.model)),
                    _eta(started, state.step - start_step, total - state.step),
                )
                if job.probe and cadence and math.isfinite(state.val_loss):
                    _log_probe(job, state)
            if saving:
                save_checkpoint(job, state, cfg.keep_checkpoints)
                last_saved = state.step
            if done:
                return metrics
            step_started = time.perf_counter()
            result = optimizer_step(job, batches, cfg, state.step)
            step_seconds += time.perf_counter() - step_started
            if result is None:
                state.nonfinite_skipped += 1
                if state.nonfinite_skipped > cfg.skip_nonfinite:
                    raise _diverged("non-finite loss or gradient", state.step + 1, job)
                log.warning(
                    "step %d: non-finite loss or gradient, skipped (%d of at most %d)",
                    state.step + 1,
                    state.nonfinite_skipped,
                    cfg.skip_nonfinite,
                )
                job.tracker.log_metrics({"train/nonfinite_skipped": state.nonfinite_skipped}, step=state.step + 1)
                continue
            state.step += 1
            state.val_loss = None  # this step's weights are not evaluated yet
            state.tokens_seen += job.tokens_per_step
            step_tokens += job.tokens_per_step
            bar.update(1)
            bar.set_postfix(loss=f"{result['train/loss']:.3f}")
            if state.step % cfg.log_every == 0 or state.step == total:
                result["train/tokens_per_s"] = step_tokens / max(step_seconds, 1e-9)
                result["train/tokens_seen"] = float(state.tokens_seen)
                step_seconds, step_tokens = 0.0, 0
                metrics.update(result)
                job.tracker.log_metrics(result, step=state.step)
                bar.set_postfix(loss=f"{result['train/loss']:.3f}", tok_s=f"{result['train/tokens_per_s']:.0f}")
                log.info(
                    train_line(state.step, total, result, _eta(started, state.step - start_step, total - state.step))
                )
