"""Frozen base (`trainer.freeze=base`, NCN paper §3.1) on a pretrained GPT-2 (`model.init_from`).

A tiny GPT-2 saved with `transformers` is loaded into `model=gpt2` shrunk to 2 layers of width 32,
with the exact-neutral controller; `python run.py` trains only the controller. Asserted: the base
weights after training (6 steps, and 200) are bitwise the pretrained ones, 200 controller-only
steps lower the val loss below the pretrained model's by more than 0.004 nats/token, the
optimizer holds exactly the controller's tensors, the counts printed and recorded, an exact
resume, DDP over two gloo ranks, and the refusals.
Run: python -m pytest -q tests/test_freeze.py   (about two minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.errors import NCNConfigError
from ncn.integrations.pretrained import convert
from ncn.training.optim import build_optimizer, freeze_base

from conftest import REPO, run_cli, time_left

transformers = pytest.importorskip("transformers")

SHAPE = ["model.d_model=32", "model.n_layer=2", "model.n_head=2", "model.block_size=32"]
TINY = {"vocab_size": 50257, "block_size": 32, "d_model": 32, "n_layer": 2, "n_head": 2}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny GPT-2 over the GPT-2 vocabulary, saved as HF-format weights."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def frozen_run(pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """6 steps of controller-only training from the pretrained base: (run dir, stdout)."""
    base = tmp_path_factory.mktemp("frozen")
    args = [
        "model=gpt2",
        *SHAPE,
        f"model.init_from={pretrained}",
        "ncn.parametrisation=exact_neutral",
        "trainer=smoke",
        "trainer.freeze=base",
        "tracking=none",
        f"hydra.run.dir={base / 'run'}",
    ]
    done = run_cli(args, cwd=base)
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "run", done.stdout + done.stderr


# A few hundred controller-only steps (NCN paper §3.1): 8 val batches (1,024 tokens) evaluated at steps 0, 100, 200.
LONG_STEPS = 200
LONG_ARGS = [
    f"trainer.max_steps={LONG_STEPS}",
    "trainer.eval_every=100",
    "trainer.eval_batches=8",
    f"trainer.checkpoint_every={LONG_STEPS}",
    "trainer.log_every=50",
    "optim.lr=3e-3",
    "optim.warmup_steps=20",
]
# The val loss the controller alone must gain over the frozen pretrained model by step 200
# (measured 2026-12-08: 10.8127 at step 0, 10.8073 at step 200, a drop of 0.0054 nats/token).
LONG_MARGIN = 0.004


@pytest.fixture(scope="module")
def long_frozen_run(pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LONG_STEPS steps of controller-only training from the pretrained base (about 50 s on 2 cores): its run dir."""
    base = tmp_path_factory.mktemp("frozen_long")
    args = [
        "model=gpt2",
        *SHAPE,
        f"model.init_from={pretrained}",
        "ncn.parametrisation=exact_neutral",
        "trainer=smoke",
        "trainer.freeze=base",
        *LONG_ARGS,
        "tracking=none",
        f"hydra.run.dir={base / 'run'}",
    ]
    done = run_cli(args, cwd=base)
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "run"


def _controller_tensors() -> int:
    model = ModulatedGPT(ModelConfig(**TINY), ModulationConfig())
    return len(list(model.controller.parameters()))


def test_frozen_base_is_bitwise_the_pretrained_weights(frozen_run: tuple[Path, str], pretrained: Path) -> None:
    run_dir, log = frozen_run
    from safetensors.torch import load_file

    cfg = ModelConfig(**TINY, norm="layer", activation="gelu_tanh")
    expected = convert(load_file(pretrained / "model.safetensors"), cfg)
    trained = torch.load(run_dir / "checkpoints" / "step_000006" / "model.pt", weights_only=True)
    assert set(expected) == {k for k in trained if not k.startswith("controller.")}
    assert all(torch.equal(trained[k], expected[k]) for k in expected)
    assert not torch.equal(trained["controller.fc2.weight"], torch.zeros_like(trained["controller.fc2.weight"]))
    optim = torch.load(run_dir / "checkpoints" / "step_000006" / "optim.pt", weights_only=True)["optimizer"]
    n = _controller_tensors()
    assert len(optim["state"]) == n and sum(len(g["params"]) for g in optim["param_groups"]) == n
    state = json.loads((run_dir / "checkpoints" / "step_000006" / "train_state.json").read_text())
    with torch.device("meta"):
        total = ModulatedGPT(cfg, ModulationConfig()).num_parameters()
    assert (state["freeze"], state["n_params_trainable"], state["n_params_frozen"]) == (
        "base",
        total.controller,
        total.base,
    )
    counts = f"{total.controller:,} trainable parameters (the controller), {total.base:,} frozen"
    assert f"trainer.freeze=base: {counts}" in log
    assert f"base weights of model.init_from={pretrained} loaded from {pretrained}" in log
    saved = (run_dir / "checkpoints" / "step_000006" / "config.yaml").read_text()
    assert "freeze: base" in saved and f"init_from: {pretrained}" in saved


@pytest.mark.slow  # the 200-step run takes 50-65 s on 2 cores under load
def test_a_few_hundred_frozen_steps_lower_the_val_loss_and_keep_the_base(
    long_frozen_run: Path, pretrained: Path
) -> None:
    from safetensors.torch import load_file

    expected = convert(
        load_file(pretrained / "model.safetensors"), ModelConfig(**TINY, norm="layer", activation="gelu_tanh")
    )
    trained = torch.load(long_frozen_run / "checkpoints" / f"step_{LONG_STEPS:06d}" / "model.pt", weights_only=True)
    assert all(torch.equal(trained[k], expected[k]) for k in expected)
    records = [json.loads(line) for line in (long_frozen_run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    assert sorted(val) == [0, 100, LONG_STEPS]
    assert val[0] > val[100] > val[LONG_STEPS]
    assert val[LONG_STEPS] < val[0] - LONG_MARGIN


def test_step0_val_loss_is_the_pretrained_models(frozen_run: tuple[Path, str], pretrained: Path) -> None:
    """The reference row: with exact_neutral, training's step-0 eval is GPT2LMHeadModel's own loss."""
    import torch.nn.functional as F

    from ncn.config import DataConfig
    from ncn.data.loader import DataModule

    run_dir, _ = frozen_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step0 = next(r["val/loss"] for r in records if r["step"] == 0 and "val/loss" in r)
    hf = transformers.GPT2LMHeadModel.from_pretrained(pretrained).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in DataModule(DataConfig()).val_batches(4, 32, 2):  # trainer=smoke's eval batches
            logits = hf(x).logits
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    assert step0 == pytest.approx(total / count, abs=1e-4)


def test_resume_of_a_frozen_run_is_bitwise_exact(frozen_run: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = frozen_run
    resumed = run_cli(
        [f"trainer.resume={run_dir / 'checkpoints' / 'step_000003'}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours = torch.load(tmp_path / "run" / "checkpoints" / "step_000006" / "model.pt", weights_only=True)
    theirs = torch.load(run_dir / "checkpoints" / "step_000006" / "model.pt", weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    refused = run_cli(
        [f"trainer.resume={run_dir / 'checkpoints' / 'step_000003'}", "trainer.freeze=none"], cwd=tmp_path
    )
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith("error: trainer.freeze=none differs from the checkpoint's trainer.freeze=base")
    )


@pytest.mark.slow
def test_frozen_base_under_ddp_stays_the_pretrained_weights(pretrained: Path, tmp_path: Path) -> None:
    from ncn.training.runtime import DistributedEnv

    env = {k: v for k, v in os.environ.items() if k not in DistributedEnv().torch_variables()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "run.py")]
    args = [
        "model=gpt2",
        *SHAPE,
        f"model.init_from={pretrained}",
        "ncn.parametrisation=exact_neutral",
        "trainer=smoke",
        "trainer.freeze=base",
        "trainer.probe_tokens=0",
        "tracking=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(
        [*cmd, *args],
        cwd=tmp_path,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=time_left(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    cfg = ModelConfig(**TINY, norm="layer", activation="gelu_tanh")
    expected = convert(load_file(pretrained / "model.safetensors"), cfg)
    final = tmp_path / "run" / "checkpoints" / "step_000006"
    trained = torch.load(final / "model.pt", weights_only=True)
    assert all(torch.equal(trained[k], expected[k]) for k in expected)
    assert not torch.equal(trained["controller.fc2.weight"], torch.zeros_like(trained["controller.fc2.weight"]))
    state = json.loads((final / "train_state.json").read_text())
    assert (state["world_size"], state["freeze"]) == (2, "base")
    optim = torch.load(final / "optim.pt", weights_only=True)["optimizer"]
    assert len(optim["state"]) == _controller_tensors()


def test_eval_generate_analyze_take_the_frozen_checkpoint(frozen_run: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = frozen_run
    ckpt = run_dir / "checkpoints" / "step_000006"
    val_loss = json.loads((ckpt / "train_state.json").read_text())["val_loss"]
    # the batches of training's eval (trainer=smoke: 2 of 4 x 32 tokens) give training's val loss
    evaluated = run_cli(["task=eval", f"checkpoint={ckpt}", "trainer.batch_size=4", "trainer.eval_batches=2"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"val loss {val_loss:.4f} |" in evaluated.stdout
    generate = ["task=generate", f"checkpoint={ckpt}", "prompt=ROMEO:", "max_new_tokens=5", "seed=0"]
    generated = run_cli(generate, tmp_path)
    assert generated.returncode == 0, generated.stderr[-3000:]
    analyzed = run_cli(["task=analyze", f"checkpoint={ckpt}", f"hydra.run.dir={tmp_path / 'analysis_run'}"], tmp_path)
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    assert (tmp_path / "analysis_run" / "analysis" / "signals.csv").is_file()


def test_freeze_without_a_controller_is_refused(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=64, block_size=8, d_model=16, n_layer=1, n_head=2)
    model = ModulatedGPT(cfg, ModulationConfig(targets=[]))
    with pytest.raises(NCNConfigError, match=r"trainer.freeze=base leaves nothing to train .*ncn=none"):
        freeze_base(model)
    done = run_cli(["model=tiny", "ncn=none", "trainer.freeze=base", "tracking=none"], cwd=tmp_path)
    assert done.returncode == 2 and "error: trainer.freeze=base leaves nothing to train" in done.stderr


def test_optimizer_holds_only_the_controller() -> None:
    from ncn.config import OptimConfig

    model = ModulatedGPT(ModelConfig(vocab_size=64, block_size=8, d_model=16, n_layer=2, n_head=2), ModulationConfig())
    trainable, frozen = freeze_base(model)
    count = model.num_parameters()
    assert (trainable, frozen) == (count.controller, count.base)
    optimizer = build_optimizer(model, OptimConfig())
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.controller.parameters()}


def test_the_control_embedding_trains_with_the_controller(pretrained: Path) -> None:
    from ncn.config import ControlConfig
    from ncn.integrations.pretrained import load_pretrained

    control = ControlConfig(kind="genre", vocabulary=["comedy", "tragedy"])
    model = ModulatedGPT(ModelConfig(**TINY, norm="layer", activation="gelu_tanh"), ModulationConfig(), control)
    load_pretrained(model, str(pretrained))  # the control embedding is not a base tensor: not expected in the file
    trainable, frozen = freeze_base(model)
    count = model.num_parameters()
    assert trainable == count.controller + 2 * 32 and frozen == count.total - trainable
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    assert learning == {f"controller.{n}" for n, _ in model.controller.named_parameters()} | {"control.weight"}
