"""Modulation analysis (NCN paper §8): heatmaps, the long-format table, summary statistics.

Unit tests on hand-made signals, plus `python run.py task=analyze` on the session's tiny trained
checkpoint (PNG opens, CSV has n_layer × n_tokens in-range values per signal, MLflow artifacts).
Run: `python -m pytest tests/test_analysis.py`.
"""

from __future__ import annotations

import json
import math
import shutil

import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.analysis.plots import signal_heatmaps
from ncn.data.tokenizer import gpt2_encoding, token_labels
from ncn.errors import NCNConfigError
from ncn.model.signals import NEUTRAL, RANGES
from ncn.tasks.analyze import main as analysis_main
from ncn.tasks.analyze import signal_summary, signal_table, summary_table
from ncn.tracking import MLflowTracker
from ncn.training import checkpoint
from ncn.training.evaluation import run_signals

from conftest import run_cli
from tiny_checkpoint import TinyRun, tiny_run

TOKENS = ["Once", " upon", " a", " time", "\n"]


@pytest.fixture
def signals() -> dict[str, torch.Tensor]:
    """Batch of 2 (row 1 is the one analysed), T=5 tokens, L=2 layers, precision per head (H=3)."""
    gate = torch.tensor([[0.2, 0.9], [0.6, 0.45], [0.1, 0.95], [0.7, 0.96], [0.4, 0.99]])  # (T, L)
    gain = torch.tensor([[1.0, 0.5], [1.2, 0.5], [0.8, 1.5], [1.0, 1.5], [1.5, 0.0]])
    precision = torch.arange(30, dtype=torch.float32).reshape(5, 2, 3) / 10 + 0.5  # (T, L, H) in [0.5, 3.4]
    rows = {"gain": gain, "precision": precision, "ffn_gate": gate}
    # row 0 is garbage that must never leak into row 1's results
    return {k: torch.stack([torch.full_like(v, 7.0), v]) for k, v in rows.items()}


def test_summary_matches_hand_computation(signals):
    s = signal_summary(signals, index=1)
    assert s["ffn_gate/L0/frac_below_0.5"] == pytest.approx(3 / 5)  # 0.2, 0.1, 0.4
    assert s["ffn_gate/L1/frac_below_0.5"] == pytest.approx(1 / 5)  # 0.45
    assert s["gain/L0/mean"] == pytest.approx(5.5 / 5)
    # population std of (0.5, 0.5, 1.5, 1.5, 0.0): mean 0.8, squares 0.09·2 + 0.49·2 + 0.64
    assert s["gain/L1/std"] == pytest.approx(math.sqrt((0.09 * 2 + 0.49 * 2 + 0.64) / 5))
    assert s["gain/L1/min"] == pytest.approx(0.0) and s["gain/L1/max"] == pytest.approx(1.5)
    # precision[t, l, h] = (6t + 3l + h) / 10 + 0.5; min/max run over tokens and heads
    assert s["precision/L0/min"] == pytest.approx(0.5) and s["precision/L0/max"] == pytest.approx(3.1)
    assert s["precision/L1/min"] == pytest.approx(0.8) and s["precision/L1/max"] == pytest.approx(3.4)
    assert s["precision/L1/mean"] == pytest.approx(
        np.mean([(6 * t + 3 + h) / 10 + 0.5 for t in range(5) for h in range(3)])
    )
    assert "gain/L0/frac_below_0.5" not in s and "precision/L0/frac_below_0.5" not in s
    assert len(s) == 4 * 2 * 3 + 2  # 4 stats × 2 layers × 3 signals + the gate's two fractions


def test_summary_table_rows_and_columns(signals):
    summary = signal_summary(signals, index=1)
    table = summary_table(summary)
    assert list(table.columns) == ["mean", "std", "min", "max", "frac_below_0.5"]
    assert list(table.index) == [
        ("ffn_gate", 0),
        ("ffn_gate", 1),
        ("gain", 0),
        ("gain", 1),
        ("precision", 0),
        ("precision", 1),
    ]
    assert table.loc[("ffn_gate", 0), "frac_below_0.5"] == pytest.approx(0.6)
    assert table.loc[("precision", 1), "max"] == summary["precision/L1/max"]
    assert math.isnan(table.loc[("gain", 0), "frac_below_0.5"])
    many = summary_table({f"gain/L{i}/mean": float(i) for i in range(12)})
    assert [layer for _, layer in many.index] == list(range(12))  # numeric order: L10 after L9


def test_table_long_format(signals, tmp_path):
    df = signal_table(signals, TOKENS, index=1)
    counts = df.groupby("signal").size().to_dict()
    assert counts == {"gain": 5 * 2, "ffn_gate": 5 * 2, "precision": 5 * 2 * 3}
    assert list(df.columns) == ["signal", "layer", "head", "position", "token", "value"]
    gate = df[df.signal == "ffn_gate"]
    assert gate["head"].isna().all()
    row = gate[(gate.position == 3) & (gate.layer == 1)]
    assert row["value"].item() == pytest.approx(0.96) and row["token"].item() == " time"
    prec = df[(df.signal == "precision") & (df.position == 4) & (df.layer == 1) & (df["head"] == 2)]
    assert prec["value"].item() == pytest.approx((4 * 6 + 3 + 2) / 10 + 0.5)
    df.to_csv(tmp_path / "t.csv", index=False)
    back = pd.read_csv(tmp_path / "t.csv", keep_default_na=False, na_values=[""])
    assert back["value"].to_numpy() == pytest.approx(df["value"].to_numpy())
    assert back[back.signal == "gain"]["token"].tolist()[::2] == TOKENS  # "\n" survives the CSV round trip


def test_heatmap_panels_labels_and_neutral_tick(signals, tmp_path):
    fig = signal_heatmaps(signals, TOKENS, index=1, title="probe")
    panels = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in panels] == [
        "gain (neutral 1)",
        "precision (neutral 1, mean over 3 heads)",
        "ffn_gate (neutral 0.95)",
    ]
    assert len(fig.axes) == 6  # one colour bar per panel
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["Once", "·upon", "·a", "·time", "\\n"]
    # the drawn precision grid is the head mean, layers as rows
    grid = panels[1].images[0].get_array()
    assert grid.shape == (2, 5)
    assert grid[1, 4] == pytest.approx((4 * 6 + 3 + 1) / 10 + 0.5)
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in panels] == [("token", "layer")] * 3
    assert fig.get_suptitle() == "probe"
    for bar, name in zip(fig.axes[3:], ["gain", "precision", "ffn_gate"], strict=True):
        labels = [t.get_text() for t in bar.get_yticklabels()]
        assert len(labels) == 5 and labels[2] == f"neutral {NEUTRAL[name]:g}"  # centred on neutral, 5 ticks
        ticks = bar.get_yticks()
        assert ticks[2] == NEUTRAL[name] and ticks[1] == pytest.approx((ticks[0] + ticks[2]) / 2)
        assert [tuple(line.get_ydata()) for line in bar.lines] == [(NEUTRAL[name], NEUTRAL[name])]
    for ax, name in zip(panels, ["gain", "precision", "ffn_gate"], strict=True):
        norm = ax.images[0].norm
        low, high = RANGES[name]
        assert low <= norm.vmin < NEUTRAL[name] == norm.vcenter < norm.vmax <= high
    fig.savefig(tmp_path / "h.png")
    with Image.open(tmp_path / "h.png") as png:
        assert 700 <= png.size[0] <= 4000 and 300 <= png.size[1] <= 4000


def test_colour_bar_labels_near_neutral_do_not_read_as_neutral():
    """A gain of 1.0019 must not be labelled "1" next to "neutral 1" (3 significant digits did that)."""
    gain = torch.tensor([[1.0019, 0.9990], [1.0, 1.0005]]).unsqueeze(0)  # (B=1, T=2, L=2)
    fig = signal_heatmaps({"gain": gain}, ["a", "b"], scale="data")
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["0.9981", "0.9991", "neutral 1", "1.001", "1.002"]


def test_colour_scale_is_centred_and_clipped(signals):
    data = signal_heatmaps(signals, TOKENS, index=1, scale="data")
    full = signal_heatmaps(signals, TOKENS, index=1, scale="range")
    gate_data = [ax for ax in data.axes if ax.get_title(loc="left").startswith("ffn_gate")][0].images[0].norm
    gate_full = [ax for ax in full.axes if ax.get_title(loc="left").startswith("ffn_gate")][0].images[0].norm
    # data: neutral 0.95 ± largest deviation 0.85 (value 0.1), clipped to the gate's range (0, 1)
    assert (gate_data.vmin, gate_data.vcenter, gate_data.vmax) == pytest.approx((0.1, 0.95, 1.0))
    assert (gate_full.vmin, gate_full.vcenter, gate_full.vmax) == pytest.approx((0.0, 0.95, 1.0))


def test_errors_for_bad_input(signals):
    with pytest.raises(ValueError, match="plain Transformer"):
        signal_heatmaps({}, TOKENS)
    with pytest.raises(ValueError, match="4 token labels for 5 positions"):
        signal_heatmaps(signals, TOKENS[:4])
    with pytest.raises(ValueError, match="expected \\(B, T, L\\)"):
        signal_summary({"gain": torch.ones(5, 2)})


def test_token_labels_bytes_and_padding():
    encoding = gpt2_encoding()
    ids = encoding.encode(" robot🦙")  # the llama's 4 UTF-8 bytes span 3 tokens
    labels = token_labels([*ids, 50300], encoding)
    assert labels == [" robot", "\ufffd", "\ufffd", "\ufffd", "<50300>"]


def test_log_to_finished_run_keeps_status(tmp_path, mlflow_store):
    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("ncn", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id, "FINISHED")
    (tmp_path / "out").mkdir()
    files = [tmp_path / "out" / "signals.png", tmp_path / "out" / "summary.json"]
    files[0].write_bytes(b"png")
    files[1].write_text(json.dumps({"gain/L0/mean": 1.0}))
    tracker = MLflowTracker(uri)
    for file in files:
        tracker.log_artifact(file, "analysis/step_000010", run_id=run_id)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(run_id, "analysis/step_000010")}
    assert logged == {"analysis/step_000010/signals.png", "analysis/step_000010/summary.json"}
    assert mlflow.active_run() is None


@pytest.fixture(scope="module")
def run(tmp_path_factory, _mlflow_template) -> TinyRun:
    return tiny_run(tmp_path_factory, _mlflow_template)


def test_analyze_cli_writes_png_csv_summary_and_mlflow_artifacts(run, tmp_path):
    prompt = "Now is the winter of our discontent made glorious summer"
    args = [
        "task=analyze",
        f"checkpoint={run.checkpoint}",
        f"prompt={prompt}",
        f"tracking.uri={run.mlflow_uri}",
        f"hydra.run.dir={tmp_path}",
    ]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "analysis"
    for name in ("signals.png", "signals.csv", "summary.json"):
        assert f"wrote {out / name}" in done.stdout

    with Image.open(out / "signals.png") as png:
        assert png.format == "PNG" and 800 <= png.size[0] <= 4000 and 400 <= png.size[1] <= 4000
    assert matplotlib.image.imread(out / "signals.png").shape[2] == 4  # RGBA pixels

    ids = gpt2_encoding().encode(prompt)
    n_layer = 2  # model=tiny
    df = pd.read_csv(out / "signals.csv", keep_default_na=False, na_values=[""])
    assert df.groupby("signal").size().to_dict() == {s: n_layer * len(ids) for s in ("gain", "precision", "ffn_gate")}
    for name, values in df.groupby("signal")["value"]:
        low, high = RANGES[name]
        assert values.between(low, high).all(), name
    assert df[(df.signal == "gain") & (df.layer == 0)]["token"].tolist() == token_labels(ids, gpt2_encoding())

    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == len(ids) and summary["step"] == 6
    stats = summary["statistics"]
    by_layer = df.groupby(["signal", "layer"])["value"]
    for (name, layer), values in by_layer:
        assert stats[f"{name}/L{layer}/mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert stats[f"{name}/L{layer}/std"] == pytest.approx(values.std(ddof=0), abs=1e-12)
        assert stats[f"{name}/L{layer}/max"] == pytest.approx(values.max(), abs=1e-12)
    gate0 = df[(df.signal == "ffn_gate") & (df.layer == 0)]["value"]
    assert stats["ffn_gate/L0/frac_below_0.5"] == pytest.approx((gate0 < 0.5).mean())

    client = MlflowClient(tracking_uri=run.mlflow_uri)
    run_id = json.loads((run.checkpoint / "train_state.json").read_text())["mlflow_run_id"]
    where = f"analysis/{tmp_path.name}"
    logged = {a.path for a in client.list_artifacts(run_id, where)}
    assert logged == {f"{where}/{n}" for n in ("signals.png", "signals.csv", "summary.json")}
    assert client.get_run(run_id).info.status == "FINISHED"


def test_probe_heatmap_draws_the_probe_and_restores_train_mode(run):
    model = checkpoint.load_model(checkpoint.load(run.checkpoint)).train()
    probe = gpt2_encoding().encode("Friends, Romans, countrymen, lend me your ears")
    signals = run_signals(model, probe)
    assert model.training
    fig = signal_heatmaps(signals, token_labels(probe, gpt2_encoding()), scale="range", title="step 6")
    panels = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left").split(" ")[0] for ax in panels] == ["gain", "precision", "ffn_gate"]
    assert [t.get_text() for t in panels[0].get_xticklabels()][:3] == ["Friends", ",", "·Romans"]
    gate = panels[2].images[0]
    assert gate.get_array().shape == (2, len(probe))
    assert (gate.norm.vmin, gate.norm.vmax) == pytest.approx((0.0, 1.0))  # fixed scale across steps
    tiny = ModelConfig(vocab_size=50304, block_size=32, d_model=32, n_layer=2, n_head=2)
    baseline = ModulatedGPT(tiny, ModulationConfig(targets=[]))
    assert run_signals(baseline, probe) == {}


def test_analyze_crops_a_long_prompt_from_the_left(run, tmp_path, caplog, task_config):
    prompt = "".join(f" w{i}" for i in range(40))
    ids = gpt2_encoding().encode(prompt)
    assert len(ids) > 32  # block_size of model=tiny
    with caplog.at_level("WARNING", logger="ncn.tasks.analyze"):
        analysis_main(
            *task_config(["task=analyze", f"checkpoint={run.checkpoint}", f"prompt={prompt}", "tracking=none"])
        )
    assert f"prompt of {len(ids)} tokens is longer than block_size=32: analyzing its last 32 tokens" in caplog.text
    df = pd.read_csv(tmp_path / "analysis" / "signals.csv", keep_default_na=False, na_values=[""])
    gain = df[(df.signal == "gain") & (df.layer == 1)]
    assert gain["token"].tolist() == token_labels(ids[-32:], gpt2_encoding())
    assert len(df) == 3 * 2 * 32


def test_training_logs_a_probe_heatmap_at_each_eval(run, tmp_path):
    client = MlflowClient(tracking_uri=run.mlflow_uri)
    run_id = json.loads((run.checkpoint / "train_state.json").read_text())["mlflow_run_id"]
    logged = [a.path for a in client.list_artifacts(run_id, "probe")]
    assert logged == [f"probe/signals_step_{step:06d}.png" for step in (0, 3, 6)]  # trainer=smoke evaluates at 0, 3, 6
    png = client.download_artifacts(run_id, logged[-1], str(tmp_path))
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 400


def test_analyze_refuses_a_plain_transformer_checkpoint(run, tmp_path, task_config):
    baseline = tmp_path / "baseline" / "step_000006"
    shutil.copytree(run.checkpoint, baseline)
    cfg = yaml.safe_load((baseline / "config.yaml").read_text())
    cfg["ncn"]["targets"] = []
    (baseline / "config.yaml").write_text(yaml.safe_dump(cfg))
    model = ModulatedGPT(ModelConfig(**cfg["model"]), ModulationConfig(**cfg["ncn"]))
    torch.save(model.state_dict(), baseline / "model.pt")
    with pytest.raises(NCNConfigError, match=f"^{baseline} is a plain Transformer \\(ncn.targets=\\[\\]\\)"):
        analysis_main(*task_config(["task=analyze", f"checkpoint={baseline}", "prompt=Hello", "tracking=none"]))


def test_analyze_without_a_prompt_analyzes_the_training_probe(run, tmp_path, capsys, task_config):
    """The default prompt is the probe training logged (the first trainer.probe_tokens val tokens), never a lone EOS."""
    analysis_main(*task_config(["task=analyze", f"checkpoint={run.checkpoint}", "tracking=none"]))
    err = capsys.readouterr().err
    assert "no prompt given: analyzing the training probe, the first 32 validation tokens" in err
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert (summary["tokens"], summary["run_name"], summary["step"]) == (32, "tiny-full-s0", 6)
    df = pd.read_csv(tmp_path / "analysis" / "signals.csv", keep_default_na=False, na_values=[""])
    from ncn.config import DataConfig
    from ncn.data.loader import DataModule

    probe = DataModule(DataConfig()).probe_tokens(32)
    assert df[(df.signal == "gain") & (df.layer == 0)]["token"].tolist() == token_labels(probe, gpt2_encoding())
