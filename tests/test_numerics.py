"""Numerical faults: a NaN/Inf loss stops the run (FAILED, last good checkpoint kept) or, with
`trainer.skip_nonfinite=N`, up to N bad steps are skipped and each one is logged.

Faults come from tests/faults.py (`--nan-steps 3,6`: the loss of each listed step becomes NaN once)
and, in-process, from a weight set to +inf (a real overflow).
Run: python -m pytest -q tests/test_numerics.py   (~30 s on 2 cores)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from mlflow import MlflowClient

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.config import OptimConfig, TrainerConfig
from ncn.errors import RUN_FAILED_EXIT
from ncn.tracking import NullTracker
from ncn.training import checkpoint as ckpt
from ncn.training.loop import Job, optimizer_step
from ncn.training.optim import build_optimizer, build_scheduler

from conftest import run_cli

ARGS = [
    "model=tiny",
    "trainer=smoke",
    "trainer.max_steps=8",
    "trainer.checkpoint_every=4",
    "trainer.eval_every=4",
    "trainer.eval_batches=1",
    "trainer.probe_tokens=0",
    "trainer.threads=1",
]
TOKENS_PER_STEP = 4 * 32  # trainer=smoke batch_size x model=tiny block_size


def _run(client: MlflowClient):
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _jsonl(run_dir: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def test_nonfinite_beyond_the_skip_budget_stops_failed_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, mlflow_store
) -> None:
    uri = mlflow_store(tmp_path / "mlflow.db")
    run_dir = tmp_path / "run"
    done = run_cli(
        [*ARGS, "trainer.skip_nonfinite=1", f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        faults=["--nan-steps", "3,6"],
    )
    assert done.returncode == RUN_FAILED_EXIT, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: non-finite loss or gradient at step 6: training diverged (newest good checkpoint: "
        f"{run_dir / 'checkpoints' / 'step_000004'}); lower optim.lr, use trainer.precision=fp32, "
        "or set trainer.skip_nonfinite=N to skip up to N bad steps"
    )
    client = MlflowClient(uri)
    run = _run(client)
    assert run.info.status == "FAILED"
    assert _history(client, run.info.run_id, "train/nonfinite_skipped") == [(3, 1.0)]  # the one allowed skip
    losses = _history(client, run.info.run_id, "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5] and all(math.isfinite(v) for _, v in losses)
    assert _jsonl(run_dir, "train/loss") == dict(losses)

    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000004"]
    kept = ckpt.load(ckpt.resolve(run_dir))
    assert kept.path == checkpoints / "step_000004"
    assert all(torch.isfinite(t).all() for t in kept.model.values())
    # step 3 was retried on the next batch: 4 good steps consumed 5 batches
    assert (kept.state.step, kept.state.nonfinite_skipped) == (4, 1)
    assert kept.state.data == {"epoch": 0, "position": 5 * 4}


def test_skip_nonfinite_skips_each_bad_step_and_logs_it(tmp_path: Path, mlflow_store) -> None:
    uri = mlflow_store(tmp_path / "mlflow.db")
    run_dir = tmp_path / "run"
    done = run_cli(
        [*ARGS, "trainer.skip_nonfinite=2", f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        faults=["--nan-steps", "3,6"],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for step, n in ((3, 1), (6, 2)):
        assert f"step {step}: non-finite loss or gradient, skipped ({n} of at most 2)" in done.stdout + done.stderr
    client = MlflowClient(uri)
    run = _run(client)
    assert run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "train/nonfinite_skipped") == [(3, 1.0), (6, 2.0)]
    losses = _history(client, run.info.run_id, "train/loss")
    assert [s for s, _ in losses] == list(range(1, 9)) and all(math.isfinite(v) for _, v in losses)
    assert run.data.metrics["train/tokens_seen"] == 8 * TOKENS_PER_STEP  # skipped steps train on nothing
    state = json.loads((run_dir / "checkpoints" / "step_000008" / "train_state.json").read_text())
    assert (state["step"], state["nonfinite_skipped"], state["data"]) == (8, 2, {"epoch": 0, "position": 10 * 4})


def _job(model: ModulatedGPT, tmp_path: Path) -> Job:
    ocfg = OptimConfig(lr=1e-3, warmup_steps=0)
    optimizer = build_optimizer(model, ocfg)
    return Job(
        model=model,
        train_model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, ocfg, 10),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loader=None,
        val_batches=[],
        tracker=NullTracker(),
        device=torch.device("cpu"),
        checkpoints=tmp_path,
        config={},
        tokens_per_step=32,
    )


def test_a_bad_step_changes_no_weight_optimizer_state_or_schedule(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = ModulatedGPT(
        ModelConfig(vocab_size=128, block_size=16, d_model=32, n_layer=2, n_head=2), ModulationConfig()
    )
    parts, cfg = _job(model, tmp_path), TrainerConfig(max_steps=10)
    x = torch.randint(0, 128, (2, 17))
    x[0, 0] = 5  # the token whose embedding overflows below
    batches = iter([(x[:, :-1], x[:, 1:])] * 3)
    good = optimizer_step(parts, batches, cfg, 0)
    assert good is not None and math.isfinite(good["train/loss"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [parts.optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    lr, epoch = parts.optimizer.param_groups[0]["lr"], parts.scheduler.last_epoch

    forward = model.forward

    def nan_loss(*args):
        out = forward(*args)
        out.loss = out.loss * float("nan")
        return out

    with monkeypatch.context() as patch:
        patch.setattr(model, "forward", nan_loss)
        assert optimizer_step(parts, batches, cfg, 1) is None
    with torch.no_grad():
        model.tok_emb.weight[5, 0] = float("inf")  # a real overflow: inf - inf in the first norm, NaN loss
    before["tok_emb.weight"][5, 0] = float("inf")
    before["lm_head.weight"][5, 0] = float("inf")  # tied to the embedding
    assert optimizer_step(parts, batches, cfg, 1) is None

    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(
        torch.equal(parts.optimizer.state[p]["exp_avg"], m) for p, m in zip(model.parameters(), moments, strict=True)
    )
    assert (parts.optimizer.param_groups[0]["lr"], parts.scheduler.last_epoch) == (lr, epoch)
    assert all(p.grad is None for p in model.parameters())  # nothing left over for the next step
