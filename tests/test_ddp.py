"""DDP tests on CPU (gloo), model=tiny trainer=smoke with dropout on, so every step draws random numbers:

- `torchrun --nproc_per_node=2`: both ranks finish and only rank 0 writes (one run dir, one MLflow
  run, one metrics history);
- the same job started as two plain processes given the variables `srun --ntasks=2` sets (the
  SLURM path, `ncn.training.runtime.distributed_env`): bitwise the same per-step losses and final weights;
- 2 ranks x 1 micro-batch against 1 process x 2 accumulated micro-batches (same global batch):
  losses equal to 1e-6 and final weights allclose (`ncn.training.loop.micro_batch_seed`);
- `distributed_env` on the variable sets of torchrun, srun steps and an sbatch script.

Run: python -m pytest -q tests/test_ddp.py   (about a minute on 2 cores; the multi-process tests are slow)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from ncn.training.runtime import MASTER_PORT_BASE, DistributedEnv, distributed_env, first_host, tasks_on_node

from conftest import REPO, time_left

# One CPU thread per process: bitwise-reproducible, and fast on a busy 2-core machine.
DROPOUT = ["model=tiny", "model.dropout=0.1", "trainer=smoke", "trainer.probe_tokens=0", "tracking=none"]


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
        cmd,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=time_left(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("data ") and " tokens train " in line]
    assert len(summaries) == 1, summaries  # the data summary once, from rank 0
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


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "step_000006" / "model.pt", weights_only=True)


def _env(**extra: str) -> dict[str, str]:
    """This environment without any torchrun/SLURM variables of an enclosing job, plus `extra`."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in DistributedEnv().torch_variables()
    }
    return {**keep, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def torchrun_dropout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run dir of `torchrun --nproc_per_node=2 run.py model=tiny model.dropout=0.1 trainer=smoke` (batch 4 per rank)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "run.py")]
    done = subprocess.run(
        [*cmd, *DROPOUT, f"hydra.run.dir={tmp / 'run'}"],
        cwd=tmp,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=time_left(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(_losses(tmp / "run")) == [1, 2, 3, 4, 5, 6]
    return tmp / "run"


def _srun_port() -> tuple[str, int]:
    """A SLURM job id whose derived rendezvous port is free here, and that port."""
    for job_id in range(4242, 4342):
        port = MASTER_PORT_BASE + job_id
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return str(job_id), port
    raise AssertionError("no free port in the SLURM range")


@pytest.mark.slow
def test_srun_tasks_train_like_torchrun(torchrun_dropout: Path, tmp_path: Path) -> None:
    """Two processes with the variables `srun --ntasks=2 --ntasks-per-node=2` sets form one DDP job whose
    losses and weights equal torchrun's bitwise; task 1 writes nothing (rank 0 logs and checkpoints)."""
    job_id, port = _srun_port()
    slurm = {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_TASKS_PER_NODE": "2",
        "SLURM_STEP_TASKS_PER_NODE": "2",
    }
    assert distributed_env({**slurm, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}) == DistributedEnv(
        rank=1,
        local_rank=1,
        world_size=2,
        local_world_size=2,
        master_addr="localhost",
        master_port=port,
        source="slurm",
    )
    tasks = [
        subprocess.Popen(
            [sys.executable, str(REPO / "run.py"), *DROPOUT, f"hydra.run.dir={tmp_path / 'run'}"],
            cwd=tmp_path,
            env=_env(**slurm, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [task.communicate(timeout=time_left()) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # task 1 made no run dir of its own
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_000006" / "train_state.json").read_text())
    assert (state["world_size"], state["data"]) == (2, {"epoch": 0, "position": 6 * 2 * 4})
    assert _losses(tmp_path / "run") == _losses(torchrun_dropout)  # bitwise, every step
    ours, theirs = _weights(tmp_path / "run"), _weights(torchrun_dropout)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_accumulating_two_micro_batches(torchrun_dropout: Path, tmp_path: Path) -> None:
    """2 ranks x batch 4 x grad_accum 1 == 1 process x batch 4 x grad_accum 2 (same blocks, same dropout masks)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "run.py"), *DROPOUT, "trainer.grad_accum=2", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=time_left(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accumulated, ddp = _losses(tmp_path / "run"), _losses(torchrun_dropout)
    assert sorted(accumulated) == sorted(ddp) == [1, 2, 3, 4, 5, 6]
    assert all(abs(accumulated[s] - ddp[s]) <= 1e-6 for s in ddp), (accumulated, ddp)
    ours, theirs = _weights(tmp_path / "run"), _weights(torchrun_dropout)
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6) for k in ours)
    # dropout did draw random numbers: without it the same steps give other losses
    plain = subprocess.run(
        [
            sys.executable,
            str(REPO / "run.py"),
            *DROPOUT,
            "model.dropout=0.0",
            "trainer.max_steps=1",
            f"hydra.run.dir={tmp_path / 'plain'}",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=time_left(),
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert abs(_losses(tmp_path / "plain")[1] - ddp[1]) > 1e-4


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("node3", "node3"), ("gpu[07-09,12],cpu1", "gpu07"), ("rack[1-2]-n[01-04]", "rack1-n01"), ("a1,a2", "a1")],
)
def test_first_host_of_a_slurm_host_list(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


def test_tasks_on_node_expands_slurm_counts() -> None:
    assert [tasks_on_node("2(x3),1", n) for n in range(5)] == [2, 2, 2, 1, None]
    assert tasks_on_node("", 0) is None


def test_distributed_env_reads_torchrun_then_srun_and_ignores_a_batch_script() -> None:
    torchrun = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "29500",
    }
    srun = {
        "SLURM_JOB_ID": "987654",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
    }
    assert distributed_env(torchrun) == DistributedEnv(3, 1, 4, 2, "h", 29500, "torchrun")
    assert distributed_env({**srun, **torchrun}).source == "torchrun"  # torchrun inside an allocation wins
    assert distributed_env(srun) == DistributedEnv(5, 1, 8, 4, "gpu07", MASTER_PORT_BASE + 987654 % 40000, "slurm")
    assert distributed_env({**srun, "MASTER_PORT": "12345"}).master_port == 12345
    # an sbatch script given --ntasks=8 but running python once: SLURM_NTASKS without a step of several tasks
    batch = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "gpu07"}
    assert distributed_env(batch) == DistributedEnv()
    assert DistributedEnv(1, 0, 2, 2, "gpu07", 21234, "slurm").torch_variables() == {
        "RANK": "1",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": "21234",
    }
