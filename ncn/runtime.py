"""Process-level setup of a job: run name, device, DDP process group, threads, autocast, signals.

`setup_device()` picks the device, joins the torchrun process group (gloo on CPU, nccl on
CUDA), sets CPU threads, deterministic algorithms and (CPU) `keep_freed_memory()`;
`default_device()` is where inference tasks run; `autocast()` applies a trainer precision;
`sigterm_as_interrupt()` turns SIGTERM (preemption, `kill`) into KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as torch_dist

from ncn.errors import NCNConfigError

# glibc mallopt(3) parameters (malloc.h) and the largest value it takes (a C int).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _INT_MAX = -1, -3, 2**31 - 1
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def keep_freed_memory() -> bool:
    """Let glibc keep freed tensor memory for reuse instead of returning it to the OS (CPU speed).

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free, so each
    training step page-faults and zeroes its large tensors (logits and their gradient, attention
    maps) again: at model=paper_18m, batch 8 x 256 that is ~480k page faults and ~1 s of kernel
    time per step, a quarter of its CPU time. Raising the mmap and trim thresholds keeps those
    blocks in the heap, as jemalloc or tcmalloc would; resident memory then stays near its peak.
    Returns False (nothing changed) off glibc or when MALLOC_MMAP_THRESHOLD_ is set by the user.
    """
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (musl, macOS)
        glibc = False
    if not glibc or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _INT_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def setup_device(
    device: str, precision: str, threads: int | None, deterministic: bool
) -> tuple[torch.device, int, int]:
    """(device, rank, world_size) of this process; joins the torchrun process group when WORLD_SIZE > 1.

    device: auto | cpu | cuda. threads: torch CPU threads (None = $OMP_NUM_THREADS, else usable cores / processes on
    this node). deterministic: deterministic algorithms, so a resume on CPU is bitwise exact.
    On CPU also `keep_freed_memory()` (faster steps; RSS stays near its peak).

    Raises:
        NCNConfigError: cuda requested without a GPU; fp16 without CUDA.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise NCNConfigError(
            "trainer.device=cuda but no CUDA GPU is visible: use trainer.device=auto or trainer.device=cpu"
        )
    if precision == "fp16" and not use_cuda:
        raise NCNConfigError(
            "trainer.precision=fp16 needs a CUDA GPU (fp16 with a GradScaler): "
            "use trainer.precision=bf16 or fp32 on CPU"
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    where = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(where)
    else:
        keep_freed_memory()
    if world_size > 1:
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # OMP_NUM_THREADS: joblib sets it to cores // n_jobs in its workers, so parallel jobs don't oversubscribe
    torch.set_num_threads(
        threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, len(os.sched_getaffinity(0)) // local_procs)
    )
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
    return where, rank, world_size


def default_device() -> torch.device:
    """CUDA when available, else CPU: where generate, analyze and eval run a checkpoint."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """`torch.autocast` to bf16/fp16 on `device` for trainer precision "bf16"/"fp16"; nothing for "fp32"."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt(enabled: bool = True) -> Iterator[None]:
    """Within the block, SIGTERM (cluster preemption, `kill`) raises KeyboardInterrupt like Ctrl-C,
    so a run ends KILLED with its checkpoint named; the previous handler is restored afterwards.
    Signal handlers belong to the main thread: elsewhere (or with enabled=False) this does nothing."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
