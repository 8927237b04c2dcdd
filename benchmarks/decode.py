"""Decoding speed with and without the KV cache + salience state (NCN paper §5), and with skipping (§8).

    python benchmarks/decode.py [--model small] [--ncn full] [--contexts 64,256,1024]
    python benchmarks/decode.py --checkpoint PATH --skip-thresholds 0.3,0.5 [--contexts 256]

For each context length C the model (conf/model/<model>.yaml, built with block_size 1024 so
that C = 1024 fits) continues a random prompt of C - new_tokens tokens to exactly C tokens;
the per-token time is the median over repeats of each run's median decode step after the first
token (the first includes the prompt's prefill), alternating cached and uncached runs so machine noise hits
both. Prints a table and writes JSON to outputs/benchmarks/ (or --out).

With --skip-thresholds, a trained checkpoint's batch-1 cached decoding instead, the prompt being
the start of its validation text: per context and threshold τ (0 = dense first), the prefill
time of the prompt, the median time per decoded
token, and the FFN and forward FLOPs the decode steps skipped (counted, `ncn.model.compute`);
dense and skipping runs alternate. A fresh model's gates are ≈ 0.95, so it skips nothing.

Bad input (a checkpoint that cannot be used, a threshold outside [0, 1]) ends with one `error:` line
and exit status 2; warnings are one `warning: <message>` line each, as under run.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ncn import ModulatedGPT, cli  # noqa: E402
from ncn.analysis.compute import require_gates  # noqa: E402
from ncn.config import check_skip_threshold  # noqa: E402
from ncn.data.loader import DataModule  # noqa: E402
from ncn.errors import NCNConfigError, RunFailedError, exit_code, show_warning  # noqa: E402
from ncn.model.compute import FlopCount, SkipPlan, count_flops  # noqa: E402
from ncn.training.checkpoint import load, load_model, resolve  # noqa: E402

VARIANTS = {"cached": True, "uncached": False}
FLAT_MAX = 1.5  # target: cached per-token time at the longest context ≤ 1.5 × at the shortest
SPEEDUP_MIN = 5.0  # target: cached ≥ 5× faster than the full forward at the longest context


def build_model(model: str, ncn: str, block_size: int, device: torch.device) -> ModulatedGPT:
    """The conf/ model and ncn options, composed with Hydra, with block_size overridden."""
    overrides = [f"model={model}", f"ncn={ncn}", f"model.block_size={block_size}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = cli.typed(compose(config_name="config", overrides=overrides))[0]
    torch.manual_seed(0)
    return ModulatedGPT(cfg.model, cfg.ncn).to(device).eval()


def time_decode(
    model: ModulatedGPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool, temperature: float = 0.0
) -> tuple[float, float]:
    """(seconds to the first new token, median seconds per later token) for one continuation."""
    generator = torch.Generator(device=prompt.device).manual_seed(0)
    stamps = [time.perf_counter()]
    with torch.no_grad():
        for _ in model.stream(prompt, new_tokens, temperature, None, generator, use_cache=use_cache):
            if prompt.device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
    steps = [b - a for a, b in itertools.pairwise(stamps[1:])]
    return stamps[1] - stamps[0], statistics.median(steps)


def time_skipping(
    model: ModulatedGPT, prompt: torch.Tensor, new_tokens: int, tau: float
) -> tuple[float, float, FlopCount]:
    """(prefill seconds, median seconds per greedy cached token, FLOPs the decode steps skipped) at threshold tau."""
    skip = SkipPlan(tau) if tau > 0 else None
    sync = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    state = model.new_decode_state(1)
    flops = FlopCount(0.0, 0.0, 0.0, 0.0)
    steps = []
    with torch.no_grad():
        start = time.perf_counter()
        logits = model.decode(prompt, state, skip)
        sync()
        prefill = time.perf_counter() - start
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            pos = state.kv.pos
            start = time.perf_counter()
            logits = model.decode(nxt, state, skip)
            sync()
            steps.append(time.perf_counter() - start)
            flops = flops + count_flops(model.config, model.modulation_config, 1, 1, state.skipped, pos)
    return prefill, statistics.median(steps), flops


def skip_benchmark(args: argparse.Namespace, contexts: list[int], device: torch.device) -> None:
    """--skip-thresholds: dense vs skipping cached decoding of a checkpoint; prints a table, writes JSON."""
    thresholds = [0.0]
    for text in args.skip_thresholds.split(","):
        try:
            tau = float(text)
        except ValueError:
            shown = f"--skip-thresholds {args.skip_thresholds}"
            raise NCNConfigError(f"{shown}: {text!r} is not a number: list gate thresholds, e.g. 0.3,0.5") from None
        check_skip_threshold(tau, f"--skip-thresholds {args.skip_thresholds}: {text}")
        thresholds.append(tau)
    ckpt = load(resolve(args.checkpoint, Path.cwd(), key="--checkpoint"))
    model = load_model(ckpt, device)
    if max(contexts) > model.config.block_size:
        block = model.config.block_size
        print(
            f"error: --contexts {max(contexts)} exceeds the checkpoint's model.block_size={block}: "
            f"give contexts up to {block}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    require_gates(model, f"--skip-thresholds={args.skip_thresholds}", str(ckpt.path))
    load_before = os.getloadavg()
    results = []
    text = DataModule(ckpt.config.data).probe_tokens(max(contexts))  # the gates react to text, not random ids
    for context in contexts:
        prompt = torch.tensor([text[: context - args.new_tokens]], dtype=torch.long, device=device)
        for tau in thresholds:  # warm-up
            time_skipping(model, prompt, 2, tau)
        samples = {tau: [] for tau in thresholds}
        for repeat in range(args.repeats):
            for tau in thresholds if repeat % 2 == 0 else list(reversed(thresholds)):
                samples[tau].append(time_skipping(model, prompt, args.new_tokens, tau))
        for tau, runs in samples.items():
            per_token = statistics.median(r[1] for r in runs)
            results.append(
                {
                    "context": context,
                    "tau": tau,
                    "prefill_s": statistics.median(r[0] for r in runs),
                    "s_per_token": per_token,
                    "tokens_per_s": 1.0 / per_token,
                    "ffn_skipped": runs[0][2].ffn_fraction,
                    "total_skipped": runs[0][2].total_fraction,
                }
            )
    print(
        f"skipping decode benchmark: checkpoint {ckpt.path} device={device} threads={args.threads} "
        f"new_tokens={args.new_tokens} repeats={args.repeats} load average {load_before[0]:.2f}"
    )
    print(
        f"{'context':>8} {'tau':>5} {'prefill ms':>11} {'ms/tok':>8} {'tok/s':>8} "
        f"{'FFN skipped':>12} {'all skipped':>12}"
    )
    for r in results:
        print(
            f"{r['context']:>8} {r['tau']:>5g} {1e3 * r['prefill_s']:>11.1f} {1e3 * r['s_per_token']:>8.2f} "
            f"{r['tokens_per_s']:>8.1f} {100 * r['ffn_skipped']:>11.1f}% {100 * r['total_skipped']:>11.1f}%"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"decode-skip-{device.type}-{stamp}.json"
    report = {
        "benchmark": "decode-skip",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "checkpoint": str(ckpt.path),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help="conf/model option")
    parser.add_argument("--ncn", default="full", help="conf/ncn option")
    parser.add_argument("--contexts", default="64,256,1024", help="comma-separated context lengths")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens decoded per run (≥ 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant and context (median)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy (times the model); > 0 adds softmax sampling over the vocabulary to both variants",
    )
    # One sequence's decode step multiplies (1, d) rows: too little work to split over threads,
    # and a multi-threaded step stalls whenever another process holds a core.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see above)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "outputs" / "benchmarks",
        help="folder of the JSON (default: outputs/benchmarks, git-ignored; benchmarks/results: recorded runs)",
    )
    parser.add_argument("--checkpoint", help="with --skip-thresholds: the trained checkpoint (path, run name, latest)")
    parser.add_argument("--skip-thresholds", help="comma-separated gate thresholds τ: time skipping against dense")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: the first token includes the prefill")
    contexts = [int(c) for c in args.contexts.split(",")]
    if min(contexts) <= args.new_tokens:
        parser.error(f"every context must exceed --new-tokens={args.new_tokens}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.skip_thresholds:
        if not args.checkpoint:
            parser.error("--skip-thresholds needs --checkpoint: a fresh model's gates (0.95) skip nothing")
        skip_benchmark(args, contexts, device)
        return
    block_size = max(1024, max(contexts))
    model = build_model(args.model, args.ncn, block_size, device)
    vocab = model.config.vocab_size
    load_before = os.getloadavg()

    results = []
    for context in contexts:
        prompt = torch.randint(
            0, vocab, (1, context - args.new_tokens), generator=torch.Generator().manual_seed(context)
        )
        prompt = prompt.to(device)
        for use_cache in VARIANTS.values():  # warm-up: allocator, kernels, thread pool
            time_decode(model, prompt, 2, use_cache)
        samples = {name: [] for name in VARIANTS}
        for repeat in range(args.repeats):
            order = list(VARIANTS) if repeat % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                samples[name].append(time_decode(model, prompt, args.new_tokens, VARIANTS[name], args.temperature))
        row = {"context": context}
        for name, runs in samples.items():
            row[f"{name}_first_token_s"] = statistics.median(r[0] for r in runs)
            row[f"{name}_s_per_token"] = statistics.median(r[1] for r in runs)
            row[f"{name}_tokens_per_s"] = 1.0 / row[f"{name}_s_per_token"]
        row["speedup"] = row["uncached_s_per_token"] / row["cached_s_per_token"]
        results.append(row)

    print(
        f"decode benchmark: model={args.model} (block_size {block_size}) ncn={args.ncn} device={device} "
        f"threads={args.threads} new_tokens={args.new_tokens} repeats={args.repeats} temperature={args.temperature}"
    )
    print(
        f"{'context':>8} {'cached ms/tok':>14} {'cached tok/s':>13} {'uncached ms/tok':>16} "
        f"{'uncached tok/s':>15} {'speed-up':>9}"
    )
    for r in results:
        print(
            f"{r['context']:>8} {1e3 * r['cached_s_per_token']:>14.2f} {r['cached_tokens_per_s']:>13.1f} "
            f"{1e3 * r['uncached_s_per_token']:>16.2f} {r['uncached_tokens_per_s']:>15.1f} {r['speedup']:>8.1f}x"
        )
    flat = results[-1]["cached_s_per_token"] / results[0]["cached_s_per_token"]
    speedup = results[-1]["speedup"]
    checks = {
        f"flat_cached_{contexts[0]}_to_{contexts[-1]}": {
            "value": flat,
            "target": f"<= {FLAT_MAX}",
            "ok": flat <= FLAT_MAX,
        },
        f"speedup_at_{contexts[-1]}": {"value": speedup, "target": f">= {SPEEDUP_MIN}", "ok": speedup >= SPEEDUP_MIN},
    }
    for name, check in checks.items():
        print(f"{name}: {check['value']:.2f} (target {check['target']}) {'PASS' if check['ok'] else 'FAIL'}")

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"decode-{args.model}-{args.ncn}-{device.type}-{stamp}.json"
    report = {
        "benchmark": "decode",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "block_size": block_size,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
        "checks": checks,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    warnings.showwarning = show_warning  # one `warning: <message>` line, as under run.py
    try:
        main()
    except (NCNConfigError, RunFailedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exit_code(exc)) from None
