"""Control inputs (control=none|genre|labels|mode; NCN paper §3.2, §6.1): config, model routes, mode penalty.

`control=none` must build exactly today's model; the routes add one embedding where they say;
the mode set point and penalty are pinned numbers. `python -m pytest -q tests/test_control.py`.
"""

import math

import pytest
import torch

from ncn import ControlConfig, ModelConfig, ModulatedGPT, ModulationConfig
from ncn.errors import NCNConfigError
from ncn.model.signals import mode_loss, mode_set_point

TINY = ModelConfig(vocab_size=97, block_size=32, d_model=32, n_layer=2, n_head=4)
GENRES = ["comedies", "histories", "problems", "roman", "romances", "tragedies"]


def build(control=None, targets=("temperature", "gain", "activation"), seed=0):
    torch.manual_seed(seed)
    return ModulatedGPT(TINY, ModulationConfig(targets=list(targets)), control)


def test_default_config_has_no_control(typed_config):
    cfg = typed_config([])
    assert cfg.control == ControlConfig()
    assert (cfg.control.kind, cfg.control.active, cfg.control.labelled) == ("none", False, False)


@pytest.mark.parametrize(
    ("option", "kind", "route"),
    [
        ("none", "none", "ncn"),
        ("genre", "genre", "ncn"),
        ("genre_embedding", "genre", "embedding"),
        ("genre_none", "genre", "none"),
        ("mode", "mode", "ncn"),
    ],
)
def test_every_option_composes(typed_config, option, kind, route):
    cfg = typed_config([f"control={option}", "model=tiny"])
    assert (cfg.control.kind, cfg.control.route) == (kind, route)


def test_run_names_name_the_control():
    from ncn.tracking import default_run_name

    choices = {"model": "tiny", "ncn": "full", "control": "genre"}
    assert default_run_name(choices, 1) == "tiny-full-genre-s1"
    assert default_run_name(choices, 1, {"control.route": "embedding"}) == "tiny-full-genre-route_embedding-s1"
    assert default_run_name({**choices, "control": "genre_embedding"}, 1) == "tiny-full-genre_embedding-s1"
    assert default_run_name({**choices, "control": "none"}, 1) == "tiny-full-s1"


def test_labels_option_composes_for_text_files(typed_config, tmp_path):
    cfg = typed_config(["control=labels", "data=text_files", f"data.path={tmp_path}"])
    assert (cfg.control.kind, cfg.control.route) == ("labels", "ncn")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["control=genre", "ncn=none"], "control.route=ncn feeds the control to the controller"),
        (["control=mode", "ncn=gain_only"], "has no temperature"),
        (["control=mode", "control.span=5"], "exceeds ncn.precision_max=4.0"),
        (["control=mode", "control.span=1"], "control.span=1.0 must be > 1"),
        (["control=labels"], "with data=shakespeare use control=genre"),
        (["control=genre", "control.route=sideways"], "control.route=sideways is unknown"),
        (["control=mode", "control.value=1.5"], "control.value=1.5 is outside [-1, 1]"),
    ],
)
def test_bad_control_settings_are_refused(typed_config, overrides, fragment):
    with pytest.raises(Exception) as caught:
        typed_config(overrides)
    assert fragment in str(caught.value)


def test_control_none_builds_todays_model():
    """Same seed: control=none gives the same parameters, the same count and the same logits as no control at all."""
    today, none = build(None), build(ControlConfig(kind="none"))
    assert none.control is None
    assert none.num_parameters() == today.num_parameters()
    # pinned: base 29,440 (embeddings 4,128 + 2 blocks of 12,640 + norm 32) + controller 6,758
    assert none.num_parameters().total == 36_198
    for (name, a), (_, b) in zip(today.state_dict().items(), none.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(today(idx).logits, none(idx).logits)


@pytest.mark.parametrize(("route", "targets"), [("ncn", ["temperature"]), ("embedding", []), ("none", [])])
def test_routes_add_one_embedding_and_start_neutral(route, targets):
    """Each route adds 6 × d_model label parameters (none: 0), leaves base and controller init unchanged, and a
    fresh controlled model computes what the uncontrolled one does (zero-initialised embedding)."""
    plain = build(None, targets)
    controlled = build(ControlConfig(kind="genre", route=route, vocabulary=GENRES), targets)
    extra = 6 * 32 if route != "none" else 0
    assert controlled.num_parameters().control == extra
    assert controlled.num_parameters().total == plain.num_parameters().total + extra
    assert controlled.num_parameters().controller == plain.num_parameters().controller
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 6, (2, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(controlled(idx, control=labels).logits, plain(idx).logits)


def test_route_ncn_reaches_only_the_controller():
    """With a non-zero label embedding, route ncn changes the signals but not the token embeddings' path
    without a controller: a baseline cannot take route ncn; route embedding changes logits even without one."""
    with pytest.raises(NCNConfigError, match="control.route=ncn feeds the controller"):
        build(ControlConfig(kind="genre", route="ncn", vocabulary=GENRES), targets=[])
    model = build(ControlConfig(kind="genre", route="embedding", vocabulary=GENRES), targets=[])
    with torch.no_grad():
        model.control.weight.normal_(0, 1.0)
    idx = torch.zeros(1, 8, dtype=torch.long)
    a = model(idx, control=torch.tensor([0])).logits
    b = model(idx, control=torch.tensor([1])).logits
    assert not torch.allclose(a, b)


def test_controlled_model_without_control_input_is_refused():
    model = build(ControlConfig(kind="genre", route="ncn", vocabulary=GENRES))
    with pytest.raises(NCNConfigError, match="trained with control=genre"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_empty_vocabulary_is_refused():
    with pytest.raises(NCNConfigError, match="empty control.vocabulary"):
        build(ControlConfig(kind="genre", route="ncn"))


def test_mode_set_point_and_penalty():
    m = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert mode_set_point(m, 2.0).tolist() == pytest.approx([0.5, 2**-0.5, 1.0, 2**0.5, 2.0], abs=1e-7)
    # precision 1 everywhere at m = 1 (set point 2): penalty lam * (1 - 2)^2 = lam
    precision = torch.ones(2, 3, 4)
    assert mode_loss(precision, torch.ones(2, 3), 2.0, 0.25).item() == pytest.approx(0.25)
    # per head (B, T, L, H): m = -1 -> set point 0.5, (1 - 0.5)^2 = 0.25
    assert mode_loss(torch.ones(2, 3, 4, 2), -torch.ones(2, 3), 2.0, 1.0).item() == pytest.approx(0.25)


def test_mode_loss_replaces_the_precision_homeostatic_term():
    """At init every signal is near neutral: the mode term is about mode_lambda · mean((1 − 2^m)²), and the
    homeostatic term covers gain and gate only."""
    cfg = ControlConfig(kind="mode", route="ncn", mode_lambda=0.5)
    model = build(cfg)
    idx = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(3))
    m = torch.tensor([1.0, -1.0])
    out = model(idx, idx, control=m)
    expected = 0.5 * ((1 - 2.0) ** 2 + (1 - 0.5) ** 2) / 2
    assert out.mode_loss.item() == pytest.approx(expected, rel=2e-3)
    plain = build(None)
    ref = plain(idx, idx)
    gate_gain = {k: v for k, v in ref.signals.items() if k != "precision"}
    from ncn.model.signals import homeostatic_loss

    assert out.reg_loss.item() == pytest.approx(homeostatic_loss(gate_gain, 0.01).item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(out.ce_loss.item() + out.reg_loss.item() + out.mode_loss.item(), rel=1e-6)
    assert math.isfinite(out.loss.item())


# --- the synthetic task: the label alone decides the continuation ---------------------------------------------

VOCAB, SEQ = 16, 16
PERM = torch.roll(torch.arange(VOCAB), 5)  # a fixed permutation without fixed points: label 1 never repeats


def synthetic(batch, generator):
    """Labels drawn independently per token; label 0: the next token repeats the current one, label 1: it is
    PERM of it. Returns x (B, SEQ), y (B, SEQ), labels (B, SEQ); the label of x[t] decides y[t]."""
    labels = torch.randint(0, 2, (batch, SEQ), generator=generator)
    tokens = [torch.randint(0, VOCAB, (batch,), generator=generator)]
    for t in range(SEQ):
        tokens.append(torch.where(labels[:, t] == 1, PERM[tokens[-1]], tokens[-1]))
    seq = torch.stack(tokens, 1)
    return seq[:, :-1], seq[:, 1:], labels


def train_synthetic(route, targets=("temperature", "gain", "activation"), steps=60):
    cfg = ModelConfig(vocab_size=VOCAB, block_size=SEQ, d_model=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = ModulatedGPT(
        cfg, ModulationConfig(targets=list(targets)), ControlConfig(kind="labels", route=route, vocabulary=["0", "1"])
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y, labels = synthetic(32, g)
        loss = model(x, y, control=labels).ce_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def synthetic_models():
    return {route: train_synthetic(route) for route in ("ncn", "embedding", "none")}


def _held_out_loss(model):
    x, y, labels = synthetic(256, torch.Generator().manual_seed(99))
    with torch.no_grad():
        return model(x, y, control=labels).ce_loss.item()


@pytest.mark.parametrize("route", ["ncn", "embedding"])
def test_label_routes_learn_what_the_label_decides(synthetic_models, route):
    """The label is the only evidence for the next token: with it, the loss falls well below ln 2 per token."""
    assert _held_out_loss(synthetic_models[route]) < 0.25 * math.log(2)


def test_route_none_cannot_beat_ln2(synthetic_models):
    """Labels loaded but unused: both continuations stay equally likely, at best ln 2 nats per token."""
    assert _held_out_loss(synthetic_models["none"]) >= math.log(2) - 0.02


@pytest.mark.parametrize("route", ["ncn", "embedding"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_flipping_the_label_flips_the_greedy_continuation(synthetic_models, route, use_cache):
    model = synthetic_models[route]
    prompt = torch.arange(VOCAB).view(VOCAB, 1)  # every token as a one-token prompt
    repeat = model.generate(prompt, 1, temperature=0, control=torch.zeros(VOCAB, dtype=torch.long), use_cache=use_cache)
    permute = model.generate(prompt, 1, temperature=0, control=torch.ones(VOCAB, dtype=torch.long), use_cache=use_cache)
    assert repeat[:, 1].tolist() == list(range(VOCAB))
    assert permute[:, 1].tolist() == PERM.tolist()


@pytest.mark.parametrize("route", ["ncn", "embedding"])
def test_cached_decoding_with_a_control_equals_the_full_forward(synthetic_models, route):
    """Per-token labels, decoded in chunks of 5, 1, 1, ... give the logits of one full forward pass."""
    model = synthetic_models[route]
    x, _, labels = synthetic(3, torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(x, control=labels).logits
        state = model.new_decode_state(3)
        parts = [model.decode(x[:, :5], state, control=labels[:, :5])]
        parts += [model.decode(x[:, t : t + 1], state, control=labels[:, t : t + 1]) for t in range(5, SEQ)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_control_sweep_composes_seed_major_at_the_cpu_budget():
    """sweeps/control.yaml: 3 seeds (slowest) × genre through none / embedding / ncn, plus the mode slider, at the
    byte-level CPU budget; each job converts to a valid typed config."""
    from hydra import compose, initialize_config_dir

    from ncn import cli

    from conftest import REPO

    with initialize_config_dir(str(REPO / "sweeps"), version_base="1.3"):
        cfg = compose("control", return_hydra_config=True)
        jobs = [
            compose("control", overrides=[f"control={c}", "seed=1"])
            for c in cfg.hydra.sweeper.params.control.split(",")
        ]
    assert dict(cfg.hydra.sweeper.params) == {"seed": "0,1,2", "control": "genre_none,genre_embedding,genre,mode"}
    assert list(cfg.hydra.sweeper.params) == ["seed", "control"]  # seeds vary slowest
    assert (cfg.model.d_model, cfg.model.block_size, cfg.data.tokenizer) == (128, 256, "bytes")
    assert (cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.optim.lr) == (1000, 16, 2e-3)
    routes = [(c.control.kind, c.control.route) for c in (cli.typed(j)[0] for j in jobs)]
    assert routes == [("genre", "none"), ("genre", "embedding"), ("genre", "ncn"), ("mode", "ncn")]
