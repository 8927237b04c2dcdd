"""Modulation analysis: what the controller tells each layer at each token (NCN paper §8).

`python run.py task=analyze checkpoint=latest prompt="..."` runs a prompt through a checkpoint
and writes a heatmap PNG ("brain scan"), the raw signal values as CSV and summary statistics as
JSON under the Hydra output dir, and logs them to the checkpoint's MLflow run when tracking is on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from omegaconf import DictConfig

from ncn.checkpoint import load_model, resolve
from ncn.data import gpt2_encoding
from ncn.errors import NCNConfigError
from ncn.generate import default_device, encode_prompt
from ncn.runtime import build, run_context
from ncn.signals import NEUTRAL, RANGES
from ncn.tracking import MLflowTracker

log = logging.getLogger(__name__)

GATE_THRESHOLD = 0.5  # ffn_gate below this = the layer's FFN is mostly switched off ("throttled")
MAX_X_LABELS = 96  # beyond this many tokens only every k-th token is labelled, so labels stay legible


def _sequence(signals: dict[str, torch.Tensor], index: int) -> dict[str, np.ndarray]:
    """One batch row of `signals` as float64 arrays (T, L) or (T, L, H), in the model's order."""
    rows = {}
    for name, value in signals.items():
        if value.dim() not in (3, 4):
            raise ValueError(f"signal {name!r} has shape {tuple(value.shape)}: expected (B, T, L) or (B, T, L, H)")
        rows[name] = value[index].detach().to(device="cpu", dtype=torch.float64).numpy()
    return rows


def token_labels(token_ids: Sequence[int], encoding) -> list[str]:
    """Readable strings for GPT-2 token ids, one per token.

    Each token's bytes are decoded on their own (a UTF-8 character split over two tokens shows
    as U+FFFD in both); ids beyond the tokenizer's vocabulary (the padded rows of the output
    head) show as ``<id>``.
    """
    labels = []
    for token in token_ids:
        try:
            labels.append(encoding.decode_single_token_bytes(int(token)).decode("utf-8", errors="replace"))
        except KeyError:
            labels.append(f"<{int(token)}>")
    return labels


def _axis_label(text: str) -> str:
    """A token string made visible on an axis: spaces as '·', newlines and tabs escaped."""
    return text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")


def _tick_label(value: float, neutral: float) -> str:
    """`value` to 4 significant digits, or more until it no longer reads as `neutral` (1.0019 -> "1.002")."""
    for digits in range(4, 16):
        label = f"{value:.{digits}g}"
        if value == neutral or label != f"{neutral:.{digits}g}":
            return label
    return label


def _norm(name: str, values: np.ndarray, scale: str) -> TwoSlopeNorm:
    """Colour scale whose centre (white in the diverging map) is the signal's neutral value.

    scale="data": neutral ± the largest deviation in `values`, so the same colour intensity
    means the same deviation on both sides; scale="range": the signal's whole range, so figures
    of different checkpoints or training steps share one scale. Both are clipped to the
    signal's range (`ncn.signals.RANGES`, widened to the data if a value lies outside it), so
    the gate (neutral 0.95 in (0, 1)) spends most of the colour map below neutral.
    """
    if scale not in ("data", "range"):
        raise ValueError(f"scale={scale!r}: choose 'data' or 'range'")
    neutral = NEUTRAL[name]
    low, high = RANGES[name]
    low = min(low, float(values.min()))  # a model with precision_max > 4 still gets a true scale
    high = max(high, float(values.max()))
    half = float(np.max(np.abs(values - neutral))) if scale == "data" else math.inf
    eps = 1e-6  # TwoSlopeNorm needs vmin < vcenter < vmax, also for a perfectly neutral signal
    return TwoSlopeNorm(
        vcenter=neutral, vmin=min(max(neutral - half, low), neutral - eps), vmax=max(min(neutral + half, high), neutral + eps)
    )


def signal_heatmaps(
    signals: dict[str, torch.Tensor],
    tokens: Sequence[str],
    index: int = 0,
    scale: str = "data",
    title: str | None = None,
) -> Figure:
    """One figure with a heatmap panel per signal: layers (rows) × tokens (columns).

    Args:
        signals: `model(idx).signals`, each (B, T, L) or (B, T, L, H) (per-head precision).
        tokens: T token strings for the x axis (see `token_labels`).
        index: the batch row to draw.
        scale: "data" or "range", see `_norm`; the colour bar marks the neutral value
            (`ncn.signals.NEUTRAL`) with a black line and a tick.
        title: figure title (e.g. the checkpoint and step).

    Per-head signals are drawn as the mean over heads (the panel title says so); the raw
    per-head values are in `signal_table`. The figure is a plain `matplotlib.figure.Figure`
    (no pyplot state, rendered by Agg on `savefig`), so it is safe in headless training loops
    and needs no `plt.close`.

    Raises:
        ValueError: no signals (a plain-Transformer checkpoint), or len(tokens) != T.
    """
    rows = _sequence(signals, index)
    if not rows:
        raise ValueError("no modulation signals to draw: the model is a plain Transformer (ncn.targets=[])")
    n_tokens, n_layer = next(iter(rows.values())).shape[:2]
    if len(tokens) != n_tokens:
        raise ValueError(f"{len(tokens)} token labels for {n_tokens} positions: pass one label per position")

    width = min(max(8.0, 2.5 + 0.18 * min(n_tokens, MAX_X_LABELS * 2)), 40.0)
    panel_height = 0.9 + 0.28 * n_layer
    fig = Figure(figsize=(width, 0.6 + panel_height * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    step = max(1, math.ceil(n_tokens / MAX_X_LABELS))
    for ax, (name, values) in zip(axes, rows.items()):
        per_head = values.ndim == 3
        grid = values.mean(axis=2) if per_head else values  # (T, L)
        image = ax.imshow(grid.T, aspect="auto", cmap="RdBu_r", norm=_norm(name, grid, scale), interpolation="nearest")
        neutral = NEUTRAL[name]
        heads = f", mean over {values.shape[2]} heads" if per_head else ""
        ax.set_title(f"{name} (neutral {neutral:g}{heads})", fontsize=10, loc="left")
        ax.set_yticks(range(n_layer), [f"L{i}" for i in range(n_layer)], fontsize=7)
        positions = range(0, n_tokens, step)
        ax.set_xticks(positions, [_axis_label(tokens[i]) for i in positions], rotation=90, fontsize=7)
        bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03)
        bar.ax.axhline(neutral, color="black", linewidth=1.5)
        vmin, vmax = image.norm.vmin, image.norm.vmax
        labels = [_tick_label(vmin, neutral), f"neutral {neutral:g}", _tick_label(vmax, neutral)]
        bar.set_ticks([vmin, neutral, vmax], labels=labels, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def signal_table(signals: dict[str, torch.Tensor], tokens: Sequence[str], index: int = 0) -> pd.DataFrame:
    """The raw signal values of one sequence in long format, one row per value.

    Columns: signal (str), layer (int), head (nullable int: the head for per-head signals,
    <NA> otherwise), position (int, 0-based), token (str), value (float). A (T, L) signal gives
    T·L rows, a (T, L, H) signal T·L·H rows. Rows are ordered signal, position, layer, head.
    """
    frames = []
    for name, values in _sequence(signals, index).items():
        if len(tokens) != values.shape[0]:
            raise ValueError(f"{len(tokens)} tokens for {values.shape[0]} positions: pass one token per position")
        grids = np.meshgrid(*(np.arange(n) for n in values.shape), indexing="ij")  # position, layer[, head]
        head = pd.array(grids[2].ravel() if values.ndim == 3 else [pd.NA] * values.size, dtype="Int64")
        frames.append(
            pd.DataFrame(
                {
                    "signal": name,
                    "layer": grids[1].ravel(),
                    "head": head,
                    "position": grids[0].ravel(),
                    "token": np.asarray(tokens, dtype=object)[grids[0].ravel()],
                    "value": values.ravel(),
                }
            )
        )
    columns = ["signal", "layer", "head", "position", "token", "value"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def signal_summary(signals: dict[str, torch.Tensor], index: int = 0) -> dict[str, float]:
    """Per-layer statistics of each signal over the tokens (and heads) of one sequence.

    Keys are ``<signal>/L<layer>/<stat>`` (the tracking namespace, e.g. ``precision/L3/min``):
    mean, std (population, ddof=0), min, max for every signal, and for ffn_gate also
    ``frac_below_0.5``, the fraction of tokens whose gate is < 0.5 (FFN mostly off).
    """
    summary = {}
    for name, values in _sequence(signals, index).items():
        for layer in range(values.shape[1]):
            v = values[:, layer]  # (T,) or (T, H)
            prefix = f"{name}/L{layer}"
            summary[f"{prefix}/mean"] = float(v.mean())
            summary[f"{prefix}/std"] = float(v.std())
            summary[f"{prefix}/min"] = float(v.min())
            summary[f"{prefix}/max"] = float(v.max())
            if name == "ffn_gate":
                summary[f"{prefix}/frac_below_{GATE_THRESHOLD:g}"] = float((v < GATE_THRESHOLD).mean())
    return summary


def run_signals(model: torch.nn.Module, token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """Signals (each (1, T, L[, H]), on CPU) of one forward pass of `model` over `token_ids`.

    Uses the last block_size tokens if the sequence is longer; runs in eval mode without
    gradients and restores the module's train/eval mode afterwards.
    """
    device = next(model.parameters()).device
    idx = torch.tensor([list(token_ids)[-model.config.block_size :]], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            signals = model(idx).signals
    finally:
        model.train(was_training)
    return {name: value.float().cpu() for name, value in signals.items()}


def probe_figure(model: torch.nn.Module, probe_tokens: Sequence[int], title: str | None = None) -> Figure | None:
    """Heatmaps of the signals `model` gives a fixed probe prompt; None for a plain Transformer.

    Called by the training loop at each evaluation (`trainer.probe_tokens` tokens from the
    start of the val split, `DataModule.probe_tokens`), so the tracker shows how the
    controller's policy develops. Uses the fixed colour scale (scale="range") so figures of
    different steps compare directly. Pass the uncompiled, unwrapped model (no DDP wrapper).
    """
    signals = run_signals(model, probe_tokens)
    if not signals:
        return None
    labels = token_labels(list(probe_tokens)[-model.config.block_size :], gpt2_encoding())
    return signal_heatmaps(signals, labels, scale="range", title=title)


def log_to_run(tracking_uri: str, run_id: str, paths: Sequence[Path], artifact_path: str) -> None:
    """Attach files to an existing MLflow run as artifacts under `artifact_path`.

    Goes through `MlflowClient`, so a finished training run stays FINISHED (no start_run,
    which would reopen it as RUNNING).
    """
    from mlflow import (
        MlflowClient,  # ~2 s to import: only analyses that track pay for it
    )

    client = MlflowClient(tracking_uri=tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def summary_table(summary: dict[str, float]) -> pd.DataFrame:
    """`signal_summary` as a table: one row per (signal, layer), one column per statistic."""
    keys = pd.Series(list(summary)).str.split("/", n=2, expand=True)
    layer = keys[1].str[1:].astype(int)  # "L10" after "L9", not after "L1"
    table = pd.DataFrame({"signal": keys[0], "layer": layer, "stat": keys[2], "value": list(summary.values())})
    wide = table.pivot(index=["signal", "layer"], columns="stat", values="value")
    return wide[[c for c in ("mean", "std", "min", "max", f"frac_below_{GATE_THRESHOLD:g}") if c in wide.columns]]


def main(cfg: DictConfig) -> None:
    """`task=analyze`: signals of `cfg.prompt` under `cfg.checkpoint`, saved and tracked.

    Writes `<run dir>/analysis/{signals.png, signals.csv, summary.json}` (see
    `signal_heatmaps`, `signal_table`, `signal_summary`), prints their paths and the summary,
    and, when `cfg.tracking` is MLflow and the checkpoint records its training run, attaches
    the files to that run under `analysis/<run dir name>/` (the run's status is unchanged).
    A prompt longer than block_size is cropped from the left with a warning.

    Raises:
        CheckpointError: unusable checkpoint; NCNConfigError: a plain-Transformer checkpoint
            (no signals), an unusable tracking store.
    """
    run_dir, launch_dir, _ = run_context()
    path = resolve(cfg.checkpoint, launch_dir)
    model, _ = load_model(path, default_device())
    if not model.modulation_config.targets:
        raise NCNConfigError(
            f"{path} is a plain Transformer (ncn.targets=[]) and has no modulation signals: "
            "analyze a checkpoint trained with an NCN option (e.g. ncn=full)"
        )
    train_state = json.loads((path / "train_state.json").read_text())
    encoding = gpt2_encoding()
    ids = encode_prompt(cfg.prompt, encoding)
    block = model.config.block_size
    if len(ids) > block:
        log.warning("prompt of %d tokens is longer than block_size=%d: analyzing its last %d tokens", len(ids), block, block)
        ids = ids[-block:]
    signals = run_signals(model, ids)
    labels = token_labels(ids, encoding)

    out = run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "signals.png", out / "signals.csv", out / "summary.json"]
    title = f"{path.parent.parent.name}/{path.name}: {len(ids)} tokens"
    signal_heatmaps(signals, labels, title=title).savefig(files[0], dpi=120)
    signal_table(signals, labels).to_csv(files[1], index=False)
    summary = signal_summary(signals)
    files[2].write_text(json.dumps({"checkpoint": str(path), "step": train_state.get("step"), "tokens": len(ids),
                                    "statistics": summary}, indent=2))
    with pd.option_context("display.width", 120, "display.precision", 4):
        print(summary_table(summary))
    for file in files:
        print(f"wrote {file}")

    tracker = build(cfg.tracking)
    run_id = train_state.get("mlflow_run_id")
    if isinstance(tracker, MLflowTracker) and run_id:
        from mlflow.exceptions import MlflowException

        tracker.check()
        try:
            log_to_run(tracker.uri, run_id, files, f"analysis/{out.parent.name}")
        except MlflowException as exc:
            log.warning("could not log to MLflow run %s in %s (%s): results are only local", run_id, tracker.uri,
                        str(exc).splitlines()[0])
        else:
            print(f"logged to MLflow run {run_id} ({tracker.uri}) under analysis/{out.parent.name}/")
