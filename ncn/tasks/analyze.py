"""`python run.py task=analyze checkpoint=latest [prompt="..."]`: what the controller tells each layer at each token.

Runs a prompt (default: the probe training logged, the first `trainer.probe_tokens` val tokens)
through a checkpoint and writes a heatmap PNG ("brain scan", NCN paper §8), the raw signal values
as CSV and summary statistics as JSON under the run dir, and attaches them to the checkpoint's
MLflow run when it is in the store. A checkpoint trained with a control input is drawn under
each of its labels (or `control.label`), or m = -1, 0, 1 (or `control.value`), side by side.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ncn.analysis.compute import require_gates
from ncn.analysis.plots import control_heatmaps, signal_heatmaps, signal_rows
from ncn.config import RunConfig, RunContext
from ncn.data.loader import DataModule
from ncn.data.tokenizer import encode_prompt, get_encoding, token_labels
from ncn.errors import NCNConfigError
from ncn.model.signals import GATES
from ncn.training.checkpoint import (
    CONTROL_USE_KEYS,
    Checkpoint,
    checkpoint_run,
    control_setting,
    load_model,
    open_checkpoint,
)
from ncn.training.evaluation import run_signals
from ncn.training.runtime import default_device

log = logging.getLogger(__name__)

GATE_THRESHOLD = 0.5  # ffn_gate below this = the layer's FFN is mostly switched off ("throttled")
DEFAULT_PROBE_TOKENS = 32  # the default run's trainer.probe_tokens: the probe of a run trained without one
ANALYZE_MODES = (-1.0, 0.0, 1.0)  # the mode values a control=mode checkpoint is drawn under by default


def control_settings(ckpt: Checkpoint, label: str | None, value: float | None) -> dict[str, int | float] | None:
    """{column name: label id or m} the prompt is analyzed under, None for a model without a control input.

    Every label of the checkpoint (or `label` alone), or m in `ANALYZE_MODES` (or `value` alone).

    Raises:
        CheckpointError: see `ncn.training.checkpoint.control_setting`.
    """
    given = control_setting(ckpt, label, value)
    control = ckpt.config.control
    if not control.active:
        return None
    if control.kind == "mode":
        values = ANALYZE_MODES if given is None else (given,)
        return {f"m={m:+.1f}": float(m) for m in values}
    ids = range(len(control.vocabulary)) if given is None else (int(given),)
    return {control.vocabulary[i]: i for i in ids}


def signal_table(signals: dict[str, torch.Tensor], tokens: Sequence[str], index: int = 0) -> pd.DataFrame:
    """The raw signal values of one sequence in long format, one row per value.

    Columns: signal (str), layer (int), head (nullable int: the head for per-head signals,
    <NA> otherwise), position (int, 0-based), token (str), value (float). A (T, L) signal gives
    T·L rows, a (T, L, H) signal T·L·H rows. Rows are ordered signal, position, layer, head.
    """
    frames = []
    for name, values in signal_rows(signals, index).items():
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


def signal_summary(signals: dict[str, torch.Tensor], index: int = 0, skip_threshold: float = 0.0) -> dict[str, float]:
    """Per-layer statistics of each signal over the tokens (and heads) of one sequence.

    Keys are ``<signal>/L<layer>/<stat>`` (the tracking namespace, e.g. ``precision/L3/min``):
    mean, std (population, ddof=0), min, max for every signal, and for ffn_gate also
    ``frac_below_0.5``, the fraction of tokens whose gate is < 0.5 (FFN mostly off). With
    skip_threshold τ > 0, every gate (ffn_gate, head_gate, layer_gate) also gets ``skipped``:
    the fraction of its units (tokens, and heads) that inference at τ skips.
    """
    summary = {}
    for name, values in signal_rows(signals, index).items():
        for layer in range(values.shape[1]):
            v = values[:, layer]  # (T,) or (T, H)
            prefix = f"{name}/L{layer}"
            summary[f"{prefix}/mean"] = float(v.mean())
            summary[f"{prefix}/std"] = float(v.std())
            summary[f"{prefix}/min"] = float(v.min())
            summary[f"{prefix}/max"] = float(v.max())
            if name == "ffn_gate":
                summary[f"{prefix}/frac_below_{GATE_THRESHOLD:g}"] = float((v < GATE_THRESHOLD).mean())
            if skip_threshold > 0 and name in GATES:
                summary[f"{prefix}/skipped"] = float((v < skip_threshold).mean())
    return summary


def summary_table(summary: dict[str, float]) -> pd.DataFrame:
    """`signal_summary` as a table: one row per (signal, layer), one column per statistic."""
    keys = pd.Series(list(summary)).str.split("/", n=2, expand=True)
    layer = keys[1].str[1:].astype(int)  # "L10" after "L9", not after "L1"
    table = pd.DataFrame({"signal": keys[0], "layer": layer, "stat": keys[2], "value": list(summary.values())})
    wide = table.pivot(index=["signal", "layer"], columns="stat", values="value")
    stats = ("mean", "std", "min", "max", f"frac_below_{GATE_THRESHOLD:g}", "skipped")
    return wide[[c for c in stats if c in wide.columns]]


def main(cfg: RunConfig, ctx: RunContext) -> None:
    """`task=analyze`: signals of `cfg.prompt` (None: the training probe) under `cfg.checkpoint`, saved and tracked.

    Writes `<run dir>/analysis/{signals.png, signals.csv, summary.json}` (see `signal_heatmaps`,
    `signal_table`, `signal_summary`), prints their paths and the summary, and attaches the files
    to the checkpoint's MLflow run under `analysis/<run dir name>/` (its status is unchanged) when
    tracking is on and the run is in the store (the checkpoint's store unless `tracking` is
    overridden). A prompt longer than block_size is cropped from the left with a warning.
    skip_threshold τ > 0 adds to the summary the fraction of each gate's units inference at τ skips.

    Raises:
        CheckpointError: unusable checkpoint; NCNConfigError: skip_threshold > 0 for a checkpoint
            without gates (`require_gates`), a plain-Transformer checkpoint (no signals), an unusable
            tracking store.
    """
    ckpt = open_checkpoint(cfg.checkpoint, ctx.launch_dir, ctx.overridden, allowed=CONTROL_USE_KEYS)
    print(ckpt.describe(), file=sys.stderr, flush=True)
    settings = control_settings(ckpt, cfg.control.label, cfg.control.value)
    model = load_model(ckpt, default_device())
    if cfg.skip_threshold > 0:
        require_gates(model, f"skip_threshold={cfg.skip_threshold:g}", str(ckpt.path))
    if not model.modulation_config.targets:
        raise NCNConfigError(
            f"{ckpt.path} is a plain Transformer (ncn.targets=[]) and has no modulation signals: "
            "analyze a checkpoint trained with an NCN option (e.g. ncn=full)"
        )
    encoding = get_encoding(ckpt.config.data.tokenizer)
    if cfg.prompt:
        ids, what = encode_prompt(cfg.prompt, encoding), "prompt"
    else:
        n = ckpt.config.trainer.probe_tokens or DEFAULT_PROBE_TOKENS
        ids, what = DataModule(ckpt.config.data, ckpt.config.control).probe_tokens(n), f"probe (first {n} val tokens)"
        print(f"no prompt given: analyzing the training probe, the first {n} validation tokens", file=sys.stderr)
    block = model.config.block_size
    if len(ids) > block:
        log.warning(
            "prompt of %d tokens is longer than block_size=%d: analyzing its last %d tokens", len(ids), block, block
        )
        ids = ids[-block:]
    labels = token_labels(ids, encoding)
    by_control = {name: run_signals(model, ids, value) for name, value in (settings or {}).items()}
    signals = next(iter(by_control.values())) if by_control else run_signals(model, ids)

    out = ctx.run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "signals.png", out / "signals.csv", out / "summary.json"]
    name = ckpt.state.run_name or ckpt.config.run_name or ckpt.path.parent.parent.name
    title = f"{name}, step {ckpt.state.step}: {len(ids)} tokens of the {what}"
    if by_control:
        control_heatmaps(by_control, labels, title=title).savefig(files[0], dpi=120)
        tables = [signal_table(sig, labels).assign(control=setting) for setting, sig in by_control.items()]
        pd.concat(tables, ignore_index=True).to_csv(files[1], index=False)
        summary = {
            f"{setting}/{k}": v
            for setting, sig in by_control.items()
            for k, v in signal_summary(sig, skip_threshold=cfg.skip_threshold).items()
        }
    else:
        signal_heatmaps(signals, labels, title=title).savefig(files[0], dpi=120)
        signal_table(signals, labels).to_csv(files[1], index=False)
        summary = signal_summary(signals, skip_threshold=cfg.skip_threshold)
    files[2].write_text(
        json.dumps(
            {
                "checkpoint": str(ckpt.path),
                "run_name": name,
                "step": ckpt.state.step,
                "tokens": len(ids),
                "statistics": summary,
            },
            indent=2,
        )
    )
    with pd.option_context("display.width", 120, "display.precision", 4):
        for setting, sig in by_control.items() or [(None, signals)]:
            if setting is not None:
                print(f"under {setting}:")
            print(summary_table(signal_summary(sig)))
    for file in files:
        print(f"wrote {file}")

    if (run := checkpoint_run(ckpt, cfg.tracking, ctx.overridden, ctx.launch_dir)) is None:
        return
    tracker, run_id = run
    for file in files:
        tracker.log_artifact(file, f"analysis/{out.parent.name}", run_id=run_id)
    print(f"logged to MLflow run {run_id} ({tracker.uri}) under analysis/{out.parent.name}/")
