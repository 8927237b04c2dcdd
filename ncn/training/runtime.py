"""Process-level setup of a job: device, DDP process group (torchrun or SLURM), threads, autocast, signals.

`distributed_env()` says where this process sits in a multi-process job (torchrun's RANK/...
variables, else those of a SLURM step); `setup_device()` picks the device, joins the process
group (gloo on CPU, nccl on CUDA), sets CPU threads, deterministic algorithms and (CPU)
`keep_freed_memory()`; `default_device()` is where inference tasks run; `autocast()` applies a
trainer precision; `sigterm_as_interrupt()` turns SIGTERM (preemption, `kill`) into
KeyboardInterrupt. torch is imported on first use, so run.py can ask for its rank cheaply.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ncn.errors import NCNConfigError

if TYPE_CHECKING:
    import torch

# glibc mallopt(3) parameters (malloc.h) and the largest value it takes (a C int).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _INT_MAX = -1, -3, 2**31 - 1
AUTOCAST_DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}  # names of torch dtypes
# Rendezvous ports of SLURM jobs: MASTER_PORT_BASE + job id % MASTER_PORT_SPAN (jobs running at the
# same time have nearby ids, so they get distinct ports), the range submitit's helper uses too.
MASTER_PORT_BASE, MASTER_PORT_SPAN = 20000, 40000


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in a multi-process job.

    rank / world_size: global process index in [0, world_size); local_rank / local_world_size:
    the same on this node (local_rank picks the GPU). master_addr, master_port: the rendezvous
    of `torch.distributed`'s env:// init. source: "torchrun" (its variables were set), "slurm"
    (derived from a SLURM step's variables) or "single" (one process).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    source: str = "single"

    def torch_variables(self) -> dict[str, str]:
        """The variables torchrun would set for this process (env:// init reads them)."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": str(self.master_addr),
            "MASTER_PORT": str(self.master_port),
        }


def first_host(nodelist: str) -> str | None:
    """First host name of a SLURM host list (`SLURM_JOB_NODELIST`), e.g. "gpu[07-09,12],cpu1" -> "gpu07",
    "rack[1-2]-n[01-04]" -> "rack1-n01", "node3" -> "node3"; None for an empty list."""
    group = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())  # up to the first comma outside brackets
    if group is None:
        return None
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], group.group(0))


def tasks_on_node(tasks_per_node: str, node: int) -> int | None:
    """Tasks on node `node` from a SLURM count list like "2(x3),1" (nodes 0-2 run 2, node 3 runs 1); None if
    the list is empty or shorter than `node`."""
    counts: list[int] = []
    for part in filter(None, tasks_per_node.split(",")):
        found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if found is None:
            return None
        counts += [int(found.group(1))] * int(found.group(2) or 1)
    return counts[node] if node < len(counts) else None


def distributed_env(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """This process's place in a multi-process job, from `environ` (default: os.environ).

    torchrun (or any launcher that sets WORLD_SIZE): RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT as set. Else a SLURM step of several tasks (`srun`, or a
    `hydra/launcher=slurm` job with tasks_per_node * nodes > 1): rank SLURM_PROCID, local rank
    SLURM_LOCALID, world size SLURM_STEP_NUM_TASKS (set by srun only: a batch script that was
    given --ntasks=4 but runs python once is one process), tasks on this node from
    SLURM_STEP_TASKS_PER_NODE (or SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE) at SLURM_NODEID,
    rendezvous at the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) on port
    MASTER_PORT_BASE + SLURM_JOB_ID % MASTER_PORT_SPAN; MASTER_ADDR / MASTER_PORT, when set, win.
    Else one process.

    Raises:
        NCNConfigError: a SLURM step of several tasks with no node list and no MASTER_ADDR.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        port = env.get("MASTER_PORT")
        return DistributedEnv(
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=int(env["WORLD_SIZE"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(port) if port else None,
            source="torchrun",
        )
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks > 1 and "SLURM_PROCID" in env:
        node = int(env.get("SLURM_NODEID", "0"))
        per_node = (
            tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""), node)
            or int(env.get("SLURM_NTASKS_PER_NODE", "0"))
            or tasks
        )
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        if not addr:  # guessing 127.0.0.1 would hang every task on another node at the rendezvous
            raise NCNConfigError(
                f"SLURM_STEP_NUM_TASKS={tasks} asks for a job of {tasks} processes, but neither "
                "SLURM_STEP_NODELIST, SLURM_JOB_NODELIST nor MASTER_ADDR names the host of rank 0: start the "
                "tasks with srun (which sets the node list), or set MASTER_ADDR=<rank 0's host>"
            )
        port = env.get("MASTER_PORT") or MASTER_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % MASTER_PORT_SPAN
        return DistributedEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            world_size=tasks,
            local_world_size=per_node,
            master_addr=addr,
            master_port=int(port),
            source="slurm",
        )
    return DistributedEnv()


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
    """(device, rank, world_size) of this process; joins the process group of a multi-process job.

    The job is the one `distributed_env()` finds (torchrun, or a SLURM step of several tasks,
    whose rendezvous it exports as torchrun's variables first). device: auto | cpu | cuda (GPU
    local_rank modulo the visible GPUs, so one GPU bound per task works too). threads: torch CPU
    threads (None = $OMP_NUM_THREADS, else usable cores / processes on this node). deterministic:
    deterministic algorithms, so a resume on CPU is bitwise exact. On CPU also
    `keep_freed_memory()` (faster steps; RSS stays near its peak).

    Raises:
        NCNConfigError: cuda requested without a GPU; fp16 without CUDA.
    """
    import torch
    import torch.distributed as torch_dist

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
    dist = distributed_env()
    where = torch.device("cuda", dist.local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(where)
    else:
        keep_freed_memory()
    if dist.world_size > 1:
        if dist.source == "slurm":  # env:// init reads torchrun's variables
            os.environ.update(dist.torch_variables())
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    # OMP_NUM_THREADS: joblib sets it to cores // n_jobs in its workers, so parallel jobs don't oversubscribe
    torch.set_num_threads(
        threads
        or int(os.environ.get("OMP_NUM_THREADS") or 0)
        or max(1, len(os.sched_getaffinity(0)) // dist.local_world_size)
    )
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
    return where, dist.rank, dist.world_size


def default_device() -> torch.device:
    """CUDA when available, else CPU: where generate, analyze and eval run a checkpoint."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """`torch.autocast` to bf16/fp16 on `device` for trainer precision "bf16"/"fp16"; nothing for "fp32"."""
    import torch

    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype is not None else contextlib.nullcontext()


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
