"""Where the controller's training-step overhead goes: a profile of none against full.

    python benchmarks/profile_step.py --model paper_18m --ncn none,full --steps 3
    python benchmarks/profile_step.py --model gpt2_124m --batch-size 16 --block-size 1024   # on CUDA

For each variant (conf/ncn option), the trainer's own step (`benchmarks/train_step.py`'s
`build_variant` and `timed_step`) is profiled with `torch.profiler` after warm-up, and the
forward pass is captured once by `torch.compile` with a counting backend. Printed per variant:

- graph ops: `call_function` nodes of the forward's captured FX graphs (and how many graphs,
  i.e. graph breaks + 1) — the work the compiler must fuse; a proxy for kernel count that can
  be tracked without a card;
- ops per step: device kernel launches per step on CUDA, ATen operator calls per step on CPU;
- profiled ms per step (inflated by the profiler; for timing use train_step.py).

Then the operators the controller adds: self time of `full` minus `none`, largest first
(`--top`). With `--out DIR` the figures are also written as JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import build_variant, timed_step  # noqa: E402


def graph_ops(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int]:
    """(captured FX graphs, call_function nodes in them) of one forward `model(x, y)`.

    Uses a `torch.compile` backend that counts and runs the captured graph eagerly.
    """
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(sum(node.op == "call_function" for node in gm.graph.nodes))
        return gm.forward

    torch.compiler.reset()
    with torch.no_grad():
        torch.compile(model, backend=counting_backend)(*batch)
    torch.compiler.reset()
    return len(graphs), sum(graphs)


def profiled(variant, batch, steps: int, cuda: bool) -> tuple[dict[str, float], float, float]:
    """Profile `steps` optimizer steps: ({op name: self microseconds per step}, ops per step, ms per step).

    On CUDA the ops are device kernels (self device time); on CPU, ATen operators (self CPU time).
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        wall = sum(timed_step(variant, batch)[0] for _ in range(steps))
    self_us: dict[str, float] = collections.defaultdict(float)
    calls = 0
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            time_us = event.device_time_total  # a kernel: its own duration on the card
        elif not cuda and event.name.startswith("aten::"):
            time_us = event.self_cpu_time_total
        else:
            continue
        self_us[event.name] += time_us / steps
        calls += 1
    return dict(self_us), calls / steps, 1000.0 * wall / steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="paper_18m", help="conf/model option")
    parser.add_argument("--ncn", default="none,full", help="comma-separated conf/ncn options; the first is the base")
    parser.add_argument("--trainer", default="default", help="conf/trainer option")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (compile happens here)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--compile", choices=["on", "off"], default=None, help="default: on for CUDA, off for CPU")
    parser.add_argument("--top", type=int, default=12, help="operators listed in the added-cost table")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="also write profile.json here")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.compile = args.compile or ("on" if cuda else "off")
    args.activation_checkpointing = False
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    names = [n.strip() for n in args.ncn.split(",") if n.strip()]
    shape = (args.batch_size, args.block_size)
    results: dict[str, dict] = {}
    for name in names:
        variant = build_variant(name, args, device)
        vocab = variant.model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        batch = tuple(torch.randint(vocab, shape, generator=gen).to(device) for _ in range(2))
        n_graphs, n_ops = graph_ops(variant.model, batch)
        for _ in range(args.warmup):
            timed_step(variant, batch)
        self_us, per_step, ms = profiled(variant, batch, args.steps, cuda)
        results[name] = {"graphs": n_graphs, "graph_ops": n_ops, "ops_per_step": per_step, "ms_per_step": ms}
        results[name]["self_us"] = self_us
        unit = "kernels" if cuda else "ATen calls"
        print(
            f"{name}: {n_ops} graph ops in {n_graphs} graph(s) per forward | {per_step:.0f} {unit} per step | "
            f"{ms:.1f} ms per profiled step"
        )
    base, *others = names
    for name in others:
        ours, theirs = results[name]["self_us"], results[base]["self_us"]
        added = sorted(((ours.get(k, 0.0) - theirs.get(k, 0.0), k) for k in ours.keys() | theirs.keys()), reverse=True)
        total = sum(ours.values()) - sum(theirs.values())
        print(f"\nadded by {name} over {base}: {total / 1000:.2f} ms of op self time per step; largest:")
        for delta_us, key in added[: args.top]:
            print(f"  {delta_us / 1000:+8.3f} ms  {key}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"model": args.model, "device": args.device, "batch": shape, "compile": args.compile}
        (args.out / "profile.json").write_text(json.dumps({"config": meta, "variants": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
