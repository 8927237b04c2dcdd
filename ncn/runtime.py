"""Process-level setup of a job: Hydra run context, run name, device, DDP process group, threads.

`run_context()` says where the run writes (Hydra output dir) and where it was launched;
`setup_device()` picks the device, joins the torchrun process group (gloo on CPU, nccl on
CUDA), sets CPU threads, deterministic algorithms and (CPU) `keep_freed_memory()`. `build()`
instantiates a config node.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from ncn.errors import NCNConfigError

# Group options whose default is not worth repeating in every run name.
NAME_DEFAULTS = {"data": "shakespeare", "optim": "adamw"}
# ncn options that build the plain Transformer (no targets); the run name says so.
BASELINE_OPTIONS = ("none", "none_iso")
# glibc mallopt(3) parameters (malloc.h) and the largest value it takes (a C int).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _INT_MAX = -1, -3, 2**31 - 1


def build(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node, **kwargs)`, re-raising our one-line NCNConfigError unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, NCNConfigError):
            raise exc.__cause__ from None
        raise


def default_run_name(choices: Mapping[str, str], seed: int) -> str:
    """`<model>-<ncn>[-<data>][-<optim>]-s<seed>`; data/optim only when not the default option."""
    parts = [choices.get("model", "model"), choices.get("ncn", "ncn")]
    parts += [choices[g] for g, default in NAME_DEFAULTS.items() if choices.get(g, default) != default]
    return "-".join([*parts, f"s{seed}"])


def check_baseline_choice(choices: Mapping[str, str], targets: list[str]) -> None:
    """Refuse empty `ncn.targets` under an NCN option, so the run name never claims a controller it lacks.

    Raises:
        NCNConfigError: targets == [] while the ncn option is not a baseline option (none, none_iso).
    """
    option = choices.get("ncn")
    if not targets and option is not None and option not in BASELINE_OPTIONS:
        raise NCNConfigError(
            f"ncn.targets=[] builds the plain Transformer: use ncn=none (the baseline option) "
            f"instead of emptying ncn={option}'s targets"
        )


def run_context() -> tuple[Path, Path, dict[str, str]]:
    """(run dir, launch dir, Hydra group choices); outside a Hydra app: (cwd, cwd, {})."""
    if not HydraConfig.initialized():
        return Path.cwd(), Path.cwd(), {}
    hydra_cfg = HydraConfig.get()
    choices = {k: str(v) for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/")}
    return Path(hydra_cfg.runtime.output_dir), Path(hydra_cfg.runtime.cwd), choices


def git_commit(directory: Path) -> str | None:
    """HEAD commit of the git checkout containing `directory`, or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


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


def setup_device(device: str, precision: str, threads: int | None, deterministic: bool) -> tuple[torch.device, int, int]:
    """(device, rank, world_size) of this process; joins the torchrun process group when WORLD_SIZE > 1.

    device: auto | cpu | cuda. threads: torch CPU threads (None = $OMP_NUM_THREADS, else usable cores / processes on
    this node). deterministic: deterministic algorithms, so a resume on CPU is bitwise exact.
    On CPU also `keep_freed_memory()` (faster steps; RSS stays near its peak).

    Raises:
        NCNConfigError: cuda requested without a GPU; fp16 without CUDA.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise NCNConfigError("trainer.device=cuda but no CUDA GPU is visible: use trainer.device=auto or trainer.device=cpu")
    if precision == "fp16" and not use_cuda:
        raise NCNConfigError(
            "trainer.precision=fp16 needs a CUDA GPU (fp16 with a GradScaler): use trainer.precision=bf16 or fp32 on CPU"
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
    torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS") or 0)
                          or max(1, len(os.sched_getaffinity(0)) // local_procs))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
    return where, rank, world_size
