"""DDP test: `torchrun --nproc_per_node=2 run.py model=tiny trainer=smoke` on CPU (gloo); both
ranks finish and only rank 0 writes (one run dir, one MLflow run, one metrics history).

Run: python -m pytest -q tests/test_ddp.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO


@pytest.mark.slow
def test_two_process_gloo_run(tmp_path: Path, mlflow_store) -> None:
    uri = mlflow_store(tmp_path / "mlflow.db")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "run.py"),
        "model=tiny",
        "trainer=smoke",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(
        cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 1 ran in the launch dir without a Hydra output dir: nothing but rank 0's files exist
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlartifacts", "mlflow.db", "mlflow.db.lock", "run"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        ".hydra",
        "checkpoints",
        "metrics.json",
        "metrics.jsonl",
        "run.log",
    ]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ncn").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert (runs[0].data.params["world_size"], runs[0].data.params["tokens_per_step"]) == ("2", str(2 * 4 * 32))
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) == [1, 2, 3, 4, 5, 6]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_000006" / "train_state.json").read_text())
    assert (state["world_size"], state["tokens_seen"], state["data"]) == (
        2,
        6 * 2 * 4 * 32,
        {"epoch": 0, "position": 6 * 2 * 4},
    )
