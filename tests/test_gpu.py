"""The GPU fast path: bf16 autocast + torch.compile numerics, fused AdamW, the flash
attention kernel for precision-scaled queries, cached decoding under bf16, DDP over NCCL, and an
fp16 run with a GradScaler that resumes with the scaler's state; and scripts/gpu_check.sh itself.

The fast-path tests are marked `gpu`, so the default run deselects them (pyproject addopts
`-m "not gpu"`); run them with `python -m pytest -q -m gpu tests/test_gpu.py` or
`bash scripts/gpu_check.sh`. Each runs on CUDA when there is a GPU; the first three also run on CPU
without one (autocast, compile, SDPA's flash kernel and the KV cache exist there too), the rest are
CUDA-only and skip on CPU. The last test (slow, not `gpu`) runs the check script's CPU quick mode.

Tolerances are stated in units of bf16's unit roundoff U = 2**-8 (8 significand bits): autocast
rounds every matmul input and output to bf16, so a result of a few such layers carries a relative
error of a few U (measured on CPU: 1.5 U for the logits, 1 U between cached and full decoding).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.config import OptimConfig, TrainerConfig
from ncn.tracking import NullTracker
from ncn.training.loop import Job, optimizer_step
from ncn.training.optim import build_optimizer, build_scheduler
from ncn.training.runtime import autocast

from conftest import REPO, time_left

# Deterministic cuBLAS needs this before its first handle exists, i.e. before any test touches CUDA
# (ncn.training.runtime.setup_device sets the same value for training runs).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
U = 2.0**-8  # bf16 unit roundoff
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Small, but shaped like the real models for the kernels: head_dim 32 (flash needs a multiple of 8).
SHAPE = ModelConfig(vocab_size=512, block_size=128, d_model=128, n_layer=2, n_head=4, dropout=0.0)


def _model(dropout: float = 0.0, seed: int = 0) -> ModulatedGPT:
    """The full NCN (temperature, gain, activation; causal salience pooling) on DEVICE."""
    torch.manual_seed(seed)
    return ModulatedGPT(dataclasses.replace(SHAPE, dropout=dropout), ModulationConfig()).to(DEVICE)


def _batch(batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(0, SHAPE.vocab_size, (batch, SHAPE.block_size), generator=gen) for _ in range(2))
    return x.to(DEVICE), y.to(DEVICE)


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| (Frobenius), in float32."""
    return float((value.float() - reference.float()).norm() / reference.float().norm())


@pytest.fixture
def restore_torch_settings():
    """Training code sets threads and deterministic algorithms process-wide; put them back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.gpu
def test_bf16_autocast_with_compile_matches_fp32_eager():
    """Train-mode loss within U relative (observed 1e-6..1e-5: the loss averages 512-way CEs whose
    rounding errors cancel) and eval logits within 4 U relative (observed 1.5 U)."""
    model, (x, y) = _model(), _batch()
    compiled = torch.compile(model)
    model.train()
    with torch.no_grad():
        reference_loss = model(x, y).loss
        with autocast(DEVICE, "bf16"):
            loss = compiled(x, y).loss
    model.eval()
    with torch.no_grad():
        reference_logits = model(x).logits
        with autocast(DEVICE, "bf16"):
            logits = compiled(x).logits
    assert logits.dtype == torch.bfloat16  # autocast really ran the head in bf16
    assert abs(loss.item() - reference_loss.item()) <= U * reference_loss.item()
    assert _relative_error(logits, reference_logits) <= 4 * U


def _kernels(prof: profile) -> tuple[set[str], set[str]]:
    """(operator names, device kernel names) recorded by `prof`."""
    events = prof.key_averages()
    ops = {e.key for e in events if e.key.startswith("aten::")}
    kernels = {e.key for e in events if e.device_type == DeviceType.CUDA}
    return ops, kernels


def _attention_ops(ops: set[str], kinds: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """(forward, backward) SDPA operators among `ops` whose name holds one of `kinds`."""
    found = {op for op in ops if any(kind in op for kind in kinds)}
    return {op for op in found if "backward" not in op}, {op for op in found if "backward" in op}


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_cuda)], ids=["eager", "compiled"])
def test_fused_attention_kernel_runs_for_precision_scaled_queries(compiled: bool):
    """The precision-scaled queries (Q' = beta Q, a strided view) keep SDPA on a fused kernel in the
    forward and the backward pass, in the training setup (bf16 autocast; attention dropout 0.1 on
    CUDA, 0 on CPU, whose flash kernel has no dropout).

    By default the profiler sees flash attention, or on Hopper cuDNN's attention when this torch
    build prefers it (both the FlashAttention algorithm), and neither the memory-efficient nor the
    math fallback. Eager, `sdpa_kernel(FLASH_ATTENTION)` forces flash alone (it raises "No available
    kernel" when flash cannot take the inputs) and the profiler sees its operators and, on CUDA, a
    kernel named flash."""
    model = _model(dropout=0.1 if CUDA else 0.0).train()
    step = torch.compile(model) if compiled else model
    x, y = _batch()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if CUDA else [])]

    def forward_backward() -> None:
        with autocast(DEVICE, "bf16"):
            loss = step(x, y).loss
        loss.backward()
        if CUDA:
            torch.cuda.synchronize()

    forward_backward()  # compiles (outside the profiler, which would also record the tracing)
    with profile(activities=activities) as prof:
        forward_backward()
    ops, _ = _kernels(prof)
    forward, backward = _attention_ops(ops, ("flash_attention", "cudnn_attention"))
    assert forward and backward, sorted(ops)
    assert _attention_ops(ops, ("efficient_attention", "attention_math")) == (set(), set()), sorted(ops)
    if compiled:
        return  # a compiled graph need not be retraced when the backend context changes
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), profile(activities=activities) as prof:
        forward_backward()
    ops, kernels = _kernels(prof)
    forward, backward = _attention_ops(ops, ("flash_attention",))
    assert forward and backward, sorted(ops)
    if CUDA:
        assert any("flash" in k.lower() for k in kernels), sorted(kernels)[:40]


@pytest.mark.gpu
def test_cached_decoding_matches_full_forward_under_bf16():
    """A 16-token prefill then one token at a time gives the full forward's logits within 4 U
    relative under bf16 autocast (observed 1 U: the cached path runs SDPA with an explicit mask,
    the full one the causal flash kernel, so they round differently)."""
    model, (x, _) = _model().eval(), _batch()
    with torch.no_grad(), autocast(DEVICE, "bf16"):
        full = model(x).logits
        state = model.new_decode_state(x.shape[0])
        chunks = [model.decode(x[:, :16], state)]
        chunks += [model.decode(x[:, t : t + 1], state) for t in range(16, SHAPE.block_size)]
    cached = torch.cat(chunks, dim=1)
    assert state.kv.k[0].dtype == torch.bfloat16  # the cache holds what autocast produced
    assert cached.shape == full.shape
    assert _relative_error(cached, full) <= 4 * U


@pytest.mark.gpu
@needs_cuda
def test_fused_adamw_is_used_on_cuda_and_matches_the_unfused_step():
    """build_optimizer picks the fused kernel on CUDA (the profiler sees `_fused_adamw_`); three
    steps on the same gradients agree with the for-each implementation to float32 rounding
    (torch.testing's float32 defaults: rtol 1.3e-6, atol 1e-5)."""
    model, (x, y) = _model(), _batch()
    twin = copy.deepcopy(model)
    fused, plain = build_optimizer(model, OptimConfig()), build_optimizer(twin, OptimConfig(fused=False))
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for step in range(3):
        model(x, y).loss.backward()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            q.grad = p.grad.clone()  # identical gradients: only the update kernels differ
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fused.step()
        plain.step()
        for opt in (fused, plain):
            opt.zero_grad(set_to_none=True)
        if step == 0:
            names = {e.key for e in prof.key_averages()}
            assert any("_fused_adamw" in n for n in names), sorted(names)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(model: ModulatedGPT, train_model: torch.nn.Module, precision: str) -> Job:
    optimizer = build_optimizer(model, OptimConfig())
    return Job(
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, OptimConfig(), total_steps=100),
        scaler=torch.amp.GradScaler(DEVICE.type, enabled=precision == "fp16"),
        loader=None,
        val_batches=[],
        tracker=NullTracker(),
        device=DEVICE,
        checkpoints=Path("unused"),
        config={},
        tokens_per_step=4 * SHAPE.block_size,
    )


@pytest.mark.gpu
@needs_cuda
def test_ddp_over_nccl_world_of_one_trains_like_the_plain_model(restore_torch_settings):
    """A real NCCL process group (world size 1) and a DDP-wrapped model: one bf16 step through
    ncn.training.loop.optimizer_step returns the plain model's loss and leaves the same weights (DDP
    all-reduces the gradients over one rank: a no-op), with deterministic algorithms so both
    backward passes sum in the same order."""
    torch.use_deterministic_algorithms(True)
    cfg = TrainerConfig(precision="bf16", device="cuda")
    batch = _batch()
    device = torch.device("cuda", torch.cuda.current_device())
    torch_dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, device_id=device
    )
    try:
        assert torch_dist.get_backend() == "nccl" and torch_dist.get_world_size() == 1
        model = _model()
        plain = copy.deepcopy(model)
        ddp = DistributedDataParallel(model, device_ids=[device.index])
        metrics = optimizer_step(_job(model, ddp, "bf16"), iter([batch]), cfg, 0)
        torch_dist.barrier()
    finally:
        torch_dist.destroy_process_group()
    reference = optimizer_step(_job(plain, plain, "bf16"), iter([batch]), cfg, 0)
    assert metrics is not None and reference is not None
    assert metrics["train/loss"] == pytest.approx(reference["train/loss"], rel=1e-6)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


def _metrics(run_dir: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def _scaler_state(run_dir: Path, step: int) -> dict:
    file = run_dir / "checkpoints" / f"step_{step:06d}" / "optim.pt"
    return torch.load(file, map_location="cpu", weights_only=True)["scaler"]


@pytest.mark.gpu
@needs_cuda
def test_fp16_run_resumes_with_the_grad_scaler_state(task_config, tmp_path: Path, restore_torch_settings):
    """fp16 + GradScaler, model=tiny: an uninterrupted 6-step run against one resumed from its step-3
    checkpoint. The checkpoint carries the scaler (scale and growth tracker, which counts the good
    steps since the last change of scale); the resumed run continues it (its step-6 scaler equals
    the uninterrupted one's: a fresh scaler would have counted from 0 at step 3) and logs the same
    losses for steps 4-6 (deterministic algorithms)."""
    from ncn.tasks import train

    args = [
        "model=tiny",
        "trainer=smoke",
        "trainer.device=cuda",
        "trainer.precision=fp16",
        "trainer.deterministic=true",
        "trainer.probe_tokens=0",
        "tracking=none",
    ]
    cfg, ctx = task_config(args)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for run_dir in (whole, resumed):
        run_dir.mkdir()  # Hydra creates a run's folder before the task starts
    train.main(cfg, dataclasses.replace(ctx, run_dir=whole))
    saved = _scaler_state(whole, 3)
    assert saved["_growth_tracker"] > 0 or saved["scale"] < 2.0**16  # not a fresh scaler's state
    cfg, ctx = task_config([*args, f"trainer.resume={whole / 'checkpoints' / 'step_000003'}"])
    train.main(cfg, dataclasses.replace(ctx, run_dir=resumed))
    assert _scaler_state(resumed, 6) == _scaler_state(whole, 6)
    expected = {s: v for s, v in _metrics(whole, "train/loss").items() if s > 3}
    assert sorted(expected) == [4, 5, 6]
    assert _metrics(resumed, "train/loss") == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_gpu_check_script_quick_cpu_run_records_every_part(tmp_path: Path):
    """`bash scripts/gpu_check.sh OUT --quick` with the GPU hidden: every part runs and passes, the
    CUDA-only tests are reported skipped, the summary's figures are the ones in the JSON files, and
    OUT holds only its 7 flat files."""
    out = tmp_path / "out"
    # the script's overall budget ends before this test's: a slow part is reported timed out, not killed
    # with the test (each part gets a 15 s kill grace, the summary a few seconds)
    budget = int(time_left(margin=40))
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_BUDGET_S": str(budget)}
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out), "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=time_left(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        ["summary.txt", "env.log", "tests.log", "bench.log", "bench.json", "train.log", "train_metrics.json"]
    )
    assert all((out / f).is_file() for f in files)
    summary = (out / "summary.txt").read_text()
    table = dict(re.findall(r"^(env|tests|bench|train)\s+(\w+)\s+0\s", summary, re.M))
    assert table == {"env": "passed", "tests": "passed", "bench": "passed", "train": "passed"}
    assert re.search(r"^  SKIPPED\s+test_fp16_run_resumes_with_the_grad_scaler_state$", summary, re.M)
    assert re.search(r"^  PASSED\s+test_cached_decoding_matches_full_forward_under_bf16$", summary, re.M)
    assert "skipped (no CUDA GPU)" in summary
    bench = json.loads((out / "bench.json").read_text())
    ratio = float(re.search(r"full/none: (\d+\.\d{3})", summary).group(1))
    assert ratio == round(bench["ratios"]["full/none"], 3)
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["step"] == 6  # trainer=smoke
    val = float(re.search(r"val loss (\d+\.\d{4})", summary).group(1))
    assert val == round(metrics["val/loss"], 4)
