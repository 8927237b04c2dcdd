"""Data-pipeline speed on the embedded corpus: token cache built cold, then found warm.

    python benchmarks/tokenization.py [--num-proc 1,2] [--repeats 3]

Each run is a fresh process with a temporary cache dir through the real pipeline
(`ncn.data.loader.DataModule.prepare`, tiktoken via `datasets.map(num_proc=N)`): cold MB/s, and warm
"data ready" seconds (the target is in docs/benchmarks.md). Not named tokenize.py: that would shadow the stdlib module.
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
sys.path.insert(0, str(ROOT))


def child(cache_dir: str, num_proc: int | str) -> dict:
    """One pipeline run in this process: seconds per stage, token counts, text bytes."""
    t0 = time.perf_counter()
    from ncn.config import DataConfig
    from ncn.data.loader import DataModule  # imports are not part of "data ready"

    t1 = time.perf_counter()
    dm = DataModule(DataConfig(cache_dir=cache_dir, num_proc=num_proc, pin_memory=False))
    t2 = time.perf_counter()
    info = dm.prepare()
    t3 = time.perf_counter()
    next(iter(dm.train_loader(batch_size=8, block_size=256, seed=0)))
    t4 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "tokenizer_s": t2 - t1,
        "prepare_s": t3 - t2,
        "first_batch_s": t4 - t3,
        "ready_s": t4 - t1,
        "cache_hit": info.cache_hit,
        "text_bytes": info.meta["text_bytes"],
        "tokens": info.train_tokens + info.val_tokens,
    }


def raw_tiktoken() -> dict:
    """tiktoken encode_ordinary_batch over the cleaned plays, no datasets, no files: MB/s ceiling."""
    from ncn.data.sources import Shakespeare
    from ncn.data.tokenizer import gpt2_encoding

    with tempfile.TemporaryDirectory() as tmp:
        texts = Shakespeare().load(Path(tmp)).documents["text"]
    encoding = gpt2_encoding()
    n_bytes = sum(len(t.encode()) for t in texts)
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        ids = encoding.encode_ordinary_batch(texts)
        runs.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(runs),
        "text_bytes": n_bytes,
        "tokens": sum(map(len, ids)),
        "mb_per_s": n_bytes / 1e6 / statistics.median(runs),
    }


def run_child(cache_dir: Path, num_proc: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--cache-dir", str(cache_dir), "--num-proc", num_proc]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-proc", default="1,2", help="comma-separated data.num_proc values (int or auto)")
    parser.add_argument("--repeats", type=int, default=3, help="cold + warm runs per num_proc (median)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "outputs" / "benchmarks",
        help="folder of the JSON (default: outputs/benchmarks, git-ignored; benchmarks/results: recorded runs)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        num_proc = args.num_proc if args.num_proc == "auto" else int(args.num_proc)
        print(json.dumps(child(args.cache_dir, num_proc)))
        return

    load_before = os.getloadavg()
    raw = raw_tiktoken()
    settings = [p.strip() for p in args.num_proc.split(",") if p.strip()]
    runs: dict[str, dict[str, list[dict]]] = {p: {"cold": [], "warm": []} for p in settings}
    with tempfile.TemporaryDirectory(prefix="ncn-bench-cache-") as tmp:
        for repeat in range(args.repeats):
            for p in settings:  # alternate the settings so machine noise hits all of them
                cache = Path(tmp) / f"{p}-{repeat}"
                runs[p]["cold"].append(run_child(cache, p))
                runs[p]["warm"].append(run_child(cache, p))
    rows = []
    for p in settings:
        cold, warm = runs[p]["cold"], runs[p]["warm"]
        assert not any(r["cache_hit"] for r in cold) and all(r["cache_hit"] for r in warm)
        cold_prepare = statistics.median(r["prepare_s"] for r in cold)
        rows.append(
            {
                "num_proc": p,
                "text_mb": cold[0]["text_bytes"] / 1e6,
                "tokens": cold[0]["tokens"],
                "cold_prepare_s": cold_prepare,
                "cold_mb_per_s": cold[0]["text_bytes"] / 1e6 / cold_prepare,
                "cold_ready_s": statistics.median(r["ready_s"] for r in cold),
                "warm_ready_s": statistics.median(r["ready_s"] for r in warm),
                "warm_tokenizer_s": statistics.median(r["tokenizer_s"] for r in warm),
                "warm_prepare_s": statistics.median(r["prepare_s"] for r in warm),
                "runs": runs[p],
            }
        )

    print(
        f"tokenization benchmark: embedded Shakespeare corpus, {rows[0]['text_mb']:.2f} MB text, "
        f"{rows[0]['tokens']:,} tokens, {args.repeats} fresh processes per cell (median), "
        f"cpus {len(os.sched_getaffinity(0))}, load average {load_before[0]:.2f}"
    )
    print(f"raw tiktoken encode_ordinary_batch: {raw['mb_per_s']:.2f} MB/s ({raw['seconds']:.2f} s)")
    print(
        f"{'num_proc':>8} {'cold prepare s':>15} {'cold MB/s':>10} {'cold ready s':>13} "
        f"{'warm ready s':>13} {'(tokenizer s':>13} {'verify s)':>10}"
    )
    for r in rows:
        print(
            f"{r['num_proc']:>8} {r['cold_prepare_s']:>15.2f} {r['cold_mb_per_s']:>10.2f} {r['cold_ready_s']:>13.2f} "
            f"{r['warm_ready_s']:>13.3f} {r['warm_tokenizer_s']:>13.3f} {r['warm_prepare_s']:>10.3f}"
        )
    warm = max(r["warm_ready_s"] for r in rows)
    print(f"warm_ready_s: {warm:.3f} (slowest of the process counts)")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tokenization-shakespeare-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    report = {
        "benchmark": "tokenization",
        "args": {k: str(v) for k, v in vars(args).items()},
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "raw_tiktoken": raw,
        "results": rows,
        "warm_ready_s": warm,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
