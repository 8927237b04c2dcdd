"""Damaged, foreign and malicious checkpoints: one-line error naming the file, and no code ever runs.

End to end through `python run.py` (resume into training, and `task=generate`) on copies of the
session's tiny trained checkpoint, plus in-process fuzzing of `ncn.training.checkpoint.load` (every kind of
truncation, flipped bytes, random bytes, pickle gadgets in every container format).
Run: python -m pytest -q tests/test_checkpoint_safety.py   (~1 min on 2 cores)
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ncn import ModelConfig, ModulatedGPT, ModulationConfig
from ncn.errors import CheckpointError
from ncn.training import checkpoint as ckpt

from conftest import run_cli
from test_cli_errors import assert_nothing_lost
from tiny_checkpoint import TinyRun, tiny_run

CORRUPT = r"is (truncated or corrupt|not a PyTorch checkpoint)"  # a few-byte stub reads as a foreign pickle
MARKER = "PWNED"  # the file a gadget would create in its checkpoint's folder


class SystemGadget:
    """Unpickling calls os.system (a module torch blocks outright)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalGadget(SystemGadget):
    """Unpickling calls builtins.eval (allowed in plain pickle, not in torch's weights-only loader)."""

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class ExecGadget(SystemGadget):
    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _other_shape(file: Path) -> None:
    torch.manual_seed(0)
    big = ModulatedGPT(
        ModelConfig(vocab_size=50304, block_size=32, d_model=64, n_layer=2, n_head=2), ModulationConfig()
    )
    torch.save(big.state_dict(), file)


@dataclass(frozen=True)
class Damage:
    """How one file of a good checkpoint is spoiled, and what stderr's last line must then say
    (after the damaged file's path, or the folder's for files that load but hold another structure)."""

    id: str
    file: str
    spoil: Callable[[Path], None]
    expect: tuple[str, ...]
    names_folder: bool = False


DAMAGES = [
    Damage(
        "truncated",
        "model.pt",
        lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
        ("model.pt is truncated or corrupt", "use an earlier checkpoint folder"),
    ),
    Damage(
        "random_bytes",
        "optim.pt",
        lambda f: f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size)),
        ("optim.pt is not a PyTorch checkpoint", "use another checkpoint folder"),
    ),
    Damage(
        "other_shape",
        "model.pt",
        _other_shape,
        ("model.pt does not fit this model (size mismatch for", "use the model/ncn options it was trained with"),
    ),
    Damage(
        "malicious_system",
        "optim.pt",
        lambda f: torch.save({"torch": SystemGadget(f.parent / MARKER)}, f),
        (
            "optim.pt was refused: loading it would import posix.system (a pickle that can run code)",
            "delete it and use a checkpoint written by ncn",
        ),
    ),
    Damage(
        "malicious_eval",
        "model.pt",
        lambda f: torch.save({"wte.weight": EvalGadget(f.parent / MARKER)}, f),
        ("model.pt was refused: loading it would import eval (a pickle that can run code)", "delete it"),
    ),
    Damage(
        "foreign_optimizer",
        "optim.pt",
        lambda f: torch.save({"state": {}, "lr": torch.tensor(1.0)}, f),
        (
            "does not hold a ncn training state this run can restore (KeyError: 'optimizer')",
            "resume from a checkpoint written by ncn's training",
        ),
        names_folder=True,
    ),
]
GENERATED = [d for d in DAMAGES if d.id == "malicious_eval"]  # the generate/analyze/eval loader
RESUMED = [d for d in DAMAGES if d not in GENERATED]  # the training resume


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, _mlflow_template: Path) -> TinyRun:
    return tiny_run(tmp_path_factory, _mlflow_template)


def _spoiled_copy(trained: TinyRun, tmp_path: Path, damage: Damage) -> tuple[Path, Path]:
    """(checkpoint folder, the damaged file) in tmp_path/damaged/."""
    folder = tmp_path / "damaged" / trained.checkpoint.name
    shutil.copytree(trained.checkpoint, folder)
    damage.spoil(folder / damage.file)
    return folder, folder / damage.file


def _last_line(done) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("damage", RESUMED, ids=[d.id for d in RESUMED])
def test_resume_from_a_bad_checkpoint_fails_cleanly(
    damage: Damage, trained: TinyRun, tmp_path: Path, mlflow_store
) -> None:
    folder, file = _spoiled_copy(trained, tmp_path, damage)
    store = tmp_path / "mlflow.db"
    uri = mlflow_store(store)
    done = run_cli(
        [
            "model=tiny",
            "trainer=smoke",
            f"trainer.resume={folder}",
            f"tracking.uri={uri}",
            f"hydra.run.dir={tmp_path / 'outputs' / 'run'}",
        ],
        cwd=tmp_path,
    )
    last = _last_line(done)
    assert last.startswith(f"error: {folder if damage.names_folder else file} ")  # names the culprit first
    for part in damage.expect:
        assert part in last, f"{part!r} not in {last!r}"
    assert not (folder / MARKER).exists()
    assert_nothing_lost(tmp_path, store)


@pytest.mark.parametrize("damage", GENERATED, ids=[d.id for d in GENERATED])
def test_generate_from_a_bad_checkpoint_fails_cleanly(damage: Damage, trained: TinyRun, tmp_path: Path) -> None:
    folder, file = _spoiled_copy(trained, tmp_path, damage)
    done = run_cli(
        ["task=generate", f"checkpoint={folder}", "max_new_tokens=2", f"hydra.run.dir={tmp_path / 'gen'}"],
        cwd=tmp_path,
    )
    last = _last_line(done)
    assert last.startswith(f"error: {file} ") and damage.expect[0] in last
    assert done.stdout == "" and not (folder / MARKER).exists()  # refused before any text was produced


def _assert_refused(folder: Path, file: Path, problem: str = "") -> str:
    """The CheckpointError of loading `folder`: one line that starts with `file` and then `problem` (a regex)."""
    with pytest.raises(CheckpointError) as info:
        ckpt.load(folder)
    message = str(info.value)
    assert re.match(re.escape(f"{file} ") + problem, message) and "\n" not in message, message
    return message


@pytest.mark.parametrize("name", ["model.pt", "optim.pt"])
def test_every_truncation_and_byte_flip_is_a_one_line_error(name: str, trained: TinyRun, tmp_path: Path) -> None:
    folder = tmp_path / trained.checkpoint.name
    shutil.copytree(trained.checkpoint, folder)
    file = folder / name
    good = file.read_bytes()
    rng = np.random.default_rng(len(name))
    cuts = sorted({0, 1, 2, 64, 511, len(good) - 22, len(good) - 1, *rng.integers(3, len(good) - 1, 24).tolist()})
    for cut in cuts:  # every cut loses the zip's central directory at the end
        file.write_bytes(good[:cut])
        _assert_refused(folder, file, CORRUPT)
    for size in (1, 7, 4096, len(good)):
        file.write_bytes(rng.bytes(size))
        _assert_refused(folder, file, CORRUPT)
    # flips inside the pickled index (the zip's first record) break the structure, not just a value
    pickled_index = good.index(b"\x80\x02", good.index(b"data.pkl"))
    refused = 0
    for _ in range(40):
        spoiled = bytearray(good)
        for pos in rng.integers(pickled_index, pickled_index + 200, 3):
            spoiled[pos] ^= 0xFF
        file.write_bytes(bytes(spoiled))
        try:
            ckpt.load(folder)
        except CheckpointError as exc:
            assert str(exc).startswith(f"{file} ") and "\n" not in str(exc)
            refused += 1
    assert refused > 0


GADGETS = [SystemGadget, EvalGadget, ExecGadget]
WRITERS = {
    "torch_zip": lambda obj, f: torch.save({"weight": obj}, f),
    "torch_legacy": lambda obj, f: torch.save([obj], f, _use_new_zipfile_serialization=False),
    "pickle_p0": lambda obj, f: f.write_bytes(pickle.dumps(obj, protocol=0)),
    "pickle_p2": lambda obj, f: f.write_bytes(pickle.dumps(obj, protocol=2)),
    "pickle_p5": lambda obj, f: f.write_bytes(pickle.dumps(obj, protocol=5)),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_pickle_gadgets_never_run(writer: str, trained: TinyRun, tmp_path: Path) -> None:
    folder = tmp_path / trained.checkpoint.name
    shutil.copytree(trained.checkpoint, folder)
    named = 0
    for gadget in GADGETS:
        for name in ("model.pt", "optim.pt"):
            marker = tmp_path / f"{gadget.__name__}-{name}"
            WRITERS[writer](gadget(marker), folder / name)
            message = _assert_refused(folder, folder / name)
            assert not marker.exists(), f"{gadget.__name__} in {name} ({writer}) ran"
            named += "was refused: loading it would import" in message
            shutil.copyfile(trained.checkpoint / name, folder / name)
    # protocol-0/2 pickles and torch files are parsed far enough to name the gadget's global
    assert named == (0 if writer == "pickle_p5" else 6)  # 3 gadgets × 2 files
