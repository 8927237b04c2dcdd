"""Modulation signals: transforms of the controller's raw outputs, neutral values, homeostasis.

Implements the table of NCN paper §3 (gain, precision, FFN gate), the Swish-β activation
shape of §7 (`activation_beta`), the head and layer gates of §8 (`head_gate`, `layer_gate`:
attention-head gating and dynamic depth) and the homeostatic penalty of §4. Everything here is a pure
function of tensors, so analysis code can reuse it without building a model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Canonical order of the signals in the controller output (one column block per signal).
SIGNALS = ("gain", "precision", "ffn_gate", "activation_beta", "head_gate", "layer_gate")
# Signals that gate a unit of compute (an FFN, a head, a whole block) which inference may skip.
GATES = ("ffn_gate", "head_gate", "layer_gate")

# Value of each signal that leaves the layer computing like a plain Transformer.
# activation_beta: x·sigmoid(1.702·x) is the classic sigmoid approximation of GELU, so a fresh
# swish_beta model computes (almost) the same FFN as the GELU baseline.
# The gates start at sigmoid(3) = 0.95, as the paper's FFN gate does (NCN paper §3 table).
NEUTRAL: dict[str, float] = {
    "gain": 1.0,
    "precision": 1.0,
    "ffn_gate": 0.95,
    "activation_beta": 1.702,
    "head_gate": 0.95,
    "layer_gate": 0.95,
}

# Open/closed ranges of the transforms, (low, high); precision's upper end is
# ModulationConfig.precision_max (4.0 by default, the value given here).
ACTIVATION_BETA_MAX = 4.0
RANGES: dict[str, tuple[float, float]] = {
    "gain": (0.0, 2.0),
    "precision": (0.01, 4.0),
    "ffn_gate": (0.0, 1.0),
    "activation_beta": (0.0, ACTIVATION_BETA_MAX),
    "head_gate": (0.0, 1.0),
    "layer_gate": (0.0, 1.0),
}

# Initial bias b2 of the controller's output column for each signal (NCN paper §3 table):
# with raw z = b2 every signal sits at (about) its neutral value, so training starts near
# the plain Transformer instead of at precision 0.70 / gate 0.50 (NCN paper §4.1.4; docs/method.md §3).
_p = NEUTRAL["activation_beta"] / ACTIVATION_BETA_MAX
NEUTRAL_BIAS: dict[str, float] = {
    "gain": 0.0,  # 2·sigmoid(0) = 1
    "precision": 0.525,  # softplus(0.525) + 0.01 = 0.9997
    "ffn_gate": 3.0,  # sigmoid(3) = 0.9526
    "activation_beta": math.log(_p / (1.0 - _p)),  # 4·sigmoid(-0.300) = 1.702
    "head_gate": 3.0,  # sigmoid(3) = 0.9526
    "layer_gate": 3.0,
}

# The exact_neutral parametrisation (ModulationConfig.parametrisation, docs/method.md §3): every
# transform maps raw z = 0 to exactly 1, and the controller starts with a zero output layer, so a
# fresh model computes bit for bit what its base computes (a pretrained base keeps its logits).
EXACT_RANGES: dict[str, tuple[float, float]] = {"gain": (0.0, 2.0), "precision": (0.0, 4.0), "ffn_gate": (0.0, 2.0)}
# The reference parametrisation's gain range (its other signals keep RANGES).
REFERENCE_GAIN_RANGE = (0.5, 1.5)

# Which signal each user-facing target produces (NCN paper §3, "vocabulary").
_TARGET_SIGNAL = {"temperature": "precision", "gain": "gain", "head_gate": "head_gate", "layer_gate": "layer_gate"}


def signal_names(targets: list[str], activation: str) -> list[str]:
    """Signals produced for `targets` (see ModulationConfig), in canonical `SIGNALS` order.

    "activation" maps to `ffn_gate` when activation == "gate" and to `activation_beta` when
    activation == "swish_beta".
    """
    wanted = {_TARGET_SIGNAL[t] for t in targets if t in _TARGET_SIGNAL}
    if "activation" in targets:
        wanted.add("ffn_gate" if activation == "gate" else "activation_beta")
    return [s for s in SIGNALS if s in wanted]


def transform(
    name: str, z: Tensor, precision_max: float = RANGES["precision"][1], parametrisation: str = "paper"
) -> Tensor:
    """Map raw controller outputs z (any shape) to signal values of the same shape.

    parametrisation "paper" (NCN paper §3 table, §7, §8): gain = 2·sigmoid(z) in (0, 2);
    precision = min(softplus(z) + 0.01, precision_max) in (0.01, precision_max]; ffn_gate,
    head_gate, layer_gate = sigmoid(z) in (0, 1) (float32 rounds sigmoid(z) to exactly 0 or 1
    for |z| > ~88 or z > ~17); activation_beta = 4·sigmoid(z) in (0, 4).
    parametrisation "exact_neutral" (docs/method.md §3): gain = 2·sigmoid(z) in (0, 2);
    precision = min(exp(z), precision_max) in (0, precision_max]; ffn_gate = 2·sigmoid(z) in
    (0, 2); each is exactly 1 at z = 0. The other signals have no such transform (KeyError).
    parametrisation "reference" (the reference implementation's `ncn.py`, docs/method.md §3):
    gain = sigmoid(z) + 0.5 in (0.5, 1.5), 1 at z = 0; every other signal as "paper".
    """
    if parametrisation == "exact_neutral":
        if name == "precision":
            return torch.exp(z).clamp(max=precision_max)
        if name in ("gain", "ffn_gate"):
            return 2.0 * torch.sigmoid(z)
        raise KeyError(f"signal {name!r} has no exact_neutral transform; it has: {', '.join(EXACT_RANGES)}")
    if name == "gain":
        return torch.sigmoid(z) + 0.5 if parametrisation == "reference" else 2.0 * torch.sigmoid(z)
    if name == "precision":
        return (F.softplus(z) + 0.01).clamp(max=precision_max)
    if name in GATES:
        return torch.sigmoid(z)
    if name == "activation_beta":
        return ACTIVATION_BETA_MAX * torch.sigmoid(z)
    raise KeyError(f"unknown signal {name!r}; known: {', '.join(SIGNALS)}")


# A hard gate lets its unit run where the gate is at least this, and switches it off below.
HARD_GATE_THRESHOLD = 0.5


def hard_gates(signals: dict[str, Tensor]) -> dict[str, Tensor]:
    """`signals` with each gate g replaced by 1[g >= 0.5] in the forward pass, with d/dg = 1 (straight through).

    Other signals pass unchanged. Same shapes; the values of the gates are exactly 0.0 or 1.0.
    """
    out = dict(signals)
    for name in GATES:
        if name in out:
            g = out[name]
            out[name] = (g >= HARD_GATE_THRESHOLD).to(g.dtype) + (g - g.detach())
    return out


def homeostatic_loss(signals: dict[str, Tensor], lam: float, gates: bool = True) -> Tensor:
    """Homeostatic penalty λ · Σ_s mean((s − 1)²) over the given signals (NCN paper §4).

    The mean runs over batch, time, layer (and head), so the penalty does not grow with
    sequence length or depth. `activation_beta` has neutral value 1.702, not 1, so it enters
    as β/1.702: the penalty pulls it toward the GELU-like neutral shape on the same scale as
    the other signals. gates=False leaves the `GATES` signals out (a compute cost is on and
    should be free to close them). Returns a 0-dim tensor; 0 for an empty dict.
    """
    total = None
    for name, value in signals.items():
        if not gates and name in GATES:
            continue
        scaled = value / NEUTRAL["activation_beta"] if name == "activation_beta" else value
        term = (scaled - 1.0).square().mean()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return lam * total


def mode_set_point(m: Tensor, span: float) -> Tensor:
    """The precision set point β* = span^m of operational mode m in [-1, 1] (same shape as m).

    span > 1: m = -1 gives 1/span (flatter attention, explore), m = 0 the neutral 1, m = 1 span
    (sharper, exploit). Source: NCN paper §6.1 (operational modes), this project's design.
    """
    return torch.pow(torch.as_tensor(span, dtype=m.dtype, device=m.device), m)


def mode_loss(precision: Tensor, m: Tensor, span: float, lam: float) -> Tensor:
    """Mode penalty lam · mean((β − span^m)²) of the precision β toward its mode set point.

    precision (B, T, L) or (B, T, L, H); m (B, T) the mode of each token, broadcast over layers
    (and heads). Replaces the precision's homeostatic term under control=mode; 0-dim tensor.
    """
    target = mode_set_point(m.to(precision.dtype), span)
    target = target.view(*target.shape, *([1] * (precision.dim() - 2)))
    return lam * (precision - target).square().mean()
