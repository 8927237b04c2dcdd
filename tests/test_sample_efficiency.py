"""Sample efficiency (ncn.analysis.sample_efficiency): the reference's SEI, the power-law fit,
tokens-to-target, the efficiency ratio with its t-interval, and the reference log's parser, each
checked against values derived by hand from synthetic curves.

Run: python -m pytest -q tests/test_sample_efficiency.py   (about a second)
"""

from __future__ import annotations

import math
import statistics

import pytest

from ncn.analysis.sample_efficiency import (
    efficiency_ratio,
    fit_power_law,
    parse_reference_log,
    run_summary,
    sei,
    smoothed_velocity,
    tokens_to_target,
)

T_975_DF2 = 4.302652729911275  # Student t quantile, 97.5 %, 2 degrees of freedom (table value)
A_EWM = 2 / 51  # pandas ewm(span=50): a = 2 / (span + 1)


def _power(d: float, e: float = 1.5, a: float = 40.0, alpha: float = 0.35) -> float:
    return e + a * d ** (-alpha)


def test_sei_of_a_pure_power_law_is_its_exponent() -> None:
    # L = A·D^(−α) is a straight line of slope −α in log–log wherever the active phase ends
    steps = list(range(20, 20 * 801, 20))
    per_step = 32768
    losses = [50.0 * (s * per_step) ** -0.3 for s in steps]
    for p in (0.95, 0.99):
        result = sei(steps, losses, per_step, p)
        assert result.sei == pytest.approx(0.3, abs=1e-3)
        assert result.slope == pytest.approx(-0.3, abs=1e-3)
        assert result.intercept == pytest.approx(math.log(50.0), abs=1e-2)


def _drop_by_hand(n: int, p: float) -> int:
    """The row where the velocity of a loss that drops once (L0 at row 0, X after) decays to 1 − p.

    EWM: s_i = X + D·q^i (D = L0 − X, q = 1 − a). np.gradient: v_0 = s_1 − s_0 = −D·a; inside,
    v_i = (s_{i+1} − s_{i−1}) / 2 = −D·q^(i−1)·a(2 − a)/2. The centred 50-row mean at row 0 covers
    rows 0..24 (the steepest: the later windows add smaller terms); from row 26 on the window
    [i − 25, i + 24] lies inside, so the smoothed velocity is C·q^i with
    C = −D·a(2 − a)/2 · q^(−1) · Σ_{k=−25}^{24} q^k / 50. The first row with C·q^i > (1 − p)·peak.
    """
    a, q, d = A_EWM, 1 - A_EWM, 1.0
    inner = -d * a * (2 - a) / 2
    peak = (-d * a + sum(inner * q ** (i - 1) for i in range(1, 25))) / 25
    c = inner / q * sum(q**k for k in range(-25, 25)) / 50
    row = math.floor(math.log((1 - p) * peak / c) / math.log(q)) + 1
    assert 26 <= row <= n - 27  # the closed form holds there
    return row


def test_convergence_point_at_the_row_computed_by_hand() -> None:
    n = 400
    losses = [4.0] + [3.0] * (n - 1)
    steps = [10 * (i + 1) for i in range(n)]
    grammar, intellectual = sei(steps, losses, 100, 0.95), sei(steps, losses, 100, 0.99)
    assert (_drop_by_hand(n, 0.95), _drop_by_hand(n, 0.99)) == (91, 131)
    assert (grammar.settling_row, grammar.settling_step, grammar.settling_tokens) == (91, 920, 92000.0)
    assert (intellectual.settling_row, intellectual.settling_step) == (131, 1320)
    assert grammar.converged and intellectual.converged
    velocity = smoothed_velocity(losses)
    assert velocity[0] == pytest.approx(-0.025771, abs=1e-6)  # the peak: mean of rows 0..24 above
    assert velocity[91] > 0.05 * velocity[0] >= velocity[90]


def test_a_log_still_falling_has_not_converged() -> None:
    losses = [10.0 - 0.01 * i for i in range(60)]  # constant velocity: never decays
    result = sei(list(range(1, 61)), losses, 1, 0.95)
    assert (result.converged, result.settling_row, result.settling_step) == (False, 59, 60)


def test_sei_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="threshold=1.0: choose a convergence threshold in"):
        sei([1, 2], [2.0, 1.0], 1, 1.0)
    with pytest.raises(ValueError, match="2 steps and 1 losses"):
        sei([1, 2], [2.0], 1)


def test_power_law_fit_recovers_its_parameters() -> None:
    tokens = [0.0] + [1000.0 * k for k in range(1, 41)]  # the step-0 point is left out
    losses = [11.0] + [_power(d) for d in tokens[1:]]
    fit = fit_power_law(tokens, losses)
    expected = (pytest.approx(1.5, abs=1e-4), pytest.approx(40.0, rel=1e-3), pytest.approx(0.35, abs=1e-4))
    assert (fit.E, fit.A, fit.alpha) == expected
    assert fit.rmse < 1e-6 and fit.points == 40
    assert fit([4000.0])[0] == pytest.approx(_power(4000.0), abs=1e-6)
    with pytest.raises(ValueError, match="2 points with tokens > 0"):
        fit_power_law([0.0, 1.0, 2.0], [3.0, 2.0, 1.0])


def test_tokens_to_target_interpolates_between_the_bracketing_points() -> None:
    assert tokens_to_target([0.0, 100.0, 200.0], [3.0, 2.0, 1.0], 1.5) == 150.0
    assert tokens_to_target([0.0, 100.0, 200.0], [3.0, 2.0, 1.0], 3.5) == 0.0
    assert tokens_to_target([0.0, 100.0, 300.0, 400.0], [3.0, 1.0, 2.0, 0.5], 1.5) == 75.0  # the first crossing
    assert math.isnan(tokens_to_target([0.0, 100.0], [3.0, 2.0], 1.0))


def _curve(shift: float, grid: float = 500.0, points: int = 40) -> list[tuple[float, float]]:
    """Loss of a learner that needs 1/shift of the tokens: L(shift·D) on the grid D = grid·k."""
    return [(grid * k, _power(shift * grid * k)) for k in range(1, points + 1)]


def test_a_known_2x_shift_gives_efficiency_ratio_2() -> None:
    base = _curve(1.0)
    assert tokens_to_target(*zip(*base, strict=True), base[-1][1]) == 20000.0
    assert tokens_to_target(*zip(*_curve(2.0), strict=True), base[-1][1]) == pytest.approx(10000.0, abs=1e-6)
    ratio = efficiency_ratio({0: _curve(2.0), 1: _curve(2.0)}, {0: base, 1: base})
    assert ratio.method == "paired" and ratio.reached == 2
    assert (ratio.mean, ratio.low, ratio.high) == (pytest.approx(2.0, abs=1e-3),) * 3
    slower = efficiency_ratio({0: _curve(0.5), 1: _curve(0.5)}, {0: base, 1: base})
    assert slower.reached == 0 and math.isnan(slower.mean)  # half as fast: not reached within the run


def test_efficiency_ratio_interval_is_the_hand_computed_t_interval() -> None:
    # per-seed shifts 1.6, 2.0, 2.5 reach the baseline's final loss at 12,500, 10,000 and 8,000 tokens
    variant = {0: _curve(1.6), 1: _curve(2.0), 2: _curve(2.5)}
    ratio = efficiency_ratio(variant, {s: _curve(1.0) for s in variant})
    assert ratio.variant_tokens == pytest.approx({0: 12500.0, 1: 10000.0, 2: 8000.0}, abs=1e-6)
    assert ratio.ratios == pytest.approx({0: 1.6, 1: 2.0, 2: 2.5}, abs=1e-9)
    half = T_975_DF2 * statistics.stdev([1.6, 2.0, 2.5]) / math.sqrt(3)
    assert half == pytest.approx(1.12016, abs=1e-5)  # 4.302653 × 0.450925 / √3
    assert ratio.mean == pytest.approx(6.1 / 3, abs=1e-9)
    assert (ratio.low, ratio.high) == (pytest.approx(6.1 / 3 - half, abs=1e-9), pytest.approx(6.1 / 3 + half, abs=1e-9))


def test_unpaired_seeds_are_measured_against_the_mean_baseline_curve() -> None:
    # baselines at shifts 1 and 1 (mean curve = the shift-1 curve); variant seeds 5 and 6 at 2.0
    ratio = efficiency_ratio({5: _curve(2.0), 6: _curve(2.5)}, {0: _curve(1.0), 1: _curve(1.0)})
    assert ratio.method == "mean baseline"
    assert ratio.ratios == pytest.approx({5: 2.0, 6: 2.5}, abs=1e-9)


REFERENCE_LOG = """\
2025-12-05 08:19:09,957 [INFO] Starting NCN Training (Binary Mode)
2025-12-05 08:19:09,958 [INFO] Command Line Arguments:
2025-12-05 08:19:09,958 [INFO] {
  "block_size": 256,
  "mod_signal_names": [
    "gain",
    "precision"
  ],
  "batch_size": 8,
  "gradient_accumulation_steps": 2,
  "world_size": 1
}
2025-12-05 08:19:12,615 [INFO] Steps per epoch: 63518
2025-12-05 08:23:35,567 [INFO] Step: 20 | Ep: 1 [80/63518 (0.1%)] | Loss: 9.9924 | Reg: 0.0034 | PPL: 21860.27
2025-12-05 08:27:52,921 [INFO] Step: 40 | Ep: 1 [160/63518 (0.3%)] | Loss: 8.5409 | Reg: 0.0034 | PPL: 5120.00
2025-12-05 08:30:00,000 [INFO] Validation Avg Loss: 8.1000 | Perplexity: 3294.47
2025-12-05 08:32:12,248 [INFO] Step: 60 | Ep: 1 [240/63518 (0.4%)] | Loss: 6.5915 | Reg: 0.0033 | PPL: 728.86
"""


def test_reference_log_steps_losses_and_tokens_per_step() -> None:
    log = parse_reference_log(REFERENCE_LOG)
    assert log.steps == [20, 40, 60]
    assert log.losses == [9.9924, 8.5409, 6.5915]
    assert log.tokens_per_step == 8 * 2 * 1 * 256
    assert log.tokens == [20 * 4096.0, 40 * 4096.0, 60 * 4096.0]
    assert log.arguments["mod_signal_names"] == ["gain", "precision"]


def test_reference_log_without_arguments_uses_the_reference_defaults() -> None:
    lines = [line for line in REFERENCE_LOG.splitlines() if "Step:" in line]
    log = parse_reference_log("\n".join(lines))
    assert (log.tokens_per_step, log.arguments, log.steps) == (16 * 4 * 1 * 512, {}, [20, 40, 60])
    with pytest.raises(ValueError, match="no 'Step: N ... Loss: x' line"):
        parse_reference_log("2025-12-05 08:19:09,957 [INFO] Starting NCN Training\n")


def test_run_summary_logs_the_sei_and_the_fit_of_a_run() -> None:
    per_step = 500
    train = [(k, 50.0 * (per_step * k) ** -0.3) for k in range(1, 301)]
    val = [(0, 11.0)] + [(10 * k, _power(per_step * 10.0 * k)) for k in range(1, 31)]
    summary = run_summary(train, val, per_step)
    assert summary["sample_efficiency/sei_95"] == pytest.approx(0.3, abs=1e-3)
    assert summary["sample_efficiency/sei_99"] == pytest.approx(0.3, abs=1e-3)
    assert (summary["sample_efficiency/fit_E"], summary["sample_efficiency/fit_alpha"]) == (
        pytest.approx(1.5, abs=1e-4),
        pytest.approx(0.35, abs=1e-4),
    )
    assert sorted(summary) == sorted(
        f"sample_efficiency/{k}"
        for k in ("sei_95", "sei_99", "settling_step_95", "settling_step_99", "fit_E", "fit_A", "fit_alpha", "fit_rmse")
    )
    short = run_summary(train[:6], val[:3], per_step)  # 6 log rows, 2 evaluations past step 0: no fit
    assert sorted(short) == ["sample_efficiency/settling_step_95", "sample_efficiency/settling_step_99"]
    assert sei([s for s, _ in train[:6]], [v for _, v in train[:6]], per_step).sei == 0.0  # the reference's value
