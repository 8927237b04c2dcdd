"""Self-describing, atomically written training checkpoints: finding, reading, restoring them.

Layout: `<run dir>/checkpoints/step_000123/{model.pt, optim.pt, train_state.json, config.yaml}`
plus a `checkpoints/latest` text pointer. No RNG state is saved: training draws its random numbers
from seeds derived from (seed, step, micro-batch) (`ncn.training.loop.micro_batch_seed`), so a resume
is exact without one (format 1 checkpoints carried an rng.pt, which is ignored). A folder is written under a temporary
name and renamed, the pointer replaced with `os.replace`, so a crash never leaves a half
checkpoint in use. Tensors load with `torch.load(weights_only=True)`: nothing is ever unpickled
beyond tensors and plain containers. Each file read back has one typed reader that checks its
shape (`read_pointer`, `read_train_state`, `read_config`) and raises a `CheckpointError` naming
the file. `restore` puts a run back exactly where its checkpoint left it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ncn.config import (
    RESUME_DERIVED,
    RESUME_FIXED_GROUPS,
    RESUME_FIXED_KEYS,
    RESUME_MUTABLE,
    OptimConfig,
    RunConfig,
    TrackingConfig,
    config_from_dict,
)
from ncn.errors import NO_SPACE, CheckpointError, DiskFullError, NCNConfigError, mb
from ncn.model.gpt import ModulatedGPT
from ncn.tracking import Tracker, open_tracker
from ncn.training.optim import apply_settings

FORMAT_VERSION = 2  # 1: config.yaml still held Hydra's `_target_`/`_convert_` keys (see _upgrade_config)
POINTER = "latest"
STEP_DIR = re.compile(r"^step_(\d+)$")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class TrainState:
    """All mutable loop state that a checkpoint carries (train_state.json).

    step: optimizer steps done. tokens_seen: training tokens over all ranks. data: the loader's
    {"epoch", "position"}. nonfinite_skipped: steps skipped for NaN/Inf. val_loss: the val CE
    (nats/token) of the eval at `step`, None when `step` was not evaluated. mlflow_run_id: the run this
    training records into. run_name: the run's name.
    """

    step: int = 0
    tokens_seen: int = 0
    data: dict[str, int] = field(default_factory=dict)
    nonfinite_skipped: int = 0
    val_loss: float | None = None
    mlflow_run_id: str | None = None
    run_name: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, state[name])


@dataclass
class Snapshot:
    """What `save` writes: loop state, uncompiled model weights, optimizer and scaler state, the
    resolved run config, and descriptive extras (world size, batch, ...)."""

    state: TrainState
    model: dict[str, torch.Tensor]
    optim: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """One loaded checkpoint folder: CPU tensors, the validated `TrainState` and `RunConfig`."""

    path: Path
    model: dict[str, torch.Tensor]
    optim: dict[str, Any]
    state: TrainState
    config: RunConfig
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line naming what this checkpoint is: run name, step, val loss / ppl, folder, MLflow run."""
        s = self.state
        val = (
            "not evaluated"
            if s.val_loss is None
            else f"val loss {s.val_loss:.4f}, ppl {np.exp(min(s.val_loss, 700)):,.2f}"
        )
        run = f"MLflow run {s.mlflow_run_id}" if s.mlflow_run_id else "no MLflow run"
        name = s.run_name or self.config.run_name or "?"
        return f"checkpoint of run {name} at step {s.step} ({val}): {self.path} ({run})"


def step_dir(step: int) -> str:
    """Folder name of the checkpoint after `step` optimizer steps, e.g. `step_000123`."""
    return f"step_{step:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: Path, snapshot: Snapshot, keep: int) -> Path:
    """Write checkpoint `directory/step_<step>` atomically, point `latest` at it, keep the last `keep`.

    Returns the checkpoint folder. The best checkpoint by finite val loss is never pruned, so
    `best` keeps working. The caller guarantees finite weights and val loss (`trainer.py`).

    Raises:
        DiskFullError: no space left for the files (the temporary folder is removed; earlier
            checkpoints and `latest` stay as they were).
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-*"):  # left behind by a crash during an earlier write
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / step_dir(snapshot.state.step)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        torch.save(snapshot.model, tmp / "model.pt")
        torch.save(snapshot.optim, tmp / "optim.pt")
        state = {"format": FORMAT_VERSION, **snapshot.state.state_dict(), **snapshot.extra}
        (tmp / "train_state.json").write_text(json.dumps(state, indent=2))
        (tmp / "config.yaml").write_text(yaml.safe_dump(snapshot.config, sort_keys=False))
        for file in tmp.iterdir():
            _fsync(file)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        needed, free = tensor_bytes(snapshot.model) + tensor_bytes(snapshot.optim), shutil.disk_usage(directory).free
        if getattr(exc, "errno", None) in NO_SPACE or free < needed:
            raise DiskFullError(
                f"no space left in {directory} for checkpoint {final.name}: it needs about {mb(needed)}, "
                f"{mb(free)} free; free some space or set hydra.run.dir=<folder on a disk with space>"
            ) from exc
        raise
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


def tensor_bytes(tree: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what torch.save writes for it."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def _steps(directory: Path) -> list[Path]:
    """Checkpoint folders in `directory`, oldest step first."""
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def _val_loss(folder: Path) -> float:
    try:
        value = read_train_state(folder / "train_state.json").val_loss
    except CheckpointError:
        return float("inf")
    return float("inf") if value is None or not np.isfinite(value) else float(value)


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


def read_pointer(pointer: Path) -> Path:
    """The checkpoint folder a `latest` pointer file names (a sibling `step_<N>` folder).

    Raises:
        CheckpointError: unreadable, not one line naming a step folder, or that folder is incomplete.
    """
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{pointer} is unreadable ({type(exc).__name__}): pass an explicit checkpoint folder"
        ) from None
    if not STEP_DIR.fullmatch(name):
        raise CheckpointError(
            f"{pointer} does not name a checkpoint folder (holds {name[:40]!r}): "
            "pass an explicit checkpoint folder, e.g. checkpoints/step_000100"
        )
    target = pointer.parent / name
    if not (target / "train_state.json").is_file():
        raise CheckpointError(
            f"{pointer} points to {target}, which is not a complete checkpoint: pass an explicit checkpoint folder"
        )
    return target


def read_train_state(file: Path) -> TrainState:
    """The `TrainState` of a train_state.json (format 1 or 2); unknown extra keys are allowed.

    Raises:
        CheckpointError: missing, not JSON, not an object, another format, or a field of the wrong type.
    """
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {file.parent} is not a complete checkpoint") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is corrupt ({type(exc).__name__}): use an earlier checkpoint folder") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{file} holds a {type(data).__name__}, not a training state: use an earlier checkpoint folder"
        )
    if data.get("format") not in (1, FORMAT_VERSION):
        raise CheckpointError(
            f"{file} has format {data.get('format')!r}, expected {FORMAT_VERSION}: "
            "it was not written by this version of ncn"
        )
    types = {
        "step": int,
        "tokens_seen": int,
        "data": dict,
        "nonfinite_skipped": int,
        "val_loss": (int, float, type(None)),
        "mlflow_run_id": (str, type(None)),
        "run_name": (str, type(None)),
    }
    values = {}
    for f in fields(TrainState):
        value = data.get(f.name, None if f.name == "run_name" else ...)
        if value is ... or isinstance(value, bool) or not isinstance(value, types[f.name]):
            raise CheckpointError(
                f"{file}: {f.name}={value if value is not ... else '<missing>'} is not a valid "
                "training state: use an earlier checkpoint folder"
            )
        values[f.name] = value
    if not all(isinstance(values["data"].get(k, 0), int) for k in ("epoch", "position")) or values["step"] < 0:
        raise CheckpointError(
            f"{file}: step={values['step']}, data={values['data']} is not a valid training state: "
            "use an earlier checkpoint folder"
        )
    return TrainState(**values)


def _upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: drop Hydra's `_target_`/`_convert_` keys; the tracker class becomes `tracking.backend`."""
    tracking = config.get("tracking") or {}
    upgraded = {
        k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v)
        for k, v in config.items()
    }
    if isinstance(tracking, dict) and "_target_" in tracking:
        upgraded["tracking"]["backend"] = "none" if tracking["_target_"].endswith("NullTracker") else "mlflow"
    if upgraded.get("prompt") == "":
        upgraded["prompt"] = None
    return upgraded


def read_config(file: Path, version: int = FORMAT_VERSION) -> tuple[RunConfig, dict[str, Any]]:
    """(typed RunConfig, plain dict) of a checkpoint's config.yaml, upgraded from `version`.

    Raises:
        CheckpointError: missing, not YAML, not a mapping, or a key/value the schema rejects.
    """
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {file.parent} is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{file} is corrupt ({type(exc).__name__}): use an earlier checkpoint folder") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{file} holds a {type(data).__name__}, not a run config: use an earlier checkpoint folder"
        )
    data = _upgrade_config(data) if version == 1 else data
    try:
        return config_from_dict(data), data
    except NCNConfigError as exc:
        raise CheckpointError(
            f"{file} does not describe a valid run ({exc}): use an earlier checkpoint folder"
        ) from None


def _checkpoints_under(root: Path) -> list[Path]:
    """Every `checkpoints/` folder with a `latest` pointer under `<root>/outputs` and `<root>/multirun`."""
    return [p.parent for top in ("outputs", "multirun") for p in (root / top).glob(f"**/checkpoints/{POINTER}")]


def _run_checkpoints(root: Path, spec: str, key: str = "checkpoint") -> Path | None:
    """The newest `checkpoints/` folder of the run named `spec` or with MLflow run id `spec`, or None.

    A name that several runs share (the same command run twice) picks the run that checkpointed
    last, with a warning that names it and how to pick each other one (its folder or run id).
    """
    matches = []
    for folder in _checkpoints_under(root):
        try:
            state = read_train_state(read_pointer(folder / POINTER) / "train_state.json")
        except CheckpointError:
            continue
        if spec in (state.mlflow_run_id, state.run_name):
            matches.append((folder, state.mlflow_run_id))
    if not matches:
        return None
    matches.sort(key=lambda m: (m[0] / POINTER).stat().st_mtime_ns, reverse=True)
    if len(matches) > 1:
        others = "; ".join(f"{key}={folder.parent} (MLflow run {run_id})" for folder, run_id in matches[1:])
        warnings.warn(
            f"{key}={spec} names {len(matches)} runs: using the newest, {matches[0][0].parent} (MLflow run "
            f"{matches[0][1]}); to pick another, pass its folder or MLflow run id: {others}",
            stacklevel=2,
        )
    return matches[0][0]


def resolve(spec: str | Path | None, search_root: Path | None = None, key: str = "checkpoint") -> Path:
    """Checkpoint folder for `spec`.

    spec: "latest" (the newest checkpoint of the run under `<search_root>/outputs` and
    `<search_root>/multirun` that checkpointed last), "best" (in that same run, the kept
    checkpoint with the lowest finite val loss), a run name or MLflow run id (that run's newest
    checkpoint), a checkpoint folder, a run dir, or a file in a checkpoint folder.
    search_root defaults to the current directory (the launch directory under Hydra 1.3).
    key: the config key `spec` came from, named in the fix of an error (e.g. "trainer.resume").

    Raises:
        CheckpointError: nothing found, or the path is not a checkpoint.
    """
    root = Path.cwd() if search_root is None else Path(search_root)
    if spec is None or str(spec) == "":
        raise CheckpointError(f"no checkpoint given: pass {key}=latest or {key}=<path to a checkpoint folder>")
    spec = str(spec)
    if spec in ("latest", "best"):
        folders = _checkpoints_under(root)
        if not folders:
            raise CheckpointError(
                f"no checkpoint found under {root / 'outputs'} or {root / 'multirun'}: "
                "train first (python run.py) or pass an explicit checkpoint path"
            )
        newest = max(folders, key=lambda p: (p / POINTER).stat().st_mtime_ns)
        if spec == "best":
            return _best(newest) or read_pointer(newest / POINTER)
        return read_pointer(newest / POINTER)
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else root / path
    if path.is_file():
        path = path.parent
    if (path / "train_state.json").is_file():
        return path
    for checkpoints in (path, path / "checkpoints"):
        if (checkpoints / POINTER).is_file():
            return read_pointer(checkpoints / POINTER)
    if not path.exists() and "/" not in spec and (run := _run_checkpoints(root, spec, key)) is not None:
        return read_pointer(run / POINTER)
    if not path.exists():
        what = "MLflow run id" if RUN_ID.match(spec) else "path or run name"
        raise CheckpointError(
            f"{key}={spec}: no checkpoint folder, run name or MLflow run id matches this {what} under "
            f"{root}: pass {key}=latest, {key}=best, a run name, or an existing checkpoint folder"
        )
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
        raise CheckpointError(f"{file} is truncated or corrupt ({detail}): use an earlier checkpoint folder") from None


def load(path: Path, tensors: bool = True) -> Checkpoint:
    """Load checkpoint folder `path` (see `resolve`) onto the CPU; with tensors=False only its metadata.

    Raises:
        CheckpointError: a missing, truncated, random, foreign or unsafe file (names it), or a
            checkpoint written by a newer format.
    """
    state = read_train_state(path / "train_state.json")
    raw = json.loads((path / "train_state.json").read_text(encoding="utf-8"))
    config, _ = read_config(path / "config.yaml", version=raw["format"])
    extra = {k: v for k, v in raw.items() if k not in TrainState.__dataclass_fields__ and k != "format"}
    model, optim = (_load_tensors(path / f) for f in ("model.pt", "optim.pt")) if tensors else ({}, {})
    return Checkpoint(path, model, optim, state, config, extra)


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


def load_model(ckpt: Checkpoint, device: str | torch.device = "cpu") -> ModulatedGPT:
    """The checkpoint's model, rebuilt from its own saved config, on `device` in eval mode.

    Raises:
        CheckpointError: the weights do not fit the saved config.
    """
    model = ModulatedGPT(ckpt.config.model, ckpt.config.ncn, ckpt.config.control)
    load_weights(model, ckpt.model, ckpt.path / "model.pt")
    return model.to(device).eval()


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _overridden(key: str, overridden: frozenset[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in overridden for i in range(1, len(parts) + 1))


def resume_config(cfg: RunConfig, ckpt: Checkpoint, overridden: frozenset[str]) -> RunConfig:
    """The config a resume from `ckpt` runs with: the checkpoint's, except keys set on the command line.

    `overridden` holds the keys and groups the command line set (`RunContext.overridden`). The
    model, ncn and data groups, the seed and trainer.freeze (`RESUME_FIXED_KEYS`) describe what
    was trained: an override of one of their keys (other than those in `RESUME_MUTABLE`) to a
    value other than the checkpoint's is refused. Everything else (trainer, optim, tracking, ...) may change.

    Raises:
        CheckpointError: naming such a key, the checkpoint's value and the new one: the first one
            that the config does not derive from another (`RESUME_DERIVED`: `model.vocab_size`
            follows `data.tokenizer`) unless typed itself, then the other keys that differ.
    """
    current, saved = _flat(asdict(cfg)), _flat(asdict(ckpt.config))
    merged, refused = {}, []
    for key in current:
        fixed = key.split(".")[0] in RESUME_FIXED_GROUPS or key in RESUME_FIXED_KEYS
        if not _overridden(key, overridden) or key == "task":
            merged[key] = saved.get(key, current[key])
            continue
        if fixed and key not in RESUME_MUTABLE and current[key] != saved.get(key, current[key]):
            refused.append(key)
        merged[key] = current[key]
    if refused:  # name a key the user set (data.tokenizer), not one the config derives from it (model.vocab_size)
        key = next((k for k in refused if k not in RESUME_DERIVED or k in overridden), refused[0])
        also = ", ".join(k for k in refused if k != key)
        raise CheckpointError(
            f"{key}={current[key]} differs from the checkpoint's {key}={saved[key]} ({ckpt.path})"
            f"{f' (and with it {also})' if also else ''}: a resume continues the checkpoint's model, ncn "
            "and data settings; drop the override, or start a new run"
        )
    nested: dict[str, Any] = {}
    for key, value in merged.items():
        *groups, leaf = key.split(".")
        node = nested
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = value
    return replace(config_from_dict(nested), task=cfg.task)


def restore(
    ckpt: Checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    optim_cfg: OptimConfig,
    scaler: torch.amp.GradScaler,
    loader: Any,
) -> TrainState:
    """Put a run back where `ckpt` left it; returns its `TrainState` (step, data position, MLflow run).

    Loads the weights into `model`, the Adam moments into `optimizer` (with `optim_cfg`'s
    hyperparameters, so a resume may change them), the GradScaler's state and the data position
    into `loader` (a `BlockLoader`). The LR schedule and the random numbers of a step are
    functions of the step: nothing else needs restoring.

    Raises:
        CheckpointError: files that load but hold another structure, naming the folder.
    """
    try:
        load_weights(model, ckpt.model, ckpt.path / "model.pt")
        loader.load_state_dict(ckpt.state.data)
        optimizer.load_state_dict(ckpt.optim["optimizer"])
        apply_settings(optimizer, optim_cfg)
        if ckpt.optim.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt.optim["scaler"])
    except NCNConfigError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{ckpt.path} does not hold a ncn training state this run can restore ({type(exc).__name__}: {detail}): "
            "resume from a checkpoint written by ncn's training with the same model/ncn options"
        ) from None
    return replace(ckpt.state)


def open_checkpoint(
    spec: str | None, launch_dir: Path, overridden: frozenset[str], allowed: frozenset[str] = frozenset()
) -> Checkpoint:
    """Resolve and load the checkpoint a task uses (`checkpoint=`), refusing settings it would ignore.

    A checkpoint carries its own model, ncn and control settings; a command-line override of a
    `model.*`, `ncn.*` or `control.*` key (or of the group) other than those in `allowed` would
    be silently ignored, so it is refused.

    Raises:
        CheckpointError: see `resolve` and `load`; or such an override, named.
    """
    refused = sorted(k for k in overridden if k.split(".")[0] in ("model", "ncn", "control") and k not in allowed)
    if refused:
        also = f" (only {', '.join(sorted(allowed))} may be set here)" if allowed else ""
        raise CheckpointError(
            f"{refused[0]} cannot be set together with checkpoint=: a checkpoint carries its own "
            f"model, ncn and control settings{also}; drop the override"
        )
    return load(resolve(spec, launch_dir))


def checkpoint_run(
    ckpt: Checkpoint, tracking: TrackingConfig, overridden: frozenset[str], launch_dir: Path
) -> tuple[Tracker, str] | None:
    """(checked tracker, run id) of the MLflow run that trained `ckpt`, for a task that adds results to it
    (task=eval's compute curve, task=analyze's figures); None when there is none to add to.

    The store is the checkpoint's own (its config's `tracking`) unless a `tracking.*` key is in
    `overridden`, then `tracking`'s. None when tracking is off or the checkpoint records no run; also
    when the store lacks the run, after one stderr line `warning: MLflow run <id> is not in <uri>:
    results are only local`.

    Raises:
        NCNConfigError: a store that cannot be used (`Tracker.check`).
    """
    tracking_overridden = any(k.split(".")[0] == "tracking" for k in overridden)
    tracker = open_tracker(tracking if tracking_overridden else ckpt.config.tracking, launch_dir)
    run_id = ckpt.state.mlflow_run_id
    if not (tracker.enabled and run_id):
        return None
    tracker.check()
    if tracker.get_run(run_id) is None:
        print(f"warning: MLflow run {run_id} is not in {tracker.uri}: results are only local", file=sys.stderr)
        return None
    return tracker, run_id


# What task=generate / task=analyze may set on a checkpoint: the control setting to use (NCN paper §3.2, §6.1).
CONTROL_USE_KEYS = frozenset({"control.label", "control.value"})


def control_setting(ckpt: Checkpoint, label: str | None, value: float | None) -> int | float | None:
    """The control a task gives `ckpt`'s model: a label id (labels), a mode value m (mode), or None.

    label / value: `control.label` / `control.value` from the command line (None = not given).
    Returns None when the checkpoint's model takes no control input, or when nothing was given
    (the task then picks: every label / the mode grid for analyze, m = 0 for generate).

    Raises:
        CheckpointError: a setting for a checkpoint trained without a control input, a label it does
            not know, a label for a mode checkpoint or a value for a labelled one; each lists what
            the checkpoint knows.
    """
    control = ckpt.config.control
    if label is None and value is None:
        return None
    given = f"control.label={label}" if label is not None else f"control.value={value}"
    if not control.active:
        why = f"control={control.kind}" if control.kind == "none" else f"control.route={control.route}"
        key = given.split("=")[0]
        raise CheckpointError(
            f"{given}: {ckpt.path} was trained with {why}, so its model takes no control input: drop {key}"
        )
    if control.kind == "mode":
        if label is not None:
            raise CheckpointError(
                f"{given}: {ckpt.path} was trained with control=mode and knows no labels: "
                "give control.value=<m in [-1, 1]> instead"
            )
        return float(value)
    known = ", ".join(control.vocabulary)
    if label is None:
        raise CheckpointError(
            f"{given}: {ckpt.path} was trained with control={control.kind}, which takes a label: "
            f"give control.label=<one of {known}>"
        )
    if label not in control.vocabulary:
        raise CheckpointError(f"control.label={label} is not a label of {ckpt.path}: choose one of {known}")
    return control.vocabulary.index(label)
