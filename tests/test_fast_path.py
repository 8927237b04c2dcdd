"""Fast-path checks not covered by the model tests: CPU allocator setup, the MFU formula, the benchmark.

Compile equality, graph breaks and activation checkpointing are pinned in tests/test_model.py.
`python -m pytest -q tests/test_fast_path.py`.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ncn import ModelConfig, ModulatedGPT, ModulationConfig

from conftest import REPO, time_left

sys.path.insert(0, str(REPO / "benchmarks"))

import profile_step  # noqa: E402  (benchmarks/profile_step.py)

import train_step  # noqa: E402  (benchmarks/train_step.py)

# Minor page faults of each of 12 cycles that allocate and free 96 MB of tensors (24,576 pages).
FAULTS = """
import resource, sys, torch
from ncn.training.runtime import setup_device
if sys.argv[1] == "setup":
    setup_device("cpu", "fp32", 1, False)
counts = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b = torch.ones(2**24), torch.ones(2**23)
    del a, b
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*counts)
"""


def _faults(mode: str) -> int:
    """Fewest page faults of a cycle among the last 6 (steady state: reuse shows as a cycle with none;
    glibc still re-faults a block now and then, e.g. when a thread arena served it)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=time_left(),
    )
    return min(int(n) for n in out.stdout.split()[-6:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting")
def test_cpu_setup_reuses_freed_tensor_memory_instead_of_faulting_it_in_again():
    plain, tuned = _faults("plain"), _faults("setup")
    assert plain > 20_000  # glibc unmaps every freed block > 32 MB: each cycle faults its 24,576 pages in again
    assert tuned * 10 < plain


def test_mfu_flops_formula_matches_counted_matmul_flops():
    cfg = ModelConfig(vocab_size=512, block_size=64, d_model=64, n_layer=2, n_head=4)
    model = ModulatedGPT(cfg, ModulationConfig(targets=[]))
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    # the math kernel runs attention as bmm, which the counter sees (full T×T, as the formula)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x).loss.backward()
    counted = counter.get_total_flops() / x.numel()
    # 6·N + 12·L·d·T; N also counts biases and norm weights, which do no matmul (1 % here)
    assert train_step.flops_per_token(model, cfg.block_size) == pytest.approx(counted, rel=0.02)


@pytest.fixture
def restore_torch_settings():
    """The benchmark sets threads and deterministic algorithms process-wide, as the trainer does."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_train_step_benchmark_reports_median_ratio_as_last_line(tmp_path, capsys, restore_torch_settings):
    report = train_step.main(
        [
            "--model",
            "tiny",
            "--ncn",
            "none,full",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--batch-size",
            "2",
            "--block-size",
            "32",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    rows = {r["variant"]: r for r in report["results"]}
    expected = statistics.median(rows["full"]["step_times_s"]) / statistics.median(rows["none"]["step_times_s"])
    assert report["ratios"]["full/none"] == expected
    assert len(rows["full"]["step_times_s"]) == len(rows["none"]["step_times_s"]) == 3
    assert rows["full"]["tokens_per_s"] == pytest.approx(2 * 32 / rows["full"]["median_step_s"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio full/none: \d+\.\d{3}", last) and float(last.split()[-1]) == round(expected, 3)
    assert len(list(tmp_path.glob("train_step-tiny-*.json"))) == 1


class _ThreeOps(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.relu(x * y) + x


def test_profile_graph_ops_counts_the_captured_call_functions():
    x = torch.randn(2, 3)
    assert profile_step.graph_ops(_ThreeOps(), (x, x)) == (1, 3)  # mul, relu, add in one graph


def test_profile_step_reports_added_self_time_as_full_minus_none(tmp_path, capsys, restore_torch_settings):
    argv = ["--model", "tiny", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--block-size", "32"]
    report = profile_step.main([*argv, "--top", "3", "--out", str(tmp_path)])
    none, full = report["none"], report["full"]
    assert full["graph_ops"] > none["graph_ops"] and full["graphs"] == none["graphs"] == 1
    assert full["ops_per_step"] > none["ops_per_step"]
    added_ms = (sum(full["self_us"].values()) - sum(none["self_us"].values())) / 1000
    out = capsys.readouterr().out
    assert f"added by full over none: {added_ms:.2f} ms of op self time per step" in out
    assert len(re.findall(r"^ +[+-]\d+\.\d{3} ms  aten::", out, re.M)) == 3
    assert json.loads((tmp_path / "profile.json").read_text())["variants"]["full"]["graph_ops"] == full["graph_ops"]
