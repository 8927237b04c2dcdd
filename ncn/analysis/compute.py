"""The quality–compute trade of gated skipping against random skipping (NCN paper §6.1, §8).

`compute_curve` evaluates a model on fixed validation batches densely and, for each threshold
τ of a grid, with every FFN, head and block whose gate is below τ skipped: the fraction of FFN
and of all forward FLOPs skipped (`ncn.model.compute.count_flops`), the val loss and its
difference to dense; and the control, the same units skipped at random at the same count per
layer and kind (`random_like`), its Δ loss as the mean and sample std of `draws` draws.
Gating is worth something only where it beats random skipping at equal compute.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ncn.errors import NCNConfigError, fixed
from ncn.model.compute import FlopCount, SkipPlan, count_flops, random_like
from ncn.model.gpt import ModulatedGPT
from ncn.model.signals import GATES

# The threshold whose row task=report shows (a sweep run with skip_grid containing it logs it).
REPORT_TAU = 0.5
# One row's fields, in table order (printed, CSV, metric names val/compute/t<τ>/<field>).
FIELDS = (
    "tau",
    "ffn_skipped",
    "total_skipped",
    "val_loss",
    "delta_loss",
    "random_delta_loss",
    "random_delta_std",
    "random_ffn_skipped",
)
_METRIC = re.compile(r"val/compute/t([^/]+)/([a-z_]+)")


@dataclass
class ComputeRow:
    """One threshold τ: skipped FLOP fractions in [0, 1], val losses in nats/token.

    random_delta_loss / random_delta_std: mean and sample std (0 for one draw) over the draws
    of the random control; random_ffn_skipped: the FFN fraction the random draws skipped (equal
    to ffn_skipped unless a layer skip and an FFN skip overlap differently).
    """

    tau: float
    ffn_skipped: float
    total_skipped: float
    val_loss: float
    delta_loss: float
    random_delta_loss: float
    random_delta_std: float
    random_ffn_skipped: float

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in FIELDS}


def has_gates(model: ModulatedGPT) -> bool:
    """Whether `model`'s controller produces a gate (ffn_gate, head_gate or layer_gate)."""
    return model.controller is not None and any(s in GATES for s in model.controller.signals)


def require_gates(model: ModulatedGPT, setting: str, owner: str) -> None:
    """Refuse a skipping setting (`setting`, e.g. "skip_threshold=0.3") for a model without gates, which would
    silently skip nothing (0 %): `owner` names the model, e.g. a checkpoint's folder (NCN paper §8).

    Raises:
        NCNConfigError: `model` has no ffn_gate, head_gate or layer_gate.
    """
    if has_gates(model):
        return
    targets = model.modulation_config.targets
    raise NCNConfigError(
        f"{setting} skips units whose gate is below the threshold, and {owner} has no gates (ncn.targets={targets}): "
        "use a checkpoint trained with ncn=sparse, ncn=head_gate or ncn=layer_gate (or any ncn option with the FFN "
        f"gate, ncn.activation=gate with the activation target, e.g. ncn=full), or drop {setting.split('=')[0]}"
    )


def _ce_sum(model: ModulatedGPT, x: torch.Tensor, y: torch.Tensor, skip: SkipPlan | None):
    out = model(x, skip=skip)
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
    return float(ce), out.skipped


@torch.no_grad()
def compute_curve(
    model: ModulatedGPT,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    thresholds: list[float],
    draws: int = 3,
    seed: int = 0,
) -> tuple[float, list[ComputeRow]]:
    """Dense val loss and one `ComputeRow` per threshold, on (x, y) int64 (B, T) `batches`, in fp32.

    The random control's draws use CPU generators seeded seed, seed + 1, ... per threshold, so a
    rerun gives the same numbers. Restores the module's train/eval mode.

    Raises:
        NCNConfigError: the model has no gate to skip by; draws < 1; a threshold outside (0, 1].
    """
    if not has_gates(model):
        raise NCNConfigError(
            f"skip_grid needs a model with gates: ncn.targets={model.modulation_config.targets} has none; "
            "train with ncn=sparse, ncn=head_gate, ncn=layer_gate or a gating activation target"
        )
    if draws < 1:
        raise NCNConfigError(f"skip_draws={draws} must be >= 1: e.g. skip_draws=3")
    for tau in thresholds:
        if not 0.0 < tau <= 1.0:
            raise NCNConfigError(
                f"skip_grid contains {tau}, outside (0, 1]: list gate thresholds such as [0.1,0.3,0.5]"
            )
    was_training = model.training
    model.eval()
    try:
        tokens = sum(y.numel() for _, y, *_ in batches)
        dense = sum(_ce_sum(model, x.to(device), y.to(device), None)[0] for x, y, *_ in batches) / tokens
        rows = []
        for tau in thresholds:
            gens = [torch.Generator().manual_seed(seed + d) for d in range(draws)]
            loss, random_loss = 0.0, [0.0] * draws
            flops = random_flops = FlopCount(0.0, 0.0, 0.0, 0.0)
            for x, y, *_ in batches:
                x, y = x.to(device), y.to(device)
                ce, masks = _ce_sum(model, x, y, SkipPlan(tau))
                loss += ce
                B, T = x.shape
                flops = flops + count_flops(model.config, model.modulation_config, B, T, masks)
                for d, gen in enumerate(gens):
                    if masks is None:
                        random_loss[d] += ce
                        continue
                    drawn = random_like(masks, gen)
                    random_loss[d] += _ce_sum(model, x, y, SkipPlan(masks=drawn))[0]
                    random_flops = random_flops + count_flops(model.config, model.modulation_config, B, T, drawn)
            deltas = [r / tokens - dense for r in random_loss]
            rows.append(
                ComputeRow(
                    tau,
                    flops.ffn_fraction,
                    flops.total_fraction,
                    loss / tokens,
                    loss / tokens - dense,
                    statistics.fmean(deltas),
                    statistics.stdev(deltas) if draws > 1 else 0.0,
                    random_flops.ffn_fraction,
                )
            )
    finally:
        model.train(was_training)
    return dense, rows


def metrics(rows: list[ComputeRow]) -> dict[str, float]:
    """The rows as metrics `val/compute/t<τ>/<field>` (τ printed with %g: t0.5)."""
    return {f"val/compute/t{r.tau:g}/{name}": getattr(r, name) for r in rows for name in FIELDS if name != "tau"}


def parse_metrics(logged: Mapping[str, float]) -> dict[float, dict[str, float]]:
    """The inverse of `metrics`: {τ: {field: value}} of every `val/compute/t<τ>/<field>` key in `logged`,
    τ ascending; other keys are ignored, and a τ keeps only the fields that were logged."""
    curve: dict[float, dict[str, float]] = {}
    for key, value in logged.items():
        match = _METRIC.fullmatch(key)
        if match and match[2] in FIELDS:
            curve.setdefault(float(match[1]), {})[match[2]] = value
    return dict(sorted(curve.items()))


def table(dense: float, rows: list[ComputeRow]) -> str:
    """The curve as a Markdown table, one row per τ (fractions in %, losses in nats/token)."""
    lines = [
        f"dense val loss {dense:.4f}",
        "| τ | FFN FLOPs skipped | forward FLOPs skipped | val loss | Δ loss gated | Δ loss random (mean ± std) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.delta_loss / r.random_delta_loss if r.random_delta_loss > 0 else math.nan
        lines.append(
            f"| {r.tau:g} | {100 * r.ffn_skipped:.1f} % | {100 * r.total_skipped:.1f} % | {r.val_loss:.4f} | "
            f"{fixed(r.delta_loss, '+.4f')} | {fixed(r.random_delta_loss, '+.4f')} ± {r.random_delta_std:.4f}"
            + ("" if math.isnan(ratio) else f" (gated/random {ratio:.2f})")
            + " |"
        )
    return "\n".join(lines)
