"""Self-describing, atomically written training checkpoints and their safe loading.

Layout: `<run dir>/checkpoints/step_000123/{model.pt, optim.pt, rng.pt, train_state.json,
config.yaml}` plus a `checkpoints/latest` text pointer. A folder is written under a temporary
name and renamed, the pointer replaced with `os.replace`, so a crash never leaves a half
checkpoint in use. Loading uses `torch.load(weights_only=True)`: nothing is ever unpickled
beyond tensors and plain containers. Test hook: `NCN_TEST_CRASH_BEFORE_RENAME=<step>` exits
the process (`os._exit(CRASH_EXIT_CODE)`) after the checkpoint of that step is fully written to
its temporary folder, before the rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ncn.errors import CheckpointError, NCNConfigError
from ncn.gpt import ModulatedGPT

FORMAT_VERSION = 1
POINTER = "latest"
CRASH_ENV = "NCN_TEST_CRASH_BEFORE_RENAME"
CRASH_EXIT_CODE = 70
STEP_DIR = re.compile(r"^step_(\d+)$")
# Settings that may change on resume; every other model/ncn key must match the checkpoint.
RESUME_MUTABLE = {"model.dropout", "ncn.homeostatic_lambda"}


@dataclass
class Checkpoint:
    """One loaded checkpoint folder.

    model: uncompiled `state_dict` (CPU tensors). optim: {"optimizer", "scheduler", "scaler"}.
    rng: {"ranks": [per-rank RNG state]} (see `capture_rng`). train_state: the JSON metadata
    (step, tokens_seen, data loader position, mlflow_run_id, ...). config: resolved run config.
    """

    path: Path
    model: dict[str, torch.Tensor]
    optim: dict[str, Any]
    rng: dict[str, Any]
    train_state: dict[str, Any]
    config: DictConfig


def step_dir(step: int) -> str:
    """Folder name of the checkpoint after `step` optimizer steps, e.g. `step_000123`."""
    return f"step_{step:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    directory: Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    optim: dict[str, Any],
    rng: dict[str, Any],
    train_state: dict[str, Any],
    config_yaml: str,
    keep: int,
) -> Path:
    """Write checkpoint `directory/step_<step>` atomically, point `latest` at it, keep the last `keep`.

    Returns the checkpoint folder. The best checkpoint by `train_state["val_loss"]` is never
    pruned, so `trainer.resume=best` keeps working.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-*"):  # left behind by a crash during an earlier write
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / step_dir(step)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    torch.save(model, tmp / "model.pt")
    torch.save(optim, tmp / "optim.pt")
    torch.save(rng, tmp / "rng.pt")
    (tmp / "train_state.json").write_text(json.dumps({"format": FORMAT_VERSION, **train_state}, indent=2))
    (tmp / "config.yaml").write_text(config_yaml)
    for file in tmp.iterdir():
        _fsync(file)
    if os.environ.get(CRASH_ENV) == str(step):
        os._exit(CRASH_EXIT_CODE)
    if final.exists():  # a resume into the same run dir replays this step: the new one wins
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer_tmp = directory / f".tmp-{POINTER}-{os.getpid()}"
    pointer_tmp.write_text(final.name + "\n")
    _fsync(pointer_tmp)
    os.replace(pointer_tmp, directory / POINTER)
    _fsync(directory)
    _prune(directory, keep)
    return final


def _steps(directory: Path) -> list[Path]:
    """Checkpoint folders in `directory`, oldest step first."""
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def _val_loss(folder: Path) -> float:
    try:
        value = json.loads((folder / "train_state.json").read_text()).get("val_loss")
    except (OSError, ValueError):
        return float("inf")
    return float("inf") if value is None else float(value)


def _best(directory: Path) -> Path | None:
    """Kept checkpoint with the lowest finite recorded val loss, or None."""
    scored = [(_val_loss(p), p) for p in _steps(directory)]
    scored = [(loss, p) for loss, p in scored if loss < float("inf")]
    return min(scored, key=lambda item: item[0])[1] if scored else None


def _prune(directory: Path, keep: int) -> None:
    best = _best(directory)
    for folder in _steps(directory)[:-keep]:
        if folder != best:
            shutil.rmtree(folder, ignore_errors=True)


def _follow_pointer(checkpoints: Path) -> Path:
    pointer = checkpoints / POINTER
    target = checkpoints / pointer.read_text().strip()
    if not (target / "train_state.json").is_file():
        raise CheckpointError(f"{pointer} points to {target}, which is not a complete checkpoint: pass an explicit checkpoint folder")
    return target


def resolve(spec: str | Path | None, search_root: Path | None = None, key: str = "checkpoint") -> Path:
    """Checkpoint folder for `spec`: "latest", "best", a checkpoint folder, a run dir or a file in one.

    "latest": the checkpoint that `checkpoints/latest` points to in the run (under
    `<search_root>/outputs` and `<search_root>/multirun`) whose pointer was written last.
    "best": in that same run, the kept checkpoint with the lowest recorded val loss (the
    latest one when none recorded a val loss).
    search_root defaults to the current directory (the launch directory under Hydra 1.3).
    key: the config key `spec` came from, named in the fix of an error (e.g. "trainer.resume").

    Raises:
        CheckpointError: nothing found, or the path is not a checkpoint.
    """
    root = Path.cwd() if search_root is None else Path(search_root)
    if spec is None or str(spec) == "":
        raise CheckpointError(f"no checkpoint given: pass {key}=latest or {key}=<path to a checkpoint folder>")
    if str(spec) in ("latest", "best"):
        pointers = [p for top in ("outputs", "multirun") for p in (root / top).glob(f"**/checkpoints/{POINTER}")]
        if not pointers:
            raise CheckpointError(
                f"no checkpoint found under {root / 'outputs'} or {root / 'multirun'}: "
                "train first (python run.py) or pass an explicit checkpoint path"
            )
        newest = max(pointers, key=lambda p: p.stat().st_mtime_ns)
        if str(spec) == "latest":
            return _follow_pointer(newest.parent)
        return _best(newest.parent) or _follow_pointer(newest.parent)
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else root / path
    if path.is_file():
        path = path.parent
    if (path / "train_state.json").is_file():
        return path
    for checkpoints in (path, path / "checkpoints"):
        if (checkpoints / POINTER).is_file():
            return _follow_pointer(checkpoints)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: pass {key}=latest or an existing checkpoint folder")
    raise CheckpointError(
        f"{path} is not a checkpoint (no train_state.json, no checkpoints/latest): "
        "pass a folder like outputs/<date>/<time>/checkpoints/step_000100"
    )


def _load_tensors(file: Path) -> Any:
    """`torch.load` of one checkpoint file that never runs foreign code; errors name the file."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete; use another checkpoint folder")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words it "unsupported GLOBAL os.system" (blocked module) or "Unsupported global: GLOBAL eval"
        found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(exc), re.IGNORECASE)
        if found:
            raise CheckpointError(
                f"{file} was refused: loading it would import {found.group(1)} (a pickle that can run code); "
                "it is not a ncn checkpoint, delete it and use a checkpoint written by ncn"
            ) from None
        raise CheckpointError(
            f"{file} is not a PyTorch checkpoint (unreadable pickle data): the file is corrupt or foreign; "
            "use another checkpoint folder"
        ) from None
    except Exception as exc:  # damaged bytes fail anywhere in zip, pickle or storage code, in many types
        first = str(exc).splitlines()[0].split(". ")[0] if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise CheckpointError(
            f"{file} is truncated or corrupt ({detail}): use an earlier checkpoint folder"
        ) from None


def load(path: Path) -> Checkpoint:
    """Load every file of checkpoint folder `path` (see `resolve`) onto the CPU.

    Raises:
        CheckpointError: a missing, truncated, random, foreign or unsafe file (names it), or a
            checkpoint written by a newer format.
    """
    state_file, config_file = path / "train_state.json", path / "config.yaml"
    try:
        train_state = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{state_file} is missing: {path} is not a complete checkpoint") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{state_file} is corrupt ({exc}): use an earlier checkpoint folder") from None
    if not isinstance(train_state, dict) or train_state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_file} has format {train_state.get('format') if isinstance(train_state, dict) else None!r}, "
            f"expected {FORMAT_VERSION}: it was not written by this version of ncn"
        )
    try:
        config = OmegaConf.load(config_file)
    except FileNotFoundError:
        raise CheckpointError(f"{config_file} is missing: {path} is not a complete checkpoint") from None
    except Exception as exc:  # any YAML or OmegaConf parse error means the same thing here
        raise CheckpointError(f"{config_file} is corrupt ({str(exc).splitlines()[0]})") from None
    return Checkpoint(
        path=path,
        model=_load_tensors(path / "model.pt"),
        optim=_load_tensors(path / "optim.pt"),
        rng=_load_tensors(path / "rng.pt"),
        train_state=train_state,
        config=config,
    )


def _leaves(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}.{key}").items()}
    return {prefix: node}


def check_compatible(ckpt: Checkpoint, cfg: DictConfig) -> None:
    """Check that `cfg`'s model and ncn settings match the checkpoint's (resume).

    Raises:
        CheckpointError: naming the first differing key and both values.
    """
    for group in ("model", "ncn"):
        saved = _leaves(OmegaConf.to_container(ckpt.config[group], resolve=True), group)
        current = _leaves(OmegaConf.to_container(cfg[group], resolve=True), group)
        for key in sorted(set(saved) | set(current)):
            if key not in RESUME_MUTABLE and saved.get(key) != current.get(key):
                raise CheckpointError(
                    f"{ckpt.path} was trained with {key}={saved.get(key)}, this run has {key}={current.get(key)}: "
                    f"resume with the model/ncn options of the original run (see {ckpt.path / 'config.yaml'})"
                )


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """`model.load_state_dict(state)` (strict) with a one-line `CheckpointError` naming `file`."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise CheckpointError(
            f"{file} does not fit this model ({detail}): use the model/ncn options it was trained with"
        ) from None


@contextlib.contextmanager
def restoring(path: Path) -> Iterator[None]:
    """Context for restoring run state from checkpoint folder `path`: files that load but hold
    another structure (a foreign optimizer or RNG state, missing train_state keys) raise a
    one-line `CheckpointError` naming the folder instead of a KeyError/TypeError traceback."""
    try:
        yield
    except NCNConfigError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path} does not hold a ncn training state this run can restore ({type(exc).__name__}: {detail}): "
            "resume from a checkpoint written by ncn's training with the same model/ncn options"
        ) from None


def load_model(spec: str | Path, device: str | torch.device = "cpu", search_root: Path | None = None) -> tuple[ModulatedGPT, DictConfig]:
    """Rebuild the model of a checkpoint from its own saved config and load its weights.

    spec: as for `resolve` ("latest", "best", a folder or file). Returns (model on `device` in
    eval mode, the run's resolved config).

    Raises:
        CheckpointError: see `resolve` and `load`.
    """
    path = resolve(spec, search_root)
    ckpt = load(path)
    try:
        model = ModulatedGPT(instantiate(ckpt.config.model), instantiate(ckpt.config.ncn))
    except Exception as exc:  # a hand-edited config.yaml: report the file, not a Hydra traceback
        cause = exc.__cause__ or exc
        raise CheckpointError(f"{path / 'config.yaml'} does not describe a valid model ({cause})") from None
    load_weights(model, ckpt.model, path / "model.pt")
    return model.to(device).eval(), ckpt.config


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch, CUDA) as tensors and plain containers."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`; CUDA states are restored only when the device count matches."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state.tolist()), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
