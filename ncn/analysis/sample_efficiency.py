"""Sample efficiency of training runs: the reference's SEI, a saturating power law, tokens-to-target.

- `sei`: the reference implementation's Sample Efficiency Index, exactly as its
  `sample_efficiency_analyze.py` computes it (docs/method.md §9): |slope| of a log–log line
  through training loss vs tokens over the "active phase", which ends where the EWM-smoothed
  loss's velocity has decayed to 5 % (p = 0.95) or 1 % (p = 0.99) of its peak. No baseline, no
  uncertainty: kept to compare with the reference's published figures, not to conclude.
- `fit_power_law`: L(D) = E + A·D^(−α) by least squares (scipy), with its residual.
- `tokens_to_target` and `efficiency_ratio`: the tokens a variant needs to reach its baseline's
  final val loss, and baseline tokens / variant tokens (> 1: the variant learns faster), with a
  95 % t-interval over seeds, paired by seed (`ncn.analysis.statistics`).
- `parse_reference_log`: the reference's text training log (`… Step: N … Loss: x …` lines and
  its logged command-line arguments).

Pure functions of numbers and text; numpy, pandas and scipy are the reference's own tools.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ncn.analysis.statistics import mean_interval

EWM_SPAN = 50  # the reference smooths the logged loss with pandas' ewm(span=50, adjust=False)
VELOCITY_WINDOW = 50  # ... and its velocity with a centred rolling mean of 50 log rows
FIT_SKIP = 0.05  # the log–log line skips the first 5 % of the active phase's rows
MIN_ACTIVE_ROWS = 10  # the reference fits only an active phase of more than 10 rows (SEI 0.0 otherwise)
THRESHOLDS = {0.95: "grammar", 0.99: "intellectual"}  # the reference's two modes and its names for them

# The reference's defaults when its log carries no (readable) arguments: 16 × 4 × 1 × 512 tokens per step.
REFERENCE_DEFAULTS = {"batch_size": 16, "gradient_accumulation_steps": 4, "world_size": 1, "block_size": 512}
STEP_LOSS = re.compile(r"Step:\s*(\d+).*?Loss:\s*([0-9]+\.[0-9]+)", re.IGNORECASE)
ARGUMENTS = re.compile(r"Command Line Arguments:\s*\n.*?({.*?})", re.DOTALL | re.MULTILINE)
LOG_PREFIX = re.compile(r"^\d{4}-\d{2}-\d{2}.*?\[INFO\] ", re.MULTILINE)


@dataclass(frozen=True)
class SEIResult:
    """The reference's SEI at one convergence threshold.

    threshold: p (0.95 or 0.99); the active phase ends where the smoothed velocity rises above
    (1 − p) × its most negative value. sei: |slope| of ln(loss) vs ln(tokens) over the active
    phase minus its first 5 % of rows (dimensionless, ≥ 0; 0.0 when the phase has ≤ 10 rows, as
    the reference). converged: False when the velocity never decays that far (the active phase
    is then the whole log). settling_row: index of the log row that ends the active phase;
    settling_step, settling_tokens: its optimizer step and tokens. slope, intercept: the fitted
    line ln L = intercept + slope · ln D (NaN when not fitted).
    """

    threshold: float
    sei: float
    converged: bool
    settling_row: int
    settling_step: int
    settling_tokens: float
    slope: float
    intercept: float


def smoothed_velocity(losses: Sequence[float]) -> np.ndarray:
    """The reference's smoothed loss velocity per log row, shape (N,), in loss units per log row.

    EWM of the losses (span 50, no bias adjustment: s₀ = x₀, sᵢ = (1 − a)·sᵢ₋₁ + a·xᵢ with
    a = 2/51), its gradient along the rows (`numpy.gradient`: central differences, one-sided at
    the ends), then a centred rolling mean over 50 rows (pandas, shorter windows at the ends).
    """
    import pandas as pd

    smooth = pd.Series(np.asarray(losses, dtype=np.float64)).ewm(span=EWM_SPAN, adjust=False).mean()
    velocity = pd.Series(np.gradient(smooth.to_numpy()) if len(smooth) > 1 else np.zeros(len(smooth)))
    return velocity.rolling(window=VELOCITY_WINDOW, center=True, min_periods=1).mean().to_numpy()


def sei(steps: Sequence[int], losses: Sequence[float], tokens_per_step: float, threshold: float = 0.95) -> SEIResult:
    """The reference's Sample Efficiency Index of a training log (its `sample_efficiency_analyze.py`).

    steps: optimizer step of each log row (ascending); losses: training loss at that row
    (nats/token); tokens_per_step: tokens per optimizer step (the reference: batch × gradient
    accumulation × world size × block size); tokens of a row = step × tokens_per_step.
    threshold: p in (0, 1); the reference uses 0.95 ("grammar") and 0.99 ("intellectual").

    Raises:
        ValueError: no rows, steps and losses of different lengths, or p outside (0, 1).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold}: choose a convergence threshold in (0, 1), e.g. 0.95 or 0.99")
    if len(steps) != len(losses) or not len(steps):
        raise ValueError(f"{len(steps)} steps and {len(losses)} losses: pass one loss per step, at least one row")
    velocity = smoothed_velocity(losses)
    peak = int(np.argmin(velocity))  # the steepest descent; first occurrence, as pandas' idxmin
    after = np.flatnonzero((np.arange(len(velocity)) > peak) & (velocity > velocity[peak] * (1.0 - threshold)))
    converged = bool(after.size)
    settling = int(after[0]) if converged else len(losses) - 1
    tokens = np.asarray(steps, dtype=np.float64) * tokens_per_step
    slope = intercept = math.nan
    value = 0.0
    active = settling + 1
    if active > MIN_ACTIVE_ROWS:
        start = int(active * FIT_SKIP)
        if active - start > 2:
            with np.errstate(divide="ignore"):  # a step-0 row would give ln 0; the reference lets it through too
                slope, intercept = np.polyfit(np.log(tokens[start:active]), np.log(losses[start:active]), 1)
            value = abs(float(slope))
    step, at = int(steps[settling]), float(tokens[settling])
    return SEIResult(threshold, value, converged, settling, step, at, float(slope), float(intercept))


@dataclass(frozen=True)
class PowerLawFit:
    """L(D) = E + A·D^(−α): loss (nats/token) after D tokens, fitted by least squares.

    E: the loss the curve saturates at (nats/token, ≥ 0); A: the amplitude (nats/token at
    D = 1 token); alpha: the exponent (≥ 0); rmse: root-mean-square residual of the fitted points
    (nats/token); points: how many (D > 0) points were fitted.
    """

    E: float
    A: float
    alpha: float
    rmse: float
    points: int

    def __call__(self, tokens: Sequence[float] | np.ndarray) -> np.ndarray:
        return self.E + self.A * np.asarray(tokens, dtype=np.float64) ** (-self.alpha)


def fit_power_law(tokens: Sequence[float], losses: Sequence[float]) -> PowerLawFit:
    """Least-squares fit of L(D) = E + A·D^(−α) (scipy's `curve_fit`, trust-region reflective).

    tokens: tokens seen at each point; losses: the loss there (nats/token). Points at D ≤ 0
    (the step-0 evaluation) are left out: D^(−α) is not defined there. Bounds: 0 ≤ E ≤ min loss,
    A ≥ 0, 0 ≤ α ≤ 10. Fitted in D / max(D) for conditioning; A is reported for D in tokens.

    Raises:
        ValueError: fewer than 3 points with D > 0, or lengths that differ.
    """
    from scipy.optimize import curve_fit

    if len(tokens) != len(losses):
        raise ValueError(f"{len(tokens)} token counts and {len(losses)} losses: pass one loss per token count")
    d, loss = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    keep = (d > 0) & np.isfinite(loss)
    d, loss = d[keep], loss[keep]
    if len(d) < 3:
        raise ValueError(f"{len(d)} points with tokens > 0: a power law E + A·D^(−α) needs at least 3")
    scale = float(d.max())
    x = d / scale

    def model(x: np.ndarray, e: float, b: float, alpha: float) -> np.ndarray:
        return e + b * x ** (-alpha)

    e0 = 0.9 * float(loss.min())
    slope, intercept = np.polyfit(np.log(x), np.log(np.maximum(loss - e0, 1e-12)), 1) if np.ptp(x) > 0 else (0.0, 0.0)
    p0 = [e0, max(math.exp(intercept), 1e-12), min(max(-slope, 1e-3), 10.0)]
    bounds = ([0.0, 0.0, 0.0], [float(loss.min()), np.inf, 10.0])
    (e, b, alpha), _ = curve_fit(model, x, loss, p0=p0, bounds=bounds, method="trf", maxfev=20000)
    rmse = float(np.sqrt(np.mean((model(x, e, b, alpha) - loss) ** 2)))
    return PowerLawFit(float(e), float(b * scale**alpha), float(alpha), rmse, len(d))


def tokens_to_target(tokens: Sequence[float], losses: Sequence[float], target: float) -> float:
    """Tokens at which a loss curve first reaches `target` (nats/token), interpolated linearly.

    The first point with loss ≤ target and the point before it bracket the crossing; between
    them the curve is taken as linear in tokens. NaN when the curve never reaches the target
    (its budget was too short), the first point's tokens when it starts at or below it.
    """
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(tokens[0])
            d0, d1, l0, l1 = tokens[i - 1], tokens[i], losses[i - 1], loss
            return float(d0 + (d1 - d0) * (l0 - target) / (l0 - l1))
    return math.nan


Curve = Sequence[tuple[float, float]]  # (tokens seen, val loss) in step order


@dataclass(frozen=True)
class EfficiencyRatio:
    """Baseline tokens / variant tokens to the baseline's final val loss, over seeds.

    mean, low, high: mean of the per-seed ratios and its two-sided 95 % Student-t interval
    (df = n − 1; NaN bounds with fewer than 2 ratios). method: "paired" (each seed's variant
    against the same seed's baseline, target = that baseline's final val loss) or "mean
    baseline" (the seeds differ: target = the final value of the baseline's mean curve, whose
    uncertainty the interval does not carry). variant_tokens, baseline_tokens: tokens to the
    target by seed (NaN: not reached within the run). ratios: by seed, NaN where the variant did
    not reach the target; reached / seeds count them.
    """

    mean: float
    low: float
    high: float
    method: str
    variant_tokens: dict[int, float] = field(default_factory=dict)
    baseline_tokens: dict[int, float] = field(default_factory=dict)
    ratios: dict[int, float] = field(default_factory=dict)

    @property
    def reached(self) -> int:
        return sum(not math.isnan(r) for r in self.ratios.values())


def _split(curve: Curve) -> tuple[list[float], list[float]]:
    return [d for d, _ in curve], [v for _, v in curve]


def mean_curve(curves: Sequence[Curve]) -> list[tuple[float, float]]:
    """Mean over seeds at the token counts every curve has, shape [(tokens, mean loss)]."""
    common = sorted(set.intersection(*(set(d for d, _ in c) for c in curves)))
    by = [dict(c) for c in curves]
    return [(d, float(np.mean([c[d] for c in by]))) for d in common]


def efficiency_ratio(variant: Mapping[int, Curve], baseline: Mapping[int, Curve]) -> EfficiencyRatio:
    """Efficiency ratio of `variant` against `baseline` (> 1: the variant reaches the baseline's
    final val loss with fewer tokens), by seed, with a 95 % t-interval over seeds.

    variant, baseline: seed -> (tokens, val loss) curve. Paired by seed when both ran the same
    ≥ 2 seeds; otherwise every variant seed is measured against the baseline's mean curve.

    Raises:
        ValueError: an empty side, or an empty curve.
    """
    if not variant or not baseline or not all(variant.values()) or not all(baseline.values()):
        raise ValueError("efficiency_ratio needs at least one non-empty curve on each side")
    if set(variant) == set(baseline) and len(variant) > 1:
        method, targets = "paired", {s: baseline[s][-1][1] for s in variant}
        base_tokens = {s: tokens_to_target(*_split(baseline[s]), targets[s]) for s in variant}
    else:
        mean = mean_curve(list(baseline.values()))
        method, target = "mean baseline", mean[-1][1]
        targets = dict.fromkeys(variant, target)
        base_tokens = dict.fromkeys(variant, tokens_to_target(*_split(mean), target))
    var_tokens = {s: tokens_to_target(*_split(variant[s]), targets[s]) for s in sorted(variant)}
    ratios = {s: base_tokens[s] / var_tokens[s] if var_tokens[s] > 0 else math.nan for s in var_tokens}
    finite = [r for r in ratios.values() if not math.isnan(r)]
    stats = mean_interval(finite) if finite else (math.nan, math.nan, math.nan)
    return EfficiencyRatio(*stats, method, var_tokens, base_tokens, ratios)


@dataclass(frozen=True)
class ReferenceLog:
    """A training log in the reference's text format.

    steps: optimizer step of each `Step: N … Loss: x` line; losses: its training loss
    (nats/token); tokens_per_step: batch_size × gradient_accumulation_steps × world_size ×
    block_size from the logged arguments (the reference's defaults 16, 4, 1, 512 for any it
    lacks); arguments: the logged command-line arguments ({} when the log has none readable).
    """

    steps: list[int]
    losses: list[float]
    tokens_per_step: int
    arguments: dict[str, Any]

    @property
    def tokens(self) -> list[float]:
        return [float(s * self.tokens_per_step) for s in self.steps]


def parse_reference_log(text: str) -> ReferenceLog:
    """Parse the reference's `training.log`, with the reference's own patterns.

    Rows: every line matching `Step: N … Loss: x` (case-insensitive, the first `Loss:` after
    `Step:`). Arguments: the JSON object after the `Command Line Arguments:` line, log prefixes
    (`2025-12-05 08:19:09,958 [INFO] `) removed.

    Raises:
        ValueError: no `Step: N … Loss: x` line in `text`.
    """
    arguments: dict[str, Any] = {}
    if match := ARGUMENTS.search(text):
        try:
            arguments = json.loads(LOG_PREFIX.sub("", match.group(1)))
        except json.JSONDecodeError:
            arguments = {}  # the reference falls back to its defaults too
    rows = [(int(m.group(1)), float(m.group(2))) for line in text.splitlines() if (m := STEP_LOSS.search(line))]
    if not rows:
        raise ValueError("no 'Step: N ... Loss: x' line: not a training log in the reference's format")
    config = {**REFERENCE_DEFAULTS, **arguments}
    per_step = math.prod(int(config[k]) for k in REFERENCE_DEFAULTS)
    return ReferenceLog([s for s, _ in rows], [v for _, v in rows], per_step, arguments)


def run_summary(
    train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], tokens_per_step: float
) -> dict[str, float]:
    """A training run's sample efficiency as metrics, logged to the run at its end.

    train: (step, training loss) of every logged step; val: (step, val loss) of every evaluation;
    tokens_per_step: tokens per optimizer step. Returns `sample_efficiency/sei_95`, `.../sei_99`
    (the reference's SEI on training loss) with `.../settling_step_95`, `.../settling_step_99`,
    and the power-law fit of val loss vs tokens `.../fit_E`, `.../fit_A`, `.../fit_alpha`,
    `.../fit_rmse`; a measure the run has too few points for is left out (an active phase of
    ≤ 10 log rows has no SEI here, where the reference's dashboard would show 0).
    """
    out: dict[str, float] = {}
    if train:
        steps, losses = zip(*train, strict=True)
        for p in THRESHOLDS:
            result = sei(steps, losses, tokens_per_step, p)
            if not math.isnan(result.slope):
                out[f"sample_efficiency/sei_{p * 100:.0f}"] = result.sei
            out[f"sample_efficiency/settling_step_{p * 100:.0f}"] = float(result.settling_step)
    try:
        fit = fit_power_law([s * tokens_per_step for s, _ in val], [v for _, v in val])
    except (ValueError, RuntimeError):  # too few evaluations, or no least-squares optimum
        return out
    out.update({f"sample_efficiency/fit_{k}": getattr(fit, k) for k in ("E", "A", "alpha", "rmse")})
    return out
