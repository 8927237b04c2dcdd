"""lm-evaluation-harness model type `ncn` (`ncn/integrations/harness.py`), offline.

A tiny byte-level checkpoint is written in the test; lm-eval scores it on the local multiple-choice
task tests/lm_eval_task/ (8 questions, 3 choices). The accuracy lm-eval reports must equal the one
computed here by hand from the model's own forward pass; rolling log-likelihood and greedy
generation are compared with direct computations too.
Run: python -m pytest -q tests/test_harness.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ncn import ModelConfig, ModulatedGPT
from ncn.config import DataConfig, RunConfig, TrackingConfig
from ncn.data.tokenizer import get_encoding, stream_text
from ncn.training import checkpoint
from ncn.training.checkpoint import Snapshot, TrainState

from conftest import REPO, time_left

lm_eval = pytest.importorskip("lm_eval")

TASK_DIR = REPO / "tests" / "lm_eval_task"


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> tuple[Path, ModulatedGPT]:
    """A random byte-level model saved as an ncn checkpoint: (folder, the model in eval mode).

    Its block (64) is longer than every question + choice, so nothing is cropped."""
    cfg = RunConfig(
        model=ModelConfig(vocab_size=320, block_size=64, d_model=32, n_layer=2, n_head=2),
        data=DataConfig(tokenizer="bytes"),
        tracking=TrackingConfig(backend="none"),
    )
    torch.manual_seed(0)
    model = ModulatedGPT(cfg.model, cfg.ncn).eval()
    snapshot = Snapshot(TrainState(step=1, run_name="tiny"), model.state_dict(), {"optimizer": {}}, asdict(cfg))
    return checkpoint.save(tmp_path / "checkpoints", snapshot, keep=1), model


@torch.no_grad()
def by_hand(model: ModulatedGPT, context: str, continuation: str) -> float:
    """Σ log p(continuation bytes | context bytes) from one forward pass."""
    enc = get_encoding("bytes")
    ctx, cont = enc.encode_ordinary(context), enc.encode_ordinary(continuation)
    logits = model(torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1 :]
    return F.log_softmax(logits, -1).gather(1, torch.tensor(cont).unsqueeze(1)).sum().item()


def test_local_task_accuracy_equals_the_hand_computed_one(tiny_checkpoint, monkeypatch) -> None:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    import ncn.integrations.harness  # noqa: F401  registers the model type "ncn"

    folder, model = tiny_checkpoint
    docs = [json.loads(line) for line in (TASK_DIR / "ncn_tiny_choice.jsonl").read_text().splitlines()]
    correct = [
        max(range(len(d["choices"])), key=lambda i: by_hand(model, d["question"], " " + d["choices"][i])) == d["answer"]
        for d in docs
    ]
    expected = sum(correct) / len(docs)
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository
    out = simple_evaluate(
        model="ncn",
        model_args=f"checkpoint={folder}",
        tasks=["ncn_tiny_choice"],
        task_manager=TaskManager(include_path=str(TASK_DIR)),
    )
    assert out["results"]["ncn_tiny_choice"]["acc,none"] == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 1 and len(docs) == 8  # the test distinguishes right from wrong answers


def test_rolling_loglikelihood_and_generation(tiny_checkpoint) -> None:
    from lm_eval.api.instance import Instance

    from ncn.integrations.harness import NCNLM

    folder, model = tiny_checkpoint
    lm = NCNLM(checkpoint=str(folder))
    text = "Exit, pursued by a bear."  # 24 bytes: one window of block_size 64
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    eot = get_encoding("bytes").eot_token
    with torch.no_grad():
        ids = get_encoding("bytes").encode_ordinary(text)
        logits = model(torch.tensor([[eot, *ids[:-1]]])).logits[0]
        direct = F.log_softmax(logits, -1).gather(1, torch.tensor(ids).unsqueeze(1)).sum().item()
    assert rolling == pytest.approx(direct, abs=1e-4)
    prompt = "To be"
    generated = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 8}), 0)])
    greedy = model.generate(torch.tensor([get_encoding("bytes").encode_ordinary(prompt)]), 8, temperature=0)[0, 5:]
    tokens = greedy.tolist()
    tokens = tokens[: tokens.index(eot)] if eot in tokens else tokens
    expected = "".join(stream_text(tokens, get_encoding("bytes"))).split("\n")[0]
    assert generated == [expected]


def test_the_command_passes_lm_evals_arguments_through(tiny_checkpoint) -> None:
    folder, _ = tiny_checkpoint
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ncn.integrations.harness",
            "--model",
            "ncn",
            "--model_args",
            f"checkpoint={folder}",
            "--tasks",
            "ncn_tiny_choice",
            "--include_path",
            str(TASK_DIR),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=time_left(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ncn_tiny_choice" in done.stdout and "acc" in done.stdout
    assert f"scoring the checkpoint of run tiny at step 1 (not evaluated): {folder} (no MLflow run)" in done.stderr


@pytest.mark.parametrize(
    ("model_args", "line"),
    [
        (
            "checkpoint=nosuch",
            "error: checkpoint=nosuch: no checkpoint folder, run name or MLflow run id matches this path or run "
            "name under {cwd}: pass checkpoint=latest, checkpoint=best, a run name, or an existing checkpoint folder",
        ),
        (
            "chekpoint=latest",
            "error: --model_args chekpoint=latest is not an argument of the ncn model: check the spelling, "
            "accepted keys are checkpoint, device, batch_size, max_batch_size",
        ),
    ],
)
def test_bad_model_args_end_in_one_error_line_with_exit_2(tmp_path: Path, model_args: str, line: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ncn.integrations.harness", "--model", "ncn", "--model_args", model_args]
        + ["--tasks", "ncn_tiny_choice", "--include_path", str(TASK_DIR), "--device", "cpu"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=time_left(),
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert errors == [line.format(cwd=tmp_path)] == done.stderr.splitlines()[-1:]
    assert "Traceback" not in done.stderr
