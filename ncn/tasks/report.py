"""Ablation report of a sweep: a Markdown + CSV table per variant and a val-loss-vs-tokens plot,
and its sample efficiency: power-law fits, tokens-to-target, efficiency ratios, the reference's SEI.

Run: `python run.py task=report sweep_run=<parent run id | experiment | sweep name>` (into the
run dir) or `python -m ncn.tasks.report [<same>] [--uri URI] [--out DIR]` (into <sweep dir>/report).
An experiment (or nothing: `tracking.experiment`) means its newest sweep, a sweep name its newest
launch. The files are also logged to the parent run under `report/`; statistics: docs/sweeps.md.
`reference_log=<training.log>` (`--reference-log`) states the SEI of a log in the reference
implementation's format, alone or drawn beside the sweep (docs/method.md §9). `baseline=<variant>`
(`--baseline`) picks the variant every Δ compares with. Runs that measured skip_grid also get the
quality–compute curve of gated vs random skipping: compute.md/.csv and quality_compute.png.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import statistics
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ncn.analysis import sample_efficiency as se
from ncn.analysis.compute import REPORT_TAU, parse_metrics
from ncn.analysis.statistics import delta_interval, mean_interval, mean_std
from ncn.config import MODE_GRID, RunConfig, RunContext, TrackingConfig
from ncn.errors import NCNConfigError, exit_code, fixed, show_warning
from ncn.tracking import RunRecord, Tracker, open_tracker
from ncn.training.evaluation import (
    EARLY_POSITIONS,
    VAL_BPB,
    VAL_CONTROL_GAIN,
    VAL_LEAK,
    VAL_LEAK_EARLY,
    VAL_LEAK_LATE,
    VAL_LOSS_CAUSAL,
    mode_key,
)

# Final metrics averaged per variant besides val/loss: column prefix, metric key, statistic
# ("std": mean ± sample std; "ci": mean with a 95 % t-interval like Δ; "std+ci": both).
EXTRA_COLUMNS = (
    ("val_bpb", VAL_BPB, "std+ci"),
    ("val_loss_causal", VAL_LOSS_CAUSAL, "std"),
    ("leak", VAL_LEAK, "ci"),
    ("leak_early", VAL_LEAK_EARLY, "ci"),
    ("leak_late", VAL_LEAK_LATE, "ci"),
    ("ffn_skipped", f"val/compute/t{REPORT_TAU:g}/ffn_skipped", "std"),
    ("total_skipped", f"val/compute/t{REPORT_TAU:g}/total_skipped", "std"),
    ("compute_delta", f"val/compute/t{REPORT_TAU:g}/delta_loss", "ci"),
    ("compute_random_delta", f"val/compute/t{REPORT_TAU:g}/random_delta_loss", "ci"),
    ("control_gain", VAL_CONTROL_GAIN, "ci"),
    *((f"mode_entropy_m{m:+.1f}", mode_key(m, "entropy"), "std") for m in MODE_GRID),
)
MODE_ENTROPY = [f"mode_entropy_m{m:+.1f}" for m in MODE_GRID]

# A mean with its 95 % interval; the quality–compute table's three Δ columns (each such a triple).
INTERVAL = ("mean", "ci_low", "ci_high")
COMPUTE_SIDES = ("gated_delta", "random_delta", "gated_minus_random")
SPREAD = {"std": ("std",), "ci": ("ci_low", "ci_high"), "std+ci": ("std", "ci_low", "ci_high")}
# The iso-parameter baseline: in a sweep over `ncn` that has it, every variant also gets Δ against it.
ISO_BASELINE = "none_iso"
FIELDS = [
    "variant",
    "seeds",
    "runs",
    "params",
    "controller_share_pct",
    "val_loss_mean",
    "val_loss_std",
    "val_loss_ci_low",
    "val_loss_ci_high",
    "val_ppl_mean",
    "val_ppl_std",
    "delta_val_loss",
    "delta_ci_low",
    "delta_ci_high",
    "delta_method",
    "baseline",
    "delta_iso_val_loss",
    "delta_iso_ci_low",
    "delta_iso_ci_high",
    "tokens_per_s",
    *(f"{name}_{part}" for name, _, stat in EXTRA_COLUMNS for part in ("mean", *SPREAD[stat])),
]


@dataclass
class RunResult:
    """One finished child run: its variant label, seed and final numbers (losses in nats/token).

    finals: the final value of each `EXTRA_COLUMNS` metric the run logged (bits per byte, leak audit).
    compute: the run's quality–compute curve, {τ: {field: value}} of its `val/compute/t<τ>/<field>`
    metrics (`ncn.analysis.compute.FIELDS`; fractions in [0, 1], losses in nats/token); {} without skip_grid.
    """

    variant: str
    seed: int
    params: int
    controller_share_pct: float
    val_loss: float
    tokens_per_s: float
    curve: list[tuple[float, float]] = field(default_factory=list)  # (tokens seen, val loss)
    finals: dict[str, float] = field(default_factory=dict)
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    tokens_per_step: float = math.nan
    compute: dict[float, dict[str, float]] = field(default_factory=dict)


def _extra(runs: Sequence[RunResult]) -> list[float]:
    """The `EXTRA_COLUMNS` cells of one variant in FIELDS order; NaN where no run of it logged the metric."""
    cells: list[float] = []
    for _, key, stat in EXTRA_COLUMNS:
        values = [r.finals[key] for r in runs if key in r.finals]
        width = 1 + len(SPREAD[stat])
        if not values:
            cells += [math.nan] * width
        elif stat == "std":
            cells += mean_std(values)
        elif stat == "ci":
            cells += mean_interval(values)
        else:
            cells += [*mean_std(values), *mean_interval(values)[1:]]
    return cells


def _variant(run: RunRecord, keys: list[str]) -> str:
    values = []
    for key in keys:
        value = run.tags.get(f"hydra.choices.{key}", run.params.get(key, "?"))
        values.append(value if len(keys) == 1 else f"{key}={value}")
    return " ".join(values)


def collect(tracker: Tracker, parent: RunRecord) -> tuple[list[RunResult], list[str], list[str]]:
    """(finished job results, variant labels in grid order, names of jobs that did not finish).

    Each job of the sweep counts once, by its current run (`Tracker.sweep_jobs`): a job run again
    in its folder (resumed sweep, requeued SLURM job) continues its run or supersedes an earlier
    attempt (a FAILED placeholder, a run killed before its first checkpoint), which is neither
    averaged in nor listed as failed.
    """
    grid: dict[str, Any] = json.loads(parent.tags.get("ncn.sweep.grid", "{}"))
    keys = [k for k in grid if k != "seed"] or ["ncn"]
    results, failed = [], []
    for run in tracker.sweep_jobs(parent.run_id):
        if run.status != "FINISHED" or "val/loss" not in run.metrics:
            failed.append(f"{run.name} ({run.status})")
            continue
        p = run.params
        per_step = float(p.get("tokens_per_step", "nan"))
        speed = [v for _, v in tracker.metric_history(run.run_id, "train/tokens_per_s")]
        curve = [(step * per_step, v) for step, v in tracker.metric_history(run.run_id, "val/loss")]
        results.append(
            RunResult(
                _variant(run, keys),
                int(p.get("seed", 0)),
                int(p.get("n_params", 0)),
                float(p.get("controller_share_pct", "nan")),
                run.metrics["val/loss"],
                statistics.fmean(speed) if speed else math.nan,
                curve,
                {key: run.metrics[key] for _, key, _ in EXTRA_COLUMNS if key in run.metrics},
                tracker.metric_history(run.run_id, "train/loss"),
                per_step,
                parse_metrics(run.metrics),
            )
        )
    order = _grid_order(grid, keys)
    labels = sorted({r.variant for r in results}, key=lambda v: order.index(v) if v in order else len(order))
    return results, labels, sorted(failed)


def _grid_order(grid: dict[str, Any], keys: list[str]) -> list[str]:
    lists = [grid[k] if isinstance(grid.get(k), list) else [] for k in keys]
    if len(keys) == 1:
        return list(lists[0])
    return [" ".join(f"{k}={v}" for k, v in zip(keys, combo, strict=True)) for combo in itertools.product(*lists)]


def _label_with(label: str, keys: list[str], key: str, value: str) -> str:
    """The variant label `label` with swept `key` set to `value` (the other keys unchanged)."""
    if len(keys) == 1:
        return value
    parts = dict(p.split("=", 1) for p in label.split(" "))
    parts[key] = value
    return " ".join(f"{k}={parts[k]}" for k in keys)


def check_baseline(baseline: str | None, grid: dict[str, Any], labels: list[str]) -> None:
    """Check `baseline=`: a variant label of the sweep, or `<key>=<value>` with a swept key and one of its values.

    Raises:
        NCNConfigError: anything else; the message lists the variants.
    """
    if baseline is None or baseline in labels:
        return
    keys = [k for k in grid if k != "seed"] or ["ncn"]
    key, _, value = baseline.partition("=")
    if key in keys and isinstance(grid.get(key), list) and value in [str(v) for v in grid[key]]:
        return
    hint = ""
    if len(keys) > 1 and (listed := [k for k in keys if isinstance(grid.get(k), list) and grid[k]]):
        hint = f" (or <key>=<value> of a swept key, e.g. {listed[0]}={grid[listed[0]][0]})"
    raise NCNConfigError(f"baseline={baseline} is not a variant of this sweep: choose one of {', '.join(labels)}{hint}")


def _baseline_of(
    label: str, keys: list[str], grid: dict[str, Any], labels: list[str], baseline: str | None = None
) -> str | None:
    """The variant `label` is compared with. `baseline` (checked by `check_baseline`) when given: a variant
    label is every row's baseline, `<key>=<value>` the variant with that value and the other keys equal.
    Without it: the contrast key (ncn if swept, else the first) at its first value, the other keys equal."""
    if baseline in labels:
        return baseline
    if baseline is not None:
        key, _, value = baseline.partition("=")
        return _label_with(label, keys, key, value)
    contrast = "ncn" if "ncn" in keys else keys[0]
    first = grid.get(contrast, [None])[0] if isinstance(grid.get(contrast), list) else None
    if first is None:
        return labels[0] if labels else None
    return _label_with(label, keys, contrast, str(first))


def _iso_baseline_of(label: str, keys: list[str], base: str | None) -> str | None:
    """The label of `label`'s iso-parameter twin (ncn=none_iso, other keys equal), None without a swept `ncn`."""
    if "ncn" not in keys or base is None:
        return None
    return _label_with(label, keys, "ncn", ISO_BASELINE)


def table(
    results: list[RunResult], labels: list[str], grid: dict[str, Any], baseline: str | None = None
) -> list[dict[str, Any]]:
    """One row per variant (FIELDS); Δ vs the variant's baseline (`_baseline_of`; `baseline=` picks
    it), NaN where not defined."""
    keys = [k for k in grid if k != "seed"] or ["ncn"]
    by_label = {v: {r.seed: r for r in results if r.variant == v} for v in labels}
    rows = []
    for label in labels:
        runs = by_label[label]
        losses = [r.val_loss for r in runs.values()]
        loss_mean, loss_std = mean_std(losses)
        ppl_mean, ppl_std = mean_std([math.exp(x) for x in losses])
        final = {s: r.val_loss for s, r in runs.items()}
        base = _baseline_of(label, keys, grid, labels, baseline)
        delta = (math.nan, math.nan, math.nan, "")
        if base in by_label and base != label and by_label[base]:
            delta = delta_interval(final, {s: r.val_loss for s, r in by_label[base].items()})
        iso = _iso_baseline_of(label, keys, base)
        delta_iso = (math.nan, math.nan, math.nan)
        if iso in by_label and iso != label and by_label[iso]:
            delta_iso = delta_interval(final, {s: r.val_loss for s, r in by_label[iso].items()})[:3]
        first = next(iter(runs.values()))
        rows.append(
            dict(
                zip(
                    FIELDS,
                    [
                        label,
                        ",".join(str(s) for s in sorted(runs)),
                        len(runs),
                        first.params,
                        first.controller_share_pct,
                        loss_mean,
                        loss_std,
                        *mean_interval(losses)[1:],
                        ppl_mean,
                        ppl_std,
                        *delta,
                        base if base in by_label else "",
                        *delta_iso,
                        statistics.fmean(r.tokens_per_s for r in runs.values()),
                        *_extra(list(runs.values())),
                    ],
                    strict=True,
                )
            )
        )
    return rows


def _num(x: float, fmt: str) -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else fixed(x, fmt)


ONE_SEED = "n/a (1 seed)"  # an interval or std over seeds needs n >= 2 (`mean_interval`, `delta_interval`)


def _seeds(seeds: str) -> str:
    """ "3 (0,1,2)": the number n of seeds a row's means and intervals are over, then the seeds themselves."""
    return f"{len(seeds.split(',')) if seeds else 0} ({seeds})"


def _bounds(low: float, high: float, fmt: str, n: int) -> str:
    """ "[+0.0100, +0.0174]": an interval's bounds ("n/a" for a NaN bound; "[n/a (1 seed)]" when n < 2)."""
    if n < 2 and math.isnan(low) and math.isnan(high):
        return f"[{ONE_SEED}]"
    return f"[{_num(low, fmt)}, {_num(high, fmt)}]"


def _signed_interval(mean: float, low: float, high: float, n: int = 2) -> str:
    """ "+0.0137 [+0.0100, +0.0174]": a signed value and its interval over n seeds, no negative zero ("n/a" for
    NaN bounds, "[n/a (1 seed)]" when n < 2)."""
    return f"{_num(mean, '+.4f')} {_bounds(low, high, '+.4f', n)}"


def _std(std: float, fmt: str, n: int) -> str:
    """ "0.0123": a sample std over n seeds ("n/a (1 seed)" when n < 2)."""
    return ONE_SEED if n < 2 else _num(std, fmt)


def _has(rows: list[dict[str, Any]], field: str, nonzero: bool = False) -> bool:
    values = [r[field] for r in rows if not (isinstance(r[field], float) and math.isnan(r[field]))]
    return any(v != 0 for v in values) if nonzero else bool(values)


def _interval(r: dict[str, Any], name: str) -> str:
    """ "+0.0137 [+0.0100, +0.0174]": a `ci` column's mean and 95 % interval ("n/a" where no run logged it)."""
    if math.isnan(r[f"{name}_mean"]):
        return "n/a"
    return _signed_interval(r[f"{name}_mean"], r[f"{name}_ci_low"], r[f"{name}_ci_high"], r["runs"])


def _spread(r: dict[str, Any], name: str, fmt: str) -> str:
    """ "1.2345 ± 0.0123 [1.2040, 1.2650]": a column's mean ± sample std, with its 95 % interval when
    the column has one ("n/a" where no run logged it)."""
    if math.isnan(r[f"{name}_mean"]):
        return "n/a"
    if r["runs"] < 2:  # neither a std nor an interval
        return f"{r[f'{name}_mean']:{fmt}} [{ONE_SEED}]"
    text = f"{r[f'{name}_mean']:{fmt}} ± {_num(r[f'{name}_std'], fmt)}"
    if f"{name}_ci_low" in r:
        text += f" {_bounds(r[f'{name}_ci_low'], r[f'{name}_ci_high'], fmt, r['runs'])}"
    return text


def _percent(r: dict[str, Any], name: str) -> str:
    """ "31.2 ± 0.4": a fraction column's mean ± sample std in percent ("n/a" where no run logged it)."""
    if math.isnan(r[f"{name}_mean"]):
        return "n/a"
    return f"{100 * r[f'{name}_mean']:.1f} ± {_std(100 * r[f'{name}_std'], '.1f', r['runs'])}"


def _delta(r: dict[str, Any], name: str) -> str:
    """ "-0.0123 [-0.0200, -0.0046]": a Δ column with its 95 % interval ("n/a" where undefined). `delta_interval`
    leaves both bounds NaN only when a side has one seed: "[n/a (1 seed)]"."""
    if math.isnan(r[f"{name}_val_loss"]):
        return "n/a"
    low, high = r[f"{name}_ci_low"], r[f"{name}_ci_high"]
    return _signed_interval(r[f"{name}_val_loss"], low, high, 1 if math.isnan(low) and math.isnan(high) else 2)


def markdown(rows: list[dict[str, Any]], title: str, failed: list[str]) -> str:
    """The table as Markdown (losses in nats/token, Δ < 0 = better than the baseline).

    A val bpb column appears when any run logged bits per byte; the leak audit's columns when
    any variant's mean leak is non-zero (a sweep with `global` salience pooling); the
    conditional-compute columns when any run measured skipping at τ = `REPORT_TAU` (skip_grid); the
    control gain and the mode's entropy curve when any run measured them (a sweep with a control).
    """
    bpb, leak = _has(rows, "val_bpb_mean"), _has(rows, "leak_mean", nonzero=True)
    compute = _has(rows, "ffn_skipped_mean")
    iso = _has(rows, "delta_iso_val_loss")
    gain, mode = _has(rows, "control_gain_mean"), _has(rows, f"{MODE_ENTROPY[0]}_mean")
    header = ["variant", "n (seeds)", "params", "controller %", "val loss ± std [95 % CI]", "val ppl"]
    align = ["---", "---", "---:", "---:", "---", "---"]
    if bpb:
        header, align = [*header, "val bpb ± std [95 % CI]"], [*align, "---"]
    header, align = [*header, "Δ val loss vs baseline [95 % CI]"], [*align, "---"]
    if iso:
        header, align = [*header, f"Δ val loss vs {ISO_BASELINE} [95 % CI]"], [*align, "---"]
    if leak:
        header += [
            "val loss, causal eval",
            "leak [95 % CI]",
            f"leak, positions < {EARLY_POSITIONS} [95 % CI]",
            f"leak, positions ≥ {EARLY_POSITIONS} [95 % CI]",
        ]
        align += ["---"] * 4
    if compute:
        header += [
            f"FFN FLOPs skipped at τ={REPORT_TAU:g} (%)",
            "forward FLOPs skipped (%)",
            "Δ loss gated skipping [95 % CI]",
            "Δ loss random skipping [95 % CI]",
        ]
        align += ["---"] * 4
    if gain:
        header, align = [*header, "control gain [95 % CI]"], [*align, "---"]
    if mode:
        grid = " / ".join(f"{m:+.1f}" for m in MODE_GRID)
        header, align = [*header, f"next-token entropy at m = {grid}"], [*align, "---"]
    header, align = [*header, "tokens/s"], [*align, "---:"]
    lines = [f"### {title}", "", f"| {' | '.join(header)} |", f"|{'|'.join(align)}|"]
    for r in rows:
        if r["delta_method"]:
            delta = _delta(r, "delta") + f" vs {r['baseline']}"
        else:
            delta = "baseline" if r["baseline"] == r["variant"] else "n/a"
        cells = [
            r["variant"],
            _seeds(r["seeds"]),
            f"{r['params']:,}",
            f"{r['controller_share_pct']:.2f}",
            _spread(r, "val_loss", ".4f"),
            f"{r['val_ppl_mean']:.2f} ± {_std(r['val_ppl_std'], '.2f', r['runs'])}",
        ]
        if bpb:
            cells.append(_spread(r, "val_bpb", ".4f"))
        cells.append(delta)
        if iso:
            cells.append(_delta(r, "delta_iso"))
        if leak:
            cells.append(_spread(r, "val_loss_causal", ".4f"))
            cells += [_interval(r, name) for name in ("leak", "leak_early", "leak_late")]
        if compute:
            cells += [_percent(r, "ffn_skipped"), _percent(r, "total_skipped")]
            cells += [_interval(r, name) for name in ("compute_delta", "compute_random_delta")]
        if gain:
            cells.append(_interval(r, "control_gain"))
        if mode:
            cells.append(" / ".join(_num(r[f"{name}_mean"], ".4f") for name in MODE_ENTROPY))
        cells.append(f"{r['tokens_per_s']:,.0f}")
        lines.append(f"| {' | '.join(str(c) for c in cells)} |")
    if leak:
        lines += [
            "",
            "Leak: val loss of the same weights under causal salience pooling − val loss (nats/token); > 0 means "
            "the model uses future tokens. Exactly 0 for causal and pooling-free models (docs/sweeps.md).",
        ]
    if gain:
        lines += [
            "",
            "Control gain: mean off-diagonal − mean diagonal of the control matrix (val loss of each label's tokens "
            "under every forced label, nats/token); 0 when the label is ignored (docs/control.md).",
        ]
    if failed:
        lines += ["", f"Not included (did not finish): {', '.join(failed)}"]
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], labels: list[str], title: str, path: Path) -> Path:
    """PNG of val loss vs tokens seen: per variant the mean over seeds, band = ± 1 std (>= 2 seeds)."""
    from ncn.analysis.plots import loss_curves  # matplotlib loads only for a report

    curves = {label: [dict(r.curve) for r in results if r.variant == label] for label in labels}
    loss_curves(curves, title, "val loss (nats/token)").savefig(path, dpi=120)
    return path


# The quality–compute table: one row per variant and threshold τ (docs/compute.md).
COMPUTE_FIELDS = [
    "variant",
    "tau",
    "seeds",
    "runs",
    "ffn_skipped_pct_mean",
    "ffn_skipped_pct_std",
    "total_skipped_pct_mean",
    "total_skipped_pct_std",
    "random_ffn_skipped_pct_mean",
    *(f"{side}_{part}" for side in COMPUTE_SIDES for part in INTERVAL),
]
# The fields a run must have logged at τ to count in that τ's row.
COMPUTE_NEEDED = ("ffn_skipped", "total_skipped", "delta_loss", "random_delta_loss")


def compute_table(results: list[RunResult], labels: list[str]) -> list[dict[str, Any]]:
    """The quality–compute curve of gated vs random skipping: one row (COMPUTE_FIELDS) per variant and
    threshold τ any of its runs logged, in τ order (NCN paper §6.1, §8).

    Over the runs (seeds) of the variant that logged τ: the FFN and forward FLOPs skipped in %
    (mean and sample std), the FFN share the random control skipped (mean, %), Δ val loss vs the
    same model dense of gated and of random skipping (mean with a two-sided 95 % Student-t
    interval over seeds, df = n−1; nats/token) and the paired (by seed) difference gated − random
    (`delta_interval`: the t-interval of the per-seed differences; < 0: gating beats random
    skipping at equal compute). NaN bounds with one seed. [] when no run logged `val/compute/...`.
    """
    rows = []
    for label in labels:
        curves = {r.seed: r.compute for r in results if r.variant == label}
        complete = {s: {t: f for t, f in c.items() if all(n in f for n in COMPUTE_NEEDED)} for s, c in curves.items()}
        for tau in sorted({t for c in complete.values() for t in c}):
            at = {s: c[tau] for s, c in sorted(complete.items()) if tau in c}
            gated = {s: f["delta_loss"] for s, f in at.items()}
            random = {s: f["random_delta_loss"] for s, f in at.items()}
            ffn = mean_std([100 * f["ffn_skipped"] for f in at.values()])
            total = mean_std([100 * f["total_skipped"] for f in at.values()])
            random_ffn = statistics.fmean(100 * f.get("random_ffn_skipped", f["ffn_skipped"]) for f in at.values())
            cells = [label, tau, ",".join(str(s) for s in at), len(at), *ffn, *total, random_ffn]
            cells += [*mean_interval(list(gated.values())), *mean_interval(list(random.values()))]
            cells += delta_interval(gated, random)[:3]
            rows.append(dict(zip(COMPUTE_FIELDS, cells, strict=True)))
    return rows


def compute_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The quality–compute table as Markdown (FLOPs skipped in %, Δ in nats/token with 95 % intervals)."""
    header = [
        "variant",
        "τ",
        "n (seeds)",
        "FFN FLOPs skipped (%)",
        "forward FLOPs skipped (%)",
        "Δ val loss, gated skipping [95 % CI]",
        "Δ val loss, random skipping [95 % CI]",
        "gated − random, paired by seed [95 % CI]",
    ]
    lines = [f"### Quality–compute curve: {title}", "", f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["variant"],
            f"{r['tau']:g}",
            _seeds(r["seeds"]),
            f"{r['ffn_skipped_pct_mean']:.1f} ± {_std(r['ffn_skipped_pct_std'], '.1f', r['runs'])}",
            f"{r['total_skipped_pct_mean']:.1f} ± {_std(r['total_skipped_pct_std'], '.1f', r['runs'])}",
            *(_signed_interval(*(r[f"{side}_{part}"] for part in INTERVAL), r["runs"]) for side in COMPUTE_SIDES),
        ]
        lines.append(f"| {' | '.join(str(c) for c in cells)} |")
    lines += [
        "",
        "Δ val loss: skipping every unit whose gate is below τ, minus the same model dense (nats/token), mean over "
        "seeds [two-sided 95 % Student-t interval, df = n−1]. Random: as many units of each kind per layer skipped "
        "at random (mean of skip_draws draws per seed). gated − random < 0: gating beats random skipping at equal "
        "compute (docs/compute.md). Drawn in quality_compute.png.",
    ]
    return "\n".join(lines) + "\n"


def compute_plot(rows: list[dict[str, Any]], title: str, path: Path, keys: list[str]) -> Path:
    """PNG of the quality–compute table (`ncn.analysis.plots.quality_compute_figure`): per variant gated skipping
    at its FFN share and random skipping at the random draws' FFN share, each Δ with its 95 % interval;
    the legend is titled with the swept `keys`."""
    from ncn.analysis.plots import quality_compute_figure  # matplotlib loads only for a report

    curves: dict[str, dict[str, list[tuple[float, float, float, float]]]] = {}
    for r in rows:
        sides = curves.setdefault(r["variant"], {"gated": [], "random": []})
        sides["gated"].append((r["ffn_skipped_pct_mean"], *(r[f"gated_delta_{part}"] for part in INTERVAL)))
        sides["random"].append((r["random_ffn_skipped_pct_mean"], *(r[f"random_delta_{part}"] for part in INTERVAL)))
    quality_compute_figure(curves, f"quality–compute: {title}", " × ".join(keys)).savefig(path, dpi=120)
    return path


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> Path:
    """`rows` as CSV with header `fields`; NaN as an empty cell."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows)
    return path


SE_FIELDS = [
    "variant",
    "seeds",
    *(f"fit_{p}_{part}" for p in ("E", "A", "alpha", "rmse") for part in ("mean", "ci_low", "ci_high")),
    *(
        f"{side}_{part}"
        for side in ("vs_baseline", "vs_iso")
        for part in ("name", "tokens_to_target", "ratio_mean", "ratio_ci_low", "ratio_ci_high", "reached", "method")
    ),
    *(f"sei_{p}_{part}" for p in (95, 99) for part in ("mean", "ci_low", "ci_high", "settling_step_mean")),
]


def _fit(curve: list[tuple[float, float]]) -> se.PowerLawFit | None:
    """The power-law fit of a val-loss curve, None when it has too few points (fewer than 3 past step 0)."""
    try:
        return se.fit_power_law(*zip(*curve, strict=True)) if curve else None
    except (ValueError, RuntimeError):  # RuntimeError: scipy found no least-squares optimum
        return None


def _interval_of(values: list[float]) -> list[float]:
    """[mean, low, high] of the finite `values` (NaN where there are none)."""
    finite = [v for v in values if not math.isnan(v)]
    return list(mean_interval(finite)) if finite else [math.nan] * 3


def _sei(run: RunResult, threshold: float) -> se.SEIResult | None:
    if not run.train_curve or math.isnan(run.tokens_per_step):
        return None
    steps, losses = zip(*run.train_curve, strict=True)
    return se.sei(steps, losses, run.tokens_per_step, threshold)


def _ratio_cells(label: str, base: str | None, by_label: dict[str, dict[int, RunResult]]) -> list[Any]:
    """name, mean tokens to target, ratio mean/low/high, reached ("k/n"), method: vs `base` (NaN where
    undefined; method "baseline" on the baseline's own row)."""
    if base == label:
        return [label, math.nan, math.nan, math.nan, math.nan, "", "baseline"]
    if base not in by_label or not by_label[base]:
        return ["", math.nan, math.nan, math.nan, math.nan, "", ""]
    ratio = se.efficiency_ratio(
        {s: r.curve for s, r in by_label[label].items()}, {s: r.curve for s, r in by_label[base].items()}
    )
    reached = [t for t in ratio.variant_tokens.values() if not math.isnan(t)]
    return [
        base,
        statistics.fmean(reached) if reached else math.nan,
        ratio.mean,
        ratio.low,
        ratio.high,
        f"{ratio.reached}/{len(ratio.ratios)}",
        ratio.method,
    ]


def efficiency_table(
    results: list[RunResult], labels: list[str], grid: dict[str, Any], baseline: str | None = None
) -> list[dict[str, Any]]:
    """One row per variant (SE_FIELDS): power-law fit parameters over seeds (mean, 95 % CI), the
    efficiency ratio against the baseline (`_baseline_of`, as in `table`) and the iso-parameter
    baseline, and the reference's SEI (on training loss) at 95 % and 99 % with its settling step."""
    keys = [k for k in grid if k != "seed"] or ["ncn"]
    by_label = {v: {r.seed: r for r in results if r.variant == v} for v in labels}
    rows = []
    for label in labels:
        runs = list(by_label[label].values())
        fits = [_fit(r.curve) for r in runs]
        cells: list[Any] = [label, ",".join(str(s) for s in sorted(by_label[label]))]
        for name in ("E", "A", "alpha", "rmse"):
            cells += _interval_of([getattr(f, name) if f else math.nan for f in fits])
        base = _baseline_of(label, keys, grid, labels, baseline)
        cells += _ratio_cells(label, base, by_label)
        cells += _ratio_cells(label, _iso_baseline_of(label, keys, base), by_label)
        for threshold in (0.95, 0.99):
            seis = [_sei(r, threshold) for r in runs]
            cells += _interval_of([x.sei if x and not math.isnan(x.slope) else math.nan for x in seis])
            settled = [x.settling_step for x in seis if x]
            cells.append(statistics.fmean(settled) if settled else math.nan)
        rows.append(dict(zip(SE_FIELDS, cells, strict=True)))
    return rows


def _ci(r: dict[str, Any], name: str, fmt: str) -> str:
    """ "0.1234 [0.1000, 0.1468]": mean and 95 % interval of an SE_FIELDS triple ("n/a" where undefined,
    "[n/a (1 seed)]" for a row of one seed)."""
    if math.isnan(r[f"{name}_mean"]):
        return "n/a"
    n = len(r["seeds"].split(","))
    return f"{r[f'{name}_mean']:{fmt}} {_bounds(r[f'{name}_ci_low'], r[f'{name}_ci_high'], fmt, n)}"


def _ratio(r: dict[str, Any], side: str) -> str:
    if r[f"{side}_method"] == "baseline":
        return "baseline"
    if not r[f"{side}_name"]:
        return "n/a"
    if math.isnan(r[f"{side}_ratio_mean"]):
        return f"not reached ({r[f'{side}_reached']} seeds)"
    text = f"{r[f'{side}_ratio_mean']:.3f} [{_num(r[f'{side}_ratio_ci_low'], '.3f')}, "
    return text + f"{_num(r[f'{side}_ratio_ci_high'], '.3f')}] ({r[f'{side}_reached']} reached)"


def reference_summary(log: se.ReferenceLog) -> list[se.SEIResult]:
    """The reference's SEI of `log` at 95 % and 99 %."""
    return [se.sei(log.steps, log.losses, log.tokens_per_step, p) for p in se.THRESHOLDS]


def reference_markdown(log: se.ReferenceLog, name: str) -> str:
    """The SEI of a reference log at 95 % and 99 % with its settling steps, as Markdown lines."""
    lines = [
        f"Reference log {name}: {len(log.steps)} rows, steps {log.steps[0]}–{log.steps[-1]}, "
        f"{log.tokens_per_step:,} tokens per step (training loss, the reference's own tokens)",
        "",
        "| threshold | SEI | settling step | settling tokens | converged |",
        "|---|---:|---:|---:|---|",
    ]
    for x in reference_summary(log):
        lines.append(
            f"| {x.threshold:.0%} ({se.THRESHOLDS[x.threshold]}) | {x.sei:.4f} | {x.settling_step:,} | "
            f"{x.settling_tokens:,.0f} | {'yes' if x.converged else 'no (still converging)'} |"
        )
    return "\n".join(lines) + "\n"


def efficiency_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The sample-efficiency table as Markdown (tokens in tokens of the sweep's tokenizer)."""
    iso = any(r["vs_iso_name"] for r in rows)
    base = next((r["vs_baseline_name"] for r in rows if r["vs_baseline_name"]), "baseline")
    header = [
        "variant",
        "n (seeds)",
        "E [95 % CI]",
        "A",
        "α [95 % CI]",
        "fit RMSE",
        f"tokens to {base}'s final val loss",
    ]
    header.append(f"efficiency ratio vs {base} [95 % CI]")
    if iso:
        header.append(f"efficiency ratio vs {ISO_BASELINE} [95 % CI]")
    header += ["SEI 95 % [95 % CI] (settling step)", "SEI 99 % [95 % CI] (settling step)"]
    lines = [f"### Sample efficiency: {title}", "", f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["variant"],
            _seeds(r["seeds"]),
            _ci(r, "fit_E", ".4f"),
            _num(r["fit_A_mean"], ".4g"),
            _ci(r, "fit_alpha", ".4f"),
            _num(r["fit_rmse_mean"], ".4f"),
            _num(r["vs_baseline_tokens_to_target"], ",.0f"),
            _ratio(r, "vs_baseline"),
        ]
        if iso:
            cells.append(_ratio(r, "vs_iso"))
        for p in (95, 99):
            cells.append(f"{_ci(r, f'sei_{p}', '.4f')} ({_num(r[f'sei_{p}_settling_step_mean'], ',.0f')})")
        lines.append(f"| {' | '.join(str(c) for c in cells)} |")
    lines += [
        "",
        "Fit: L(D) = E + A·D^(−α) on each seed's val loss vs tokens (step 0 left out), mean over seeds. "
        "Efficiency ratio: baseline tokens / variant tokens to the baseline's final val loss, paired by seed "
        "(> 1: the variant learns faster; a seed that never reaches the target counts as not reached). "
        "SEI: the reference's index on training loss (no baseline, no uncertainty; docs/method.md §9).",
    ]
    return "\n".join(lines) + "\n"


def efficiency_plot(
    results: list[RunResult], labels: list[str], title: str, path: Path, reference: tuple[se.ReferenceLog, str] | None
) -> Path:
    """PNG of val loss vs tokens, log–log: mean over seeds with ± 1 std band and a power-law fit per
    variant; the reference log's EWM-smoothed training loss in grey when given."""
    import pandas as pd

    from ncn.analysis.plots import sample_efficiency_figure  # matplotlib loads only for a report

    curves = {label: [r.curve for r in results if r.variant == label] for label in labels}
    fits = {}
    for label, runs in curves.items():
        if fit := _fit(se.mean_curve(runs)):
            fits[label] = fit
    drawn = None
    if reference is not None:
        log, name = reference
        smooth = pd.Series(log.losses).ewm(span=se.EWM_SPAN, adjust=False).mean().to_numpy()
        drawn = (log.tokens, smooth, f"reference {name}: training loss, EWM span {se.EWM_SPAN} (its tokens)")
    sample_efficiency_figure(curves, fits, f"sample efficiency: {title}", drawn).savefig(path, dpi=120)
    return path


def report(
    tracker: Tracker,
    parent: RunRecord,
    out_dir: Path,
    reference: tuple[se.ReferenceLog, str] | None = None,
    baseline: str | None = None,
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Write report.md, report.csv, val_loss.png and sample_efficiency.md/.csv/.png into out_dir,
    and compute.md/.csv and quality_compute.png when runs logged `val/compute/t<τ>/...` (skip_grid),
    and log them to the parent run under `report/`; returns (rows, paths). reference: a log in the
    reference's format and its name, whose SEI the sample-efficiency files state and draw.
    baseline: the variant every Δ and efficiency ratio compares with (`check_baseline`); None: the
    contrast key's first value.

    Raises:
        NCNConfigError: no finished child run, or a `baseline` that is not a variant of the sweep.
    """
    results, labels, failed = collect(tracker, parent)
    if not results:
        raise NCNConfigError(
            f"sweep run {parent.run_id} has no finished child runs with a val/loss: "
            "nothing to report (check the sweep's job logs)"
        )
    grid = json.loads(parent.tags.get("ncn.sweep.grid", "{}"))
    check_baseline(baseline, grid, labels)
    rows = table(results, labels, grid, baseline)
    title = f"sweep {parent.tags.get('ncn.sweep', parent.name)} (parent run {parent.run_id[:8]})"
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    md.write_text(markdown(rows, title, failed))
    paths = [
        md,
        _write_csv(out_dir / "report.csv", FIELDS, rows),
        plot(results, labels, title, out_dir / "val_loss.png"),
    ]
    se_rows = efficiency_table(results, labels, grid, baseline)
    se_md = out_dir / "sample_efficiency.md"
    text = efficiency_markdown(se_rows, title)
    if reference is not None:
        text += "\n" + reference_markdown(*reference)
    se_md.write_text(text)
    paths += [
        se_md,
        _write_csv(out_dir / "sample_efficiency.csv", SE_FIELDS, se_rows),
        efficiency_plot(results, labels, title, out_dir / "sample_efficiency.png", reference),
    ]
    if compute_rows := compute_table(results, labels):
        compute_md = out_dir / "compute.md"
        compute_md.write_text(compute_markdown(compute_rows, title))
        paths += [
            compute_md,
            _write_csv(out_dir / "compute.csv", COMPUTE_FIELDS, compute_rows),
            compute_plot(compute_rows, title, out_dir / "quality_compute.png", [k for k in grid if k != "seed"]),
        ]
    for path in paths:
        tracker.log_artifact(path, "report", run_id=parent.run_id)
    return rows, paths


def load_reference(path: str | Path) -> tuple[se.ReferenceLog, str]:
    """A training log in the reference's text format and its name, for `reference_log=`.

    Raises:
        NCNConfigError: no such file, or a file without `Step: N ... Loss: x` lines.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise NCNConfigError(f"reference_log={path} is not a file: pass the path of the reference's training.log")
    try:
        return se.parse_reference_log(file.read_text(encoding="utf-8", errors="replace")), file.name
    except ValueError as exc:
        raise NCNConfigError(f"reference_log={path}: {exc} (pass the reference's training.log)") from None


def _write(
    tracker: Tracker, sweep_run: str | None, out: Path | None, reference_log: str | None, baseline: str | None
) -> None:
    reference = load_reference(reference_log) if reference_log else None
    tracker.check()
    parent = tracker.find_sweep(sweep_run)
    out = out or Path(parent.tags.get("ncn.sweep.dir", ".")) / "report"
    _, paths = report(tracker, parent, out, reference, baseline)
    print("\n".join(p.read_text() for p in paths if p.suffix == ".md"))
    print(f"written: {', '.join(str(p) for p in paths)} (and to run {parent.run_id})")


def main(cfg: RunConfig, ctx: RunContext) -> None:
    """`python run.py task=report sweep_run=<id | experiment | sweep name> [reference_log=<path>]
    [baseline=<variant>]`: report into the run dir; `reference_log=<path>` alone prints that log's SEI.

    Raises:
        NCNConfigError: tracking=none, no such sweep (see `Tracker.find_sweep`), an unreadable
            reference log, or a baseline that is not a variant of the sweep.
    """
    if cfg.reference_log is not None and cfg.sweep_run is None:  # a reference log alone: nothing read from a store
        print(reference_markdown(*load_reference(cfg.reference_log)))
        return
    tracker = open_tracker(cfg.tracking, ctx.launch_dir)
    _write(tracker, cfg.sweep_run, ctx.run_dir / "report", cfg.reference_log, cfg.baseline)


def cli(argv: Sequence[str] | None = None) -> None:
    """`python -m ncn.tasks.report [SWEEP_RUN] [--uri URI] [--experiment NAME] [--out DIR] [--reference-log PATH]
    [--baseline VARIANT]`."""
    parser = argparse.ArgumentParser(prog="python -m ncn.tasks.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_run", nargs="?", help="parent run id, experiment or sweep name (default: newest sweep)")
    parser.add_argument("--uri", help="tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--experiment", default="ncn", help="experiment searched when sweep_run is not given")
    parser.add_argument("--out", type=Path, help="output folder (default: <sweep dir>/report)")
    parser.add_argument("--reference-log", help="a training log in the reference's format: its SEI (drawn beside)")
    parser.add_argument("--baseline", help="the variant every Δ compares with (default: the first of the contrast key)")
    args = parser.parse_args(argv)
    tracking = TrackingConfig(uri=args.uri, experiment=args.experiment)
    if args.reference_log is not None and args.sweep_run is None:
        print(reference_markdown(*load_reference(args.reference_log)))
        return
    _write(open_tracker(tracking, Path.cwd()), args.sweep_run, args.out, args.reference_log, args.baseline)


if __name__ == "__main__":
    warnings.showwarning = show_warning  # one `warning: <message>` line, as under run.py
    try:
        cli()
    except NCNConfigError as exc:  # a user mistake: exit status 2, as under run.py (docs/errors.md)
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exit_code(exc)) from None
