"""Conditional compute: which gated work inference skips, what it costs, and the compute penalty (NCN paper §6.1, §8).

The gates (`ffn_gate`, `head_gate`, `layer_gate`) scale an FFN, an attention head or a whole
block per token and layer. `SkipPlan` tells the model to skip, rather than scale, the units
whose gate is below a threshold τ (or given masks: the random control); `SkipMasks` holds the
decision. FLOPs are counted for matrix multiplications only, 2 per multiply-add (norms,
softmaxes, activations, embeddings and pooling sums are O(d) per token and left out). With
d = d_model, f = d_ff, hs = d / n_head, V = vocab_size and n = the number of keys a query sees
(its position + 1), per token and layer:

| work | FLOPs | skipped with |
|---|---|---|
| key and value projection | 4·d² | never (later tokens attend to them) |
| query projection | 2·d² | layer |
| attention scores and weighted values, per head | 4·hs·n | head, layer |
| output projection, per head's share | 2·hs·d | head (counted; see below), layer |
| FFN | 4·d·f | ffn, layer |

plus per token 2·d·V for the output head and the controller (salience v/out projections 4·d²,
salience scores 2·d·heads, MLP 2·d·h + 2·h·L·w). A skipped head's share of the output
projection is counted as skipped, the work a per-(token, head) kernel avoids; `Block` drops a
head from the attention kernel only where every query of the chunk skips it (batch-1
decoding: per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ncn.config import ModelConfig, ModulationConfig
from ncn.model.blocks import BlockSkip
from ncn.model.signals import GATES, signal_names

# The gate signal whose value decides each kind of unit.
UNIT_GATE = {"ffn": "ffn_gate", "head": "head_gate", "layer": "layer_gate"}


@dataclass
class SkipMasks:
    """Skipped units, True = skipped: ffn (B, T, L), head (B, T, L, n_head), layer (B, T, L); None = none skipped."""

    ffn: Tensor | None = None
    head: Tensor | None = None
    layer: Tensor | None = None

    def block(self, layer: int) -> BlockSkip:
        """The masks of block `layer`: ffn (B, T), head (B, T, n_head), layer (B, T)."""
        return BlockSkip(*(None if m is None else m[:, :, layer] for m in (self.ffn, self.head, self.layer)))


@dataclass
class SkipPlan:
    """How inference treats the gates.

    threshold τ in [0, 1]: a unit whose gate is < τ is skipped (0 = dense, the model's own
    path bitwise). masks: skip exactly these units instead (the random control); the gates
    still scale the units that run. gather: True computes only the units that run
    (gather–compute–scatter); False is the reference it must equal: the dense model with the
    skipped units' gates set to 0.
    """

    threshold: float = 0.0
    masks: SkipMasks | None = None
    gather: bool = True


def threshold_masks(signals: dict[str, Tensor], threshold: float) -> SkipMasks | None:
    """Units whose gate is below `threshold`; None when threshold <= 0 or no gate signal exists.

    signals: name -> (B, T, L) or (B, T, L, n_head), as `ModulatedGPT` returns them.
    """
    if threshold <= 0 or not any(name in signals for name in GATES):
        return None
    return SkipMasks(*(signals[g] < threshold if g in signals else None for g in UNIT_GATE.values()))


def present(masks: SkipMasks, signals: dict[str, Tensor]) -> SkipMasks:
    """`masks` without the kinds of unit whose gate `signals` lacks (an ungated unit always runs)."""
    return SkipMasks(*(getattr(masks, u) if g in signals else None for u, g in UNIT_GATE.items()))


def masked_signals(signals: dict[str, Tensor], masks: SkipMasks) -> dict[str, Tensor]:
    """`signals` with every skipped unit's gate set to 0 (the masked dense reference of skipping)."""
    out = dict(signals)
    for unit, gate in UNIT_GATE.items():
        mask = getattr(masks, unit)
        if mask is not None and gate in out:
            out[gate] = out[gate].masked_fill(mask, 0.0)
    return out


def random_like(masks: SkipMasks, generator: torch.Generator) -> SkipMasks:
    """The random control: per kind of unit and per layer, as many units skipped as in `masks`, chosen uniformly.

    A layer's units are all its (batch, token[, head]) entries; the count per layer equals
    `masks`' exactly, so the skip rate per layer and unit is the same. `generator` is a CPU
    generator; the result lives on the masks' device.
    """

    def draw(mask: Tensor | None) -> Tensor | None:
        if mask is None:
            return None
        per_layer = mask.movedim(2, 0).reshape(mask.shape[2], -1)  # (L, units)
        ranks = torch.rand(per_layer.shape, generator=generator).argsort(1).argsort(1)
        chosen = ranks < per_layer.sum(1, keepdim=True).cpu()
        moved = mask.movedim(2, 0).shape
        return chosen.view(moved).movedim(0, 2).to(mask.device)

    return SkipMasks(draw(masks.ffn), draw(masks.head), draw(masks.layer))


def _keys(T: int, start: int, device: torch.device | None = None) -> Tensor:
    """Keys seen by the queries at positions start .. start + T - 1: (T,) float64."""
    return torch.arange(start + 1, start + T + 1, dtype=torch.float64, device=device)


def unit_flops(model: ModelConfig, T: int, start: int = 0) -> dict[str, Tensor]:
    """FLOPs of one unit per query position, (T,) float64: ffn, head (one head), layer, block (dense).

    Positions start .. start + T - 1 (a query at position p sees p + 1 keys); see the module table.
    """
    d, f, hs = model.d_model, model.ffn_dim, model.d_model // model.n_head
    n = _keys(T, start)
    ffn = torch.full_like(n, 4.0 * d * f)
    return {
        "ffn": ffn,
        "head": 4.0 * hs * n + 2.0 * hs * d,
        "layer": 4.0 * d * d + 4.0 * d * n + ffn,
        "block": 8.0 * d * d + 4.0 * d * n + ffn,
    }


def per_token_flops(model: ModelConfig, modulation: ModulationConfig) -> float:
    """FLOPs per token outside the blocks: output head and controller (the module table)."""
    d, L = model.d_model, model.n_layer
    total = 2.0 * d * model.vocab_size
    if modulation.targets:
        names = signal_names(modulation.targets, modulation.activation)
        per_head = {"head_gate"} | ({"precision"} if modulation.per_head_precision else set())
        width = sum(model.n_head if s in per_head else 1 for s in names)
        h = modulation.hidden_dim
        total += 2.0 * d * h + 2.0 * h * L * width
        if modulation.pooling != "none":
            total += 4.0 * d * d + 2.0 * d * modulation.heads
    return total


@dataclass
class FlopCount:
    """Forward FLOPs of a batch: ffn / total dense, and how many of them a skip plan skipped."""

    ffn: float
    ffn_skipped: float
    total: float
    total_skipped: float

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[float, float, float, float]:
        return (self.ffn, self.ffn_skipped, self.total, self.total_skipped)

    @property
    def ffn_fraction(self) -> float:
        """Fraction of FFN FLOPs skipped, in [0, 1]."""
        return self.ffn_skipped / self.ffn if self.ffn else 0.0

    @property
    def total_fraction(self) -> float:
        """Fraction of all forward FLOPs skipped, in [0, 1]."""
        return self.total_skipped / self.total if self.total else 0.0


def count_flops(
    model: ModelConfig, modulation: ModulationConfig, B: int, T: int, masks: SkipMasks | None = None, start: int = 0
) -> FlopCount:
    """Forward FLOPs of B sequences of T tokens at positions start .. start + T - 1, and those `masks` skip.

    A token whose block is skipped skips its FFN and heads too (counted once, as the layer);
    otherwise its skipped FFN and heads count. Raises ValueError if a mask's shape is not
    (B, T, n_layer[, n_head]).
    """
    u = unit_flops(model, T, start)
    L = model.n_layer
    ffn_total = B * T * L * float(u["ffn"][0])
    total = L * B * float(u["block"].sum()) + B * T * per_token_flops(model, modulation)
    if masks is None:
        return FlopCount(ffn_total, 0.0, total, 0.0)
    for name, m in (("ffn", masks.ffn), ("head", masks.head), ("layer", masks.layer)):
        want = (B, T, L, model.n_head) if name == "head" else (B, T, L)
        if m is not None and tuple(m.shape) != want:
            raise ValueError(f"skip mask {name} has shape {tuple(m.shape)}, expected {want}")
    zeros = torch.zeros(B, T, L, dtype=torch.bool)
    layer = zeros if masks.layer is None else masks.layer.cpu()
    ffn = zeros if masks.ffn is None else masks.ffn.cpu()
    ffn_skipped = (ffn | layer).double().sum().item() * float(u["ffn"][0])
    skipped = (layer.double() * u["layer"].view(1, T, 1)).sum().item()
    skipped += ((ffn & ~layer).double().sum().item()) * float(u["ffn"][0])
    if masks.head is not None:
        heads = (masks.head.cpu() & ~layer.unsqueeze(-1)).double().sum(-1)  # (B, T, L): skipped heads
        skipped += (heads * u["head"].view(1, T, 1)).sum().item()
    return FlopCount(ffn_total, ffn_skipped, total, skipped)


def compute_cost(signals: dict[str, Tensor], model: ModelConfig) -> Tensor:
    """Expected compute of the gated units: the FLOP-weighted mean of the gates, 0-dim, in [0, 1].

    cost = Σ_units gate·FLOPs(unit) / Σ_units FLOPs(unit) over ffn_gate (B, T, L), head_gate
    (B, T, L, n_head) and layer_gate (B, T, L) (each unit's FLOPs from `unit_flops` at its
    position); 1 when every gate is 1. Returns 0 when `signals` has no gate.
    """
    num = den = None
    for unit, gate in UNIT_GATE.items():
        if gate not in signals:
            continue
        g = signals[gate]
        w = unit_flops(model, g.shape[1])[unit].to(device=g.device, dtype=g.dtype)  # (T,)
        w = w.view(1, -1, *([1] * (g.dim() - 2)))
        part_num, part_den = (g * w).sum(), w.sum() * (g.numel() / g.shape[1])
        num = part_num if num is None else num + part_num
        den = part_den if den is None else den + part_den
    if num is None:
        return torch.zeros(())
    return num / den
