"""Figures: signal heatmaps ("brain scans", NCN paper §8), a sweep's val-loss curves, its
sample-efficiency figure (log–log, with power-law fits) and the quality–compute curve of gated vs
random skipping (NCN paper §6.1, §8).

Every figure is a plain `matplotlib.figure.Figure` (no pyplot state; rendered by Agg on
`savefig`), safe in headless training loops and needing no `plt.close`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure, SubFigure
from matplotlib.ticker import ScalarFormatter

from ncn.model.signals import NEUTRAL, RANGES

MAX_X_LABELS = 96  # beyond this many tokens only every k-th token is labelled, so labels stay legible


def signal_rows(signals: Mapping[str, torch.Tensor], index: int = 0) -> dict[str, np.ndarray]:
    """One batch row of `signals` as float64 arrays (T, L) or (T, L, H), in the model's order.

    Raises:
        ValueError: a signal that is not (B, T, L) or (B, T, L, H).
    """
    rows = {}
    for name, value in signals.items():
        if value.dim() not in (3, 4):
            raise ValueError(f"signal {name!r} has shape {tuple(value.shape)}: expected (B, T, L) or (B, T, L, H)")
        rows[name] = value[index].detach().to(device="cpu", dtype=torch.float64).numpy()
    return rows


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
    signal's range (`ncn.model.signals.RANGES`, widened to the data if a value lies outside it).
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
        vcenter=neutral,
        vmin=min(max(neutral - half, low), neutral - eps),
        vmax=max(min(neutral + half, high), neutral + eps),
    )


def _rows_checked(signals: Mapping[str, torch.Tensor], tokens: Sequence[str], index: int) -> dict[str, np.ndarray]:
    rows = signal_rows(signals, index)
    if not rows:
        raise ValueError("no modulation signals to draw: the model is a plain Transformer (ncn.targets=[])")
    n_tokens = next(iter(rows.values())).shape[0]
    if len(tokens) != n_tokens:
        raise ValueError(f"{len(tokens)} token labels for {n_tokens} positions: pass one label per position")
    return rows


def _draw(fig: Figure | SubFigure, rows: dict[str, np.ndarray], tokens: Sequence[str], scale: str) -> None:
    """One heatmap panel per signal of `rows` into `fig` (a figure or a sub-figure), stacked vertically."""
    n_tokens, n_layer = next(iter(rows.values())).shape[:2]
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    step = max(1, math.ceil(n_tokens / MAX_X_LABELS))
    for ax, (name, values) in zip(axes, rows.items(), strict=True):
        per_head = values.ndim == 3
        grid = values.mean(axis=2) if per_head else values  # (T, L)
        image = ax.imshow(grid.T, aspect="auto", cmap="RdBu_r", norm=_norm(name, grid, scale), interpolation="nearest")
        neutral = NEUTRAL[name]
        heads = f", mean over {values.shape[2]} heads" if per_head else ""
        ax.set_title(f"{name} (neutral {neutral:g}{heads})", fontsize=10, loc="left")
        ax.set_yticks(range(n_layer), [f"L{i}" for i in range(n_layer)], fontsize=7)
        ax.set_ylabel("layer", fontsize=8)
        positions = range(0, n_tokens, step)
        ax.set_xticks(positions, [_axis_label(tokens[i]) for i in positions], rotation=90, fontsize=7)
        ax.set_xlabel("token", fontsize=8)
        bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03)
        bar.ax.axhline(neutral, color="black", linewidth=1.5)
        vmin, vmax = image.norm.vmin, image.norm.vmax
        ticks = [vmin, (vmin + neutral) / 2, neutral, (neutral + vmax) / 2, vmax]
        labels = [_tick_label(v, neutral) for v in ticks]
        labels[2] = f"neutral {neutral:g}"
        bar.set_ticks(ticks, labels=labels, fontsize=7)


def _size(n_tokens: int, n_layer: int, n_signals: int) -> tuple[float, float]:
    width = min(max(8.0, 2.5 + 0.18 * min(n_tokens, MAX_X_LABELS * 2)), 40.0)
    return width, 0.6 + (1.3 + 0.28 * n_layer) * n_signals


def signal_heatmaps(
    signals: Mapping[str, torch.Tensor],
    tokens: Sequence[str],
    index: int = 0,
    scale: str = "data",
    title: str | None = None,
) -> Figure:
    """One figure with a heatmap panel per signal: layers (rows, y axis "layer") × tokens (x axis "token").

    Args:
        signals: `model(idx).signals`, each (B, T, L) or (B, T, L, H) (per-head precision).
        tokens: T token strings for the x axis (see `ncn.data.tokenizer.token_labels`).
        index: the batch row to draw.
        scale: "data" or "range", see `_norm`. Each colour bar is centred on the signal's
            neutral value (`ncn.model.signals.NEUTRAL`, white), marks it with a black line and has
            five ticks: both ends, neutral, and the midpoints between them.
        title: figure title; say what was drawn (run name, step, checkpoint).

    Per-head signals are drawn as the mean over heads (the panel title says so).

    Raises:
        ValueError: no signals (a plain-Transformer checkpoint), or len(tokens) != T.
    """
    rows = _rows_checked(signals, tokens, index)
    n_tokens, n_layer = next(iter(rows.values())).shape[:2]
    fig = Figure(figsize=_size(n_tokens, n_layer, len(rows)), layout="constrained")
    _draw(fig, rows, tokens, scale)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def control_heatmaps(
    signals_by_control: Mapping[str, Mapping[str, torch.Tensor]],
    tokens: Sequence[str],
    scale: str = "range",
    title: str | None = None,
) -> Figure:
    """The same prompt's `signal_heatmaps` under each control side by side: one column per control setting
    (a label, or a mode value m), titled with its name; scale "range" by default so the columns share
    each signal's colour scale (NCN paper §3.2, §6.1; `task=analyze` of a controlled checkpoint).

    Raises:
        ValueError: no settings, no signals, or len(tokens) != T.
    """
    if not signals_by_control:
        raise ValueError("no control settings to draw")
    rows = {name: _rows_checked(signals, tokens, 0) for name, signals in signals_by_control.items()}
    first = next(iter(rows.values()))
    n_tokens, n_layer = next(iter(first.values())).shape[:2]
    width, height = _size(n_tokens, n_layer, len(first))
    fig = Figure(figsize=(width * len(rows), height + 0.4), layout="constrained")
    for sub, (name, signal_rows_of) in zip(np.atleast_1d(fig.subfigures(1, len(rows))), rows.items(), strict=True):
        _draw(sub, signal_rows_of, tokens, scale)
        sub.suptitle(name, fontsize=11)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def loss_curves(curves: Mapping[str, Sequence[Mapping[float, float]]], title: str, ylabel: str) -> Figure:
    """Val loss vs tokens seen: per variant the mean over its seeds' curves, band = ± 1 std (>= 2 seeds).

    curves: variant label -> one {tokens seen: value} per seed; only token counts present in
    every seed's curve are drawn. The y axis shows plain values (no offset, no scientific notation).
    """
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for label, runs in curves.items():
        xs = sorted(set.intersection(*(set(c) for c in runs)))
        values = np.array([[c[x] for x in xs] for c in runs])  # (seeds, points)
        mean = values.mean(axis=0)
        (line,) = ax.plot(xs, mean, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            std = values.std(axis=0, ddof=1)
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    ax.yaxis.set_major_formatter(formatter)
    ax.set(xlabel="tokens seen", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def sample_efficiency_figure(
    curves: Mapping[str, Sequence[Sequence[tuple[float, float]]]],
    fits: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    title: str,
    reference: tuple[Sequence[float], Sequence[float], str] | None = None,
) -> Figure:
    """Val loss vs tokens on log–log axes: per variant the mean over seeds (band = ± 1 std, >= 2
    seeds) and its power-law fit L(D) = E + A·D^(−α) (dashed, same colour).

    curves: variant -> one [(tokens, val loss)] per seed; only token counts > 0 present in every
    seed's curve are drawn. fits: variant -> the fitted curve (a callable of tokens), drawn over the
    variant's token range. reference: (tokens, loss, label) of another run drawn in grey (the
    reference implementation's training loss, EWM-smoothed as its own dashboard draws it).
    """
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    for label, runs in curves.items():
        xs = sorted(x for x in set.intersection(*(set(dict(c)) for c in runs)) if x > 0)
        if not xs:  # nothing past step 0: no point on a log axis
            continue
        values = np.array([[dict(c)[x] for x in xs] for c in runs])  # (seeds, points)
        mean = values.mean(axis=0)
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=f"{label}: val loss, mean of {len(runs)}")
        if len(runs) > 1:
            std = values.std(axis=0, ddof=1)
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        if label in fits:
            grid = np.geomspace(xs[0], xs[-1], 200)
            ax.plot(grid, fits[label](grid), linestyle="--", color=line.get_color(), label=f"{label}: power-law fit")
    if reference is not None:
        tokens, losses, ref_label = reference
        ax.plot(tokens, losses, color="0.45", linewidth=1.2, label=ref_label)
    if not ax.lines:
        ax.text(0.5, 0.5, "no curve past step 0", transform=ax.transAxes, ha="center")
        ax.set(title=title)
        return fig
    ax.set_xscale("log")
    ax.set_yscale("log")
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    ax.yaxis.set_major_formatter(formatter)
    ax.yaxis.set_minor_formatter(formatter)
    ax.set(xlabel="tokens seen (log scale)", ylabel="loss (nats/token, log scale)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


# One point of a quality–compute curve: (FFN FLOPs skipped in %, Δ val loss vs dense in nats/token,
# lower and upper end of its 95 % interval; NaN ends: no interval, e.g. one seed).
CurvePoint = tuple[float, float, float, float]


def quality_compute_figure(
    curves: Mapping[str, Mapping[str, Sequence[CurvePoint]]], title: str, legend_title: str | None = None
) -> Figure:
    """Δ val loss vs dense against the share of FFN FLOPs skipped: per variant gated skipping (solid,
    circles) and random skipping at the same count per layer and kind (dashed, squares), in the
    variant's colour, each point with its 95 % interval as an error bar; a grey line marks dense (Δ = 0).

    curves: variant -> {"gated": points, "random": points} (`CurvePoint`s, one per threshold τ,
    drawn in x order). legend_title: what the variant labels are values of (a sweep's swept keys).
    Below the dense line means skipping helped; the gap between a variant's two
    curves at equal x is what gating buys over random skipping (NCN paper §6.1, §8).
    """
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.axhline(0.0, color="0.6", linewidth=1, label="dense (Δ = 0)")
    for variant, sides in curves.items():
        colour = None
        for side, style, marker in (("gated", "-", "o"), ("random", "--", "s")):
            points = sorted(sides.get(side, ()))
            if not points:
                continue
            x, y, low, high = (np.array(v, dtype=float) for v in zip(*points, strict=True))
            below = np.nan_to_num(y - low, nan=0.0)  # no interval: no bar
            above = np.nan_to_num(high - y, nan=0.0)
            bars = ax.errorbar(
                x,
                y,
                yerr=[below, above],
                linestyle=style,
                marker=marker,
                markersize=5,
                capsize=3,
                color=colour,
                label=f"{variant}: {side} skipping",
            )
            colour = bars.lines[0].get_color()
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    ax.yaxis.set_major_formatter(formatter)
    ax.set(
        xlabel="FFN FLOPs skipped (%)",
        ylabel="Δ val loss vs dense (nats/token)",
        title=title,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=legend_title, title_fontsize=8)
    return fig
