"""Using a controlled checkpoint: task=generate with control.label / control.value, task=analyze per label or
mode value side by side, and the one-line refusals that list what the checkpoint knows.

Checkpoints are written directly (a tiny byte-level model with a random control embedding, no training).
`python -m pytest -q tests/test_control_use.py`.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from ncn import ModulatedGPT
from ncn.errors import CheckpointError
from ncn.tasks import analyze, generate
from ncn.training import checkpoint as ckpt

GENRES = ["comedies", "histories", "problems", "roman", "romances", "tragedies"]


def _write(path, typed_config, overrides, vocabulary=()):
    cfg = typed_config(["model=tiny", "data.tokenizer=bytes", "tracking=none", *overrides])
    cfg = dataclasses.replace(cfg, control=dataclasses.replace(cfg.control, vocabulary=list(vocabulary)))
    torch.manual_seed(0)
    model = ModulatedGPT(cfg.model, cfg.ncn, cfg.control)
    if model.control is not None:
        with torch.no_grad():
            model.control.weight.normal_(0.0, 1.0)  # a trained-looking control: each setting changes the signals
    state = ckpt.TrainState(step=1, run_name=path.name)
    snapshot = ckpt.Snapshot(state, model.state_dict(), {"optimizer": {}, "scaler": {}}, dataclasses.asdict(cfg))
    return ckpt.save(path / "checkpoints", snapshot, keep=1)


@pytest.fixture
def genre_ckpt(tmp_path, typed_config):
    return _write(tmp_path / "genre", typed_config, ["control=genre"], GENRES)


@pytest.fixture
def mode_ckpt(tmp_path, typed_config):
    return _write(tmp_path / "mode", typed_config, ["control=mode"])


@pytest.fixture
def plain_ckpt(tmp_path, typed_config):
    return _write(tmp_path / "plain", typed_config, [])


def _generate(task_config, capsys, path, *extra):
    args = ["task=generate", f"checkpoint={path}", "prompt=ROMEO:", "max_new_tokens=12", *extra]
    generate.main(*task_config(args))
    return capsys.readouterr()


def test_generate_with_a_label_repeats_for_the_same_seed(genre_ckpt, task_config, capsys):
    first = _generate(task_config, capsys, genre_ckpt, "control.label=comedies", "seed=3")
    again = _generate(task_config, capsys, genre_ckpt, "control.label=comedies", "seed=3")
    assert first.out == again.out and first.out.startswith("ROMEO:")
    assert "generating with control.label=comedies" in first.err


def test_generate_follows_the_label(tmp_path, typed_config, task_config, capsys):
    """Greedy text from one prompt under two labels differs (route embedding with a large label embedding):
    the task hands the chosen label to every decoded token."""
    path = _write(tmp_path / "embedding", typed_config, ["control=genre_embedding"], GENRES)
    texts = {
        label: _generate(task_config, capsys, path, f"control.label={label}", "temperature=0").out
        for label in ("comedies", "tragedies")
    }
    assert texts["comedies"] != texts["tragedies"]


@pytest.mark.parametrize(
    ("fixture", "extra", "fragment"),
    [
        ("genre_ckpt", ["control.label=sonnets"], "sonnets is not a label of"),
        ("genre_ckpt", [], "give control.label=<one of comedies, histories, problems, roman, romances, tragedies>"),
        ("genre_ckpt", ["control.value=0.5"], "give control.label=<one of comedies, histories"),
        ("genre_ckpt", ["control.route=embedding"], "control.route cannot be set together with checkpoint="),
        ("mode_ckpt", ["control.label=comedies"], "knows no labels: give control.value=<m in [-1, 1]>"),
        ("plain_ckpt", ["control.label=comedies"], "was trained with control=none, so its model takes no control"),
    ],
)
def test_control_settings_a_checkpoint_does_not_know_are_refused(
    request, task_config, capsys, fixture, extra, fragment
):
    path = request.getfixturevalue(fixture)
    with pytest.raises(CheckpointError) as caught:
        _generate(task_config, capsys, path, *extra)
    assert fragment in str(caught.value)


def test_generate_mode_defaults_to_zero_and_takes_a_value(mode_ckpt, task_config, capsys):
    assert "generating with control.value=+0.00" in _generate(task_config, capsys, mode_ckpt, "seed=1").err
    assert "generating with control.value=+0.50" in _generate(task_config, capsys, mode_ckpt, "control.value=0.5").err


def _analyze(task_config, tmp_path, path, *extra):
    cfg, ctx = task_config(["task=analyze", f"checkpoint={path}", "prompt=ROMEO and JULIET", *extra])
    analyze.main(cfg, ctx)
    return pd.read_csv(ctx.run_dir / "analysis" / "signals.csv"), ctx.run_dir / "analysis" / "signals.png"


def test_analyze_draws_every_label_side_by_side(genre_ckpt, task_config, tmp_path):
    table, png = _analyze(task_config, tmp_path, genre_ckpt)
    assert png.stat().st_size > 0
    assert sorted(table["control"].unique()) == GENRES
    per_control = table.groupby("control").size()
    assert set(per_control) == {16 * 2 * 3}  # 16 byte tokens × 2 layers × 3 signals, under each label
    values = table.pivot_table(index=["signal", "layer", "position"], columns="control", values="value")
    assert not values["comedies"].equals(values["tragedies"])  # the label changes the signals


def test_analyze_one_label_or_the_mode_grid(genre_ckpt, mode_ckpt, task_config, tmp_path):
    one, _ = _analyze(task_config, tmp_path, genre_ckpt, "control.label=roman")
    assert one["control"].unique().tolist() == ["roman"]
    grid, _ = _analyze(task_config, tmp_path, mode_ckpt)
    assert sorted(grid["control"].unique()) == ["m=+0.0", "m=+1.0", "m=-1.0"]
