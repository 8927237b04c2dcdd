"""Ablation report of a sweep: a Markdown + CSV table per variant and a val-loss-vs-tokens plot.

Run: `python run.py task=report sweep_run=<parent run id | experiment | sweep name>` (into the
run dir) or `python -m ncn.tasks.report [<same>] [--uri URI] [--out DIR]` (into <sweep dir>/report).
An experiment (or nothing: `tracking.experiment`) means its newest sweep, a sweep name its newest
launch. The files are also logged to the parent run under `report/`; statistics: docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ncn.analysis.statistics import delta_interval, mean_interval, mean_std
from ncn.config import RunConfig, RunContext, TrackingConfig
from ncn.errors import NCNConfigError
from ncn.tracking import RunRecord, Tracker, open_tracker
from ncn.training.evaluation import EARLY_POSITIONS, VAL_BPB, VAL_LEAK, VAL_LEAK_EARLY, VAL_LEAK_LATE, VAL_LOSS_CAUSAL

# Final metrics averaged per variant besides val/loss: column prefix, metric key, statistic
# ("std": mean ± sample std; "ci": mean with a 95 % t-interval like Δ; "std+ci": both).
EXTRA_COLUMNS = (
    ("val_bpb", VAL_BPB, "std+ci"),
    ("val_loss_causal", VAL_LOSS_CAUSAL, "std"),
    ("leak", VAL_LEAK, "ci"),
    ("leak_early", VAL_LEAK_EARLY, "ci"),
    ("leak_late", VAL_LEAK_LATE, "ci"),
)

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
    """

    variant: str
    seed: int
    params: int
    controller_share_pct: float
    val_loss: float
    tokens_per_s: float
    curve: list[tuple[float, float]] = field(default_factory=list)  # (tokens seen, val loss)
    finals: dict[str, float] = field(default_factory=dict)


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


def _baseline_of(label: str, keys: list[str], grid: dict[str, Any], labels: list[str]) -> str | None:
    """Same values on the other keys, the contrast key (ncn if swept, else the first) at its first value."""
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


def table(results: list[RunResult], labels: list[str], grid: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant (FIELDS); Δ vs the variant's baseline, NaN where not defined."""
    keys = [k for k in grid if k != "seed"] or ["ncn"]
    by_label = {v: {r.seed: r for r in results if r.variant == v} for v in labels}
    rows = []
    for label in labels:
        runs = by_label[label]
        losses = [r.val_loss for r in runs.values()]
        loss_mean, loss_std = mean_std(losses)
        ppl_mean, ppl_std = mean_std([math.exp(x) for x in losses])
        final = {s: r.val_loss for s, r in runs.items()}
        base = _baseline_of(label, keys, grid, labels)
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
    return "n/a" if isinstance(x, float) and math.isnan(x) else format(x, fmt)


def _has(rows: list[dict[str, Any]], field: str, nonzero: bool = False) -> bool:
    values = [r[field] for r in rows if not (isinstance(r[field], float) and math.isnan(r[field]))]
    return any(v != 0 for v in values) if nonzero else bool(values)


def _interval(r: dict[str, Any], name: str) -> str:
    """ "+0.0137 [+0.0100, +0.0174]": a `ci` column's mean and 95 % interval ("n/a" where no run logged it)."""
    if math.isnan(r[f"{name}_mean"]):
        return "n/a"
    return f"{r[f'{name}_mean']:+.4f} [{_num(r[f'{name}_ci_low'], '+.4f')}, {_num(r[f'{name}_ci_high'], '+.4f')}]"


def _spread(r: dict[str, Any], name: str, fmt: str) -> str:
    """ "1.2345 ± 0.0123 [1.2040, 1.2650]": a column's mean ± sample std, with its 95 % interval when
    the column has one ("n/a" where no run logged it)."""
    if math.isnan(r[f"{name}_mean"]):
        return "n/a"
    text = f"{r[f'{name}_mean']:{fmt}} ± {_num(r[f'{name}_std'], fmt)}"
    if f"{name}_ci_low" in r:
        text += f" [{_num(r[f'{name}_ci_low'], fmt)}, {_num(r[f'{name}_ci_high'], fmt)}]"
    return text


def _delta(r: dict[str, Any], name: str) -> str:
    """ "-0.0123 [-0.0200, -0.0046]": a Δ column with its 95 % interval ("n/a" where undefined)."""
    if math.isnan(r[f"{name}_val_loss"]):
        return "n/a"
    return f"{r[f'{name}_val_loss']:+.4f} [{_num(r[f'{name}_ci_low'], '+.4f')}, {_num(r[f'{name}_ci_high'], '+.4f')}]"


def markdown(rows: list[dict[str, Any]], title: str, failed: list[str]) -> str:
    """The table as Markdown (losses in nats/token, Δ < 0 = better than the baseline).

    A val bpb column appears when any run logged bits per byte; the leak audit's columns when
    any variant's mean leak is non-zero (a sweep with `global` salience pooling).
    """
    bpb, leak = _has(rows, "val_bpb_mean"), _has(rows, "leak_mean", nonzero=True)
    iso = _has(rows, "delta_iso_val_loss")
    header = ["variant", "seeds", "params", "controller %", "val loss ± std [95 % CI]", "val ppl"]
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
    header, align = [*header, "tokens/s"], [*align, "---:"]
    lines = [f"### {title}", "", f"| {' | '.join(header)} |", f"|{'|'.join(align)}|"]
    for r in rows:
        if r["delta_method"]:
            delta = (
                f"{r['delta_val_loss']:+.4f} [{_num(r['delta_ci_low'], '+.4f')}, {_num(r['delta_ci_high'], '+.4f')}]"
                f" vs {r['baseline']}"
            )
        else:
            delta = "baseline" if r["baseline"] == r["variant"] else "n/a"
        cells = [
            r["variant"],
            r["seeds"],
            f"{r['params']:,}",
            f"{r['controller_share_pct']:.2f}",
            _spread(r, "val_loss", ".4f"),
            f"{r['val_ppl_mean']:.2f} ± {_num(r['val_ppl_std'], '.2f')}",
        ]
        if bpb:
            cells.append(_spread(r, "val_bpb", ".4f"))
        cells.append(delta)
        if iso:
            cells.append(_delta(r, "delta_iso"))
        if leak:
            cells.append(_spread(r, "val_loss_causal", ".4f"))
            cells += [_interval(r, name) for name in ("leak", "leak_early", "leak_late")]
        cells.append(f"{r['tokens_per_s']:,.0f}")
        lines.append(f"| {' | '.join(str(c) for c in cells)} |")
    if leak:
        lines += [
            "",
            "Leak: val loss of the same weights under causal salience pooling − val loss (nats/token); > 0 means "
            "the model uses future tokens. Exactly 0 for causal and pooling-free models (docs/sweeps.md).",
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


def report(tracker: Tracker, parent: RunRecord, out_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Write report.md, report.csv, val_loss.png into out_dir and log them to the parent run
    under `report/`; returns (rows, paths)."""
    results, labels, failed = collect(tracker, parent)
    if not results:
        raise NCNConfigError(
            f"sweep run {parent.run_id} has no finished child runs with a val/loss: "
            "nothing to report (check the sweep's job logs)"
        )
    grid = json.loads(parent.tags.get("ncn.sweep.grid", "{}"))
    rows = table(results, labels, grid)
    title = f"sweep {parent.tags.get('ncn.sweep', parent.name)} (parent run {parent.run_id[:8]})"
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    md.write_text(markdown(rows, title, failed))
    with (out_dir / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows)
    paths = [md, out_dir / "report.csv", plot(results, labels, title, out_dir / "val_loss.png")]
    for path in paths:
        tracker.log_artifact(path, "report", run_id=parent.run_id)
    return rows, paths


def _write(tracker: Tracker, sweep_run: str | None, out: Path | None) -> None:
    tracker.check()
    parent = tracker.find_sweep(sweep_run)
    out = out or Path(parent.tags.get("ncn.sweep.dir", ".")) / "report"
    _, paths = report(tracker, parent, out)
    print(paths[0].read_text() + f"\nwritten: {', '.join(str(p) for p in paths)} (and to run {parent.run_id})")


def main(cfg: RunConfig, ctx: RunContext) -> None:
    """`python run.py task=report sweep_run=<id | experiment | sweep name>`: report into the run dir.

    Raises:
        NCNConfigError: tracking=none, or no such sweep (see `Tracker.find_sweep`).
    """
    _write(open_tracker(cfg.tracking, ctx.launch_dir), cfg.sweep_run, ctx.run_dir / "report")


def cli(argv: Sequence[str] | None = None) -> None:
    """`python -m ncn.tasks.report [SWEEP_RUN] [--uri URI] [--experiment NAME] [--out DIR]`."""
    parser = argparse.ArgumentParser(prog="python -m ncn.tasks.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_run", nargs="?", help="parent run id, experiment or sweep name (default: newest sweep)")
    parser.add_argument("--uri", help="tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--experiment", default="ncn", help="experiment searched when sweep_run is not given")
    parser.add_argument("--out", type=Path, help="output folder (default: <sweep dir>/report)")
    args = parser.parse_args(argv)
    tracking = TrackingConfig(uri=args.uri, experiment=args.experiment)
    _write(open_tracker(tracking, Path.cwd()), args.sweep_run, args.out)


if __name__ == "__main__":
    try:
        cli()
    except NCNConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
