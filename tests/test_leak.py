"""The leak audit (NCN paper §5) and bits per byte of `ncn.training.evaluation`, on tiny models in memory.

Exactly zero leak without global pooling; a positive leak, concentrated in the early positions,
for a model trained to read a latent bit from the future, equal to an independent per-position
cross-entropy of two models built from the two pooling configs; bits per byte by hand.
Run: python -m pytest -q tests/test_leak.py   (a few seconds)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ncn.config import DataConfig, ModelConfig, ModulationConfig
from ncn.data.loader import DataModule
from ncn.errors import NCNConfigError
from ncn.model.gpt import ModulatedGPT
from ncn.training.evaluation import (
    EARLY_POSITIONS,
    VAL_BPB,
    VAL_LEAK,
    VAL_LEAK_EARLY,
    VAL_LEAK_LATE,
    VAL_LOSS_CAUSAL,
    evaluate,
    uses_future,
    with_pooling,
)

CPU = torch.device("cpu")
SHAPE = ModelConfig(vocab_size=8, block_size=24, d_model=32, n_layer=1, n_head=2)


def _hidden_bit_batch(generator: torch.Generator, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks 0, t, t, ... with t = 2 + a random bit: the next token after position 0 is the bit,
    which a causal model cannot know there (ln 2 nats) and a view of the future reveals."""
    bit = torch.randint(0, 2, (rows, 1), generator=generator)
    seq = (2 + bit).expand(rows, SHAPE.block_size + 1).clone()
    seq[:, 0] = 0
    return seq[:, :-1], seq[:, 1:]


def _trained(pooling: str, steps: int = 200) -> ModulatedGPT:
    torch.manual_seed(0)
    model = ModulatedGPT(SHAPE, ModulationConfig(pooling=pooling, hidden_dim=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = model(*_hidden_bit_batch(generator, 16)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation (and contention on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def val_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [_hidden_bit_batch(generator, 32), _hidden_bit_batch(generator, 7)]  # a short last batch too


@pytest.mark.parametrize(
    "modulation",
    [ModulationConfig(pooling="causal"), ModulationConfig(pooling="none"), ModulationConfig(targets=[])],
    ids=["causal", "pooling_none", "plain_transformer"],
)
def test_leak_is_exactly_zero_without_global_pooling(modulation, val_batches) -> None:
    torch.manual_seed(0)
    model = ModulatedGPT(SHAPE, modulation)
    metrics = evaluate(model, val_batches, CPU)
    assert not uses_future(model)
    assert metrics[VAL_LEAK] == 0.0 and metrics[VAL_LEAK_EARLY] == 0.0 and metrics[VAL_LEAK_LATE] == 0.0
    assert metrics[VAL_LOSS_CAUSAL] == metrics["val/loss"]


def test_causal_twin_of_a_causal_model_evaluates_bitwise_equal(val_batches) -> None:
    torch.manual_seed(0)
    model = ModulatedGPT(SHAPE, ModulationConfig(pooling="causal"))
    twin = with_pooling(model, "causal")
    assert evaluate(twin, val_batches, CPU) == evaluate(model, val_batches, CPU)


def test_twin_shares_the_weights_and_only_the_mask_differs() -> None:
    torch.manual_seed(0)
    model = ModulatedGPT(SHAPE, ModulationConfig(pooling="global")).train()
    twin = with_pooling(model, "causal")
    assert twin.modulation_config.pooling == "causal" and model.modulation_config.pooling == "global"
    assert twin.training and uses_future(model) and not uses_future(twin)
    ours, theirs = model.state_dict(), twin.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() and ours[k].device == theirs[k].device for k in ours)
    plain = ModulatedGPT(SHAPE, ModulationConfig(pooling="none"))
    with pytest.raises(NCNConfigError, match=r"no salience pooling \(.*ncn.pooling=none\)"):
        with_pooling(plain, "causal")
    with pytest.raises(NCNConfigError, match="pooling='none': a salience pooling mask is 'causal' or 'global'"):
        with_pooling(model, "none")


# evaluate() sums fp32 cross-entropies of near-certain predictions (each off by up to ~1e-7 from the
# float64 reference); 1e-7 still fails a denominator off by one token (4e-4 / 936 = 4.5e-7)
FP32_CE = 1e-7


def _per_position_ce(model: ModulatedGPT, batches) -> torch.Tensor:
    """Independent reference: CE (N, T) of every val row and position, from the logits."""
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [F.cross_entropy(model(x).logits.transpose(1, 2), y, reduction="none").double() for x, y in batches]
        )


def test_a_model_trained_to_read_the_future_has_a_positive_leak_equal_to_a_direct_computation(val_batches) -> None:
    model = _trained("global")
    metrics = evaluate(model, val_batches, CPU, early=EARLY_POSITIONS)

    # independent: a second model built from the causal config, given a copy of the weights
    causal = ModulatedGPT(SHAPE, ModulationConfig(pooling="causal", hidden_dim=32))
    causal.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    ce_global, ce_causal = _per_position_ce(model, val_batches), _per_position_ce(causal, val_batches)
    assert ce_global.shape == (39, SHAPE.block_size)
    diff = ce_causal - ce_global
    assert metrics["val/loss"] == pytest.approx(ce_global.mean().item(), abs=FP32_CE)
    assert metrics[VAL_LOSS_CAUSAL] == pytest.approx(ce_causal.mean().item(), abs=FP32_CE)
    assert metrics[VAL_LEAK] == pytest.approx(diff.mean().item(), abs=FP32_CE)
    assert metrics[VAL_LEAK_EARLY] == pytest.approx(diff[:, :EARLY_POSITIONS].mean().item(), abs=FP32_CE)
    assert metrics[VAL_LEAK_LATE] == pytest.approx(diff[:, EARLY_POSITIONS:].mean().item(), abs=FP32_CE)

    # the bit is unknowable at position 0 without the future: the global model learned to read it
    assert ce_global[:, 0].mean() < 0.1 * math.log(2)
    assert metrics[VAL_LEAK] > 0.02 and metrics[VAL_LEAK_EARLY] > 0.1
    assert metrics[VAL_LEAK_EARLY] > 10 * abs(metrics[VAL_LEAK_LATE])  # later positions see the bit in the past

    # another bucket boundary: the first position alone holds (almost) the whole leak
    first = evaluate(model, val_batches, CPU, early=1)
    assert first[VAL_LEAK_EARLY] == pytest.approx(diff[:, 0].mean().item(), abs=1e-9)
    assert first[VAL_LEAK] == metrics[VAL_LEAK]
    assert VAL_LEAK_LATE not in evaluate(model, val_batches, CPU, early=SHAPE.block_size)  # an empty bucket


def test_the_same_task_trained_causally_cannot_beat_ln2_at_the_first_position(val_batches) -> None:
    model = _trained("causal")
    ce = _per_position_ce(model, val_batches)
    assert ce[:, 0].mean().item() == pytest.approx(math.log(2), abs=0.05)
    assert evaluate(model, val_batches, CPU)[VAL_LEAK] == 0.0


def test_bits_per_byte_by_hand(tmp_path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    val_text = "Ô ma mère, " * 30  # Ô and è are 2 bytes each in UTF-8
    for i in range(9):
        (corpus / f"doc{i}.txt").write_text(f"scene {i}: " + "to be or not to be. " * 40)
    (corpus / "val.txt").write_text(val_text)
    data = DataModule(DataConfig(source="text_files", path=str(corpus), tokenizer="bytes", cache_dir=str(tmp_path)))
    info = data.prepare()
    val_names = info.meta["split"]["val_names"]
    assert len(val_names) == 1
    val_bytes = len((corpus / val_names[0]).read_text().encode("utf-8"))  # one document: its text + end-of-text
    torch.manual_seed(0)
    model = ModulatedGPT(ModelConfig(vocab_size=320, block_size=16, d_model=16, n_layer=1, n_head=2))
    batches = data.val_batches(4, 16)
    metrics = evaluate(model, batches, CPU, bits_per_byte=data.bits_per_byte)
    ce = metrics["val/loss"]
    assert ce == pytest.approx(_per_position_ce(model, batches).mean().item(), rel=1e-6)  # float32 sums
    assert metrics[VAL_BPB] == pytest.approx(ce * (val_bytes + 1) / (math.log(2) * val_bytes), rel=1e-12)
    assert VAL_BPB not in evaluate(model, batches, CPU)  # logged only where the caller knows the bytes


@pytest.mark.parametrize("pooling", ["causal", "global"])
def test_evaluate_runs_in_eval_mode_and_restores_the_callers_mode(pooling: str) -> None:
    """A model in training mode (dropout 0.5) is evaluated without dropout (the loss equals the eval-mode
    forward's, on every call) and is back in training mode afterwards, every submodule included; a
    model in eval mode stays in eval mode."""
    torch.manual_seed(0)
    shape = ModelConfig(vocab_size=8, block_size=24, d_model=32, n_layer=1, n_head=2, dropout=0.5)
    model = ModulatedGPT(shape, ModulationConfig(pooling=pooling))
    x = torch.randint(0, 8, (3, 24), generator=torch.Generator().manual_seed(1))
    batches = [(x[:, :-1], x[:, 1:])]
    with torch.no_grad():
        expected = model.eval()(x[:, :-1], x[:, 1:]).ce_loss.item()
    model.train()
    first, second = evaluate(model, batches, CPU)["val/loss"], evaluate(model, batches, CPU)["val/loss"]
    assert first == second == pytest.approx(expected, rel=1e-6)
    assert all(m.training for m in model.modules())
    model.eval()
    evaluate(model, batches, CPU)
    assert not any(m.training for m in model.modules())
