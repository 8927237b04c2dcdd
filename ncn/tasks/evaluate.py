"""`python run.py task=eval checkpoint=latest [data=<option>] [ncn.pooling=causal]`: val metrics of a checkpoint.

Rebuilds the checkpoint's model, runs the fixed validation batches of the data (the checkpoint's
own data config unless `data` is overridden on the command line) and prints CE loss, perplexity
= exp(CE) (NCN paper §4) and bits per byte; for a checkpoint trained with `global` salience
pooling also the leak audit (the same weights under causal pooling, NCN paper §5).
`ncn.pooling=causal` makes the causal evaluation of such a checkpoint the headline number.
`skip_threshold=τ` evaluates with every FFN, head and block whose gate is below τ skipped;
`skip_grid=[τ, ...]` measures the quality–compute trade against random skipping
(`ncn.analysis.compute`, NCN paper §6.1, §8), prints it, writes compute.csv and the curve
quality_compute.png and logs both.
A checkpoint trained with a control input also prints what the control controls: the control
matrix and gain (labels) or the mode's precision and entropy curve (NCN paper §3.2, §6.1).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import torch

from ncn.analysis.compute import FIELDS, ComputeRow, compute_curve, require_gates
from ncn.analysis.compute import metrics as compute_metrics
from ncn.analysis.compute import table as compute_table
from ncn.analysis.statistics import summary_interval
from ncn.config import MODE_GRID, RunConfig, RunContext
from ncn.data.loader import DataModule
from ncn.errors import CheckpointError, NCNConfigError, fixed
from ncn.model.compute import FlopCount, SkipPlan, count_flops
from ncn.model.gpt import ModulatedGPT
from ncn.training.checkpoint import Checkpoint, checkpoint_run, load_model, open_checkpoint
from ncn.training.evaluation import (
    EARLY_POSITIONS,
    VAL_CONTROL_DIAGONAL,
    VAL_CONTROL_GAIN,
    VAL_CONTROL_OFF_DIAGONAL,
    VAL_LEAK,
    VAL_LEAK_EARLY,
    VAL_LEAK_LATE,
    VAL_LOSS_CAUSAL,
    control_matrix_key,
    evaluate,
    mode_key,
    uses_future,
)
from ncn.training.runtime import default_device

# The one model/ncn key task=eval accepts with checkpoint=: evaluate global-trained weights causally.
POOLING_KEY = "ncn.pooling"


def _causal_requested(cfg: RunConfig, ctx: RunContext, ckpt: Checkpoint) -> bool:
    """Whether `ncn.pooling=causal` was given (for a checkpoint trained with global pooling).

    Raises:
        CheckpointError: ncn.pooling set to anything but causal, or for a checkpoint that does
            not pool globally (nothing would change).
    """
    if POOLING_KEY not in ctx.overridden:
        return False
    trained = ckpt.config.ncn
    if cfg.ncn.pooling != "causal":
        raise CheckpointError(
            f"ncn.pooling={cfg.ncn.pooling} cannot be set together with checkpoint=: only ncn.pooling=causal "
            "may be, to evaluate a global-pooling checkpoint's weights causally; drop the override"
        )
    if not trained.targets or trained.pooling != "global":
        what = "no controller" if not trained.targets else f"ncn.pooling={trained.pooling}"
        raise CheckpointError(
            f"ncn.pooling=causal changes nothing for {ckpt.path}, which was trained with {what}: "
            "it applies to checkpoints trained with ncn.pooling=global; drop the override"
        )
    return True


def main(cfg: RunConfig, ctx: RunContext) -> float:
    """Print and return the val CE loss of `cfg.checkpoint` (under causal pooling with `ncn.pooling=causal`).

    Batches: the whole val split in fixed batches of `trainer.batch_size` × the model's block_size
    (`DataModule.val_batches`), or its first `trainer.eval_batches` batches when that key is set on
    the command line (training's periodic eval uses those); the line printed says how many of the
    split's tokens were covered. In fp32, through the training loop's own
    `ncn.training.evaluation.evaluate` (token-weighted mean CE; perplexity = exp(CE), NCN paper §4;
    bits per byte of the evaluated data's val text). For a global-pooling checkpoint a second
    line gives the leak audit: val loss under causal pooling and the difference, overall and
    for the first `EARLY_POSITIONS` positions of each block vs the rest.

    Raises:
        CheckpointError: unusable checkpoint, a model/ncn override other than ncn.pooling=causal,
            or ncn.pooling=causal for a checkpoint that does not pool globally; NCNConfigError:
            data whose val split is shorter than one block, or whose tokenizer the model was not
            trained with.
    """
    ckpt = open_checkpoint(cfg.checkpoint, ctx.launch_dir, ctx.overridden, allowed=frozenset({POOLING_KEY}))
    print(ckpt.describe(), file=sys.stderr, flush=True)
    causal = _causal_requested(cfg, ctx, ckpt)
    if causal:
        print(
            f"evaluating the weights of {ckpt.path}, trained with ncn.pooling=global, under ncn.pooling=causal",
            file=sys.stderr,
            flush=True,
        )
    model = load_model(ckpt, default_device())
    data_overridden = any(k.split(".")[0] == "data" for k in ctx.overridden)
    data = DataModule(cfg.data if data_overridden else ckpt.config.data, ckpt.config.control)
    if data.cfg.tokenizer != ckpt.config.data.tokenizer:
        raise NCNConfigError(
            f"data.tokenizer={data.cfg.tokenizer}, but {ckpt.path} was trained with "
            f"data.tokenizer={ckpt.config.data.tokenizer}: evaluate on data tokenized the same way "
            f"(data.tokenizer={ckpt.config.data.tokenizer})"
        )
    if (cfg.skip_threshold > 0 or cfg.skip_grid) and model.control is not None:
        raise NCNConfigError(
            f"skip_threshold/skip_grid measure skipping without a control input, and {ckpt.path} was trained with "
            f"control={ckpt.config.control.kind}: drop skip_threshold and skip_grid"
        )
    if cfg.skip_threshold > 0:
        require_gates(model, f"skip_threshold={cfg.skip_threshold:g}", str(ckpt.path))
    if cfg.skip_grid:
        require_gates(model, f"skip_grid={list(cfg.skip_grid)}", str(ckpt.path))
    limit = cfg.trainer.eval_batches if "trainer.eval_batches" in ctx.overridden else None
    batches = data.val_batches(cfg.trainer.batch_size, model.config.block_size, limit)
    names = ckpt.config.control.vocabulary
    if ckpt.config.control.labelled and data.label_names != names:
        raise NCNConfigError(
            f"the data's labels {', '.join(data.label_names)} differ from {ckpt.path}'s {', '.join(names)}: "
            "evaluate on data labelled as in training"
        )
    device = next(model.parameters()).device
    skip = SkipPlan(cfg.skip_threshold) if cfg.skip_threshold > 0 else None
    metrics = evaluate(model, batches, device, bits_per_byte=data.bits_per_byte, skip=skip, control_names=names)
    loss = metrics[VAL_LOSS_CAUSAL] if causal else metrics["val/loss"]
    tokens = sum(y.numel() for _, y, *_ in batches)
    pooling = "ncn.pooling=causal (trained: global) | " if causal else ""
    print(
        f"val loss {loss:.4f} | val ppl {math.exp(min(loss, 700.0)):.3f} | val bpb {data.bits_per_byte(loss):.4f} | "
        f"{pooling}{tokens} of {data.prepare().val_tokens} val tokens in {len(batches)} batches | "
        f"data {data.source.describe()} | checkpoint {ckpt.path}",
        flush=True,
    )
    if uses_future(model):
        print(_audit_line(metrics, model.config.block_size), flush=True)
    if VAL_CONTROL_GAIN in metrics:
        print(control_table(metrics, names), flush=True)
    if mode_key(0.0, "entropy") in metrics:
        print(mode_table(metrics, model.config.n_layer), flush=True)
    if skip is not None:
        flops = _skipped(model, batches, skip)
        print(
            f"skip_threshold {cfg.skip_threshold:g}: {100 * flops.ffn_fraction:.1f} % of FFN FLOPs and "
            f"{100 * flops.total_fraction:.1f} % of forward FLOPs skipped",
            flush=True,
        )
    if cfg.skip_grid:
        _measure_grid(cfg, ctx, ckpt, model, batches)
    return loss


def _skipped(model: ModulatedGPT, batches: list, skip: SkipPlan) -> FlopCount:
    """FLOPs (counted, `count_flops`) that `skip` skips over `batches`."""
    device = next(model.parameters()).device
    total = FlopCount(0.0, 0.0, 0.0, 0.0)
    with torch.no_grad():
        for x, *_ in batches:
            masks = model(x.to(device), skip=skip).skipped
            total = total + count_flops(model.config, model.modulation_config, *x.shape, masks)
    return total


def _measure_grid(cfg: RunConfig, ctx: RunContext, ckpt: Checkpoint, model: ModulatedGPT, batches: list) -> None:
    """The τ grid against random skipping: printed, written to <run dir>/compute.csv and drawn in
    <run dir>/quality_compute.png (`curve_plot`), logged to the checkpoint's run.

    Metrics `val/compute/t<τ>/<field>` go to the checkpoint's MLflow run at its step (when
    tracking is on and the run is in the store), with compute.csv and the PNG as artifacts under
    `compute/<run dir name>/`.
    """
    device = next(model.parameters()).device
    dense, rows = compute_curve(model, batches, device, list(cfg.skip_grid), cfg.skip_draws, cfg.seed)
    print(compute_table(dense, rows), flush=True)
    path = ctx.run_dir / "compute.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dense_val_loss", *FIELDS])
        writer.writeheader()
        writer.writerows({"dense_val_loss": dense, **r.as_dict()} for r in rows)
    name = ckpt.state.run_name or ckpt.config.run_name or ckpt.path.name
    png = curve_plot(rows, cfg.skip_draws, f"{name}, step {ckpt.state.step}", ctx.run_dir / "quality_compute.png")
    print(f"wrote {path} and {png}", flush=True)
    if (run := checkpoint_run(ckpt, cfg.tracking, ctx.overridden, ctx.launch_dir)) is None:
        return
    tracker, run_id = run
    tracker.log_metrics(compute_metrics(rows), step=ckpt.state.step, run_id=run_id)
    for artifact in (path, png):
        tracker.log_artifact(artifact, f"compute/{ctx.run_dir.name}", run_id=run_id)
    print(f"logged to MLflow run {run_id} ({tracker.uri}): val/compute/t<τ>/*", flush=True)


def curve_points(rows: list[ComputeRow], draws: int) -> dict[str, list[tuple[float, float, float, float]]]:
    """One checkpoint's quality–compute curve as {"gated": points, "random": points}, one point per τ:
    (FFN FLOPs skipped in %, Δ val loss vs dense in nats/token, low, high).

    Gated skipping is one deterministic evaluation per τ (no interval: NaN ends); the random
    control's interval is the two-sided 95 % Student-t interval of the mean of its `draws` draws
    (`summary_interval`, df = draws − 1; NaN for one draw), at the FFN share the draws skipped.
    """
    return {
        "gated": [(100 * r.ffn_skipped, r.delta_loss, math.nan, math.nan) for r in rows],
        "random": [
            (
                100 * r.random_ffn_skipped,
                r.random_delta_loss,
                *summary_interval(r.random_delta_loss, r.random_delta_std, draws),
            )
            for r in rows
        ],
    }


def curve_plot(rows: list[ComputeRow], draws: int, title: str, path: Path) -> Path:
    """`curve_points` drawn by `ncn.analysis.plots.quality_compute_figure` into the PNG `path`."""
    from ncn.analysis.plots import quality_compute_figure  # matplotlib loads only when a curve is drawn

    figure = quality_compute_figure(
        {"checkpoint": curve_points(rows, draws)}, f"quality–compute: {title} ({draws} random draws)"
    )
    figure.savefig(path, dpi=120)
    return path


def control_table(metrics: dict[str, float], names: list[str]) -> str:
    """The control matrix (rows: the tokens' true label; columns: the label forced on every token; val CE in
    nats/token) and the control gain = mean off-diagonal − mean diagonal, as aligned text."""
    width = max(8, *(len(n) for n in names))
    lines = [
        "control matrix: val loss of each label's tokens (rows) under each forced label (columns), nats/token",
        " " * width + "".join(f" {n:>{width}}" for n in names),
    ]
    for true in names:
        cells = "".join(f" {metrics[control_matrix_key(true, forced)]:>{width}.4f}" for forced in names)
        lines.append(f"{true:<{width}}{cells}")
    off, diagonal = metrics[VAL_CONTROL_OFF_DIAGONAL], metrics[VAL_CONTROL_DIAGONAL]
    lines.append(
        f"control gain {fixed(metrics[VAL_CONTROL_GAIN], '+.4f')} nats/token "
        f"(off-diagonal {off:.4f} - diagonal {diagonal:.4f}; 0 when the label is ignored)"
    )
    return "\n".join(lines)


def mode_table(metrics: dict[str, float], n_layer: int) -> str:
    """The mode slider's curve: per m, the mean precision of each layer, the next-token entropy and val loss."""
    lines = ["mode slider: m | mean precision per layer | next-token entropy (nats) | val loss"]
    for m in MODE_GRID:
        precision = " ".join(f"{metrics[mode_key(m, f'precision/L{i}')]:.3f}" for i in range(n_layer))
        lines.append(
            f"m={m:+.1f} | {precision} | {metrics[mode_key(m, 'entropy')]:.4f} | {metrics[mode_key(m, 'loss')]:.4f}"
        )
    return "\n".join(lines)


def _audit_line(metrics: dict[str, float], block_size: int) -> str:
    """The leak audit of a global-pooling model as one line (nats/token; > 0: the model uses the future)."""
    early = min(EARLY_POSITIONS, block_size)
    buckets = f"positions 0-{early - 1}: {fixed(metrics[VAL_LEAK_EARLY], '+.4f')}"
    if VAL_LEAK_LATE in metrics:
        buckets += f", positions {early}-{block_size - 1}: {fixed(metrics[VAL_LEAK_LATE], '+.4f')}"
    return (
        f"leak audit (trained with ncn.pooling=global): val loss {metrics['val/loss']:.4f} global, "
        f"{metrics[VAL_LOSS_CAUSAL]:.4f} with the same weights under causal pooling; the future buys "
        f"{fixed(metrics[VAL_LEAK], '+.4f')} nats/token ({buckets})"
    )
