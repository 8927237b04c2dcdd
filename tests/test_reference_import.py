"""`task=import`: a checkpoint of the reference implementation's train.py becomes an ncn checkpoint.

The oracle is tests/reference_model.py, a re-implementation of the reference's `ModulatedLLM`
forward pass with its parameter names and shapes. A random model of it (2 layers, width 32, the
GPT-2 vocabulary) is saved as the reference's train.py saves; asserted: the imported model's
logits equal the oracle's (max |Δ| <= 1e-4 in fp32), its config pools globally with the
reference's transforms, task=eval evaluates it with the leak audit and reports the oracle's own
val loss, it generates, is analyzed and fine-tunes (trainer.resume), and an unmappable tensor,
a wrong shape or a file that needs full unpickling (without unsafe_unpickle=true) each end in
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
