"""Command-line start-up time: `run.py --help`, `--cfg job`, a rejected override and a warm `task=prepare`.

    python benchmarks/startup.py --repeats 5

Each command runs `--repeats` times as a fresh process (the commands interleaved, so machine
noise hits each alike) in a scratch launch directory; the median wall time is compared with
`python -c "import torch"`, the floor of any command that trains. The token cache of
`task=prepare` is built once before timing (warm: tokenizer load + cache verification only).
Writes JSON to outputs/benchmarks/ (or --out); the last line is `ratio help/torch: <x.xx>`.
Targets: --help, --cfg job and a rejected override <= 0.5x the torch import; warm prepare <= 3 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = str(ROOT / "run.py")

# name -> (argv after the interpreter, expected exit status)
COMMANDS: dict[str, tuple[list[str], int]] = {
    "torch": (["-c", "import torch"], 0),
    "help": ([RUN, "--help"], 0),
    "cfg_job": ([RUN, "--cfg", "job"], 0),
    "rejected": ([RUN, "seed=abc"], 2),
    "prepare_warm": ([RUN, "task=prepare"], 0),
}
LABELS = {
    "torch": 'python -c "import torch"',
    "help": "python run.py --help",
    "cfg_job": "python run.py --cfg job",
    "rejected": "python run.py seed=abc (rejected)",
    "prepare_warm": "python run.py task=prepare (warm cache)",
}
RATIO_TARGET = 0.5  # help, cfg_job, rejected: at most this fraction of the torch import
PREPARE_TARGET_S = 3.0


def cpu_model() -> str:
    """`lscpu`'s model name and the usable cores."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return f"{names[0] if names else platform.processor()}, {len(os.sched_getaffinity(0))} cores"


def timed(name: str, cwd: Path, env: dict[str, str]) -> float:
    """Wall seconds of one fresh process of command `name`.

    Raises:
        RuntimeError: the command ended with another exit status than expected.
    """
    argv, expected = COMMANDS[name]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if done.returncode != expected:
        raise RuntimeError(f"{LABELS[name]}: exit status {done.returncode}, expected {expected}: {done.stderr[-500:]}")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per command (median)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "outputs" / "benchmarks",
        help="folder of the JSON (default: outputs/benchmarks, git-ignored; benchmarks/results: recorded runs)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the JSON report (also written to --out)."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ncn-startup-") as scratch:
        launch = Path(scratch)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("NCN_CACHE_DIR", str(launch / "cache"))  # an existing cache is reused
        timed("prepare_warm", launch, env)  # builds the token cache when it is not there yet
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {name: [] for name in COMMANDS}
        for _ in range(args.repeats):
            for name in COMMANDS:
                times[name].append(timed(name, launch, env))
        load_after = os.getloadavg()

    median = {name: statistics.median(ts) for name, ts in times.items()}
    torch_s = median["torch"]
    rows = []
    for name in COMMANDS:
        ratio = median[name] / torch_s
        if name in ("help", "cfg_job", "rejected"):
            target, met = f"<= {RATIO_TARGET}x torch", ratio <= RATIO_TARGET
        elif name == "prepare_warm":
            target, met = f"<= {PREPARE_TARGET_S:g} s", median[name] <= PREPARE_TARGET_S
        else:
            target, met = "", None
        rows.append(
            {
                "command": LABELS[name],
                "name": name,
                "median_s": median[name],
                "min_s": min(times[name]),
                "ratio_vs_torch": ratio,
                "target": target,
                "met": met,
                "times_s": times[name],
            }
        )
    where = cpu_model()
    print(
        f"startup benchmark: median of {args.repeats} fresh processes; machine: {where}; "
        f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}; {dt.datetime.now():%Y-%m-%d %H:%M}; "
        f"python {platform.python_version()}"
    )
    print(f"{'command':<42} {'median s':>9} {'min s':>7} {'x torch':>8}  target")
    for r in rows:
        verdict = "" if r["met"] is None else (" met" if r["met"] else " MISSED")
        print(
            f"{r['command']:<42} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['ratio_vs_torch']:>8.2f}  "
            f"{r['target']}{verdict}"
        )
    report = {
        "benchmark": "startup",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": where,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"startup-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    print(f"ratio help/torch: {median['help'] / torch_s:.2f}")
    return report


if __name__ == "__main__":
    main()
