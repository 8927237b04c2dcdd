"""`task=import`: a checkpoint of the reference implementation's train.py becomes an ncn checkpoint.

The oracle is tests/reference_model.py, a re-implementation of the reference's `ModulatedLLM`
forward pass with its parameter names and shapes. A random model of it (2 layers, width 32, the
GPT-2 vocabulary) is saved as the reference's train.py saves; asserted: the imported model's
logits equal the oracle's (max |Δ| <= 1e-4 in fp32), its config pools globally with the
reference's transforms, task=eval evaluates it with the leak audit and reports the oracle's own
val loss, it generates, is analyzed and fine-tunes (trainer.resume, also with the base frozen),
and an unmappable tensor, a wrong shape, a NaN or inf, a model/ncn override, a tokenizer beyond
the vocabulary or a file that needs full unpickling (without unsafe_unpickle=true) each end in
one `error:` line with exit status 2.
Run: python -m pytest -q tests/test_reference_import.py   (about two minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ncn.data.loader import DataModule
from ncn.training.checkpoint import load, load_model, resolve

from conftest import run_cli
from reference_model import ModulatedLLM, NCNConfig, randomise, save_reference_checkpoint

TOLERANCE = 1e-4  # max |Δ logit| between the imported model and the oracle, fp32
SHAPE = {"vocab_size": 50257, "d_model": 32, "nhead": 2, "num_layers": 2, "max_position_embeddings": 32}


def _oracle(signals: list[str] | None = None) -> ModulatedLLM:
    names = signals or ["gain", "precision", "ffn_gate"]
    config = NCNConfig(
        **SHAPE, ncn_hidden_dim=16, ncn_heads=4, num_mod_signals=len(names), modulation_signal_names=names
    )
    torch.manual_seed(0)
    model = ModulatedLLM(config)
    randomise(model, seed=1)
    return model.eval()


def _import(source: Path, cwd: Path, *extra: str):
    return run_cli(
        ["task=import", f"reference_checkpoint={source}", "tracking=none", f"hydra.run.dir={cwd / 'run'}", *extra],
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModulatedLLM, Path, Path]:
    """(oracle, the reference checkpoint file, the imported ncn checkpoint folder)."""
    base = tmp_path_factory.mktemp("reference")
    oracle = _oracle()
    source = base / "checkpoint_step_500.pt"
    save_reference_checkpoint(source, oracle)
    done = _import(source, base)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = base / "run" / "checkpoints" / "step_000500"
    assert f"imported {source} as {folder}" in done.stdout
    return oracle, source, folder


def _max_delta(oracle: ModulatedLLM, folder: Path) -> float:
    model = load_model(load(folder))
    idx = torch.randint(
        0, SHAPE["vocab_size"], (4, SHAPE["max_position_embeddings"]), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        return (model(idx).logits - oracle(idx)).abs().max().item()


def test_the_fixture_drives_every_reference_transform_off_neutral() -> None:
    """Without this the logit test could pass with a wrong transform: the signals must span their ranges."""
    oracle = _oracle()
    idx = torch.randint(0, SHAPE["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        s = oracle.signals(idx)
    assert s["gain"].min() < 0.6 and s["gain"].max() > 1.4  # sigmoid + 0.5 spans (0.5, 1.5)
    assert s["precision"].max() > 4.0  # the clamp at 4 in the reference's attention is exercised
    assert s["ffn_gate"].min() < 0.1


def test_imported_logits_equal_the_reference_forward(imported: tuple[ModulatedLLM, Path, Path]) -> None:
    oracle, _, folder = imported
    assert _max_delta(oracle, folder) <= TOLERANCE


def test_imported_checkpoint_pools_globally_with_the_reference_transforms(
    imported: tuple[ModulatedLLM, Path, Path],
) -> None:
    _, source, folder = imported
    ckpt = load(folder)
    ncn, model = ckpt.config.ncn, ckpt.config.model
    assert ncn.pooling == "global"
    assert (ncn.parametrisation, ncn.controller_activation, ncn.controller_norm) == ("reference", "relu", "none")
    assert (ncn.targets, ncn.hidden_dim, ncn.heads, ncn.precision_max) == (
        ["gain", "temperature", "activation"],
        16,
        4,
        4.0,
    )
    assert (model.norm, model.norm_eps, model.activation, model.vocab_size, model.block_size) == (
        "rms",
        1e-5,
        "gelu",
        50257,
        32,
    )
    assert (ckpt.state.step, ckpt.state.tokens_seen, ckpt.state.val_loss) == (500, 2_048_000, None)
    assert ckpt.extra["imported_from"] == str(source.resolve())
    assert ckpt.optim["optimizer"]["state"] == {}  # a fresh AdamW: the reference's moments are not carried over
    assert ckpt.state.data == {"epoch": 0, "position": 0}
    assert resolve(folder.parent / "latest") == folder


def test_eval_runs_the_leak_audit_and_reports_the_oracles_val_loss(
    imported: tuple[ModulatedLLM, Path, Path], tmp_path: Path
) -> None:
    oracle, _, folder = imported
    done = run_cli(
        [
            "task=eval",
            f"checkpoint={folder}",
            "trainer.eval_batches=2",
            "tracking=none",
            f"hydra.run.dir={tmp_path / 'e'}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = load(folder)
    batches = DataModule(ckpt.config.data).val_batches(ckpt.config.trainer.batch_size, 32, 2)
    with torch.no_grad():
        losses = [F.cross_entropy(oracle(x).flatten(0, 1), y.flatten(), reduction="sum") for x, y, *_ in batches]
    expected = sum(losses).item() / sum(y.numel() for _, y, *_ in batches)
    headline = float(re.search(r"^val loss (\d+\.\d+) \|", done.stdout, re.MULTILINE).group(1))
    assert headline == pytest.approx(expected, abs=1e-3)
    audit = re.search(
        r"^leak audit \(trained with ncn\.pooling=global\): val loss (\d+\.\d+) global, (\d+\.\d+) with the same "
        r"weights under causal pooling; the future buys ([-+]\d+\.\d+) nats/token",
        done.stdout,
        re.MULTILINE,
    )
    assert audit is not None, done.stdout
    global_loss, causal_loss, leak = (float(g) for g in audit.groups())
    assert global_loss == headline
    assert causal_loss != global_loss
    assert leak == pytest.approx(causal_loss - global_loss, abs=2e-4)


def test_the_imported_checkpoint_generates_analyzes_and_fine_tunes(
    imported: tuple[ModulatedLLM, Path, Path], tmp_path: Path
) -> None:
    _, _, folder = imported
    sample = run_cli(
        ["task=generate", f"checkpoint={folder}", "prompt=To be", "max_new_tokens=4", "tracking=none"], cwd=tmp_path
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert sample.stdout.startswith("To be") and len(sample.stdout) > len("To be")
    analysis = run_cli(
        [
            "task=analyze",
            f"checkpoint={folder}",
            "prompt=To be or not",
            "tracking=none",
            f"hydra.run.dir={tmp_path / 'a'}",
        ],
        cwd=tmp_path,
    )
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    summary = json.loads((tmp_path / "a" / "analysis" / "summary.json").read_text())
    assert (summary["run_name"], summary["step"]) == ("reference-checkpoint_step_500", 500)
    gains = [v for k, v in summary["statistics"].items() if k.startswith("gain/") and k.endswith(("/min", "/max"))]
    assert len(gains) == 4 and all(0.5 < g < 1.5 for g in gains)  # the reference's gain range, sigmoid + 0.5
    tuned = run_cli(
        [
            f"trainer.resume={folder}",
            "trainer=smoke",
            "trainer.max_steps=502",
            "tracking=none",
            f"hydra.run.dir={tmp_path / 'ft'}",
        ],
        cwd=tmp_path,
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    after = load(tmp_path / "ft" / "checkpoints" / "step_000502")
    before = load(folder)
    assert after.config.ncn == before.config.ncn and after.config.model == before.config.model
    assert not torch.equal(after.model["controller.fc2.weight"], before.model["controller.fc2.weight"])


def test_a_reordered_subset_of_signals_maps_onto_ncns_order(tmp_path: Path) -> None:
    oracle = _oracle(["ffn_gate", "gain"])
    source = tmp_path / "subset.pt"
    save_reference_checkpoint(source, oracle)
    done = _import(source, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "run" / "checkpoints" / "step_000500"
    assert load(folder).config.ncn.targets == ["gain", "activation"]
    assert _max_delta(oracle, folder) <= TOLERANCE


def _unmappable(state: dict) -> None:
    state["ncn.extra_gate.weight"] = torch.zeros(3, 32)


def _reshaped(state: dict) -> None:
    state["ncn.layer1.weight"] = torch.zeros(16, 33)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            _unmappable,
            r"tensor ncn\.extra_gate\.weight \(3, 32\) has no counterpart in ncn: such a model cannot be imported",
        ),
        (_reshaped, r"the tensor for controller\.fc1\.weight has shape \(16, 33\), its config implies \(16, 32\)"),
    ],
    ids=["unmappable-key", "mismatched-shape"],
)
def test_a_tensor_that_does_not_map_is_refused_in_one_line(tmp_path: Path, damage, message: str) -> None:
    oracle = _oracle()
    source = tmp_path / "bad.pt"
    state = oracle.state_dict()
    damage(state)
    save_reference_checkpoint(source, oracle, extra={"model_state_dict": state})
    done = _import(source, tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: reference_checkpoint={source}: ")
    assert re.search(message, lines[-1]), lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_full_unpickling_needs_the_opt_in_flag(tmp_path: Path) -> None:
    oracle = _oracle()
    source = tmp_path / "with_args.pt"
    save_reference_checkpoint(source, oracle, extra={"args": argparse.Namespace(lr=3e-4, batch_size=8)})
    refused = _import(source, tmp_path)
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: reference_checkpoint={source} needs full unpickling (it would import argparse.Namespace), which "
        "can run code: pass unsafe_unpickle=true only if you trust the file"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
    done = _import(source, tmp_path, "unsafe_unpickle=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _max_delta(oracle, tmp_path / "run" / "checkpoints" / "step_000500") <= TOLERANCE


def test_import_without_a_file_is_refused(tmp_path: Path) -> None:
    done = run_cli(["task=import", "tracking=none", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: task=import needs reference_checkpoint=<file.pt>: the checkpoint the reference's train.py saved"
    )


def _nan_at_first(key: str):
    def damage(state: dict) -> None:
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")

    return damage


def _inf_in_a_base_weight(state: dict) -> None:
    state["transformer_layers.1.feed_forward.linear1.weight"] = torch.full((128, 32), float("inf"))


def _nan_in_the_tied_embedding(state: dict) -> None:
    tied = state["token_embeddings.weight"].clone()
    tied[7, 3] = float("nan")
    state["token_embeddings.weight"] = state["output_head.weight"] = tied  # still tied, as the reference saves it


@pytest.mark.parametrize(
    ("damage", "key", "count"),
    [
        (_nan_at_first("ncn.layer2.bias"), "ncn.layer2.bias", 1),
        (_inf_in_a_base_weight, "transformer_layers.1.feed_forward.linear1.weight", 128 * 32),
        (_nan_in_the_tied_embedding, "token_embeddings.weight", 1),
    ],
    ids=["controller", "base", "tied-embedding"],
)
def test_a_non_finite_tensor_is_refused_in_one_line(tmp_path: Path, damage, key: str, count: int) -> None:
    oracle = _oracle()
    source = tmp_path / "diverged.pt"
    state = oracle.state_dict()
    damage(state)
    save_reference_checkpoint(source, oracle, extra={"model_state_dict": state})
    done = _import(source, tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == (
        f"error: reference_checkpoint={source}: tensor {key} holds {count} non-finite values (NaN or inf): "
        "the checkpoint is damaged; import one saved before the run diverged"
    )
    assert sum(line.startswith("error:") for line in lines) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(("override", "key"), [("model.d_model=64", "model.d_model"), ("ncn=sparse", "ncn")])
def test_a_model_or_ncn_override_is_refused(tmp_path: Path, override: str, key: str) -> None:
    source = tmp_path / "ref.pt"
    save_reference_checkpoint(source, _oracle())
    done = _import(source, tmp_path, override)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {key} cannot be set with task=import: the model and controller come from the reference "
        f"checkpoint: drop {key}"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("vocab", "fix"),
    [
        (1000, "choose the data's tokenizer the reference was trained with (data.tokenizer=bytes fits)"),
        (
            200,
            "no tokenizer of ncn fits (the smallest, data.tokenizer=bytes, has 257): such a model cannot be imported",
        ),
    ],
)
def test_a_tokenizer_beyond_the_vocabulary_names_one_that_fits(tmp_path: Path, vocab: int, fix: str) -> None:
    config = NCNConfig(**{**SHAPE, "vocab_size": vocab}, ncn_hidden_dim=16, ncn_heads=4)
    source = tmp_path / "small_vocab.pt"
    save_reference_checkpoint(source, ModulatedLLM(config).eval())
    done = _import(source, tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: data.tokenizer=gpt2 has 50257 token ids, the reference model {vocab}: {fix}"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_import_with_the_base_frozen_resumes_training_the_controller_only(tmp_path: Path) -> None:
    oracle = _oracle()
    source = tmp_path / "ref.pt"
    save_reference_checkpoint(source, oracle)
    done = _import(source, tmp_path, "trainer.freeze=base")
    assert done.returncode == 0, done.stderr[-3000:]
    before = load(tmp_path / "run" / "checkpoints" / "step_000500")
    controller = sum(p.numel() for p in oracle.ncn.parameters()) - SHAPE["d_model"]  # less the dropped key bias
    groups = before.optim["optimizer"]["param_groups"]
    assert before.config.trainer.freeze == "base"
    assert sum(len(g["params"]) for g in groups) == len(
        [k for k in before.model if k.startswith("controller.")]
    )  # the optimizer holds the controller's tensors only
    tuned = run_cli(
        [
            f"trainer.resume={before.path}",
            "trainer=smoke",
            "trainer.freeze=base",  # trainer=smoke sets the whole group, freeze=none with it
            "trainer.max_steps=501",
            "tracking=none",
            f"hydra.run.dir={tmp_path / 'ft'}",
        ],
        cwd=tmp_path,
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    after = load(tmp_path / "ft" / "checkpoints" / "step_000501")
    changed = {k for k in before.model if not torch.equal(before.model[k], after.model[k])}
    assert changed and all(k.startswith("controller.") for k in changed)
    assert sum(before.model[k].numel() for k in before.model if k.startswith("controller.")) == controller
