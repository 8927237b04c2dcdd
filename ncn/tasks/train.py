"""`python run.py [overrides]` (task=train): train, evaluate, checkpoint and record one run.

`main` reads as the run's sequence: resume source -> device -> tracker pre-flight -> data ->
model and optimizer -> restore -> MLflow run -> `ncn.training.loop.train` -> final metrics. The run
ends FAILED on an exception and KILLED on Ctrl-C, SIGTERM or a requested exit (submitit's
requeue). A sweep job run again in its folder (resumed sweep, requeued SLURM job) continues its
earlier attempt (`ncn.training.job_resume`). DDP: `torchrun --nproc_per_node=N run.py ...` or the tasks of
a SLURM step; rank 0 alone logs, checkpoints and talks to MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import shutil
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from ncn.analysis.compute import compute_curve, has_gates
from ncn.analysis.compute import metrics as compute_metrics
from ncn.analysis.compute import table as compute_table
from ncn.config import RunConfig, RunContext, TrainerConfig, check_baseline_choice, python_command, shell_override
from ncn.data.loader import DataModule
from ncn.data.tokenizer import token_labels
from ncn.errors import NCNConfigError
from ncn.model.gpt import ModulatedGPT
from ncn.tracking import NullTracker, RunSource, Tracker, default_run_name, name_overrides, open_tracker
from ncn.training import checkpoint, job_resume
from ncn.training.checkpoint import Checkpoint, TrainState
from ncn.training.loop import Job, total_steps, train
from ncn.training.optim import build_optimizer, build_scheduler, freeze_base, lr_at, trainable_counts
from ncn.training.runtime import distributed_env, setup_device, sigterm_as_interrupt

log = logging.getLogger(__name__)


def _resume_source(cfg: RunConfig, ctx: RunContext, attempt: job_resume.JobPlan) -> tuple[RunConfig, Checkpoint | None]:
    """(the config to run, the checkpoint to resume from or None): a sweep job's earlier attempt (whose
    config equals `cfg` up to runtime keys), else `trainer.resume` (see `checkpoint.resume_config`)."""
    if attempt.action == job_resume.RESUME:
        return cfg, checkpoint.load(attempt.checkpoint)
    if not cfg.trainer.resume:
        return cfg, None
    ckpt = checkpoint.load(checkpoint.resolve(cfg.trainer.resume, ctx.launch_dir, key="trainer.resume"))
    return checkpoint.resume_config(cfg, ckpt, ctx.overridden), ckpt


def _earlier_attempt(cfg: RunConfig, ctx: RunContext) -> job_resume.JobPlan:
    """What a sweep job's folder holds from an earlier attempt (nothing to continue outside a sweep).

    Raises:
        NCNConfigError: sweep_resume outside a multirun; see `job_resume.plan_job`.
    """
    if ctx.job is None:
        if cfg.sweep_resume:
            raise NCNConfigError(
                f"sweep_resume={cfg.sweep_resume} continues a sweep: launch it as one, e.g. "
                "python run.py -cd sweeps -cn <sweep> sweep_resume=<parent run id | sweep dir> (or add -m)"
            )
        return job_resume.JobPlan()
    if cfg.trainer.resume:  # an explicit resume source wins
        return job_resume.JobPlan()
    return job_resume.plan_job(ctx.run_dir, cfg, ctx.job)


def _skip_finished(cfg: RunConfig, ctx: RunContext, attempt: job_resume.JobPlan) -> float:
    """A sweep job whose earlier attempt finished: close its MLflow run FINISHED if the attempt died
    before closing it, and return the recorded final val loss (the sweeper's objective)."""
    if distributed_env().rank == 0 and cfg.tracking.backend != "none" and attempt.run_id:
        tracker = open_tracker(cfg.tracking, ctx.launch_dir)
        tracker.check()
        run = tracker.get_run(attempt.run_id)
        if run is not None and run.status != "FINISHED":
            tracker.terminate(run.run_id, "FINISHED")
    log.info(
        "sweep job %s already finished in %s (MLflow run %s, val loss %.4f): not trained again",
        ctx.job,
        ctx.run_dir,
        attempt.run_id,
        attempt.val_loss,
    )
    return float(attempt.val_loss)


def _with_vocabulary(cfg: RunConfig, names: list[str], resumed: Checkpoint | None) -> RunConfig:
    """`cfg` with `control.vocabulary` set to the token cache's label names (saved with every checkpoint).

    Raises:
        NCNConfigError: a resume whose checkpoint knows other labels than the data now has.
    """
    if not cfg.control.labelled:
        return cfg
    if resumed is not None and list(resumed.config.control.vocabulary) != names:
        raise NCNConfigError(
            f"the token cache's labels {', '.join(names)} differ from the checkpoint's "
            f"{', '.join(resumed.config.control.vocabulary)} ({resumed.path}): a resume keeps the label "
            "vocabulary; use the data it was trained on, or start a new run"
        )
    return dataclasses.replace(cfg, control=dataclasses.replace(cfg.control, vocabulary=list(names)))


def _build_job(
    cfg: RunConfig,
    ctx: RunContext,
    data: DataModule,
    tracker: Tracker,
    device: torch.device,
    rank: int,
    world_size: int,
    fresh: bool,
) -> Job:
    """Model (seeded; `model.init_from`'s base weights when `fresh`, i.e. not resuming), frozen
    base if `trainer.freeze=base`, optimizer over the trainable parameters, scaler, loaders and
    probe of this run; the schedule comes after restore."""
    t = cfg.trainer
    loader = data.train_loader(t.batch_size, cfg.model.block_size, cfg.seed, rank, world_size)
    val_batches = data.val_batches(t.batch_size, cfg.model.block_size, t.eval_batches)
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    model = ModulatedGPT(cfg.model, cfg.ncn, cfg.control)
    if fresh and cfg.model.init_from:  # a resume takes every weight from its checkpoint
        from ncn.integrations.pretrained import load_pretrained

        folder = load_pretrained(model, cfg.model.init_from)
        log.info("base weights of model.init_from=%s loaded from %s", cfg.model.init_from, folder)
    if t.freeze == "base":
        freeze_base(model)
    model = model.to(device)
    model.activation_checkpointing = t.activation_checkpointing
    train_model: torch.nn.Module = torch.compile(model) if t.compile else model
    if world_size > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    tokens_per_step = t.batch_size * cfg.model.block_size * t.grad_accum * world_size
    probe = data.probe_tokens(t.probe_tokens) if t.probe_tokens and rank == 0 else []
    extra = {
        "world_size": world_size,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "tokens_per_step": tokens_per_step,
        "run_dir": str(ctx.run_dir),
    }
    if t.freeze != "none":  # what was frozen, in every train_state.json (config.yaml has trainer.freeze)
        trainable, frozen = trainable_counts(model)
        extra.update(freeze=t.freeze, n_params_trainable=trainable, n_params_frozen=frozen)
    return Job(
        model=model,
        train_model=train_model,
        optimizer=build_optimizer(model, cfg.optim),
        scheduler=None,
        scaler=torch.amp.GradScaler(device.type, enabled=t.precision == "fp16"),
        loader=loader,
        val_batches=val_batches,
        tracker=tracker,
        device=device,
        checkpoints=ctx.run_dir / "checkpoints",
        config=dataclasses.asdict(cfg),
        tokens_per_step=tokens_per_step,
        probe=probe,
        probe_labels=token_labels(probe, data.encoding),
        bits_per_byte=data.bits_per_byte,
        control=cfg.control.kind,
        control_names=list(cfg.control.vocabulary),
        probe_control=data.probe_labels(len(probe)) if probe else [],
        extra=extra,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
    )


def _record_start(job: Job, state: TrainState, ctx: RunContext, data: DataModule, resumed: Checkpoint | None) -> None:
    """Open (or continue) the tracked run with the config, the sizes and where it comes from."""
    count = job.model.num_parameters()
    info = data.prepare()
    sizes = {
        "n_params": count.total,
        "n_params_controller": count.controller,
        **({"n_params_control": count.control} if job.control != "none" else {}),
        "controller_share_pct": f"{count.controller_share_pct:.3f}",
        "dataset.train_tokens": info.train_tokens,
        "dataset.val_tokens": info.val_tokens,
        "world_size": job.world_size,
        "tokens_per_step": job.tokens_per_step,
    }
    if "freeze" in job.extra:
        sizes.update(n_params_trainable=job.extra["n_params_trainable"], n_params_frozen=job.extra["n_params_frozen"])
        log.info(
            "trainer.freeze=%s: %s trainable parameters (the controller%s), %s frozen",
            job.extra["freeze"],
            f"{job.extra['n_params_trainable']:,}",
            " and the control embedding" if job.model.control is not None else "",
            f"{job.extra['n_params_frozen']:,}",
        )
    source = RunSource(ctx.command, ctx.run_dir, ctx.launch_dir, dict(ctx.choices))
    resume_step = state.step if resumed else None
    state.mlflow_run_id = job.tracker.start_training_run(
        state.run_name, job.config, sizes, source, run_id=state.mlflow_run_id, resume_step=resume_step
    )
    log.info(
        "%s: %s params (controller %.2f%%%s), %d tokens per step, run dir %s",
        state.run_name,
        f"{count.total:,}",
        count.controller_share_pct,
        f", control {job.control} route {job.config['control']['route']}: {count.control:,}"
        if job.control != "none"
        else "",
        job.tokens_per_step,
        ctx.run_dir,
    )


def _interrupted(step: int, job: Job, cfg: RunConfig, ctx: RunContext) -> str:
    """run.py's last line after Ctrl-C/SIGTERM: where training stopped and, if it can, how to go on
    (a command to paste: `latest` could name another run's checkpoint, the folder cannot; a sweep
    job goes on with its sweep: `sweep_resume=<parent run id | sweep dir>`)."""
    if ctx.job is not None:
        sweep = cfg.tracking.parent_run_id or ctx.run_dir.parent
        where = f"last checkpoint: {job.last_good}" if job.last_good is not None else "no checkpoint yet"
        return (
            f"interrupted at step {step} of sweep job {ctx.job} ({where}): resume the sweep with "
            f"{shell_override('sweep_resume', sweep)}"
        )
    if job.last_good is not None:
        script = ctx.launch_dir / (shlex.split(ctx.command)[0] if ctx.command else "run.py")
        again = python_command(str(script), shell_override("trainer.resume", job.last_good))
        return f"interrupted at step {step} (last checkpoint: {job.last_good}): resume with {again}"
    return f"interrupted at step {step}, before this run's first checkpoint: rerun to start over"


def _log_sample_efficiency(tracker: Tracker, tokens_per_step: int, step: int) -> None:
    """Log the run's SEI (training loss) and power-law fit (val loss) at its last step (docs/method.md §9)."""
    from ncn.analysis.sample_efficiency import run_summary  # pandas and scipy load only at the end

    train = tracker.metric_history(tracker.run_id, "train/loss")
    val = tracker.metric_history(tracker.run_id, "val/loss")
    if summary := run_summary(train, val, tokens_per_step):
        tracker.log_metrics(summary, step)


def _measure_compute(job: Job, cfg: RunConfig, step: int) -> dict[str, float]:
    """`skip_grid` after the last step: gated vs random skipping on the val batches, logged at `step`.

    Raises:
        NCNConfigError: the model has no gate (`compute_curve`).
    """
    dense, rows = compute_curve(job.model, job.val_batches, job.device, list(cfg.skip_grid), cfg.skip_draws, cfg.seed)
    log.info("conditional compute at step %d (gated vs random skipping):\n%s", step, compute_table(dense, rows))
    measured = compute_metrics(rows)
    job.tracker.log_metrics(measured, step=step)
    return measured


def resume_notes(
    saved: dict[str, Any], saved_cfg: RunConfig, now: dict[str, Any], cfg: RunConfig, step: int, last: int
) -> list[str]:
    """What a resume at `step` changes that the user may not expect, as log lines: the tokens per
    optimizer step (another world size, batch size or grad_accum than the checkpoint's `saved` extras;
    `now`: this run's) with the trainer.grad_accum that keeps them, and the learning rate at `step`
    when the cosine schedule now ends at `last` instead of the checkpoint's trainer.max_steps."""
    notes = []
    before, after = saved.get("tokens_per_step"), now["tokens_per_step"]
    if before is not None and before != after:
        per_micro = after // now["grad_accum"]
        keep = f"trainer.grad_accum={before // per_micro}" if before % per_micro == 0 else "the checkpoint's settings"
        notes.append(
            f"tokens per step change from {before:,} (world size {saved.get('world_size')}, batch "
            f"{saved.get('batch_size')}, grad_accum {saved.get('grad_accum')}) to {after:,} (world size "
            f"{now['world_size']}, batch {now['batch_size']}, grad_accum {now['grad_accum']}): {keep} keeps {before:,}"
        )
    old_total = saved_cfg.trainer.max_steps
    if old_total is not None and old_total != last and step < max(old_total, last):
        o = saved_cfg.optim
        was = lr_at(step, lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps, total_steps=old_total)
        n = cfg.optim
        new = lr_at(step, lr=n.lr, min_lr=n.min_lr, warmup_steps=n.warmup_steps, total_steps=last)
        notes.append(
            f"the learning-rate schedule now ends at step {last} instead of {old_total}: lr {new:.2e} at step "
            f"{step} (the checkpoint's schedule: {was:.2e}); trainer.max_steps={old_total} keeps the old schedule"
        )
    return notes


def _already_done(cfg: TrainerConfig, state: TrainState, ctx: RunContext) -> float:
    """A resume whose checkpoint already reached the step budget: say which bound, change nothing
    (no MLflow update; the folder Hydra made for this launch is removed when it holds only its own
    .hydra/ and run.log) and return the checkpoint's val loss (nan when it was not evaluated)."""
    if cfg.max_steps is not None and cfg.max_steps <= state.step:
        key, value = "trainer.max_steps", cfg.max_steps
    elif cfg.epochs is not None and cfg.max_tokens is None:
        key, value = "trainer.epochs", cfg.epochs
    else:
        key, value = "trainer.max_tokens", cfg.max_tokens
    val = "val loss not evaluated" if state.val_loss is None else f"val loss {state.val_loss:.4f}"
    log.info("run %s already reached %s=%s (%s): raise %s to continue", state.run_name, key, value, val, key)
    if ctx.job is None and {p.name for p in ctx.run_dir.iterdir()} <= {".hydra", "run.log"}:
        shutil.rmtree(ctx.run_dir, ignore_errors=True)
    return float("nan") if state.val_loss is None else state.val_loss


def main(cfg: RunConfig, ctx: RunContext) -> float:
    """Train as `cfg` says; returns the final val loss (the objective for sweepers).

    Raises:
        NCNConfigError: a bad config (before any run is created); CheckpointError: an unusable
            resume checkpoint or an override that contradicts it; DivergenceError: divergence.
    """
    attempt = _earlier_attempt(cfg, ctx)
    if attempt.restart is not None:
        log.warning("%s", attempt.restart)
        if distributed_env().rank == 0:  # the new attempt logs every step once
            (ctx.run_dir / "metrics.jsonl").replace(ctx.run_dir / job_resume.RESTARTED_METRICS)
    cfg = dataclasses.replace(cfg, sweep_resume=None)  # the parent run records it; the runs' params stay alike
    if attempt.action == job_resume.SKIP:
        return _skip_finished(cfg, ctx, attempt)
    cfg, resumed = _resume_source(cfg, ctx, attempt)
    if resumed is None:
        check_baseline_choice(ctx.choices, cfg.ncn.targets)
    run_name = cfg.run_name or default_run_name(
        ctx.choices, cfg.seed, name_overrides(ctx.config, ctx.overridden, ctx.swept)
    )
    cfg = dataclasses.replace(cfg, run_name=run_name)
    device, rank, world_size = setup_device(
        cfg.trainer.device, cfg.trainer.precision, cfg.trainer.threads, cfg.trainer.deterministic
    )
    tracker = open_tracker(cfg.tracking, ctx.launch_dir, ctx.run_dir) if rank == 0 else NullTracker()
    tracker.check(resumed.state.mlflow_run_id if resumed is not None else None)
    if tracker.enabled:  # checkpoints record the store itself, so tasks find the run from any folder
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=tracker.uri))
    data = DataModule(cfg.data, cfg.control)
    data.prepare(announce=rank == 0)
    cfg = _with_vocabulary(cfg, data.label_names, resumed)
    if data.vocab_size > cfg.model.vocab_size:
        raise NCNConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{data.vocab_size}: use model.vocab_size={data.vocab_size}"
        )
    job = _build_job(cfg, ctx, data, tracker, device, rank, world_size, fresh=resumed is None)
    if rank == 0:
        covered = sum(y.numel() for _, y, *_ in job.val_batches)
        log.info(
            "val loss during training: the first %d val batches, %s of the %s val tokens "
            "(task=eval evaluates the whole split)",
            len(job.val_batches),
            f"{covered:,}",
            f"{data.prepare().val_tokens:,}",
        )
    if cfg.skip_grid and not has_gates(job.model):
        raise NCNConfigError(
            f"skip_grid={list(cfg.skip_grid)} needs a model with gates, and ncn.targets={cfg.ncn.targets} has none: "
            "train ncn=sparse (or add head_gate / layer_gate to ncn.targets), or drop skip_grid"
        )
    state = TrainState(run_name=run_name)
    if resumed is not None:
        state = checkpoint.restore(resumed, job.model, job.optimizer, cfg.optim, job.scaler, job.loader)
        job.last_good = resumed.path
        if attempt.action == job_resume.RESUME and rank == 0:  # same run dir: log each later step once
            job_resume.trim_metrics_log(ctx.run_dir / "metrics.jsonl", state.step)
        log.info(
            "resuming run %s (MLflow run %s) at step %d from %s",
            state.run_name,
            state.mlflow_run_id,
            state.step,
            resumed.path,
        )
    last = total_steps(cfg.trainer, state, job.loader.blocks_per_epoch, job.loader.global_batch, job.tokens_per_step)
    if resumed is not None and last <= state.step:
        if world_size > 1:
            torch_dist.destroy_process_group()
        return _already_done(cfg.trainer, state, ctx) if rank == 0 else float("nan")
    job.scheduler = build_scheduler(job.optimizer, cfg.optim, last, start_step=state.step)
    if resumed is not None and rank == 0:
        for note in resume_notes(resumed.extra, resumed.config, job.extra, cfg, state.step, last):
            log.info("resume: %s", note)
    with sigterm_as_interrupt(rank == 0):
        try:
            _record_start(job, state, ctx, data, resumed)
            if attempt.restart is not None and rank == 0:
                tracker.set_tags({"ncn.restarted": attempt.restart})
            metrics = train(job, state, cfg.trainer, last)
            if cfg.skip_grid and rank == 0:
                metrics.update(_measure_compute(job, cfg, state.step))
            final = {**metrics, "step": state.step, "tokens_seen": state.tokens_seen}
            if rank == 0:
                (ctx.run_dir / "metrics.json").write_text(json.dumps(final, indent=2))
                tracker.log_artifact(ctx.run_dir / "metrics.json")
                if tracker.enabled:  # the whole history lives in the store (a resumed run included)
                    _log_sample_efficiency(tracker, job.tokens_per_step, state.step)
        except KeyboardInterrupt as exc:
            tracker.end("KILLED")
            raise KeyboardInterrupt(_interrupted(state.step, job, cfg, ctx)) from exc
        except SystemExit:  # asked to exit, e.g. by submitit before it requeues a preempted job
            tracker.end("KILLED")
            raise
        except BaseException:
            tracker.end("FAILED")
            raise
        finally:
            if world_size > 1:
                torch_dist.destroy_process_group()
    tracker.end("FINISHED")
    if rank == 0:
        where = f"MLflow run {tracker.run_id} in {tracker.uri}" if tracker.enabled else "no tracking"
        log.info(
            "done: val loss %.4f, val ppl %.2f | run dir %s | %s",
            final.get("val/loss", float("nan")),
            final.get("val/ppl", float("nan")),
            ctx.run_dir,
            where,
        )
        if tracker.enabled:
            log.info("browse: %s", tracker.browse_hint())
    return float(final.get("val/loss", float("nan")))
