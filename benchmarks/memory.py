"""Peak memory of a training step: process RSS on CPU, allocator peak on CUDA, per NCN variant.

    python benchmarks/memory.py --model paper_18m --ncn none,full [--steps 2]

Each variant runs in a fresh Python process, so one variant's peak cannot hide another's:
it sets up the process, model, optimizer and step exactly as benchmarks/train_step.py does (same flags),
notes the resident set after the build, runs --steps training steps and reports the peak RSS
(`resource.getrusage`, kernel high-water mark) and, on CUDA, `torch.cuda.max_memory_allocated`
/ `max_memory_reserved`. Prints a table and writes JSON to outputs/benchmarks/ (or --out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20


def rss_bytes() -> int:
    """Current resident set size of this process (psutil if installed, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def child(argv: list[str], steps: int) -> dict:
    """Build one variant and run `steps` training steps in this process; memory figures in bytes."""
    import torch

    from ncn.training.runtime import setup_device

    import train_step  # benchmarks/ is sys.path[0] when this file runs as a script

    args = train_step.parse_args(argv)
    tcfg = train_step.compose_config(args, args.ncn, False).trainer
    device, _, _ = setup_device(args.device, args.precision, args.threads, tcfg.deterministic)
    variant = train_step.build_variant(args.ncn, args, device)
    vocab = variant.model.config.vocab_size
    batch = tuple(torch.randint(0, vocab, (args.batch_size, args.block_size)).to(device) for _ in range(2))
    state_bytes = sum(p.numel() * p.element_size() for p in variant.model.parameters())
    rss_built = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        train_step.timed_step(variant, batch)
    result = {
        "ncn": args.ncn,
        "params": variant.model.num_parameters().total,
        "param_bytes": state_bytes,
        "rss_after_build": rss_built,
        "rss_after_steps": rss_bytes(),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }  # Linux: KiB
    if device.type == "cuda":
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
        result["cuda_max_reserved"] = torch.cuda.max_memory_reserved(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other flags (--batch-size, --block-size, --precision, --compile, "
        "--activation-checkpointing, --device, --trainer ...) as train_step.py.",
    )
    parser.add_argument("--model", default="paper_18m", help="conf/model option")
    parser.add_argument("--ncn", default="none,full", help="comma-separated conf/ncn options")
    parser.add_argument("--steps", type=int, default=2, help="training steps per variant (the peak is over all)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "outputs" / "benchmarks",
        help="folder of the JSON (default: outputs/benchmarks, git-ignored; benchmarks/results: recorded runs)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, step_flags = parser.parse_known_args()
    if args.child:
        print(json.dumps(child(["--model", args.model, "--ncn", args.ncn, *step_flags], args.steps)))
        return

    rows = []
    for ncn in [n.strip() for n in args.ncn.split(",") if n.strip()]:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--model",
            args.model,
            "--ncn",
            ncn,
            "--steps",
            str(args.steps),
            *step_flags,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"variant {ncn} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    cuda = "cuda_max_allocated" in rows[0]
    print(
        f"memory benchmark: model={args.model} steps={args.steps} flags={' '.join(step_flags) or '(defaults)'} "
        f"-- one fresh process per variant"
    )
    header = f"{'ncn':<22} {'params MB':>10} {'RSS built MB':>13} {'peak RSS MB':>12} {'step peak - built':>18}"
    print(header + (f" {'CUDA alloc MB':>14} {'CUDA reserved MB':>17}" if cuda else ""))
    for r in rows:
        line = (
            f"{r['ncn']:<22} {r['param_bytes'] / MB:>10.1f} {r['rss_after_build'] / MB:>13.1f} "
            f"{r['peak_rss'] / MB:>12.1f} {(r['peak_rss'] - r['rss_after_build']) / MB:>18.1f}"
        )
        if cuda:
            line += f" {r['cuda_max_allocated'] / MB:>14.1f} {r['cuda_max_reserved'] / MB:>17.1f}"
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"memory-{args.model}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    report = {
        "benchmark": "memory",
        "args": {k: str(v) for k, v in vars(args).items()},
        "step_flags": step_flags,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_")},
        "results": rows,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
