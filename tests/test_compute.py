"""Conditional compute: head and layer gates, skipping equals masking, the KV cache, FLOP counts, the
quality–compute curve of one checkpoint (NCN paper §6.1, §8).

Tiny CPU models (vocab 97, d_model 32, 2 layers, 4 heads). `python -m pytest -q tests/test_compute.py`.
"""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from scipy.stats import t

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.analysis.compute import REPORT_TAU, ComputeRow, compute_curve, metrics, parse_metrics, require_gates
from ncn.errors import NCNConfigError
from ncn.model.blocks import Block, BlockSkip, CausalSelfAttention
from ncn.model.compute import SkipMasks, SkipPlan, compute_cost, count_flops, random_like, threshold_masks
from ncn.model.signals import homeostatic_loss
from ncn.tasks.evaluate import curve_plot, curve_points
from ncn.tasks.report import RunResult, markdown, table

from conftest import run_cli

T_975_DF1 = 12.706204736174698  # Student t quantile 0.975 with 1 degree of freedom

TINY = ModelConfig(vocab_size=97, block_size=32, d_model=32, n_layer=2, n_head=4)
GATED = ["temperature", "gain", "activation", "head_gate", "layer_gate"]
TAU = 0.8  # with tiny()'s controller every kind of gate is below it for some tokens, above for others


def tiny(targets=GATED, seed=0, std=0.5, **modulation):
    """A tiny model in eval mode whose controller has large random weights, so the gates spread over (0, 1)."""
    torch.manual_seed(seed)
    model = ModulatedGPT(TINY, ModulationConfig(targets=targets, **modulation)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.controller.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tokens(B=3, T=24, seed=0):
    return torch.randint(0, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_gates_start_near_one_with_their_shapes():
    torch.manual_seed(0)
    model = ModulatedGPT(TINY, ModulationConfig(targets=GATED))
    signals = model(tokens()).signals
    assert signals["head_gate"].shape == (3, 24, 2, 4)
    assert signals["layer_gate"].shape == (3, 24, 2)
    for name in ("head_gate", "layer_gate", "ffn_gate"):
        assert (signals[name] - 0.9526).abs().max().item() < 0.01
    # fc2 columns per layer: gain 1 + precision 1 + ffn_gate 1 + head_gate 4 + layer_gate 1
    assert model.controller.fc2.out_features == 2 * 8


def test_head_gate_zero_removes_that_head_before_the_projection():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, 0.0, 0).eval()
    x = torch.randn(2, 6, 32)
    gate = torch.ones(2, 6, 4)
    gate[:, :, 2] = 0.0
    pruned = CausalSelfAttention(32, 4, 0.0, 0).eval()
    pruned.load_state_dict(attn.state_dict())
    with torch.no_grad():
        pruned.proj.weight[:, 16:24] = 0.0  # head 2's columns of the output projection
        assert (attn(x, head_gate=gate) - pruned(x)).abs().max().item() <= 1e-6
        half = attn(x, head_gate=torch.full((2, 6, 4), 0.5))
        assert (half - attn.proj.bias - 0.5 * (attn(x) - attn.proj.bias)).abs().max().item() <= 1e-6


def test_layer_gate_scales_the_whole_residual_update():
    torch.manual_seed(0)
    block = Block(32, 4, 128, 0.0, 0).eval()
    x = torch.randn(2, 6, 32)
    gain = torch.rand(2, 6, 1) + 0.5
    gate = torch.rand(2, 6, 1)
    with torch.no_grad():
        full = block(x, gain=gain, layer_gate=torch.ones(2, 6, 1))
        gated = block(x, gain=gain, layer_gate=gate)
        assert (full - block(x, gain=gain)).abs().max().item() <= 1e-6  # gate 1 = today's block
        assert (gated - x - gate * (full - x)).abs().max().item() <= 1e-6
        assert torch.equal(block(x, gain=gain, layer_gate=torch.zeros(2, 6, 1)), x)


@pytest.mark.parametrize("targets", [["head_gate"], ["layer_gate"], GATED])
def test_gate_targets_keep_the_model_causal(targets):
    model = tiny(targets)
    x = tokens()
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert (a[:, :12] - b[:, :12]).abs().max().item() <= 1e-6
    assert (a[:, 12:] - b[:, 12:]).abs().max().item() > 1e-3


def _ragged(masks: SkipMasks) -> None:
    """Each mask skips some units and runs others, with different counts per batch row."""
    for m in (masks.ffn, masks.head, masks.layer):
        assert m is not None and 0 < m.float().mean().item() < 1
        per_row = m.flatten(1).sum(1)
        assert len(set(per_row.tolist())) > 1


def test_threshold_zero_is_the_dense_model_bitwise():
    model = tiny()
    x = tokens()
    with torch.no_grad():
        dense = model(x)
        zero = model(x, skip=SkipPlan(0.0))
    assert torch.equal(dense.logits, zero.logits) and zero.skipped is None


@pytest.mark.parametrize(
    "targets",
    [GATED, ["activation"], ["head_gate"], ["layer_gate"], ["temperature", "head_gate"]],
    ids=lambda t: "+".join(t),
)
def test_skipping_equals_masked_dense(targets):
    model = tiny(targets)
    x = tokens()
    with torch.no_grad():
        skipped = model(x, skip=SkipPlan(TAU))
        masked = model(x, skip=SkipPlan(TAU, gather=False))
        dense = model(x)
    if targets == GATED:
        _ragged(skipped.skipped)
    assert (skipped.logits - masked.logits).abs().max().item() <= 1e-6
    assert (skipped.logits - dense.logits).abs().max().item() > 1e-2  # skipping does change the output


def test_skipping_equals_masked_dense_per_kind_to_1e_6():
    """Block level: each kind alone and all together, ragged patterns, to 1e-6."""
    torch.manual_seed(0)
    block = Block(32, 4, 128, 0.0, 0).eval()
    g = torch.Generator().manual_seed(3)
    B, T = 3, 10
    x = torch.randn(B, T, 32, generator=g)
    sig = {
        "gain": torch.rand(B, T, 1, generator=g) + 0.5,
        "precision": torch.rand(B, T, 4, generator=g) + 0.5,
        "ffn_gate": torch.rand(B, T, 1, generator=g),
        "head_gate": torch.rand(B, T, 4, generator=g),
        "layer_gate": torch.rand(B, T, 1, generator=g),
    }
    cuts = {
        "ffn": sig["ffn_gate"][..., 0] < 0.5,
        "head": sig["head_gate"] < 0.5,
        "layer": sig["layer_gate"][..., 0] < 0.5,
    }
    for kinds in (["ffn"], ["head"], ["layer"], ["ffn", "head", "layer"]):
        skip = BlockSkip(**{k: cuts[k] for k in kinds})
        zeroed = dict(sig)
        for k in kinds:
            name = {"ffn": "ffn_gate", "head": "head_gate", "layer": "layer_gate"}[k]
            mask = cuts[k] if k == "head" else cuts[k].unsqueeze(-1)
            zeroed[name] = sig[name].masked_fill(mask, 0.0)
        with torch.no_grad():
            assert (block(x, **sig, skip=skip) - block(x, **zeroed)).abs().max().item() <= 1e-6, kinds


def test_threshold_one_removes_the_gated_units():
    x = tokens()
    with torch.no_grad():
        ffn = tiny(["activation"])  # every gate < 1: τ = 1 skips every FFN
        no_ffn = tiny(["activation"])
        for block in no_ffn.blocks:
            block.mlp.proj.weight.zero_()
            block.mlp.proj.bias.zero_()
        assert (ffn(x, skip=SkipPlan(1.0)).logits - no_ffn(x).logits).abs().max().item() <= 1e-5
        heads = tiny(["head_gate"])
        no_heads = tiny(["head_gate"])
        for block in no_heads.blocks:
            block.attn.proj.weight.zero_()  # no head reaches the projection; its bias stays
        assert (heads(x, skip=SkipPlan(1.0)).logits - no_heads(x).logits).abs().max().item() <= 1e-5
        layers = tiny(["layer_gate"])
        pos = torch.arange(x.shape[1])
        embedded = layers.lm_head(layers.norm(layers.tok_emb(x) + layers.pos_emb(pos)))
        assert (layers(x, skip=SkipPlan(1.0)).logits - embedded).abs().max().item() <= 1e-5


def _decode(model, x, skip, chunks=(11, 1, 1, 1, 10)):
    state = model.new_decode_state(x.shape[0])
    out, at = [], 0
    for n in chunks:
        out.append(model.decode(x[:, at : at + n], state, skip))
        at += n
    return torch.cat(out, 1), state


def test_cached_decode_with_skipping_equals_full_forward_with_skipping_and_keeps_the_cache_exact():
    model = tiny()
    x = tokens(T=24)
    skip = SkipPlan(TAU)
    with torch.no_grad():
        full = model(x, skip=skip)
        cached, state = _decode(model, x, skip)
        _, masked_state = _decode(model, x, SkipPlan(TAU, gather=False))
        _, dense_state = _decode(model, x, None)
    _ragged(full.skipped)
    assert (cached - full.logits).abs().max().item() <= 1e-4
    for layer in range(TINY.n_layer):
        for ours, ref in ((state.kv.k, masked_state.kv.k), (state.kv.v, masked_state.kv.v)):
            assert (ours[layer][:, :, :24] - ref[layer][:, :, :24]).abs().max().item() <= 1e-5
            assert ours[layer][:, :, :24].abs().amin(dim=-1).gt(0).all()  # every position has its key/value
    # layer 0 sees the embeddings: its keys and values are the dense model's exactly as computed
    assert (state.kv.k[0] - dense_state.kv.k[0]).abs().max().item() <= 1e-6


def test_a_head_skipped_by_every_query_leaves_the_kernel(monkeypatch):
    model = tiny(["head_gate"])
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append(q.shape[1])
        return original(q, k, v, **kwargs)

    x = tokens(B=1, T=6)
    with torch.no_grad():
        signals = model(x).signals["head_gate"]
        state = model.new_decode_state(1)
        model.decode(x[:, :5], state)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        model.decode(x[:, 5:], state, SkipPlan(TAU))
    live = (signals[0, 5] >= TAU).sum(-1).tolist()  # heads each layer runs for the last token
    assert calls == [n for n in live if n > 0] and min(live) < 4


def test_flop_counter_matches_a_hand_count_for_a_two_layer_model():
    cfg = ModelConfig(vocab_size=16, block_size=8, d_model=8, n_layer=2, n_head=2, d_ff=32)
    plain = count_flops(cfg, ModulationConfig(targets=[]), B=1, T=3)
    # per token and layer 8·64 + 4·8·n + 4·8·32 = 1536 + 32 n, n = 1, 2, 3; 2 layers; head 2·8·16 per token
    assert plain.total == 2 * (1568 + 1600 + 1632) + 3 * 256 == 10368
    assert plain.ffn == 3 * 2 * 1024 and plain.total_skipped == 0
    ctrl = ModulationConfig(targets=["activation", "head_gate", "layer_gate"], hidden_dim=4, heads=2)
    # controller per token: fc1 2·8·4 + fc2 2·4·(2 layers · 4 columns) + salience 4·64 + 2·8·2 = 416
    assert count_flops(cfg, ctrl, B=1, T=3).total == 10368 + 3 * 416
    layer = torch.zeros(1, 3, 2, dtype=torch.bool)
    ffn = torch.zeros(1, 3, 2, dtype=torch.bool)
    head = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    layer[0, 0, 1] = True  # 4·64 + 4·8·1 + 1024 = 1312
    ffn[0, 0, 1] = True  # inside the skipped layer: not counted again
    ffn[0, 2, 0] = True  # 1024
    head[0, 1, 0, 1] = True  # 4·4·2 + 2·4·8 = 96
    head[0, 0, 1, 0] = True  # inside the skipped layer
    count = count_flops(cfg, ModulationConfig(targets=[]), 1, 3, SkipMasks(ffn, head, layer))
    assert count.total_skipped == 1312 + 1024 + 96
    assert count.ffn_skipped == 2048 and count.ffn_fraction == pytest.approx(1 / 3)
    assert count.total_fraction == pytest.approx(2432 / 10368)
    # a chunk continuing a prefix of 5: its one query sees 6 keys
    assert count_flops(cfg, ModulationConfig(targets=[]), 1, 1, start=5).total == 2 * (1536 + 32 * 6) + 256


def test_random_control_skips_the_same_count_per_layer_and_unit():
    model = tiny()
    with torch.no_grad():
        masks = threshold_masks(model(tokens()).signals, TAU)
    _ragged(masks)
    draws = [random_like(masks, torch.Generator().manual_seed(s)) for s in range(3)]
    for drawn in draws:
        for ours, theirs in ((drawn.ffn, masks.ffn), (drawn.layer, masks.layer), (drawn.head, masks.head)):
            per_layer = ours.movedim(2, 0).flatten(1).sum(1)
            assert torch.equal(per_layer, theirs.movedim(2, 0).flatten(1).sum(1))
            assert not torch.equal(ours, theirs)
    assert not torch.equal(draws[0].ffn, draws[1].ffn)


def test_compute_cost_is_the_flop_weighted_mean_gate():
    cfg = ModelConfig(vocab_size=16, block_size=8, d_model=8, n_layer=1, n_head=2, d_ff=32)
    signals = {
        "ffn_gate": torch.tensor([[[0.5], [1.0]]]),  # (B=1, T=2, L=1); each FFN 4·8·32 = 1024
        "head_gate": torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]]),  # each head 4·4·n + 2·4·8: 80, 96
        "layer_gate": torch.tensor([[[0.25], [0.5]]]),  # 4·64 + 4·8·n + 1024: 1312, 1344
        "gain": torch.zeros(1, 2, 1),  # not a gate: no cost
    }
    num = 0.5 * 1024 + 1024 + 80 + 2 * 96 + 0.25 * 1312 + 0.5 * 1344
    den = 2 * 1024 + 2 * 80 + 2 * 96 + 1312 + 1344
    assert compute_cost(signals, cfg).item() == pytest.approx(num / den, rel=1e-6)
    assert compute_cost({"gain": torch.ones(1, 2, 1)}, cfg).item() == 0.0


def test_compute_lambda_adds_the_cost_and_frees_the_gates_from_homeostasis():
    x = tokens()
    y = torch.roll(x, -1, 1)
    off = tiny(GATED)
    on = tiny(GATED, compute_lambda=0.3)
    with torch.no_grad():
        a, b = off(x, y), on(x, y)
    assert a.compute_loss is None and torch.equal(a.loss, a.ce_loss + a.reg_loss)
    cost = compute_cost(b.signals, TINY)
    assert b.compute_loss.item() == pytest.approx(0.3 * cost.item(), rel=1e-6)
    assert b.loss.item() == pytest.approx((b.ce_loss + b.reg_loss + b.compute_loss).item(), rel=1e-6)
    kept = {k: v for k, v in b.signals.items() if k in ("gain", "precision")}
    assert b.reg_loss.item() == pytest.approx(homeostatic_loss(kept, 0.01).item(), rel=1e-6)
    assert a.reg_loss.item() == pytest.approx(homeostatic_loss(a.signals, 0.01).item(), rel=1e-6)
    assert a.reg_loss.item() > b.reg_loss.item()


def test_compute_curve_pins_its_ends_and_matches_the_counter():
    model = tiny(["activation"])  # one FFN gate per token and layer
    batches = [(tokens(seed=s), torch.roll(tokens(seed=s), -1, 1)) for s in (0, 1)]
    dense, (nothing, some, everything) = compute_curve(model, batches, torch.device("cpu"), [1e-9, TAU, 1.0], draws=3)
    with torch.no_grad():
        ce = [
            torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="sum")
            for x, y in batches
        ]
    assert dense == pytest.approx(float(sum(ce)) / (2 * 3 * 24), rel=1e-6)
    assert (nothing.ffn_skipped, nothing.delta_loss, nothing.random_delta_loss, nothing.random_delta_std) == (
        0,
        0,
        0,
        0,
    )
    # τ = 1: every FFN is skipped, by the gates and by every random draw alike
    assert everything.ffn_skipped == 1.0 == everything.random_ffn_skipped
    assert everything.random_delta_loss == pytest.approx(everything.delta_loss, abs=1e-6)
    assert everything.random_delta_std == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        masks = [model(x, skip=SkipPlan(TAU)).skipped for x, _ in batches]
    counted = sum(
        (count_flops(TINY, model.modulation_config, 3, 24, m) for m in masks[1:]),
        count_flops(TINY, model.modulation_config, 3, 24, masks[0]),
    )
    assert some.ffn_skipped == pytest.approx(counted.ffn_fraction) and 0 < some.ffn_skipped < 1
    assert some.total_skipped == pytest.approx(counted.total_fraction)
    assert some.random_ffn_skipped == pytest.approx(some.ffn_skipped)  # same count per layer, FFN cost per token fixed
    assert some.delta_loss == pytest.approx(some.val_loss - dense) and some.random_delta_std > 0
    again = compute_curve(model, batches, torch.device("cpu"), [TAU], draws=3)[1][0]
    assert again.random_delta_loss == some.random_delta_loss  # seeded draws: a rerun gives the same numbers


def test_compute_curve_refuses_a_model_without_gates():
    with pytest.raises(NCNConfigError, match=r"skip_grid needs a model with gates: ncn.targets=\['temperature'\]"):
        compute_curve(tiny(["temperature"]), [(tokens(), tokens())], torch.device("cpu"), [0.5])


NO_GATES = (
    "skips units whose gate is below the threshold, and {owner} has no gates (ncn.targets={targets}): use a "
    "checkpoint trained with ncn=sparse, ncn=head_gate or ncn=layer_gate (or any ncn option with the FFN gate, "
    "ncn.activation=gate with the activation target, e.g. ncn=full), or drop skip_threshold"
)


@pytest.mark.parametrize(
    ("targets", "gated"),
    [
        ([], False),
        (["temperature", "gain"], False),
        (["temperature", "gain", "activation"], True),  # ncn=full: the FFN gate
        (["head_gate"], True),
        (["layer_gate"], True),
    ],
)
def test_skipping_is_refused_for_a_model_without_gates(targets: list[str], gated: bool) -> None:
    """A threshold on a model without gates would skip nothing and report 0 %: it is refused instead."""
    model = ModulatedGPT(TINY, ModulationConfig(targets=targets)).eval()
    if gated:
        require_gates(model, "skip_threshold=0.3", "ckpt")
        assert [t.shape for t in model.stream(tokens(1, 4), 2, 0.0, skip_threshold=0.3)] == [(1, 1), (1, 1)]
        return
    with pytest.raises(NCNConfigError) as refused:
        require_gates(model, "skip_threshold=0.3", "ckpt")
    assert str(refused.value) == "skip_threshold=0.3 " + NO_GATES.format(owner="ckpt", targets=targets)
    with pytest.raises(NCNConfigError) as in_the_model:  # checked at the call, before any token
        model.stream(tokens(1, 4), 2, 0.0, skip_threshold=0.3)
    assert str(in_the_model.value) == (
        "skip_threshold=0.3 needs a model with gates (ffn_gate, head_gate or layer_gate), and "
        f"ncn.targets={targets} has none: use 0 (dense) or a model with gates"
    )
    assert len(list(model.stream(tokens(1, 4), 2, 0.0, skip_threshold=0.0))) == 2  # dense is fine


def test_skip_threshold_on_a_checkpoint_without_gates_is_one_error_line(tmp_path: Path) -> None:
    """eval, generate and analyze refuse skip_threshold for an ncn=none checkpoint (exit 2), naming it."""
    run_dir = tmp_path / "run"
    base = ["model=tiny", "data.tokenizer=bytes", "tracking=none"]
    done = run_cli([*base, "trainer=smoke", "ncn=none", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "step_000006"
    for task in ("eval", "generate", "analyze"):
        refused = run_cli(
            [f"task={task}", f"checkpoint={ckpt}", "skip_threshold=0.3", f"hydra.run.dir={tmp_path / task}"], tmp_path
        )
        assert refused.returncode == 2, refused.stderr[-3000:]
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
        assert errors == ["error: skip_threshold=0.3 " + NO_GATES.format(owner=ckpt, targets=[])]
        assert refused.stdout == ""


def test_report_shows_the_compute_columns_at_the_report_threshold():
    keys = {name: f"val/compute/t{REPORT_TAU:g}/{name}" for name in ("ffn_skipped", "total_skipped", "delta_loss")}
    random_key = f"val/compute/t{REPORT_TAU:g}/random_delta_loss"
    results = [
        RunResult(
            "sparse",
            s,
            1,
            0.0,
            2.0,
            1.0,
            [],
            {keys["ffn_skipped"]: f, keys["total_skipped"]: f / 2, keys["delta_loss"]: d, random_key: r},
        )
        for s, (f, d, r) in enumerate([(0.30, 0.01, 0.05), (0.34, 0.03, 0.07)])
    ]
    text = markdown(table(results, ["sparse"], {"ncn": ["sparse"]}), "compute", [])
    assert f"| FFN FLOPs skipped at τ={REPORT_TAU:g} (%) | forward FLOPs skipped (%) |" in text
    half = T_975_DF1 * 0.01  # sample std of (0.01, 0.03) is 0.01·√2, over √2 runs
    assert f"| 32.0 ± 2.8 | 16.0 ± 1.4 | {0.02:+.4f} [{0.02 - half:+.4f}, {0.02 + half:+.4f}] |" in text
    assert f"{0.06:+.4f} [{0.06 - half:+.4f}, {0.06 + half:+.4f}]" in text
    plain = [RunResult("full", 0, 1, 0.0, 2.0, 1.0)]
    assert "FLOPs skipped" not in markdown(table(plain, ["full"], {"ncn": ["full"]}), "ablation", [])


ROWS = [
    ComputeRow(0.1, 0.05, 0.03, 2.01, 0.01, 0.02, 0.004, 0.05),
    ComputeRow(0.5, 0.40, 0.25, 2.10, 0.10, 0.16, 0.010, 0.38),
]


def test_compute_metrics_parse_back_to_the_rows():
    logged = metrics(ROWS) | {"val/loss": 2.0, "val/compute/t0.5/unknown_field": 1.0}
    assert parse_metrics(logged) == {
        0.1: {k: v for k, v in ROWS[0].as_dict().items() if k != "tau"},
        0.5: {k: v for k, v in ROWS[1].as_dict().items() if k != "tau"},
    }
    assert list(parse_metrics(logged)) == [0.1, 0.5] and parse_metrics({"val/loss": 2.0}) == {}


def test_eval_curve_of_one_checkpoint_gives_random_skipping_the_t_interval_of_its_draws(tmp_path: Path):
    points = curve_points(ROWS, draws=5)
    half = t.ppf(0.975, 4) * 0.010 / 5**0.5  # sample std 0.010 over 5 draws
    assert points["random"][1] == pytest.approx((38.0, 0.16, 0.16 - half, 0.16 + half))
    assert points["gated"][1][:2] == pytest.approx((40.0, 0.10))  # one deterministic evaluation: no interval
    assert all(math.isnan(x) for x in points["gated"][1][2:])
    one_draw = curve_points(ROWS, draws=1)["random"][0]
    assert one_draw[:2] == pytest.approx((5.0, 0.02)) and math.isnan(one_draw[2])
    path = curve_plot(ROWS, 5, "tiny-sparse-s0, step 6", tmp_path / "quality_compute.png")
    with Image.open(path) as png:
        assert (png.format, png.size) == ("PNG", (960, 660))


@pytest.mark.slow
def test_sparse_trains_measures_and_skips_through_run_py(tmp_path: Path, mlflow_store) -> None:
    """ncn=sparse trains with the cost logged apart, measures its τ grid at the end, and eval, generate and
    analyze take skip_threshold; a fresh model's gates (≈ 0.95) are all below τ = 1, none below 0.5."""
    uri = mlflow_store(tmp_path / "mlflow.db")
    run_dir = tmp_path / "run"
    base = ["model=tiny", "data.tokenizer=bytes", f"tracking.uri={uri}"]
    done = run_cli([*base, "trainer=smoke", "ncn=sparse", "skip_grid=[0.5]", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    costs = [m["train/compute_loss"] for m in logged if "train/compute_loss" in m]
    assert len(costs) == 6 and all(abs(c - 0.2 * 0.9526) < 0.005 for c in costs)  # λ · cost, gates at sigmoid(3)
    lines = [line.split(" - ", 1)[1] for line in done.stdout.splitlines() if " - step 6/6 | " in line]
    terms = dict(f.split(" ") for f in lines[0].split(" | ")[1:6])  # the console shows the cost in the loss
    assert list(terms) == ["loss", "ce", "reg", "compute", "lr"] and len(lines) == 1
    assert float(terms["compute"]) == pytest.approx(costs[-1], abs=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(terms["ce"]) + float(terms["reg"]) + costs[-1], abs=2e-4)
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["val/compute/t0.5/ffn_skipped"] == 0.0 == final["val/compute/t0.5/delta_loss"]

    ckpt = f"checkpoint={run_dir / 'checkpoints' / 'step_000006'}"
    evaluated = run_cli(
        [
            "task=eval",
            ckpt,
            "trainer.eval_batches=2",  # the batches training evaluated (task=eval's default is the whole split)
            "skip_threshold=1.0",
            "skip_grid=[0.5,1.0]",
            "skip_draws=2",
            f"hydra.run.dir={tmp_path / 'e'}",
        ],
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "skip_threshold 1: 100.0 % of FFN FLOPs and" in evaluated.stdout
    rows = list(csv.DictReader((tmp_path / "e" / "compute.csv").open()))
    assert [float(r["tau"]) for r in rows] == [0.5, 1.0]
    png = tmp_path / "e" / "quality_compute.png"
    assert f"wrote {tmp_path / 'e' / 'compute.csv'} and {png}" in evaluated.stdout
    with Image.open(png) as image:
        assert (image.format, image.size) == ("PNG", (960, 660))
    assert float(rows[1]["ffn_skipped"]) == 1.0 == float(rows[1]["random_ffn_skipped"])
    assert float(rows[0]["total_skipped"]) == 0.0 < float(rows[1]["total_skipped"]) < 1.0  # K/V, head, controller stay
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("ncn").experiment_id])[0]
    assert run.data.metrics["val/compute/t1/ffn_skipped"] == 1.0 and run.info.status == "FINISHED"
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "compute/e"))
    assert logged == ["compute/e/compute.csv", "compute/e/quality_compute.png"]

    args = ["task=generate", ckpt, "prompt=ROMEO:", "max_new_tokens=16", "seed=0"]
    dense = run_cli([*args, f"hydra.run.dir={tmp_path / 'g0'}"], cwd=tmp_path)
    tiny_tau = run_cli([*args, "skip_threshold=1e-9", f"hydra.run.dir={tmp_path / 'g1'}"], cwd=tmp_path)
    assert dense.returncode == 0 == tiny_tau.returncode and dense.stdout == tiny_tau.stdout  # nothing below τ

    analyzed = run_cli(["task=analyze", ckpt, "skip_threshold=1.0", f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    stats = json.loads((tmp_path / "a" / "analysis" / "summary.json").read_text())["statistics"]
    assert stats["layer_gate/L0/skipped"] == 1.0 == stats["head_gate/L1/skipped"]


def test_a_threshold_outside_its_range_is_one_error_line(tmp_path: Path) -> None:
    done = run_cli(["task=eval", "skip_grid=[0.5,1.5]"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: skip_grid contains 1.5, outside (0, 1]: list gate thresholds, e.g. skip_grid=[0.1,0.3,0.5]"
    )


def _copy_task(gate_mode: str) -> tuple[list[float], list[float], float]:
    """Train a 2-layer model with layer gates and compute_lambda 0.5 to copy the previous token.

    Layer 0's attention is needed; layer 1's outputs are frozen at 0, so only the cost acts on its
    gate. AdamW as in training (decay 0.1 on matrices). Returns per layer the mean gate and the
    fraction of tokens whose gate is >= 0.5 (they run at skip_threshold 0.5), and the final CE.
    """
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, block_size=16, d_model=32, n_layer=2, n_head=2)
    modulation = ModulationConfig(targets=["layer_gate"], compute_lambda=0.5, pooling="none", gate_mode=gate_mode)
    model = ModulatedGPT(cfg, modulation)
    useless = model.blocks[1]
    with torch.no_grad():
        for p in (useless.attn.proj.weight, useless.attn.proj.bias, useless.mlp.proj.weight, useless.mlp.proj.bias):
            p.zero_()
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = torch.randint(0, 16, (16, 16), generator=g)
        out = model(x, torch.roll(x, 1, 1))  # the previous token (position 0: unlearnable, 1/16 of the loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    with torch.no_grad():
        x = torch.randint(0, 16, (16, 16), generator=g)
        out = model(x, torch.roll(x, 1, 1))
    gate = out.signals["layer_gate"]  # (B, T, 2)
    return gate.mean(dim=(0, 1)).tolist(), (gate >= 0.5).float().mean(dim=(0, 1)).tolist(), out.ce_loss.item()


def test_hard_gates_let_the_compute_cost_close_a_useless_layer_and_keep_a_needed_one():
    mean, runs, ce = _copy_task("hard")
    assert mean[1] < 0.01 and runs[1] == 0.0  # the useless layer: closed for every token
    assert runs[0] > 0.95  # the needed layer runs for (almost) every token
    assert ce < 0.5  # and does its work (chance: ln 16 = 2.77)


def test_soft_gates_under_a_compute_cost_shrink_a_needed_layer_too():
    """The measured limit of soft gates: the needed layer's gate falls as far as the useless one's would
    allow while its weights grow to make up for it, so skipping at 0.5 would drop a layer the model needs."""
    mean, runs, ce = _copy_task("soft")
    assert mean[1] < 0.01 and mean[0] < 0.3 and runs[0] < 0.05
    assert ce < 0.5  # the scaled-down layer still does its work


def test_hard_gates_run_a_unit_whole_or_not_at_all_and_pass_gradients_straight_through():
    model = tiny(GATED, gate_mode="hard")
    x = tokens()
    with torch.no_grad():
        out = model(x)
        assert (model(x, skip=SkipPlan(0.5)).logits - out.logits).abs().max().item() <= 1e-6  # τ = 0.5 is the model
        soft = tiny(GATED)
        soft.load_state_dict(model.state_dict())
        ones = {
            name: (v >= 0.5).float() if name in ("ffn_gate", "head_gate", "layer_gate") else v
            for name, v in soft(x).signals.items()
        }
    assert torch.equal(out.signals["layer_gate"], soft(x).signals["layer_gate"])  # signals: the controller's values
    assert 0 < ones["head_gate"].mean().item() < 1  # some heads off, some on: τ = 0.5 does skip
    model.train()
    model(x, torch.roll(x, -1, 1)).loss.backward()
    assert model.controller.fc2.weight.grad.abs().sum().item() > 0
