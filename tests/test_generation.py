"""Cached generation (KV cache + salience state) equals the full forward pass; sampling controls.

NCN paper §5 invariants on tiny CPU models. `python -m pytest -q tests/test_generation.py`.
"""

import pytest
import torch

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.errors import NCNConfigError

from model_cases import ALL, TARGET_SETS

TINY = ModelConfig(vocab_size=97, block_size=32, d_model=32, n_layer=2, n_head=4)


def tiny(targets=ALL, block_size=32, seed=0, **modulation):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, block_size=block_size, d_model=32, n_layer=2, n_head=4)
    model = ModulatedGPT(cfg, ModulationConfig(targets=targets, **modulation)).eval()
    if targets:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # a strongly non-neutral controller, so any mismatch would show
            for p in model.controller.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def prompt(B=2, T=24, seed=0):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "variant",
    [{"targets": t} for t in TARGET_SETS]
    + [
        {"targets": ALL, "per_head_precision": True},
        {"targets": ALL, "activation": "swish_beta"},
        {"targets": ALL, "pooling": "none"},
    ],
    ids=lambda v: "+".join(v["targets"]) + "".join(f"-{k}={x}" for k, x in v.items() if k != "targets") or "baseline",
)
def test_cached_decoding_equals_full_forward(variant):
    model = tiny(**variant)
    x = prompt(T=30)
    with torch.no_grad():
        full = model(x).logits
        state = model.new_decode_state(2)
        chunks = [x[:, :11], x[:, 11:12], x[:, 12:13], x[:, 13:14], x[:, 14:30]]  # prefill, 3 tokens, chunk
        cached = torch.cat([model.decode(c, state) for c in chunks], dim=1)
    assert state.kv.pos == 30
    assert (cached - full).abs().max().item() <= 1e-4
    assert (cached[:, -1] - full[:, -1]).abs().max().item() <= 1e-4


def test_salience_state_is_constant_size_and_controller_sees_one_token_per_step():
    model = tiny(ALL)
    seen = []
    model.controller.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    state = model.new_decode_state(2)
    with torch.no_grad():
        model.decode(prompt(T=5), state)
        for t in range(10):
            model.decode(prompt(T=1, seed=t), state)
            assert state.salience.lse.shape == (2, 2) and state.salience.value.shape == (2, 2, 16)
    assert seen == [5] + [1] * 10  # O(1) controller work per new token


def test_greedy_generation_with_and_without_cache_agree():
    model = tiny(ALL)
    x = prompt(T=8)
    cached = model.generate(x, 20, temperature=0)
    uncached = model.generate(x, 20, temperature=0, use_cache=False)
    assert cached.shape == (2, 28) and torch.equal(cached[:, :8], x)
    assert torch.equal(cached, uncached)


def test_global_pooling_refuses_incremental_generation():
    model = tiny(ALL, pooling="global")
    with pytest.raises(
        NCNConfigError, match=r"ncn\.pooling=global cannot decode incrementally.*Python argument use_cache=False"
    ):
        model.generate(prompt(T=4), 3)
    out = model.generate(prompt(T=4), 3, temperature=0, use_cache=False)
    with torch.no_grad():
        first = model(prompt(T=4)).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, 4], first)


def test_greedy_is_argmax_of_forward_and_top_k_1_is_greedy():
    model = tiny(ALL)
    x = prompt(T=6)
    with torch.no_grad():
        first = model(x).logits[:, -1].argmax(-1)
    greedy = model.generate(x, 5, temperature=0)
    assert torch.equal(greedy[:, 6], first)
    assert torch.equal(model.generate(x, 5, temperature=0.7, top_k=1), greedy)


def test_generator_makes_sampling_reproducible():
    model = tiny(ALL)
    x = prompt(T=4)

    def sample(seed, **kw):
        return model.generate(x, 16, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    assert torch.equal(sample(7), sample(7, use_cache=False))  # same logits, same random stream


def test_top_k_restricts_samples_to_the_k_most_likely():
    model = tiny(ALL)
    x = prompt(B=64, T=4)
    with torch.no_grad():
        allowed = model(x).logits[:, -1].topk(3).indices
    out = model.generate(x, 1, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert (out[:, -1:] == allowed).any(dim=1).all()


@pytest.mark.parametrize("use_cache", [True, False])
def test_temperature_2_samples_softmax_of_logits_over_2(use_cache):
    """Sampled frequencies of the first token at temperature 2 match softmax(logits / 2) of the full
    forward pass; softmax(logits / 4) (temperature applied twice) and softmax(logits) are far off."""
    model = tiny(ALL)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked logits: the temperature changes the distribution a lot
    n = 32000
    x = prompt(B=1, T=4).expand(n, 4)
    with torch.no_grad():
        logits = model(x[:1]).logits[0, -1].double()
    out = model.generate(x, 1, temperature=2.0, generator=torch.Generator().manual_seed(0), use_cache=use_cache)
    freq = torch.bincount(out[:, -1], minlength=97).double() / n

    def tv(p, q):  # total variation distance
        return 0.5 * (p - q).abs().sum().item()

    expected = torch.softmax(logits / 2, dim=-1)
    assert tv(freq, expected) < 0.04  # sampling noise at n = 32000: 0.015-0.02
    assert tv(freq, torch.softmax(logits / 4, dim=-1)) > 0.25  # 0.37 apart
    assert tv(freq, torch.softmax(logits, dim=-1)) > 0.25  # 0.52 apart


def test_stream_yields_the_generated_tokens_one_by_one():
    model = tiny(ALL)
    x = prompt(T=5)
    steps = list(model.stream(x, 6, temperature=0))
    assert len(steps) == 6 and all(s.shape == (2, 1) and s.dtype == torch.long for s in steps)
    assert torch.equal(torch.cat([x, *steps], dim=1), model.generate(x, 6, temperature=0))


def test_long_prompt_is_cropped_from_the_left_with_a_warning():
    model = tiny(ALL, block_size=16)
    x = prompt(T=20)
    with pytest.warns(UserWarning, match=r"prompt of 20 tokens is longer than block_size=16"):
        out = model.generate(x, 3, temperature=0)
    assert out.shape == (2, 23) and torch.equal(out[:, :20], x)
    assert torch.equal(out[:, 20:], model.generate(x[:, -16:], 3, temperature=0)[:, 16:])


def test_full_cache_re_prefills_the_last_half_block():
    block = 16
    model = tiny(ALL, block_size=block)
    x = prompt(T=10)
    out = model.generate(x, 30, temperature=0)
    # Reference for the documented policy: the cache holds ctx[start:]; when it is full, the
    # next step restarts it from the last block // 2 tokens.
    ctx, start = x, 0
    with torch.no_grad():
        for _ in range(30):
            if ctx.shape[1] - start > block:
                start = ctx.shape[1] - block // 2
            nxt = model(ctx[:, start:]).logits[:, -1].argmax(-1, keepdim=True)
            ctx = torch.cat([ctx, nxt], dim=1)
    assert torch.equal(out, ctx)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, r"temperature=-1\.0 is negative"),
        ({"top_k": 0}, r"top_k=0 must be >= 1"),
        ({"max_new_tokens": -2}, r"max_new_tokens=-2 is negative"),
    ],
)
def test_bad_sampling_arguments_fail_before_generating(kwargs, match):
    model = tiny(ALL)
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(NCNConfigError, match=match):
        model.stream(prompt(T=3), **args)  # raised on the call, not at the first next()
