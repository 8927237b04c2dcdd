"""Signal transforms, neutral biases, homeostatic loss and causal salience pooling (NCN paper §3–§5).

Pure tensor functions, no model: `python -m pytest -q tests/test_signals.py`.
"""

import math

import pytest
import torch

from ncn.model.controller import SalienceState, causal_pool
from ncn.model.signals import NEUTRAL, NEUTRAL_BIAS, RANGES, SIGNALS, homeostatic_loss, signal_names, transform


@pytest.mark.parametrize("name", SIGNALS)
def test_neutral_bias_gives_neutral_value(name):
    value = transform(name, torch.tensor(NEUTRAL_BIAS[name])).item()
    assert value == pytest.approx(NEUTRAL[name], abs=0.003)


def test_paper_table_biases_and_values():
    # NCN paper §3 table: without the biases, z = 0 gives precision 0.70 and FFN gate 0.5.
    assert NEUTRAL_BIAS["precision"] == 0.525 and NEUTRAL_BIAS["ffn_gate"] == 3.0 and NEUTRAL_BIAS["gain"] == 0.0
    assert transform("precision", torch.tensor(0.0)).item() == pytest.approx(math.log(2) + 0.01, abs=1e-6)
    assert transform("ffn_gate", torch.tensor(0.0)).item() == 0.5
    assert transform("ffn_gate", torch.tensor(3.0)).item() == pytest.approx(0.9526, abs=1e-4)


@pytest.mark.parametrize("name", SIGNALS)
def test_transforms_are_monotone_and_stay_in_range(name):
    z = torch.linspace(-12, 12, 1001)
    s = transform(name, z, precision_max=4.0)
    low, high = RANGES[name]
    assert torch.all(s > low)
    assert torch.all(s <= high) if name == "precision" else torch.all(s < high)
    assert torch.all(s[1:] >= s[:-1])


def test_precision_clamps_at_precision_max():
    s = transform("precision", torch.tensor([1.0, 2.5, 50.0]), precision_max=2.0)
    assert s.tolist() == pytest.approx([math.log1p(math.e) + 0.01, 2.0, 2.0], abs=1e-6)


def test_swish_beta_neutral_matches_gelu():
    x = torch.linspace(-6, 6, 2001)
    beta = NEUTRAL["activation_beta"]
    assert (x * torch.sigmoid(beta * x) - torch.nn.functional.gelu(x)).abs().max().item() < 0.021


@pytest.mark.parametrize(
    ("targets", "activation", "expected"),
    [
        ([], "gate", []),
        (["temperature"], "gate", ["precision"]),
        (["activation", "gain"], "gate", ["gain", "ffn_gate"]),
        (["activation", "temperature", "gain"], "swish_beta", ["gain", "precision", "activation_beta"]),
    ],
)
def test_signal_names_in_canonical_order(targets, activation, expected):
    assert signal_names(targets, activation) == expected


def test_homeostatic_loss_hand_formula():
    signals = {
        "gain": torch.tensor([[1.0, 1.5], [0.5, 1.0]]),
        "precision": torch.tensor([[2.0, 1.0], [1.0, 1.0]]),
        "activation_beta": torch.full((2, 2), 2 * 1.702),
    }
    # gain: mean(0, .25, .25, 0) = .125; precision: mean(1, 0, 0, 0) = .25; beta/1.702 = 2: 1.
    assert homeostatic_loss(signals, 0.1).item() == pytest.approx(0.1 * (0.125 + 0.25 + 1.0))
    assert homeostatic_loss({}, 0.1).item() == 0.0


def _brute_force_pool(a, v):
    """o_t = softmax(a[..., :t+1]) @ v[..., :t+1, :] one position at a time."""
    steps = [(a[..., : t + 1].softmax(-1).unsqueeze(-2) @ v[:, :, : t + 1]).squeeze(-2) for t in range(a.shape[-1])]
    return torch.stack(steps, 2)


def _empty(B, H, hs):
    return SalienceState(torch.full((B, H), torch.finfo(torch.float32).min), torch.zeros(B, H, hs))


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_causal_pool_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    a, v = 6 * torch.randn(2, 3, 37, generator=g), torch.randn(2, 3, 37, 5, generator=g)
    o, state = causal_pool(a, v, _empty(2, 3, 5), chunk)
    ref = _brute_force_pool(a, v)
    assert (o - ref).abs().max().item() < 1e-5
    assert (state.lse - a.logsumexp(-1)).abs().max().item() < 1e-5
    assert torch.equal(state.value, o[:, :, -1])


def test_causal_pool_continues_a_prefix_state_exactly():
    g = torch.Generator().manual_seed(1)
    a, v = 6 * torch.randn(2, 2, 30, generator=g), torch.randn(2, 2, 30, 4, generator=g)
    state, parts = _empty(2, 2, 4), []
    for lo, hi in [(0, 11), (11, 12), (12, 13), (13, 30)]:  # chunk, two single tokens, chunk
        o, state = causal_pool(a[..., lo:hi], v[:, :, lo:hi], state, chunk=4)
        parts.append(o)
    assert (torch.cat(parts, 2) - _brute_force_pool(a, v)).abs().max().item() < 1e-5
    assert state.lse.shape == (2, 2) and state.value.shape == (2, 2, 4)  # constant-size state


def test_causal_pool_gradients_are_finite_with_empty_prefix():
    a = torch.randn(1, 2, 9, requires_grad=True)
    v = torch.randn(1, 2, 9, 3, requires_grad=True)
    o, _ = causal_pool(a, v, _empty(1, 2, 3), chunk=4)
    o.square().sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(v.grad).all()
    assert a.grad.abs().sum().item() > 0


def test_reference_parametrisation_gain_is_sigmoid_plus_half_and_the_rest_is_the_papers():
    z = torch.tensor([-40.0, -1.0, 0.0, 1.0, 40.0])
    gain = transform("gain", z, parametrisation="reference")
    assert gain.tolist() == pytest.approx([0.5, 0.5 + 1 / (1 + math.e), 1.0, 0.5 + 1 / (1 + math.exp(-1)), 1.5])
    for name in ("precision", "ffn_gate"):
        assert torch.equal(transform(name, z, parametrisation="reference"), transform(name, z))


def test_controller_activation_and_norm_options_follow_the_reference_mlp():
    from ncn.model.controller import Controller

    torch.manual_seed(0)
    ours = Controller(8, 2, 2, ["gain"], 4, 2, "none", 4.0, False, "reference", "relu", "none")
    ours.init_weights()
    e = torch.randn(1, 3, 8)
    z = ours.fc2(torch.relu(ours.fc1(e)))  # (1, 3, 2): no norm, relu
    assert torch.equal(ours(e)[0]["gain"], torch.sigmoid(z) + 0.5)
    assert not any(isinstance(m, torch.nn.RMSNorm) for m in ours.modules())
