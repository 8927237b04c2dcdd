"""Training job: `python run.py [overrides]` (task=train) trains, evaluates, checkpoints, tracks.

`main(cfg)` builds everything from the composed config (model, data, optimizer, tracker) and
calls `train(...)`, a loop with fixed sections eval -> checkpoint -> step -> log whose mutable
state lives in `TrainState`. On CPU with deterministic settings a resumed run
(`trainer.resume=latest`) is bitwise identical to an uninterrupted one. DDP: `torchrun
--nproc_per_node=N run.py ...`; rank 0 alone logs, checkpoints and talks to MLflow.
Test hook: `NCN_TEST_NONFINITE_STEPS=3,5` makes the loss NaN once at each listed step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ncn import checkpoint
from ncn.errors import NCNConfigError
from ncn.gpt import ModulatedGPT
from ncn.optim import OptimConfig, build_optimizer, build_scheduler, load_optimizer_state
from ncn.runtime import build, check_baseline_choice, default_run_name, git_commit, run_context, setup_device
from ncn.tracking import NullTracker, Tracker, flatten

log = logging.getLogger(__name__)
NONFINITE_ENV = "NCN_TEST_NONFINITE_STEPS"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainerConfig:
    """How to train (`conf/trainer/*.yaml`). Steps are optimizer steps.

    Bounds (the first reached stops; at least one is required): max_steps, epochs (passes over
    the train split, may be fractional), max_tokens (tokens over all ranks).
    batch_size: sequences per micro-batch and rank; grad_accum: micro-batches per step.
    grad_clip: max global grad norm (0 = no clipping). precision: fp32 | bf16 | fp16 (fp16
    needs CUDA and uses a GradScaler). compile: torch.compile the model. device: auto | cpu | cuda.
    eval_every / eval_batches: evaluate every N steps (and at the end) on the first
    eval_batches fixed val batches of batch_size. log_every: train metrics every N steps.
    checkpoint_every / keep_checkpoints: checkpoint every N steps (and at the end), keep the
    last K (and the best). resume: null | latest | best | PATH. skip_nonfinite: skip up to N
    steps with a NaN/Inf loss or grad norm instead of stopping. activation_checkpointing:
    recompute blocks in backward. threads: torch CPU threads per process (null = cores /
    local processes). deterministic: deterministic algorithms (exact resume on CPU).
    progress: tqdm bar on an interactive terminal. probe_tokens: at each eval, log the signal
    heatmaps of the first N val tokens as `probe/signals_step_<N>.png` (0 = off; NCN paper §8).

    Raises:
        NCNConfigError: no bound, a non-positive count, an unknown precision or device.
    """

    max_steps: int | None = None
    epochs: float | None = None
    max_tokens: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str = "fp32"
    compile: bool = False
    device: str = "auto"
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    resume: str | None = None
    skip_nonfinite: int = 0
    activation_checkpointing: bool = False
    threads: int | None = None
    deterministic: bool = True
    progress: bool = True
    probe_tokens: int = 32

    def __post_init__(self) -> None:
        if self.max_steps is None and self.epochs is None and self.max_tokens is None:
            raise NCNConfigError(
                "trainer.max_steps, trainer.epochs and trainer.max_tokens are all null: set one, e.g. trainer.max_steps=300"
            )
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batches", "log_every", "checkpoint_every",
                     "keep_checkpoints", "max_steps", "max_tokens", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise NCNConfigError(f"trainer.{name}={value} must be >= 1: e.g. trainer.{name}=1")
        if self.epochs is not None and not self.epochs > 0:
            raise NCNConfigError(f"trainer.epochs={self.epochs} must be > 0: e.g. trainer.epochs=1")
        for name in ("skip_nonfinite", "grad_clip", "probe_tokens"):
            if not getattr(self, name) >= 0:
                raise NCNConfigError(f"trainer.{name}={getattr(self, name)} must be >= 0: e.g. trainer.{name}=0")
        if self.precision not in PRECISIONS:
            raise NCNConfigError(f"trainer.precision={self.precision!r} is unknown: choose fp32, bf16 or fp16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise NCNConfigError(f"trainer.device={self.device!r} is unknown: choose auto, cpu or cuda")


@dataclass
class TrainState:
    """All mutable loop state that a checkpoint must carry (train_state.json).

    step: optimizer steps done. tokens_seen: training tokens over all ranks. data: the loader's
    {"epoch", "position"}. nonfinite_skipped: steps skipped for NaN/Inf. val_loss: last val CE
    (nats/token). mlflow_run_id: the run this training records into.
    """

    step: int = 0
    tokens_seen: int = 0
    data: dict[str, int] = field(default_factory=dict)
    nonfinite_skipped: int = 0
    val_loss: float | None = None
    mlflow_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, state[name])


class NonFiniteLossError(NCNConfigError):
    """Training diverged (NaN/Inf loss or gradient); the fix is a config change (lr, precision)."""


@dataclass
class Parts:
    """Runtime objects of one training job (built by `main`)."""

    model: ModulatedGPT  # the uncompiled module: checkpoints, eval
    train_model: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loader: Any  # ncn.data.BlockLoader
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    tracker: Tracker
    device: torch.device
    save: Callable[[TrainState], Path | None]  # checkpoint (collective under DDP); path on rank 0
    probe: list[int] = field(default_factory=list)  # token ids of the probe prompt; [] = no probe figures
    rank: int = 0
    world_size: int = 1


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: ModulatedGPT, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             precision: str = "fp32") -> dict[str, float]:
    """val/loss (token-weighted mean CE, nats/token), val/ppl = exp(val/loss), and per signal and
    layer the mean and std over all val tokens (and heads): `signals/<name>/L<i>/mean|std`."""
    model.eval()
    ce_sum, n_tokens = 0.0, 0
    moments: dict[str, torch.Tensor] = {}  # name -> (L, 3): count, sum, sum of squares
    for x, y in batches:
        with _autocast(device, precision):
            out = model(x.to(device), y.to(device))
        ce_sum += out.ce_loss.item() * y.numel()
        n_tokens += y.numel()
        for name, s in out.signals.items():
            per_layer = s.detach().double().movedim(2, 0).reshape(s.shape[2], -1)  # (L, B*T[*H])
            stats = torch.stack([torch.full_like(per_layer[:, 0], per_layer.shape[1]),
                                 per_layer.sum(1), per_layer.square().sum(1)], dim=1)
            moments[name] = moments.get(name, 0) + stats.cpu()
    model.train()
    metrics = {"val/loss": ce_sum / n_tokens, "val/ppl": math.exp(min(ce_sum / n_tokens, 700.0))}
    for name, stats in moments.items():
        for layer, (count, total, squares) in enumerate(stats.tolist()):
            mean = total / count
            metrics[f"signals/{name}/L{layer}/mean"] = mean
            metrics[f"signals/{name}/L{layer}/std"] = math.sqrt(max(squares / count - mean * mean, 0.0))
    return metrics


def _log_probe(parts: Parts, step: int) -> None:
    """Signal heatmaps of the fixed probe prompt as artifact `probe/signals_step_<step>.png` (NCN paper §8)."""
    from ncn.analysis import probe_figure  # matplotlib and pandas load only when probing

    figure = probe_figure(parts.model, parts.probe, title=f"step {step}")
    if figure is not None:  # None for the plain-Transformer baseline
        parts.tracker.log_figure(figure, f"probe/signals_step_{step:06d}.png")


def _injected_nonfinite() -> set[int]:
    raw = os.environ.get(NONFINITE_ENV, "")
    return {int(s) for s in raw.split(",") if s.strip()}


def optimizer_step(parts: Parts, batches: Iterator, cfg: TrainerConfig, inject: bool) -> dict[str, float] | None:
    """One optimizer step over cfg.grad_accum micro-batches of (x, y) int64 (B, block_size) from `batches`.

    Autocast per cfg.precision, backward (GradScaler for fp16), grad-norm clipping, AdamW, LR schedule.
    Returns the metrics train/loss, train/ce_loss, train/reg_loss (sums of the micro-batch means / grad_accum,
    averaged over DDP ranks), train/ppl = exp(ce), train/grad_norm and train/lr, or None when the loss or
    the gradients were NaN/Inf (nothing is updated then). `inject` forces a NaN loss (the test hook).
    """
    model, optimizer, scaler = parts.train_model, parts.optimizer, parts.scaler
    optimizer.zero_grad(set_to_none=True)
    losses = torch.zeros(3, device=parts.device)  # loss, ce, reg summed over micro-batches
    for micro in range(cfg.grad_accum):
        x, y = next(batches)
        x, y = x.to(parts.device, non_blocking=True), y.to(parts.device, non_blocking=True)
        last = micro == cfg.grad_accum - 1
        # DDP all-reduces gradients only on the last micro-batch of a step
        sync = model.no_sync() if parts.world_size > 1 and not last else contextlib.nullcontext()
        with sync:
            with _autocast(parts.device, cfg.precision):
                out = model(x, y)
            loss = out.loss / cfg.grad_accum
            if inject:
                loss = loss * float("nan")
            scaler.scale(loss).backward()
        losses += torch.stack([loss.detach(), out.ce_loss.detach() / cfg.grad_accum, out.reg_loss.detach() / cfg.grad_accum]).float()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.grad_clip or float("inf"))
    # fp16: the GradScaler itself skips steps with inf gradients; a NaN loss is still fatal
    bad = torch.stack([~torch.isfinite(losses[0]), ~torch.isfinite(grad_norm) & (cfg.precision != "fp16")]).any().float()
    if parts.world_size > 1:
        torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)  # all ranks skip or stop together
    if bad.item():
        optimizer.zero_grad(set_to_none=True)
        return None
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; the scheduler moves it on below
    scaler.step(optimizer)
    scaler.update()
    parts.scheduler.step()
    if parts.world_size > 1:
        torch_dist.all_reduce(losses)
        losses /= parts.world_size
    loss, ce, reg = losses.tolist()
    return {"train/loss": loss, "train/ce_loss": ce, "train/reg_loss": reg, "train/ppl": math.exp(min(ce, 700.0)),
            "train/grad_norm": float(grad_norm), "train/lr": lr}


def train(parts: Parts, state: TrainState, cfg: TrainerConfig, total_steps: int, tokens_per_step: int) -> dict[str, float]:
    """Train until `state.step == total_steps`; returns the last train and val metrics.

    Each iteration runs fixed sections: eval (every cfg.eval_every steps and at the end;
    skipped at the step a resume starts from, which was evaluated before the checkpoint) ->
    checkpoint (every cfg.checkpoint_every steps and at the end) -> step -> log.

    Raises:
        NonFiniteLossError: a NaN/Inf loss or grad norm after cfg.skip_nonfinite skips; the
            last good checkpoint is kept.
    """
    start_step, last_saved = state.step, state.step
    last_path: Path | None = None
    metrics: dict[str, float] = {}
    inject = _injected_nonfinite()
    batches = iter(parts.loader)
    bar = tqdm(total=total_steps, initial=state.step, unit="step", dynamic_ncols=True,
               disable=True if parts.rank != 0 or not cfg.progress else None)
    step_seconds, step_tokens = 0.0, 0  # throughput counts step time only, not eval/checkpoint
    with bar, logging_redirect_tqdm():
        while True:
            done = state.step >= total_steps
            if parts.rank == 0 and (state.step % cfg.eval_every == 0 or done) and not (state.step == start_step > 0):
                val = evaluate(parts.model, parts.val_batches, parts.device, cfg.precision)
                state.val_loss = val["val/loss"]
                metrics.update(val)
                parts.tracker.log_metrics(val, step=state.step)
                log.info("step %d | val loss %.4f | val ppl %.2f", state.step, val["val/loss"], val["val/ppl"])
                if parts.probe:
                    _log_probe(parts, state.step)
            if state.step > last_saved and (state.step % cfg.checkpoint_every == 0 or done):
                last_path = parts.save(state)
                last_saved = state.step
            if done:
                return metrics
            started = time.perf_counter()
            result = optimizer_step(parts, batches, cfg, inject=(state.step + 1) in inject)
            step_seconds += time.perf_counter() - started
            inject.discard(state.step + 1)
            if result is None:
                state.nonfinite_skipped += 1
                if state.nonfinite_skipped > cfg.skip_nonfinite:
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {state.step + 1}: training stopped "
                        f"(last good checkpoint: {last_path or cfg.resume or 'none'}); lower optim.lr, use trainer.precision=fp32, "
                        f"or set trainer.skip_nonfinite=N to skip up to N bad steps"
                    )
                log.warning("step %d: non-finite loss or gradient, skipped (%d of at most %d)",
                            state.step + 1, state.nonfinite_skipped, cfg.skip_nonfinite)
                parts.tracker.log_metrics({"train/nonfinite_skipped": state.nonfinite_skipped}, step=state.step + 1)
                continue
            state.step += 1
            state.tokens_seen += tokens_per_step
            step_tokens += tokens_per_step
            bar.update(1)
            bar.set_postfix(loss=f"{result['train/loss']:.3f}")
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                result["train/tokens_per_s"] = step_tokens / max(step_seconds, 1e-9)
                result["train/tokens_seen"] = float(state.tokens_seen)
                step_seconds, step_tokens = 0.0, 0
                metrics.update(result)
                parts.tracker.log_metrics(result, step=state.step)
                bar.set_postfix(loss=f"{result['train/loss']:.3f}", tok_s=f"{result['train/tokens_per_s']:.0f}")
                log.info("step %d/%d | loss %.4f | ce %.4f | reg %.5f | lr %.2e | grad %.3f | %.0f tok/s",
                         state.step, total_steps, result["train/loss"], result["train/ce_loss"],
                         result["train/reg_loss"], result["train/lr"], result["train/grad_norm"],
                         result["train/tokens_per_s"])


def total_steps(cfg: TrainerConfig, state: TrainState, blocks_per_epoch: int, global_batch: int, tokens_per_step: int) -> int:
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


def _interrupted(step: int, checkpoints: Path) -> str:
    """run.py's last line after Ctrl-C/SIGTERM: where training stopped and how to go on."""
    if (checkpoints / checkpoint.POINTER).is_file():
        last = checkpoints / (checkpoints / checkpoint.POINTER).read_text().strip()
        return f"interrupted at step {step} (last checkpoint: {last}): resume with trainer.resume=latest"
    return f"interrupted at step {step}, before this run's first checkpoint: rerun to start over"


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(cfg: DictConfig) -> float:
    """Train as `cfg` says; returns the final val loss (the objective for sweepers).

    Order: validate configs -> device/DDP -> tracker reachable -> resume checkpoint -> data ->
    model -> MLflow run -> `train` -> final checkpoint, metrics.json, run status. The run ends
    FAILED on an exception and KILLED on Ctrl-C or SIGTERM.

    Raises:
        NCNConfigError: bad config (before any run is created); CheckpointError: unusable resume
            checkpoint; NonFiniteLossError: divergence.
    """
    tcfg: TrainerConfig = build(cfg.trainer)
    ocfg: OptimConfig = build(cfg.optim)
    model_cfg, mod_cfg = build(cfg.model), build(cfg.ncn)
    run_dir, launch, choices = run_context()
    check_baseline_choice(choices, mod_cfg.targets)
    if cfg.run_name is None:
        cfg.run_name = default_run_name(choices, int(cfg.seed))
    device, rank, world_size = setup_device(tcfg.device, tcfg.precision, tcfg.threads, tcfg.deterministic)
    tracker = build(cfg.tracking, run_dir=run_dir) if rank == 0 else NullTracker()
    tracker.check()
    resume = checkpoint.load(checkpoint.resolve(tcfg.resume, launch, key="trainer.resume")) if tcfg.resume else None
    if resume is not None:
        checkpoint.check_compatible(resume, cfg)
    datamodule = build(cfg.data)
    data_info = datamodule.prepare()
    if datamodule.vocab_size > model_cfg.vocab_size:
        raise NCNConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {datamodule.vocab_size}: "
            f"use model.vocab_size={datamodule.vocab_size}"
        )
    loader = datamodule.train_loader(tcfg.batch_size, model_cfg.block_size, int(cfg.seed), rank, world_size)
    val_batches = datamodule.val_batches(tcfg.batch_size, model_cfg.block_size, tcfg.eval_batches)

    torch.manual_seed(int(cfg.seed))  # identical init on every rank (DDP also broadcasts rank 0's)
    model = ModulatedGPT(model_cfg, mod_cfg).to(device)
    model.activation_checkpointing = tcfg.activation_checkpointing
    optimizer = build_optimizer(model, ocfg)
    tokens_per_step = tcfg.batch_size * model_cfg.block_size * tcfg.grad_accum * world_size
    state = TrainState()
    if resume is not None:
        with checkpoint.restoring(resume.path):
            state.load_state_dict(resume.train_state)
            checkpoint.load_weights(model, resume.model, resume.path / "model.pt")
            loader.load_state_dict(state.data)
    last = total_steps(tcfg, state, loader.blocks_per_epoch, loader.global_batch, tokens_per_step)
    scheduler = build_scheduler(optimizer, ocfg, last)
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg.precision == "fp16")
    if resume is not None:
        with checkpoint.restoring(resume.path):
            load_optimizer_state(optimizer, scheduler, resume.optim, ocfg)
            if resume.optim["scaler"] and scaler.is_enabled():
                scaler.load_state_dict(resume.optim["scaler"])
            ranks = resume.rng["ranks"]
            if rank < len(ranks):
                checkpoint.restore_rng(ranks[rank])
            else:
                torch.manual_seed(int(cfg.seed) + rank + state.step)
    else:
        torch.manual_seed(int(cfg.seed) + rank)  # dropout masks differ across ranks

    train_model: torch.nn.Module = torch.compile(model) if tcfg.compile else model
    if world_size > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)

    def save(st: TrainState) -> Path | None:
        rngs = [checkpoint.capture_rng()]
        if world_size > 1:
            rngs = [None] * world_size
            torch_dist.all_gather_object(rngs, checkpoint.capture_rng())
        if rank != 0:
            return None
        st.data = loader.state_dict()
        extra = {"world_size": world_size, "batch_size": tcfg.batch_size, "grad_accum": tcfg.grad_accum,
                 "tokens_per_step": tokens_per_step, "run_dir": str(run_dir), "time": time.time()}
        return checkpoint.save(
            run_dir / "checkpoints", st.step, model=model.state_dict(),
            optim={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
            rng={"ranks": rngs}, train_state={**st.state_dict(), **extra}, config_yaml=config_yaml,
            keep=tcfg.keep_checkpoints,
        )

    probe = datamodule.probe_tokens(tcfg.probe_tokens) if tcfg.probe_tokens and rank == 0 else []
    parts = Parts(model, train_model, optimizer, scheduler, scaler, loader, val_batches, tracker, device, save,
                  probe, rank, world_size)
    count = model.num_parameters()
    params = {**flatten(resolved), "n_params": str(count.total), "n_params_controller": str(count.controller),
              "controller_share_pct": f"{count.controller_share_pct:.3f}",
              "dataset.train_tokens": str(data_info.train_tokens), "dataset.val_tokens": str(data_info.val_tokens),
              "world_size": str(world_size), "tokens_per_step": str(tokens_per_step)}
    tags = {"mlflow.source.name": "run.py", "ncn.command": " ".join(sys.argv), "ncn.run_dir": str(run_dir),
            **{f"hydra.choices.{k}": v for k, v in choices.items()}}
    commit = git_commit(launch)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    # SIGTERM (cluster preemption, `kill`) ends the run KILLED like Ctrl-C; handlers need the main thread
    handle_term = rank == 0 and threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if handle_term else None
    try:
        state.mlflow_run_id = tracker.start(cfg.run_name, run_id=state.mlflow_run_id,
                                            resume_step=state.step if resume else None, tags=tags)
        tracker.log_params(params)
        prefix = f"resume/step_{state.step:06d}/" if resume is not None else ""
        tracker.log_dict(resolved, f"{prefix}config.yaml")
        if (run_dir / ".hydra").is_dir():
            tracker.log_artifact(run_dir / ".hydra", f"{prefix}hydra")
        log.info("%s: %s params (controller %.2f%%), %d steps of %d tokens, run dir %s", cfg.run_name,
                 f"{count.total:,}", count.controller_share_pct, last, tokens_per_step, run_dir)
        metrics = train(parts, state, tcfg, last, tokens_per_step)
        final = {**metrics, "step": state.step, "tokens_seen": state.tokens_seen}
        if rank == 0:
            (run_dir / "metrics.json").write_text(json.dumps(final, indent=2))
            tracker.log_artifact(run_dir / "metrics.json")
    except KeyboardInterrupt as exc:
        tracker.end("KILLED")
        raise KeyboardInterrupt(_interrupted(state.step, run_dir / "checkpoints")) from exc
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if world_size > 1:
            torch_dist.destroy_process_group()
    tracker.end("FINISHED")
    if rank == 0:
        where = f"MLflow run {tracker.run_id} in {getattr(tracker, 'uri', 'no store')}" if tracker.run_id else "no tracking"
        log.info("done: val loss %.4f, val ppl %.2f | run dir %s | %s", final.get("val/loss", float("nan")),
                 final.get("val/ppl", float("nan")), run_dir, where)
        if tracker.run_id:
            log.info("browse: mlflow ui --backend-store-uri %s", tracker.uri)
    return float(final.get("val/loss", float("nan")))
