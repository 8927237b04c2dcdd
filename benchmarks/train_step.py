"""Training-step speed: forward + backward + AdamW step, NCN variants against the baseline.

    python benchmarks/train_step.py --model paper_18m --ncn none,full --steps 5

Variants (conf/ncn options; `--compile both` adds `<option>+compile`) run the trainer's own
process setup (`ncn.training.runtime.setup_device`) and step (`ncn.training.loop.optimizer_step`) on random tokens, one
step each in turn; medians after warm-up. CUDA: bf16 + compile and MFU. Writes JSON to
outputs/benchmarks/ (or --out); the last line is `ratio full/none: <x.xxx>` when both ran.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ncn import ModulatedGPT, cli  # noqa: E402
from ncn.config import RunConfig, TrainerConfig  # noqa: E402
from ncn.tracking import NullTracker  # noqa: E402
from ncn.training.loop import Job, optimizer_step  # noqa: E402
from ncn.training.optim import build_optimizer, build_scheduler, freeze_base  # noqa: E402
from ncn.training.runtime import setup_device  # noqa: E402

# Dense bf16 tensor-core peak, TFLOP/s (NVIDIA data sheets, SXM parts); first substring match wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
COMPILED = "+compile"


@dataclass
class Variant:
    """One model under test and everything its training step needs."""

    name: str
    model: ModulatedGPT
    job: Job
    cfg: TrainerConfig
    steps: int = 0


def compose_config(args: argparse.Namespace, ncn: str, compiled: bool) -> RunConfig:
    """The real conf/ config of one variant, composed and typed as run.py does (`ncn.cli.typed`)."""
    overrides = [
        f"model={args.model}",
        f"ncn={ncn}",
        f"trainer={args.trainer}",
        "tracking=none",
        f"model.block_size={args.block_size}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.precision={args.precision}",
        f"trainer.compile={compiled}",
        f"trainer.activation_checkpointing={args.activation_checkpointing}",
        *args.override,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return cli.typed(compose(config_name="config", overrides=overrides))[0]


def build_variant(name: str, args: argparse.Namespace, device: torch.device) -> Variant:
    """Model (seed 0), AdamW + schedule + scaler from conf/optim, wrapped as the train task does
    (`--override trainer.freeze=base`: the controller alone trains).

    name: a conf/ncn option, optionally suffixed "+compile".
    """
    ncn, compiled = name.removesuffix(COMPILED), name.endswith(COMPILED) or args.compile == "on"
    cfg = compose_config(args, ncn, compiled)
    torch.manual_seed(0)
    model = ModulatedGPT(cfg.model, cfg.ncn)
    if cfg.trainer.freeze == "base":
        freeze_base(model)
    model = model.to(device)
    model.activation_checkpointing = cfg.trainer.activation_checkpointing
    optimizer = build_optimizer(model, cfg.optim)
    job = Job(
        model=model,
        train_model=torch.compile(model) if cfg.trainer.compile else model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.optim, total_steps=10**9),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.trainer.precision == "fp16"),
        loader=None,
        val_batches=[],
        tracker=NullTracker(),
        device=device,
        checkpoints=ROOT,
        config={},
        tokens_per_step=args.batch_size * args.block_size,
    )
    return Variant(name, model, job, cfg.trainer)


def flops_per_token(model: ModulatedGPT, block_size: int) -> float:
    """Training FLOPs per token: 6·N + 12·n_layer·d_model·T (PaLM, Chowdhery et al. 2022, app. B).

    N: parameters that take part in a matmul per token = all parameters (tied head counted
    once, controller included) minus the position embedding; T = block_size. The causal
    attention term counts the full T×T score matrix, as nanoGPT's MFU estimate does.
    """
    c = model.config
    n = model.num_parameters().total - model.pos_emb.weight.numel()
    return 6.0 * n + 12.0 * c.n_layer * c.d_model * block_size


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    """--peak-tflops, else the table entry for this CUDA card, else None (MFU not reported)."""
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def machine(device: torch.device) -> str:
    """CUDA device name, or `lscpu`'s model name and the usable cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return f"{names[0] if names else platform.processor()}, {len(os.sched_getaffinity(0))} cores"


def timed_step(v: Variant, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one optimizer step of the trainer (data on the device).

    CPU seconds (all threads) are less sensitive to other processes than wall time on a busy machine.
    """
    if v.job.device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    result = optimizer_step(v.job, itertools.repeat(batch), v.cfg, v.steps)
    v.steps += 1
    if v.job.device.type == "cuda":
        torch.cuda.synchronize()
    if result is None:
        raise RuntimeError(f"variant {v.name}: non-finite loss in the benchmark step")
    return time.perf_counter() - start, time.process_time() - cpu


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="paper_18m", help="conf/model option")
    parser.add_argument("--ncn", default="none,full", help="comma-separated conf/ncn options")
    parser.add_argument("--trainer", default="default", help="conf/trainer option (gpu: bf16, compile, fused AdamW)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (median)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per variant (default 2, 3 with compile)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256, help="sequence length (overrides model.block_size)")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="on",
        choices=["on", "off", "both"],
        default=None,
        help="torch.compile: on, off, or both (each variant eager and compiled); default on for CUDA, off for CPU",
    )
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: as the trainer, usable cores or $OMP_NUM_THREADS)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help=f"peak bf16 TFLOP/s for MFU (default for CUDA cards: {PEAK_BF16_TFLOPS})",
    )
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "outputs" / "benchmarks",
        help="folder of the JSON (default: outputs/benchmarks, git-ignored; benchmarks/results: recorded runs)",
    )
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.compile = args.compile or ("on" if cuda else "off")
    args.warmup = (3 if args.compile != "off" else 2) if args.warmup is None else args.warmup
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def variant_names(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.ncn.split(",") if n.strip()]
    return [m for n in names for m in (n, n + COMPILED)] if args.compile == "both" else names


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the JSON report (also written to --out)."""
    args = parse_args(argv)
    names = variant_names(args)
    tcfg = compose_config(args, names[0].removesuffix(COMPILED), False).trainer
    device, _, _ = setup_device(args.device, args.precision, args.threads, tcfg.deterministic)
    variants = [build_variant(n, args, device) for n in names]
    gen = torch.Generator().manual_seed(0)
    vocab = variants[0].model.config.vocab_size
    batch = tuple(
        torch.randint(0, vocab, (args.batch_size, args.block_size), generator=gen).to(device) for _ in range(2)
    )
    load_before = os.getloadavg()
    for v in variants:
        for _ in range(args.warmup):  # allocator, thread pool, compilation
            timed_step(v, batch)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v.name: [] for v in variants}
    for step in range(args.steps):
        k = step % len(variants)
        for v in variants[k:] + variants[:k]:  # rotate who goes first
            wall, cpu = timed_step(v, batch)
            times[v.name].append(wall)
            cpu_times[v.name].append(cpu)

    tokens = args.batch_size * args.block_size
    peak = peak_tflops(device, args.peak_tflops)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for v in variants:
        count = v.model.num_parameters()
        fpt = flops_per_token(v.model, args.block_size)
        med = median[v.name]
        rows.append(
            {
                "variant": v.name,
                "params": count.total,
                "controller_share_pct": count.controller_share_pct,
                "median_step_s": med,
                "min_step_s": min(times[v.name]),
                "tokens_per_s": tokens / med,
                "median_cpu_s": statistics.median(cpu_times[v.name]),
                "ratio_vs_first": med / median[names[0]],
                "flops_per_token": fpt,
                "tflops": fpt * tokens / med / 1e12,
                "mfu": fpt * tokens / med / (peak * 1e12) if peak else None,
                "step_times_s": times[v.name],
                "cpu_times_s": cpu_times[v.name],
            }
        )
    ratios = {f"{n}{COMPILED}/{n}": median[n + COMPILED] / median[n] for n in names if n + COMPILED in median}
    if "full" in median and "none" in median:
        ratios["full/none"] = median["full"] / median["none"]
    where = machine(device)
    load_after = os.getloadavg()

    print(
        f"train_step benchmark: model={args.model} trainer={args.trainer} batch {args.batch_size} x "
        f"{args.block_size} precision={args.precision} compile={args.compile} device={device} "
        f"threads={torch.get_num_threads()} steps={args.steps} (+{args.warmup} warm-up)"
    )
    print(
        f"machine: {where}; load average {load_before[0]:.2f} -> {load_after[0]:.2f}; "
        f"{dt.datetime.now():%Y-%m-%d %H:%M}; torch {torch.__version__}"
    )
    fused = bool(variants[0].job.optimizer.defaults.get("fused"))
    print(f"optimizer: AdamW fused={fused} (optim.fused=null: fused on CUDA); deterministic={tcfg.deterministic}")
    print(
        "FLOPs/token = 6*N + 12*n_layer*d_model*T (N: params without position embedding); "
        f"MFU = FLOPs/token * tokens/s / peak ({f'{peak:g} TFLOP/s' if peak else 'n/a: pass --peak-tflops'})"
    )
    print(
        f"{'variant':<24} {'params':>11} {'ctrl %':>7} {'step ms':>9} {'min ms':>9} {'CPU ms':>9} "
        f"{'tokens/s':>10} {'vs ' + names[0]:>14} {'TFLOP/s':>8} {'MFU':>7}"
    )
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"{r['variant']:<24} {r['params']:>11,} {r['controller_share_pct']:>7.2f} "
            f"{1e3 * r['median_step_s']:>9.1f} {1e3 * r['min_step_s']:>9.1f} {1e3 * r['median_cpu_s']:>9.1f} "
            f"{r['tokens_per_s']:>10.1f} "
            f"{r['ratio_vs_first']:>13.3f}x {r['tflops']:>8.3f} {mfu:>7}"
        )

    report = {
        "benchmark": "train_step",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": where,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_")},
        "peak_tflops": peak,
        "fused_adamw": fused,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "results": rows,
        "ratios": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_step-{args.model}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    for name, value in ratios.items():  # full/none last: it is the headline figure
        print(f"ratio {name}: {value:.3f}")
    return report


if __name__ == "__main__":
    main()
