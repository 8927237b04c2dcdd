"""Byte-level data end to end through run.py: prepare, train, eval, generate, analyze.

The byte tokenizer has one id per UTF-8 byte, so the val loss in bits per token is the bits per
byte up to the end-of-text token between documents: `val/bpb` must equal `val/loss / ln 2 ×
tokens / bytes` exactly, and every signal row of the analysis is one byte of the prompt.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli

PROMPT = "ROMEO: é"  # 9 bytes: é is two


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory) -> Path:
    """A 6-step model=tiny run on byte-level Shakespeare, untracked; its run folder."""
    base = tmp_path_factory.mktemp("bytes")
    run_dir = base / "run"
    args = ["model=tiny", "data.tokenizer=bytes", "trainer=smoke", "tracking=none", f"hydra.run.dir={run_dir}"]
    done = run_cli(args, cwd=base)
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


@pytest.mark.slow
def test_prepare_reports_as_many_tokens_as_bytes(tmp_path: Path) -> None:
    done = run_cli(["task=prepare", "data.tokenizer=bytes"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in (done.stdout + done.stderr).splitlines() if "bytes tokens train" in x)
    train, val = (int(n.replace(",", "")) for n in re.findall(r"(?:train|val) ([\d,]+)", line))
    assert (train, val) == (4_745_428, 241_644)  # the embedded corpus's bytes, split by documents


@pytest.mark.slow
def test_byte_level_train_eval_generate_analyze(byte_run: Path, tmp_path: Path) -> None:
    metrics = json.loads((byte_run / "metrics.json").read_text())
    # val tokens = val bytes + one end-of-text per document (2 val documents)
    assert metrics["val/bpb"] == pytest.approx(metrics["val/loss"] / math.log(2) * (241_644 + 2) / 241_644, rel=1e-9)
    config = (byte_run / "checkpoints" / "step_000006" / "config.yaml").read_text()
    assert "vocab_size: 320" in config and "tokenizer: bytes" in config  # 257 padded to a multiple of 64

    ckpt = f"checkpoint={byte_run / 'checkpoints' / 'step_000006'}"
    # the 2 batches training evaluated (task=eval's default is the whole split)
    evaluated = run_cli(
        ["task=eval", ckpt, "trainer.eval_batches=2", f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert f"val loss {metrics['val/loss']:.4f}" in evaluated.stdout + evaluated.stderr

    args = ["task=generate", ckpt, f"prompt='{PROMPT}'", "max_new_tokens=24", "seed=0"]
    first = run_cli([*args, f"hydra.run.dir={tmp_path / 'g1'}"], cwd=tmp_path)
    again = run_cli([*args, f"hydra.run.dir={tmp_path / 'g2'}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith(PROMPT) and first.stdout == again.stdout  # same seed, same bytes

    analyzed = run_cli(["task=analyze", ckpt, f"prompt='{PROMPT}'", f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert analyzed.returncode == 0, analyzed.stderr[-2000:]
    df = pd.read_csv(tmp_path / "a" / "analysis" / "signals.csv", keep_default_na=False, na_values=[""])
    n_bytes = len(PROMPT.encode())
    assert df.groupby("signal").size().to_dict() == {s: 2 * n_bytes for s in ("gain", "precision", "ffn_gate")}
