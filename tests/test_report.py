"""Tests of the report task on synthetic sweeps logged to a real temporary MLflow store: the table's
statistics checked by hand (mean ± sample std, paired and Welch 95 % t-intervals, perplexity,
tokens/s, bits per byte, the leak audit's 95 % intervals, the control gain and mode entropy, the
quality–compute table), grid order, baselines (also `baseline=`), excluded failed runs, the
CSV/PNG/Markdown files and artifacts, finding a sweep by id, experiment or a name with quotes and
non-ASCII, and the plots' axes.

Run: python -m pytest -q tests/test_report.py   (a few seconds)
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from PIL import Image

import ncn.tasks.report as report_module
from ncn.analysis.plots import loss_curves, quality_compute_figure, sample_efficiency_figure
from ncn.analysis.sample_efficiency import parse_reference_log
from ncn.analysis.statistics import delta_interval
from ncn.config import MODE_GRID
from ncn.errors import NCNConfigError, fixed
from ncn.tasks.report import RunResult, cli, markdown, report, table
from ncn.tracking import MLflowTracker
from ncn.training.evaluation import (
    VAL_BPB,
    VAL_CONTROL_GAIN,
    VAL_LEAK,
    VAL_LEAK_EARLY,
    VAL_LEAK_LATE,
    VAL_LOSS_CAUSAL,
    mode_key,
)

from conftest import REPO, run_cli, time_left

T_975_DF2 = 4.302652729911275  # Student t quantile, 97.5 %, 2 degrees of freedom (table value)
REPORT_FILES = [
    "report.csv",
    "report.md",
    "sample_efficiency.csv",
    "sample_efficiency.md",
    "sample_efficiency.png",
    "val_loss.png",
]

# variant -> {seed: final val loss}; gain_only misses seed 2 (-> Welch interval)
LOSSES = {"none": {0: 5.0, 1: 5.2, 2: 5.1}, "full": {0: 4.9, 1: 5.0, 2: 5.05}, "gain_only": {0: 5.3, 1: 5.5}}
PARAMS = {"none": (1000, "0.000"), "full": (1100, "9.091"), "gain_only": (1050, "4.762")}
SPEED = {"none": [100.0, 200.0, 300.0], "full": [90.0, 110.0], "gain_only": [50.0]}


def _child(
    client: MlflowClient, exp: str, parent: str, variant: str, seed: int, loss: float | None, status: str = "FINISHED"
) -> str:
    run = client.create_run(
        exp, run_name=f"tiny-{variant}-s{seed}", tags={"mlflow.parentRunId": parent, "hydra.choices.ncn": variant}
    )
    rid = run.info.run_id
    n, share = PARAMS[variant]
    params = {"seed": str(seed), "n_params": str(n), "controller_share_pct": share, "tokens_per_step": "100"}
    metrics = [Metric("train/tokens_per_s", v, 0, 10 * (i + 1)) for i, v in enumerate(SPEED[variant])]
    if loss is not None:  # val/loss falls to the final value at step 20
        metrics += [Metric("val/loss", v, 0, step) for step, v in ((0, 10.0), (10, loss + 1.0), (20, loss))]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(rid, status)
    return rid


@pytest.fixture
def sweep(tmp_path: Path, mlflow_store) -> tuple[MlflowClient, str]:
    """A finished 'ablation' parent with 8 finished children and one FAILED child; (client, parent id)."""
    client = MlflowClient(mlflow_store(tmp_path / "mlflow.db"))
    client.tracker = MLflowTracker(client.tracking_uri)  # the interface the report task uses
    exp = client.create_experiment("ncn", artifact_location=(tmp_path / "artifacts").as_uri())
    grid = {"ncn": ["none", "gain_only", "full"], "seed": ["0", "1", "2"]}
    parent = client.create_run(
        exp,
        run_name="ablation",
        tags={"ncn.sweep": "ablation", "ncn.sweep.grid": json.dumps(grid), "ncn.sweep.dir": str(tmp_path / "sweep")},
    ).info.run_id
    for variant, by_seed in LOSSES.items():
        for seed, loss in by_seed.items():
            _child(client, exp, parent, variant, seed, loss)
    _child(client, exp, parent, "gain_only", 2, None, status="FAILED")
    client.set_terminated(parent, "FAILED")
    return client, parent


def test_report_table_statistics_by_hand(sweep, tmp_path: Path) -> None:
    client, parent_id = sweep
    rows, paths = report(client.tracker, client.tracker.get_run(parent_id), tmp_path / "out")
    assert [r["variant"] for r in rows] == ["none", "gain_only", "full"]  # grid order, not alphabetical
    none, gain, full = rows
    assert (none["seeds"], none["runs"], gain["seeds"], gain["runs"]) == ("0,1,2", 3, "0,1", 2)
    assert (full["params"], full["controller_share_pct"], none["params"]) == (1100, 9.091, 1000)
    # mean ± sample std of the final val loss: 5.0, 5.2, 5.1 -> 5.1 ± 0.1
    assert none["val_loss_mean"] == pytest.approx(5.1) and none["val_loss_std"] == pytest.approx(0.1)
    assert full["val_loss_mean"] == pytest.approx(14.95 / 3)
    assert full["val_loss_std"] == pytest.approx(math.sqrt(0.0116666667 / 2))
    ppl = [math.exp(5.0), math.exp(5.2), math.exp(5.1)]
    assert none["val_ppl_mean"] == pytest.approx(sum(ppl) / 3)
    assert none["val_ppl_std"] == pytest.approx(math.sqrt(sum((p - sum(ppl) / 3) ** 2 for p in ppl) / 2))
    # paired by seed: differences -0.1, -0.2, -0.05 -> mean -0.11667, sd 0.076376, half = t(0.975, 2) * sd / sqrt(3)
    half = T_975_DF2 * math.sqrt(0.0116666667 / 2) / math.sqrt(3)
    assert full["delta_method"] == "paired" and full["baseline"] == "none"
    assert full["delta_val_loss"] == pytest.approx(-0.35 / 3)
    assert (full["delta_ci_low"], full["delta_ci_high"]) == (
        pytest.approx(-0.35 / 3 - half),
        pytest.approx(-0.35 / 3 + half),
    )
    assert half == pytest.approx(0.18973, abs=1e-5)
    # Welch (seeds differ): var 0.02/2 and 0.01/3, df = 1.6842
    from scipy.stats import t

    se2 = 0.02 / 2 + 0.01 / 3
    df = se2**2 / ((0.02 / 2) ** 2 / 1 + (0.01 / 3) ** 2 / 2)
    assert df == pytest.approx(1.68421, abs=1e-5)
    assert gain["delta_method"] == "welch" and gain["delta_val_loss"] == pytest.approx(0.3)
    assert gain["delta_ci_high"] - 0.3 == pytest.approx(t.ppf(0.975, df) * math.sqrt(se2))
    assert math.isnan(none["delta_val_loss"]) and none["delta_method"] == ""
    # tokens/s: mean over each run's logged windows, then over seeds
    assert (none["tokens_per_s"], full["tokens_per_s"], gain["tokens_per_s"]) == (200.0, 100.0, 50.0)

    md, csv_path, png, *_ = paths
    text = md.read_text()
    # val loss: mean ± std [95 % t-interval over seeds]: 4.9833 ± t(0.975, 2) * 0.0764 / sqrt(3)
    loss_half = T_975_DF2 * full["val_loss_std"] / math.sqrt(3)
    assert (full["val_loss_ci_low"], full["val_loss_ci_high"]) == (
        pytest.approx(14.95 / 3 - loss_half),
        pytest.approx(14.95 / 3 + loss_half),
    )
    assert "| full | 3 (0,1,2) | 1,100 | 9.09 | 4.9833 ± 0.0764 [4.7936, 5.1731] |" in text
    assert f"| {-0.35 / 3:+.4f} [{-0.35 / 3 - half:+.4f}, {-0.35 / 3 + half:+.4f}] vs none |" in text
    assert "| none | 3 (0,1,2) | 1,000 | 0.00 | 5.1000 ± 0.1000 [4.8516, 5.3484] |" in text and "| baseline |" in text
    assert "Not included (did not finish): tiny-gain_only-s2 (FAILED)" in text
    with csv_path.open() as f:
        table_rows = list(csv.DictReader(f))
    assert [r["variant"] for r in table_rows] == ["none", "gain_only", "full"]
    assert float(table_rows[2]["delta_ci_low"]) == pytest.approx(-0.35 / 3 - half)
    assert table_rows[0]["delta_val_loss"] == ""  # the baseline has no Δ
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    logged = sorted(a.path for a in client.list_artifacts(parent_id, "report"))
    assert logged == [f"report/{name}" for name in REPORT_FILES]


def test_delta_interval_edge_cases() -> None:
    assert delta_interval({0: 2.0}, {0: 1.5})[0] == 0.5
    assert [math.isnan(x) for x in delta_interval({0: 2.0}, {0: 1.5})[1:3]] == [True, True]
    assert delta_interval({0: 2.0}, {0: 1.5})[3] == "n/a"
    # identical paired differences: zero-width interval
    assert delta_interval({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}) == (1.0, 1.0, 1.0, "paired")


def test_every_variant_is_also_compared_with_the_iso_parameter_baseline() -> None:
    """ablation-like grid: Δ vs none (first) and vs none_iso, each paired by seed with its 95 % interval."""
    grid = {"ncn": ["none", "none_iso", "full"], "seed": [0, 1, 2]}
    losses = {"none": [2.0, 2.1, 2.05], "none_iso": [1.95, 2.0, 2.0], "full": [1.9, 2.0, 1.9]}
    results = [RunResult(v, s, 1, 0.0, loss, 1.0) for v, ls in losses.items() for s, loss in enumerate(ls)]
    rows = {r["variant"]: r for r in table(results, grid["ncn"], grid)}
    full, iso = rows["full"], rows["none_iso"]
    diffs = [-0.05, 0.0, -0.1]  # full - none_iso per seed: mean -0.05, sd 0.05
    half = T_975_DF2 * 0.05 / math.sqrt(3)
    assert full["delta_iso_val_loss"] == pytest.approx(-0.05) == pytest.approx(sum(diffs) / 3)
    assert (full["delta_iso_ci_low"], full["delta_iso_ci_high"]) == (
        pytest.approx(-0.05 - half),
        pytest.approx(-0.05 + half),
    )
    assert full["delta_val_loss"] == pytest.approx(-0.35 / 3) and full["baseline"] == "none"
    assert math.isnan(iso["delta_iso_val_loss"]) and iso["delta_val_loss"] == pytest.approx(-0.2 / 3)
    assert rows["none"]["delta_iso_val_loss"] == pytest.approx(0.2 / 3)
    text = markdown(list(rows.values()), "ablation", [])
    assert "Δ val loss vs none_iso [95 % CI]" in text
    assert f"| {-0.05:+.4f} [{-0.05 - half:+.4f}, {-0.05 + half:+.4f}] |" in text


def test_multi_key_grid_uses_matching_baseline() -> None:
    """scale-like grid (model × ncn): each size is compared with the baseline of the same size."""
    grid = {"model": ["tiny", "small"], "ncn": ["none", "full"]}
    losses = {("tiny", "none"): 7.0, ("tiny", "full"): 6.9, ("small", "none"): 6.0, ("small", "full"): 5.7}
    results = [RunResult(f"model={m} ncn={n}", 0, 1, 0.0, v, 1.0, [(0.0, v)]) for (m, n), v in losses.items()]
    labels = [f"model={m} ncn={n}" for m in grid["model"] for n in grid["ncn"]]
    rows = {r["variant"]: r for r in table(results, labels, grid)}
    assert rows["model=small ncn=full"]["baseline"] == "model=small ncn=none"
    assert rows["model=small ncn=full"]["delta_val_loss"] == pytest.approx(-0.3)
    assert rows["model=tiny ncn=full"]["delta_val_loss"] == pytest.approx(-0.1)
    # one seed per variant: the count says so, and so does every interval and std
    one_seed = "| model=tiny ncn=full | 1 (0) | 1 | 0.00 | 6.9000 [n/a (1 seed)] | 992.27 ± n/a (1 seed) | "
    assert one_seed + "-0.1000 [n/a (1 seed)] vs model=tiny ncn=none | 1 |" in markdown(
        list(rows.values()), "scale", []
    )
    # baseline=: a whole label is every row's baseline; <key>=<value> keeps the other keys matched
    fixed_base = {r["variant"]: r for r in table(results, labels, grid, baseline="model=small ncn=none")}
    assert fixed_base["model=tiny ncn=full"]["delta_val_loss"] == pytest.approx(0.9)  # 6.9 - 6.0
    assert fixed_base["model=tiny ncn=full"]["baseline"] == "model=small ncn=none"
    keyed = {r["variant"]: r for r in table(results, labels, grid, baseline="ncn=full")}
    assert keyed["model=small ncn=none"]["delta_val_loss"] == pytest.approx(0.3)  # 6.0 - 5.7, same size
    assert keyed["model=tiny ncn=none"]["delta_val_loss"] == pytest.approx(0.1)
    report_module.check_baseline("ncn=full", grid, labels)  # accepted: no exception
    with pytest.raises(NCNConfigError) as refused:
        report_module.check_baseline("ncn=fancy", grid, labels)
    assert str(refused.value) == (
        "baseline=ncn=fancy is not a variant of this sweep: choose one of model=tiny ncn=none, model=tiny ncn=full, "
        "model=small ncn=none, model=small ncn=full (or <key>=<value> of a swept key, e.g. model=tiny)"
    )


def test_find_sweep_by_id_experiment_and_errors(sweep, tmp_path: Path) -> None:
    client, parent_id = sweep
    find_sweep = client.tracker.find_sweep
    assert find_sweep(parent_id).run_id == parent_id
    exp = client.get_experiment_by_name("ncn").experiment_id
    newer = client.create_run(exp, run_name="pooling", tags={"ncn.sweep": "pooling"}).info.run_id
    assert find_sweep("ncn").run_id == newer  # newest sweep of the experiment
    assert find_sweep(None).run_id == newer  # of the tracker's experiment
    assert find_sweep("ablation").run_id == parent_id  # a sweep name: its newest launch
    odd = 'it\'s a "sweep" – naïve, ünïcode'  # both quote kinds: no MLflow filter string could hold it
    named = client.create_run(exp, run_name=odd, tags={"ncn.sweep": odd}).info.run_id
    assert find_sweep(odd).run_id == named
    with pytest.raises(NCNConfigError, match="sweep_run=nope is neither a run id, an experiment nor a sweep name"):
        find_sweep("nope")
    with pytest.raises(NCNConfigError, match=f"sweep_run={'0' * 32} is not a run"):
        find_sweep("0" * 32)
    client.create_experiment("empty", artifact_location=(tmp_path / "a2").as_uri())
    with pytest.raises(NCNConfigError, match="experiment empty has no sweep runs"):
        find_sweep("empty")


def test_loss_plot_reads_plain_values_and_names_the_sweep() -> None:
    """Losses near 10.82 must read as 10.82 on the axis, not as an offset "+1.082e1" over ticks 0.003."""
    curves = {
        "none": [{0.0: 10.8232, 100.0: 10.8261}, {0.0: 10.8240, 100.0: 10.8270}],
        "full": [{0.0: 10.8255, 100.0: 10.8290}],
    }
    fig = loss_curves(curves, "sweep ablation (parent run 0123abcd)", "val loss (nats/token)")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_title() == "sweep ablation (parent run 0123abcd)"
    assert ax.yaxis.get_offset_text().get_text() == ""
    labels = [float(t.get_text()) for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(10.8 < v < 10.84 for v in labels)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["none (n=2)", "full (n=1)"]


def test_cli_writes_into_the_sweep_dir(sweep, tmp_path: Path, capsys) -> None:
    client, parent_id = sweep
    cli([parent_id, "--uri", client.tracking_uri])
    out = tmp_path / "sweep" / "report"
    assert sorted(p.name for p in out.iterdir()) == REPORT_FILES
    printed = capsys.readouterr().out
    assert "| full | 3 (0,1,2) |" in printed and str(out / "report.md") in printed


# pooling sweep: variant -> {seed: (val loss, val bpb, leak, leak early, leak late)}; leaks 0 unless global
POOLING = {
    "causal": {0: (2.00, 2.90, 0.0, 0.0, 0.0), 1: (2.02, 2.93, 0.0, 0.0, 0.0), 2: (2.01, 2.91, 0.0, 0.0, 0.0)},
    "none": {0: (2.05, 2.96, 0.0, 0.0, 0.0), 1: (2.06, 2.98, 0.0, 0.0, 0.0), 2: (2.04, 2.95, 0.0, 0.0, 0.0)},
    "global": {
        0: (1.98, 2.86, 0.010, 0.050, 0.006),
        1: (1.99, 2.88, 0.014, 0.060, 0.008),
        2: (1.97, 2.85, 0.012, 0.040, 0.010),
    },
}


def test_pooling_report_shows_bits_per_byte_and_the_leak_with_95_percent_intervals(
    tmp_path: Path, mlflow_store
) -> None:
    client = MlflowClient(mlflow_store(tmp_path / "mlflow.db"))
    tracker = MLflowTracker(client.tracking_uri)
    exp = client.create_experiment("ncn", artifact_location=(tmp_path / "artifacts").as_uri())
    grid = {"ncn.pooling": list(POOLING), "seed": ["0", "1", "2"]}
    tags = {"ncn.sweep": "pooling", "ncn.sweep.grid": json.dumps(grid)}
    parent = client.create_run(exp, run_name="pooling", tags=tags).info.run_id
    for variant, by_seed in POOLING.items():
        for seed, (loss, bpb, leak, early, late) in by_seed.items():
            rid = client.create_run(
                exp, run_name=f"p-{variant}-s{seed}", tags={"mlflow.parentRunId": parent}
            ).info.run_id
            values = {
                "val/loss": loss,
                VAL_BPB: bpb,
                VAL_LOSS_CAUSAL: loss + leak,
                VAL_LEAK: leak,
                VAL_LEAK_EARLY: early,
                VAL_LEAK_LATE: late,
            }
            params = {"seed": str(seed), "n_params": "1000", "controller_share_pct": "8.0", "ncn.pooling": variant}
            client.log_batch(
                rid,
                metrics=[Metric(k, v, 0, 20) for k, v in values.items()],
                params=[Param(k, v) for k, v in params.items()],
            )
            client.set_terminated(rid, "FINISHED")
    rows, (md, csv_path, *_) = report(tracker, tracker.get_run(parent), tmp_path / "out")
    causal, none, glob = rows
    assert [r["variant"] for r in rows] == ["causal", "none", "global"]
    # exact zeros stay exact: mean 0 with a zero-width interval
    assert (causal["leak_mean"], causal["leak_ci_low"], causal["leak_ci_high"]) == (0.0, 0.0, 0.0)
    assert (none["leak_early_mean"], none["leak_late_ci_high"]) == (0.0, 0.0)
    # leak 0.010, 0.014, 0.012: mean 0.012, sd 0.002, half = t(0.975, 2) * 0.002 / sqrt(3)
    half = T_975_DF2 * 0.002 / math.sqrt(3)
    assert glob["leak_mean"] == pytest.approx(0.012)
    assert (glob["leak_ci_low"], glob["leak_ci_high"]) == (pytest.approx(0.012 - half), pytest.approx(0.012 + half))
    early_half = T_975_DF2 * 0.01 / math.sqrt(3)  # 0.05, 0.06, 0.04: sd 0.01
    assert (glob["leak_early_mean"], glob["leak_early_ci_high"]) == (
        pytest.approx(0.05),
        pytest.approx(0.05 + early_half),
    )
    assert glob["leak_late_mean"] == pytest.approx(0.008)
    assert glob["val_loss_causal_mean"] == pytest.approx(1.98 + 0.012)
    # bits per byte like val loss: mean ± sample std
    assert glob["val_bpb_mean"] == pytest.approx((2.86 + 2.88 + 2.85) / 3)
    assert glob["val_bpb_std"] == pytest.approx(statistics.stdev([2.86, 2.88, 2.85]))
    assert glob["delta_method"] == "paired" and glob["baseline"] == "causal"

    text = md.read_text()
    assert (
        "| val bpb ± std [95 % CI] | Δ val loss vs baseline [95 % CI] | val loss, causal eval | leak [95 % CI] | "
        in text
    )
    assert "leak, positions < 16 [95 % CI] | leak, positions ≥ 16 [95 % CI] | tokens/s |" in text
    assert "| +0.0000 [+0.0000, +0.0000] |" in text  # causal and none: no future, no leak
    assert f"| +0.0120 [{0.012 - half:+.4f}, {0.012 + half:+.4f}] |" in text
    bpb_mean, bpb_sd = (2.86 + 2.88 + 2.85) / 3, statistics.stdev([2.86, 2.88, 2.85])
    bpb_half = T_975_DF2 * bpb_sd / math.sqrt(3)
    assert f"| {bpb_mean:.4f} ± {bpb_sd:.4f} [{bpb_mean - bpb_half:.4f}, {bpb_mean + bpb_half:.4f}] |" in text
    with csv_path.open() as f:
        by_variant = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(by_variant["global"]["leak_ci_high"]) == pytest.approx(0.012 + half)
    assert float(by_variant["causal"]["leak_mean"]) == 0.0


def test_leak_columns_only_where_a_variant_leaks(sweep, tmp_path: Path) -> None:
    """The ablation sweep of the fixture logged no bpb and no leak: neither column appears, the CSV cells are empty."""
    client, parent_id = sweep
    rows, (md, csv_path, *_) = report(client.tracker, client.tracker.get_run(parent_id), tmp_path / "out")
    assert all(math.isnan(r["leak_mean"]) and math.isnan(r["val_bpb_mean"]) for r in rows)
    assert "leak" not in md.read_text() and "bpb" not in md.read_text()
    with csv_path.open() as f:
        assert {r["leak_mean"] for r in csv.DictReader(f)} == {""}
    zeros = [
        RunResult("full", s, 1, 0.0, 5.0, 1.0, [], {VAL_LEAK: 0.0, VAL_LEAK_EARLY: 0.0, VAL_BPB: 7.0}) for s in (0, 1)
    ]
    text = markdown(table(zeros, ["full"], {"ncn": ["full"]}), "ablation", [])
    assert "| val bpb ± std [95 % CI] |" in text and "leak" not in text  # every leak exactly 0: no audit columns
    assert "| 7.0000 ± 0.0000 [7.0000, 7.0000] |" in text


# sample efficiency: each variant learns like L(shift·D) with L(D) = 1.5 + 40·D^(−0.35); full needs half
# the tokens of none, none_iso 1/1.25 of them; training loss is a pure power law of slope −α_train
SHIFT = {"none": 1.0, "none_iso": 1.25, "full": 2.0}
ALPHA_TRAIN = {"none": 0.20, "none_iso": 0.22, "full": 0.30}


def _efficiency_sweep(client: MlflowClient, tmp_path: Path) -> str:
    exp = client.create_experiment("ncn", artifact_location=(tmp_path / "artifacts").as_uri())
    grid = {"ncn": list(SHIFT), "seed": ["0", "1", "2"]}
    parent = client.create_run(
        exp, run_name="ablation", tags={"ncn.sweep": "ablation", "ncn.sweep.grid": json.dumps(grid)}
    ).info.run_id
    for variant, shift in SHIFT.items():
        for seed in range(3):
            run = client.create_run(
                exp, run_name=f"{variant}-s{seed}", tags={"mlflow.parentRunId": parent, "hydra.choices.ncn": variant}
            )
            params = {"seed": str(seed), "n_params": "1000", "controller_share_pct": "0", "tokens_per_step": "500"}
            val = [Metric("val/loss", 11.0, 0, 0)]  # step 0: left out of the fit
            val += [Metric("val/loss", 1.5 + 40.0 * (shift * 500.0 * k) ** -0.35, 0, k) for k in range(1, 41)]
            train = [Metric("train/loss", 50.0 * (500.0 * k) ** -ALPHA_TRAIN[variant], 0, k) for k in range(1, 301)]
            client.log_batch(run.info.run_id, metrics=val + train, params=[Param(k, v) for k, v in params.items()])
            client.set_terminated(run.info.run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return parent


def test_sample_efficiency_table_ratios_fits_and_sei(tmp_path: Path, mlflow_store) -> None:
    tracker = MLflowTracker(mlflow_store(tmp_path / "mlflow.db"))
    parent = _efficiency_sweep(MlflowClient(tracker.uri), tmp_path)
    reference = (
        parse_reference_log("\n".join(f"Step: {20 * k} | Loss: {8.0 * k**-0.5:.4f}" for k in range(1, 200))),
        "ref.log",
    )
    _, paths = report(tracker, tracker.get_run(parent), tmp_path / "out", reference)
    se_md, se_csv, se_png = paths[3:]
    with se_csv.open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    none, iso, full = rows["none"], rows["none_iso"], rows["full"]
    # full reaches none's final val loss (at 20,000 tokens) at 10,000: ratio 2; none_iso's (at 25,000 scaled) at 12,500
    assert float(full["vs_baseline_tokens_to_target"]) == pytest.approx(10000.0, abs=1e-3)
    assert float(full["vs_baseline_ratio_mean"]) == pytest.approx(2.0, abs=1e-6)
    assert float(full["vs_iso_ratio_mean"]) == pytest.approx(1.6, abs=1e-6)
    assert float(iso["vs_baseline_ratio_mean"]) == pytest.approx(1.25, abs=1e-6)
    assert (none["vs_iso_reached"], none["vs_iso_ratio_mean"]) == ("0/3", "")  # slower: never reaches it
    assert (full["vs_baseline_reached"], full["vs_baseline_method"]) == ("3/3", "paired")
    assert (none["vs_baseline_method"], iso["vs_iso_method"], none["vs_baseline_ratio_mean"]) == ("baseline",) * 2 + (
        "",
    )
    # identical seeds: a zero-width interval
    assert float(full["vs_baseline_ratio_ci_low"]) == pytest.approx(2.0, abs=1e-6)
    # the power law is recovered from each seed's curve: E = 1.5, α = 0.35, A = 40·shift^(−0.35)
    assert float(full["fit_alpha_mean"]) == pytest.approx(0.35, abs=1e-3)
    assert float(full["fit_E_mean"]) == pytest.approx(1.5, abs=1e-3)
    assert float(full["fit_A_mean"]) == pytest.approx(40.0 * 2.0**-0.35, rel=1e-2)
    # SEI of a pure power-law training loss is its exponent, at both thresholds
    for variant, alpha in ALPHA_TRAIN.items():
        assert float(rows[variant]["sei_95_mean"]) == pytest.approx(alpha, abs=1e-3)
        assert float(rows[variant]["sei_99_mean"]) == pytest.approx(alpha, abs=1e-3)
    text = se_md.read_text()
    assert "| full | 3 (0,1,2) |" in text and "2.000 [2.000, 2.000] (3/3 reached)" in text
    assert "| baseline | not reached (0/3 seeds) |" in text  # none: its own baseline; slower than none_iso
    assert "efficiency ratio vs none_iso [95 % CI]" in text and "Reference log ref.log: 199 rows" in text
    assert se_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = sorted(a.path for a in MlflowClient(tracker.uri).list_artifacts(parent, "report"))
    assert logged == [f"report/{name}" for name in REPORT_FILES]


def test_sample_efficiency_figure_is_log_log_with_a_fit_per_variant_and_the_reference() -> None:
    curves = {"none": [[(0.0, 9.0), (100.0, 3.0), (200.0, 2.5), (400.0, 2.2)]] * 2}
    fig = sample_efficiency_figure(
        curves, {"none": lambda d: 2.0 + 10.0 * d**-0.5}, "t", ([20.0, 40.0], [5.0, 4.0], "reference")
    )
    ax = fig.axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert "tokens" in ax.get_xlabel() and "nats/token" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["none: val loss, mean of 2", "none: power-law fit", "reference"]
    assert list(ax.lines[0].get_xdata()) == [100.0, 200.0, 400.0]  # step 0 is not on a log axis


def test_report_of_a_reference_log_alone_prints_its_sei(tmp_path: Path, capsys) -> None:
    log = tmp_path / "training.log"
    log.write_text("\n".join(f"x [INFO] Step: {20 * k} | Ep: 1 | Loss: {8.0 * k**-0.5:.4f}" for k in range(1, 200)))
    cli(["--reference-log", str(log)])
    printed = capsys.readouterr().out
    assert "32,768 tokens per step" in printed  # the reference's defaults: 16 × 4 × 1 × 512
    assert "| 95% (grammar) | 0.50" in printed and "| 99% (intellectual) |" in printed
    with pytest.raises(NCNConfigError, match=r"reference_log=.*nope.log is not a file: pass the path"):
        cli(["--reference-log", str(tmp_path / "nope.log")])
    (tmp_path / "empty.log").write_text("nothing here\n")
    with pytest.raises(NCNConfigError, match="no 'Step: N ... Loss: x' line"):
        cli(["--reference-log", str(tmp_path / "empty.log")])


def test_no_negative_zero_in_reports_and_logs() -> None:
    """A value that rounds to zero prints as +0.0000 / 0.0000, never -0.0000; other values keep their sign."""
    assert fixed(-0.00001, "+.4f") == "+0.0000" and fixed(-0.0, ".4f") == "0.0000"
    assert fixed(-0.00005, "+.4f") == "-0.0001" and fixed(0.01234, "+.4f") == "+0.0123"
    assert report_module._signed_interval(-0.00001, -0.00003, 0.00002) == "+0.0000 [+0.0000, +0.0000]"
    assert report_module._signed_interval(-0.0123, float("nan"), 0.5) == "-0.0123 [n/a, +0.5000]"


# control sweep: variant -> {seed: (final val loss, control gain or None)}; mode logs its entropy curve instead
CONTROL = {
    "genre_none": {0: (2.50, 0.0), 1: (2.52, 0.0), 2: (2.49, 0.0)},
    "genre_embedding": {0: (2.45, 0.05), 1: (2.46, 0.07), 2: (2.47, 0.06)},
    "genre": {0: (2.40, 0.10), 1: (2.44, 0.13), 2: (2.41, 0.09)},
    "mode": {0: (2.48, None), 1: (2.50, None), 2: (2.47, None)},
}
MODE_ENTROPY = {0: [2.6, 2.5, 2.4, 2.3, 2.2], 1: [2.7, 2.5, 2.3, 2.2, 2.1], 2: [2.5, 2.5, 2.4, 2.4, 2.3]}


def _t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95 % Student-t interval, computed here from scipy's quantile."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _store_sweep(
    client: MlflowClient, tmp_path: Path, name: str, grid: dict, runs: dict[str, dict[int, dict[str, float]]]
) -> str:
    """A finished parent `name` with `grid` and one finished child per (variant, seed) logging those metrics."""
    exp = client.create_experiment("ncn", artifact_location=(tmp_path / "artifacts").as_uri())
    tags = {"ncn.sweep": name, "ncn.sweep.grid": json.dumps(grid), "ncn.sweep.dir": str(tmp_path / "sweep")}
    parent = client.create_run(exp, run_name=name, tags=tags).info.run_id
    key = next(k for k in grid if k != "seed")
    for variant, by_seed in runs.items():
        for seed, metrics in by_seed.items():
            rid = client.create_run(
                exp, run_name=f"{variant}-s{seed}", tags={"mlflow.parentRunId": parent, f"hydra.choices.{key}": variant}
            ).info.run_id
            params = {"seed": str(seed), "n_params": "1000", "controller_share_pct": "5.0", "tokens_per_step": "100"}
            client.log_batch(
                rid,
                metrics=[Metric(k, v, 0, 20) for k, v in metrics.items()],
                params=[Param(k, v) for k, v in params.items()],
            )
            client.set_terminated(rid, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return parent


@pytest.fixture
def control_sweep(tmp_path: Path, mlflow_store) -> tuple[MLflowTracker, str]:
    tracker = MLflowTracker(mlflow_store(tmp_path / "mlflow.db"))
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for variant, by_seed in CONTROL.items():
        for seed, (loss, gain) in by_seed.items():
            metrics = {"val/loss": loss}
            if gain is None:
                metrics |= {mode_key(m, "entropy"): h for m, h in zip(MODE_GRID, MODE_ENTROPY[seed], strict=True)}
            else:
                metrics[VAL_CONTROL_GAIN] = gain
            runs.setdefault(variant, {})[seed] = metrics
    grid = {"control": list(CONTROL), "seed": ["0", "1", "2"]}
    return tracker, _store_sweep(MlflowClient(tracker.uri), tmp_path, "control", grid, runs)


def _losses(variant: str) -> list[float]:
    return [CONTROL[variant][s][0] for s in (0, 1, 2)]


def test_control_report_shows_the_gain_and_the_mode_entropy_and_compares_with_the_chosen_baseline(
    control_sweep, tmp_path: Path
) -> None:
    tracker, parent = control_sweep
    rows, paths = report(tracker, tracker.get_run(parent), tmp_path / "default")
    by = {r["variant"]: r for r in rows}
    # default: the contrast key's first value, genre_none; genre - genre_none by seed: -0.10, -0.08, -0.08
    diffs = [a - b for a, b in zip(_losses("genre"), _losses("genre_none"), strict=True)]
    assert by["genre"]["baseline"] == "genre_none" and by["genre"]["delta_method"] == "paired"
    expected = _t_interval(diffs)
    assert (by["genre"]["delta_val_loss"], by["genre"]["delta_ci_low"], by["genre"]["delta_ci_high"]) == tuple(
        pytest.approx(x) for x in expected
    )
    # control gain: 0.10, 0.13, 0.09 -> mean with its t-interval; exact zeros stay exact; mode has none
    gain = _t_interval([0.10, 0.13, 0.09])
    genre = by["genre"]
    assert (genre["control_gain_mean"], genre["control_gain_ci_low"], genre["control_gain_ci_high"]) == tuple(
        pytest.approx(x) for x in gain
    )
    assert (by["genre_none"]["control_gain_mean"], by["genre_none"]["control_gain_ci_high"]) == (0.0, 0.0)
    assert math.isnan(by["mode"]["control_gain_mean"])
    # the mode's entropy at each m: mean over seeds (e.g. m = -1: 2.6, 2.7, 2.5 -> 2.6); label variants have none
    entropy = [statistics.fmean(MODE_ENTROPY[s][i] for s in (0, 1, 2)) for i in range(len(MODE_GRID))]
    assert [by["mode"][f"mode_entropy_m{m:+.1f}_mean"] for m in MODE_GRID] == pytest.approx(entropy)
    assert by["mode"]["mode_entropy_m-1.0_std"] == pytest.approx(0.1)
    assert math.isnan(by["genre"]["mode_entropy_m+0.0_mean"])
    text = paths[0].read_text()
    assert "| control gain [95 % CI] | next-token entropy at m = -1.0 / -0.5 / +0.0 / +0.5 / +1.0 | tokens/s |" in text
    no_curve = " / ".join(["n/a"] * len(MODE_GRID))
    assert f"| {gain[0]:+.4f} [{gain[1]:+.4f}, {gain[2]:+.4f}] | {no_curve} |" in text  # genre: gain, no mode curve
    assert f"| +0.0000 [+0.0000, +0.0000] | {no_curve} |" in text  # genre_none: the label is ignored
    assert f"| n/a | {' / '.join(f'{h:.4f}' for h in entropy)} |" in text  # mode: no gain, its curve

    # baseline=genre_embedding: the paired difference ncn-route - embedding-route (and the others against it)
    rows, paths = report(tracker, tracker.get_run(parent), tmp_path / "vs_embedding", baseline="genre_embedding")
    by = {r["variant"]: r for r in rows}
    vs_embedding = _t_interval([a - b for a, b in zip(_losses("genre"), _losses("genre_embedding"), strict=True)])
    assert by["genre"]["baseline"] == "genre_embedding" == by["genre_none"]["baseline"]
    assert (by["genre"]["delta_val_loss"], by["genre"]["delta_ci_low"], by["genre"]["delta_ci_high"]) == tuple(
        pytest.approx(x) for x in vs_embedding
    )
    assert by["genre"]["delta_val_loss"] == pytest.approx(-0.13 / 3)
    assert by["genre_none"]["delta_val_loss"] == pytest.approx(0.13 / 3)
    assert math.isnan(by["genre_embedding"]["delta_val_loss"])  # the baseline's own row
    text = paths[0].read_text()
    assert f"| {vs_embedding[0]:+.4f} [{vs_embedding[1]:+.4f}, {vs_embedding[2]:+.4f}] vs genre_embedding |" in text
    assert "| genre_embedding | 3 (0,1,2) | 1,000 | 5.00 | 2.4600 ± 0.0100 [2.4352, 2.4848] | " in text
    assert text.count("| baseline |") == 1
    with paths[4].open() as f:  # sample_efficiency.csv: its ratios use the same baseline
        assert {r["variant"]: r["vs_baseline_name"] for r in csv.DictReader(f)}["genre"] == "genre_embedding"
    # <key>=<value> picks the same variant
    keyed = {r["variant"]: r for r in table(*_results(tracker, parent), baseline="control=genre_embedding")}
    assert (
        keyed["genre"]["delta_val_loss"] == pytest.approx(-0.13 / 3) and keyed["genre"]["baseline"] == "genre_embedding"
    )
    with pytest.raises(
        NCNConfigError,
        match="^baseline=nope is not a variant of this sweep: choose one of genre_none, genre_embedding, genre, mode$",
    ):
        report(tracker, tracker.get_run(parent), tmp_path / "bad", baseline="nope")
    with pytest.raises(NCNConfigError, match="^baseline=control=tragedies is not a variant"):
        report(tracker, tracker.get_run(parent), tmp_path / "bad", baseline="control=tragedies")


def _results(tracker: MLflowTracker, parent: str) -> tuple[list[RunResult], list[str], dict]:
    run = tracker.get_run(parent)
    results, labels, _ = report_module.collect(tracker, run)
    return results, labels, json.loads(run.tags["ncn.sweep.grid"])


def test_an_unknown_baseline_is_one_error_line_with_exit_2(control_sweep, tmp_path: Path) -> None:
    tracker, parent = control_sweep
    done = run_cli(
        ["task=report", f"sweep_run={parent}", "baseline=genre_nope", f"tracking.uri={tracker.uri}"], cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: baseline=genre_nope is not a variant of this sweep: "
        "choose one of genre_none, genre_embedding, genre, mode"
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["{parent}", "--baseline", "nope"],
            "error: baseline=nope is not a variant of this sweep: "
            "choose one of genre_none, genre_embedding, genre, mode",
        ),
        (
            ["nosuchsweep"],
            "error: sweep_run=nosuchsweep is neither a run id, an experiment nor a sweep name in {uri}: "
            "pass the parent run id (printed at the sweep's start and end), an experiment or a sweep name "
            "(e.g. ablation)",
        ),
    ],
)
def test_the_report_command_ends_a_user_mistake_with_one_error_line_and_exit_2(
    control_sweep, tmp_path: Path, args: list[str], line: str
) -> None:
    tracker, parent = control_sweep
    done = subprocess.run(
        [sys.executable, "-m", "ncn.tasks.report", *(a.format(parent=parent) for a in args), "--uri", tracker.uri],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=time_left(),
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [line.format(uri=tracker.uri)]


# compute sweep: λ -> {seed: {τ: (FFN skipped, forward skipped, Δ gated, Δ random, random FFN skipped)}}
COMPUTE = {
    "0.0": {0: {0.1: (0.0, 0.0, 0.0, 0.0, 0.0), 0.5: (0.02, 0.01, 0.003, 0.004, 0.02)}},
    "0.2": {
        0: {0.1: (0.05, 0.020, 0.0010, 0.004, 0.05), 0.5: (0.30, 0.15, 0.010, 0.050, 0.30)},
        1: {0.1: (0.07, 0.030, 0.0020, 0.006, 0.07), 0.5: (0.34, 0.17, 0.030, 0.080, 0.34)},
        2: {0.1: (0.06, 0.025, 0.0015, 0.005, 0.06), 0.5: (0.32, 0.16, 0.020, 0.065, 0.33)},
    },
}
COMPUTE_KEYS = ("ffn_skipped", "total_skipped", "delta_loss", "random_delta_loss", "random_ffn_skipped")


def test_quality_compute_table_and_plot_over_every_logged_threshold(tmp_path: Path, mlflow_store) -> None:
    tracker = MLflowTracker(mlflow_store(tmp_path / "mlflow.db"))
    runs = {
        variant: {
            seed: {"val/loss": 2.0}
            | {
                f"val/compute/t{tau:g}/{key}": value
                for tau, cells in curve.items()
                for key, value in zip(COMPUTE_KEYS, cells, strict=True)
            }
            for seed, curve in by_seed.items()
        }
        for variant, by_seed in COMPUTE.items()
    }
    grid = {"ncn.compute_lambda": list(COMPUTE), "seed": ["0", "1", "2"]}
    parent = _store_sweep(MlflowClient(tracker.uri), tmp_path, "compute", grid, runs)
    rows, paths = report(tracker, tracker.get_run(parent), tmp_path / "out")
    assert [p.name for p in paths[6:]] == ["compute.md", "compute.csv", "quality_compute.png"]
    with paths[7].open() as f:
        table_rows = list(csv.DictReader(f))
    assert [(r["variant"], float(r["tau"]), r["seeds"]) for r in table_rows] == [
        ("0.0", 0.1, "0"),
        ("0.0", 0.5, "0"),
        ("0.2", 0.1, "0,1,2"),
        ("0.2", 0.5, "0,1,2"),
    ]
    top = table_rows[3]  # λ = 0.2, τ = 0.5
    assert float(top["ffn_skipped_pct_mean"]) == pytest.approx(32.0) and float(
        top["ffn_skipped_pct_std"]
    ) == pytest.approx(2.0)
    assert float(top["total_skipped_pct_mean"]) == pytest.approx(16.0)
    assert float(top["random_ffn_skipped_pct_mean"]) == pytest.approx(97.0 / 3)
    gated, random = _t_interval([0.010, 0.030, 0.020]), _t_interval([0.050, 0.080, 0.065])
    paired = _t_interval([-0.040, -0.050, -0.045])  # gated - random by seed
    for side, expected in (("gated_delta", gated), ("random_delta", random), ("gated_minus_random", paired)):
        assert [float(top[f"{side}_{p}"]) for p in ("mean", "ci_low", "ci_high")] == pytest.approx(list(expected))
    assert paired[2] < 0  # gating beats random skipping here: the whole interval is below 0
    one_seed = table_rows[1]  # λ = 0: one seed, no interval
    assert (one_seed["gated_delta_mean"], one_seed["gated_delta_ci_low"], one_seed["gated_minus_random_ci_high"]) == (
        "0.003",
        "",
        "",
    )
    text = paths[6].read_text()
    assert (
        f"| 0.2 | 0.5 | 3 (0,1,2) | 32.0 ± 2.0 | 16.0 ± 1.0 | +0.0200 [{gated[1]:+.4f}, {gated[2]:+.4f}] | "
        f"+0.0650 [{random[1]:+.4f}, {random[2]:+.4f}] | -0.0450 [{paired[1]:+.4f}, {paired[2]:+.4f}] |"
    ) in text
    assert "| 0.0 | 0.1 | 1 (0) | 0.0 ± n/a (1 seed) | 0.0 ± n/a (1 seed) | +0.0000 [n/a (1 seed)] |" in text
    # report.md keeps the τ = 0.5 columns, now from a real store
    assert f"| 32.0 ± 2.0 | 16.0 ± 1.0 | +0.0200 [{gated[1]:+.4f}, {gated[2]:+.4f}] |" in paths[0].read_text()
    with Image.open(paths[8]) as png:
        assert (png.format, png.size) == ("PNG", (960, 660))  # 8 × 5.5 in at 120 dpi
    logged = sorted(a.path for a in MlflowClient(tracker.uri).list_artifacts(parent, "report"))
    assert logged == sorted(
        f"report/{name}" for name in [*REPORT_FILES, "compute.csv", "compute.md", "quality_compute.png"]
    )


def test_quality_compute_figure_draws_each_interval_as_an_error_bar() -> None:
    curves = {
        "0.2": {
            "gated": [(32.0, 0.02, 0.01, 0.04), (6.0, 0.001, math.nan, math.nan)],
            "random": [(33.0, 0.06, 0.05, 0.08)],
        }
    }
    fig = quality_compute_figure(curves, "quality–compute: t", "ncn.compute_lambda")
    ax = fig.axes[0]
    assert ax.get_legend().get_title().get_text() == "ncn.compute_lambda"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("FFN FLOPs skipped (%)", "Δ val loss vs dense (nats/token)")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "dense (Δ = 0)",
        "0.2: gated skipping",
        "0.2: random skipping",
    ]
    gated, random = ax.containers
    assert list(gated.lines[0].get_xdata()) == [6.0, 32.0]  # drawn in x order
    bars = [seg.tolist() for seg in gated.lines[2][0].get_segments()]
    assert bars == [[[6.0, 0.001], [6.0, 0.001]], [[32.0, 0.01], [32.0, 0.04]]]  # no interval: a zero-length bar
    assert [seg.tolist() for seg in random.lines[2][0].get_segments()] == [[[33.0, 0.05], [33.0, 0.08]]]
    assert gated.lines[0].get_color() == random.lines[0].get_color()  # one colour per variant
