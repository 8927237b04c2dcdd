"""Ablation report of a sweep: a Markdown + CSV table per variant and a val-loss-vs-tokens plot.

Run: `python run.py task=report sweep_run=<parent run id | experiment | sweep name>` (into the
Hydra run dir) or `python -m ncn.report [<same>] [--uri URI] [--out DIR]` (into <sweep dir>/report).
An experiment (or nothing: `tracking.experiment`) means its newest sweep, a sweep name its newest
launch. The files are also logged to the parent run under `report/`; statistics: docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ncn.errors import NCNConfigError

FIELDS = ["variant", "seeds", "runs", "params", "controller_share_pct", "val_loss_mean", "val_loss_std",
          "val_ppl_mean", "val_ppl_std", "delta_val_loss", "delta_ci_low", "delta_ci_high", "delta_method",
          "baseline", "tokens_per_s"]


@dataclass
class RunResult:
    """One finished child run: its variant label, seed and final numbers (losses in nats/token)."""

    variant: str
    seed: int
    params: int
    controller_share_pct: float
    val_loss: float
    tokens_per_s: float
    curve: list[tuple[float, float]] = field(default_factory=list)  # (tokens seen, val loss)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than 2 values)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def delta_interval(variant: dict[int, float], baseline: dict[int, float]) -> tuple[float, float, float, str]:
    """Δ = mean(variant) − mean(baseline) with a two-sided 95 % Student-t interval.

    variant, baseline: final val loss by seed. When both ran the same >= 2 seeds (same data
    order and init seed), the interval is the paired one on per-seed differences (df = n−1);
    otherwise Welch's (Welch–Satterthwaite df); NaN bounds when a side has one run.
    Returns (Δ, low, high, "paired" | "welch" | "n/a").
    """
    from scipy.stats import t  # scipy comes with mlflow

    delta = statistics.fmean(variant.values()) - statistics.fmean(baseline.values())
    if set(variant) == set(baseline) and len(variant) > 1:
        diffs = [variant[s] - baseline[s] for s in sorted(variant)]
        half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        return delta, delta - half, delta + half, "paired"
    if len(variant) > 1 and len(baseline) > 1:
        a, b = statistics.variance(variant.values()) / len(variant), statistics.variance(baseline.values()) / len(baseline)
        if a + b == 0:
            return delta, delta, delta, "welch"
        df = (a + b) ** 2 / (a**2 / (len(variant) - 1) + b**2 / (len(baseline) - 1))
        half = t.ppf(0.975, df) * math.sqrt(a + b)
        return delta, delta - half, delta + half, "welch"
    return delta, math.nan, math.nan, "n/a"


def find_sweep(client: Any, sweep_run: str | None, experiment: str) -> Any:
    """The parent run: `sweep_run` as a run id, else the newest sweep of experiment `sweep_run`
    (or of `experiment` when sweep_run is None), else the newest launch of the sweep named so.

    Raises:
        NCNConfigError: no such run or experiment, or an experiment without sweeps.
    """
    from mlflow.exceptions import MlflowException

    if sweep_run and re.fullmatch(r"[0-9a-f]{32}", sweep_run):
        try:
            return client.get_run(sweep_run)
        except MlflowException:
            raise NCNConfigError(f"sweep_run={sweep_run} is not a run in {client.tracking_uri}: "
                                 "pass the parent run id printed by the sweep, or an experiment name") from None
    name = sweep_run or experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:  # a sweep name: its newest launch in any experiment
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, f"tags.`ncn.sweep` = '{name}'", order_by=["attributes.start_time DESC"],
                                  max_results=1) if ids else []
        if runs:
            return runs[0]
        raise NCNConfigError(f"sweep_run={name} is neither a run id, an experiment nor a sweep name in "
                             f"{client.tracking_uri}: pass the parent run id (the sweep's first log line), an "
                             "experiment or a sweep name (e.g. ablation)")
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000):
        if "ncn.sweep" in run.data.tags:
            return run
    raise NCNConfigError(f"experiment {name} has no sweep runs: launch one with python run.py -cd sweeps -cn ablation")


def _variant(run: Any, keys: list[str]) -> str:
    values = []
    for key in keys:
        value = run.data.tags.get(f"hydra.choices.{key}", run.data.params.get(key, "?"))
        values.append(value if len(keys) == 1 else f"{key}={value}")
    return " ".join(values)


def collect(client: Any, parent: Any) -> tuple[list[RunResult], list[str], list[str]]:
    """(finished child results, variant labels in grid order, names of children that did not finish)."""
    grid: dict[str, Any] = json.loads(parent.data.tags.get("ncn.sweep.grid", "{}"))
    keys = [k for k in grid if k != "seed"] or ["ncn"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=50000)
    results, failed = [], []
    for run in children:
        if run.info.status != "FINISHED" or "val/loss" not in run.data.metrics:
            failed.append(f"{run.info.run_name} ({run.info.status})")
            continue
        p = run.data.params
        per_step = float(p.get("tokens_per_step", "nan"))
        speed = [m.value for m in client.get_metric_history(run.info.run_id, "train/tokens_per_s")]
        curve = sorted((m.step * per_step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss"))
        results.append(RunResult(_variant(run, keys), int(p.get("seed", 0)), int(p.get("n_params", 0)),
                                 float(p.get("controller_share_pct", "nan")), run.data.metrics["val/loss"],
                                 statistics.fmean(speed) if speed else math.nan, curve))
    order = _grid_order(grid, keys)
    labels = sorted({r.variant for r in results}, key=lambda v: order.index(v) if v in order else len(order))
    return results, labels, sorted(failed)


def _grid_order(grid: dict[str, Any], keys: list[str]) -> list[str]:
    import itertools

    lists = [grid[k] if isinstance(grid.get(k), list) else [] for k in keys]
    if len(keys) == 1:
        return list(lists[0])
    return [" ".join(f"{k}={v}" for k, v in zip(keys, combo)) for combo in itertools.product(*lists)]


def _baseline_of(label: str, keys: list[str], grid: dict[str, Any], labels: list[str]) -> str | None:
    """Same values on the other keys, the contrast key (ncn if swept, else the first) at its first value."""
    contrast = "ncn" if "ncn" in keys else keys[0]
    first = grid.get(contrast, [None])[0] if isinstance(grid.get(contrast), list) else None
    if first is None:
        return labels[0] if labels else None
    if len(keys) == 1:
        return str(first)
    parts = dict(p.split("=", 1) for p in label.split(" "))
    parts[contrast] = str(first)
    return " ".join(f"{k}={parts[k]}" for k in keys)


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
        base = _baseline_of(label, keys, grid, labels)
        delta = (math.nan, math.nan, math.nan, "")
        if base in by_label and base != label and by_label[base]:
            delta = delta_interval({s: r.val_loss for s, r in runs.items()},
                                   {s: r.val_loss for s, r in by_label[base].items()})
        first = next(iter(runs.values()))
        rows.append(dict(zip(FIELDS, [
            label, ",".join(str(s) for s in sorted(runs)), len(runs), first.params, first.controller_share_pct,
            loss_mean, loss_std, ppl_mean, ppl_std, *delta, base if base in by_label else "",
            statistics.fmean(r.tokens_per_s for r in runs.values())])))
    return rows


def _num(x: float, fmt: str) -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else format(x, fmt)


def markdown(rows: list[dict[str, Any]], title: str, failed: list[str]) -> str:
    """The table as Markdown (losses in nats/token, Δ < 0 = better than the baseline)."""
    lines = [f"### {title}", "",
             "| variant | seeds | params | controller % | val loss | val ppl | Δ val loss vs baseline [95 % CI] | tokens/s |",
             "|---|---|---:|---:|---|---|---|---:|"]
    for r in rows:
        if r["delta_method"]:
            delta = (f"{r['delta_val_loss']:+.4f} [{_num(r['delta_ci_low'], '+.4f')}, {_num(r['delta_ci_high'], '+.4f')}]"
                     f" vs {r['baseline']}")
        else:
            delta = "baseline" if r["baseline"] == r["variant"] else "n/a"
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['params']:,} | {r['controller_share_pct']:.2f} | "
                     f"{r['val_loss_mean']:.4f} ± {_num(r['val_loss_std'], '.4f')} | "
                     f"{r['val_ppl_mean']:.2f} ± {_num(r['val_ppl_std'], '.2f')} | {delta} | {r['tokens_per_s']:,.0f} |")
    if failed:
        lines += ["", f"Not included (did not finish): {', '.join(failed)}"]
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], labels: list[str], title: str, path: Path) -> Path:
    """PNG of val loss vs tokens seen: per variant the mean over seeds, band = ± 1 std (>= 2 seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label in labels:
        curves = [dict(r.curve) for r in results if r.variant == label]
        xs = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [mean_std([c[x] for c in curves]) for x in xs]
        mean = [m for m, _ in stats]
        line, = ax.plot(xs, mean, label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="tokens seen", ylabel="val loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(client: Any, parent: Any, out_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Write report.md, report.csv, val_loss.png into out_dir and log them to the parent run
    under `report/`; returns (rows, paths)."""
    results, labels, failed = collect(client, parent)
    if not results:
        raise NCNConfigError(f"sweep run {parent.info.run_id} has no finished child runs with a val/loss: "
                             "nothing to report (check the sweep's job logs)")
    grid = json.loads(parent.data.tags.get("ncn.sweep.grid", "{}"))
    rows = table(results, labels, grid)
    title = f"{parent.data.tags.get('ncn.sweep', parent.info.run_name)} ({parent.info.run_id[:8]})"
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    md.write_text(markdown(rows, title, failed))
    with (out_dir / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows)
    paths = [md, out_dir / "report.csv", plot(results, labels, title, out_dir / "val_loss.png")]
    for path in paths:
        client.log_artifact(parent.info.run_id, str(path), "report")
    return rows, paths


def main(cfg: DictConfig) -> None:
    """`python run.py task=report sweep_run=<id | experiment>`: report into the Hydra run dir.

    Raises:
        NCNConfigError: tracking=none, or see `find_sweep`.
    """
    from mlflow import MlflowClient

    from ncn.runtime import run_context

    if "uri" not in cfg.tracking:
        raise NCNConfigError("task=report reads runs from MLflow but tracking=none: use tracking=mlflow "
                             "(and tracking.uri=<the sweep's store>)")
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    parent = find_sweep(client, cfg.sweep_run, cfg.tracking.experiment)
    _, paths = report(client, parent, run_context()[0] / "report")
    print(paths[0].read_text() + f"\nwritten: {', '.join(str(p) for p in paths)} (and to run {parent.info.run_id})")


def cli(argv: Sequence[str] | None = None) -> None:
    """`python -m ncn.report [SWEEP_RUN] [--uri URI] [--experiment NAME] [--out DIR]`."""
    from mlflow import MlflowClient

    parser = argparse.ArgumentParser(prog="python -m ncn.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_run", nargs="?", help="parent run id, experiment or sweep name (default: newest sweep)")
    parser.add_argument("--uri", default=f"sqlite:///{Path('mlflow.db').absolute()}", help="tracking URI")
    parser.add_argument("--experiment", default="ncn", help="experiment searched when sweep_run is not given")
    parser.add_argument("--out", type=Path, help="output folder (default: <sweep dir>/report)")
    args = parser.parse_args(argv)
    client = MlflowClient(tracking_uri=args.uri)
    parent = find_sweep(client, args.sweep_run, args.experiment)
    out = args.out or Path(parent.data.tags.get("ncn.sweep.dir", ".")) / "report"
    _, paths = report(client, parent, out)
    print(paths[0].read_text() + f"\nwritten: {', '.join(str(p) for p in paths)} (and to run {parent.info.run_id})")


if __name__ == "__main__":
    try:
        cli()
    except NCNConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
