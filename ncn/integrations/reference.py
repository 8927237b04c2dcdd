"""The reference implementation's checkpoints into `ncn` checkpoints: `python run.py task=import`.

The reference's `train.py` saves `torch.save(dict)` with `model_state_dict` (its `ModulatedLLM`),
`config` (an `ncn_architecture.config.NCNConfig` instance), `global_step`, `processed_tokens`,
`best_val_loss` and optimizer, scheduler and scaler states. `read_reference` loads such a file
with `torch.load(weights_only=True)`, the `NCNConfig` read into a plain stand-in that runs no
code; a file that holds anything else needs full unpickling, refused unless the caller opts in
(`unsafe_unpickle`). `model_config`, `modulation_config` and `convert` map it onto a
`ModulatedGPT` that computes the reference's forward pass: RMSNorm with the reference's
`layer_norm_eps`, its global salience pooling (`ncn.pooling=global`, NCN paper §5), a
controller relu(W1·(c + E) + b1) without norm, gain = sigmoid(z) + 0.5
(`ncn.parametrisation=reference`), precision and FFN gate as the paper's (NCN paper §3).
The reference's optimizer state is not carried over (`trainer.resume` fine-tunes with a fresh
AdamW). Anything that does not map is refused in one line.

| reference tensor | `ModulatedGPT` parameter |
|---|---|
| `token_embeddings.weight`, `position_embeddings.weight` | `tok_emb.weight`, `pos_emb.weight` |
| `output_head.weight` | `lm_head.weight` (tied: must equal the token embedding) |
| `final_norm.weight`, `transformer_layers.{i}.norm1/norm2.weight` | `norm.weight`, `blocks.{i}.norm1/norm2.weight` |
| `transformer_layers.{i}.self_attn.q_proj/k_proj/v_proj.weight` | `blocks.{i}.attn.qkv.weight` (stacked; bias 0) |
| `transformer_layers.{i}.self_attn.out_proj.weight` | `blocks.{i}.attn.proj.weight` (bias 0) |
| `transformer_layers.{i}.feed_forward.linear1/linear2` | `blocks.{i}.mlp.fc/proj` |
| `ncn.control_query` (1, 1, d) | `controller.salience.query` (d) |
| `ncn.pooling_attn.in_proj_weight/bias` (3d, d)/(3d) | `controller.salience.q_proj/k_proj/v_proj` (key bias dropped) |
| `ncn.pooling_attn.out_proj` | `controller.salience.out_proj` |
| `ncn.layer1`, `ncn.layer2` | `controller.fc1`, `controller.fc2` (rows in ncn's signal order) |

The pooling's key bias adds the same number to every score of a head, which the softmax ignores,
so dropping it changes no output beyond float rounding.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ncn.config import (
    CONTROLLER_ACTIVATIONS,
    TOKENIZERS,
    ControlConfig,
    ModelConfig,
    ModulationConfig,
    RunConfig,
    vocab_size,
)
from ncn.errors import NCNConfigError
from ncn.model.gpt import ModulatedGPT
from ncn.model.signals import SIGNALS
from ncn.training.checkpoint import Snapshot, TrainState, save
from ncn.training.optim import build_optimizer, freeze_base

# Where the reference's train.py pickles its config class.
REFERENCE_CONFIG_CLASS = "ncn_architecture.config.NCNConfig"
MODEL_KEY = "model_state_dict"
# Reference signal name -> ncn target (ncn.targets); the reference's three signals are ncn's.
TARGET_OF = {"gain": "gain", "precision": "temperature", "ffn_gate": "activation"}
# The reference's NCNConfig fields with their defaults (ncn_architecture/config.py); any other is refused.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "d_model": 768,
    "nhead": 12,
    "num_layers": 12,
    "dim_feedforward": None,
    "dropout": 0.1,
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "tie_weights": True,
    "ncn_input_dim": None,
    "ncn_hidden_dim": 128,
    "ncn_heads": 4,
    "num_mod_signals": 3,
    "modulation_signal_names": ["gain", "precision", "ffn_gate"],
    "ncn_activation_fn": "relu",
    "homeostatic_lambda": 0.01,
    "gradient_checkpointing": False,
    "ncn_output_dim": None,
}
# The reference clamps the precision at 4 in its attention (ncn_architecture/attention.py).
REFERENCE_PRECISION_MAX = 4.0
_LAYER = re.compile(r"^transformer_layers\.(\d+)\.(.+)$")
_LAYER_RENAME = {
    "norm1.weight": "norm1.weight",
    "norm2.weight": "norm2.weight",
    "self_attn.out_proj.weight": "attn.proj.weight",
    "feed_forward.linear1.weight": "mlp.fc.weight",
    "feed_forward.linear1.bias": "mlp.fc.bias",
    "feed_forward.linear2.weight": "mlp.proj.weight",
    "feed_forward.linear2.bias": "mlp.proj.bias",
}
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_RENAME = {
    "token_embeddings.weight": "tok_emb.weight",
    "position_embeddings.weight": "pos_emb.weight",
    "output_head.weight": "lm_head.weight",
    "final_norm.weight": "norm.weight",
    "ncn.pooling_attn.out_proj.weight": "controller.salience.out_proj.weight",
    "ncn.pooling_attn.out_proj.bias": "controller.salience.out_proj.bias",
    "ncn.layer1.weight": "controller.fc1.weight",
    "ncn.layer1.bias": "controller.fc1.bias",
}


class ReferenceConfig:
    """The attributes of a pickled reference `NCNConfig`, with none of its code (a plain namespace)."""

    def fields(self) -> dict[str, Any]:
        return dict(vars(self))


class _MappingUnpickler(pickle.Unpickler):
    """Full unpickling (opt-in) that reads the reference's config class as `ReferenceConfig`."""

    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" == REFERENCE_CONFIG_CLASS:
            return ReferenceConfig
        return super().find_class(module, name)


_FULL_PICKLE = types.ModuleType("ncn_reference_pickle")
_FULL_PICKLE.Unpickler = _MappingUnpickler  # type: ignore[attr-defined]
_FULL_PICKLE.load = pickle.load  # type: ignore[attr-defined]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_reference(file: Path, unsafe_unpickle: bool = False) -> dict[str, Any]:
    """The dict a reference `train.py` saved in `file`, loaded onto the CPU.

    weights_only=True, with `REFERENCE_CONFIG_CLASS` read as `ReferenceConfig`; with
    unsafe_unpickle=True a file that holds other objects is fully unpickled (it can run code:
    only for files you trust).

    Raises:
        NCNConfigError: a missing or corrupt file; one that needs full unpickling without
            unsafe_unpickle (names the global it would import); not a dict with `model_state_dict`.
    """
    if not file.is_file():
        raise NCNConfigError(
            f"reference_checkpoint={file} is not a file: pass the .pt file the reference's train.py saved"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if unsafe_unpickle:
                data = torch.load(file, map_location="cpu", weights_only=False, pickle_module=_FULL_PICKLE)
            else:
                with torch.serialization.safe_globals([(ReferenceConfig, REFERENCE_CONFIG_CLASS)]):
                    data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(exc), re.IGNORECASE)
        what = f"it would import {found.group(1)}" if found else _first_line(exc)
        raise NCNConfigError(
            f"reference_checkpoint={file} needs full unpickling ({what}), which can run code: pass "
            "unsafe_unpickle=true only if you trust the file"
        ) from None
    except (ImportError, AttributeError) as exc:
        raise NCNConfigError(
            f"reference_checkpoint={file} holds an object ncn cannot rebuild ({_first_line(exc)}): "
            "save the reference's model_state_dict and config alone and import that file"
        ) from None
    except Exception as exc:  # damaged bytes fail anywhere in zip, pickle or storage code
        raise NCNConfigError(
            f"reference_checkpoint={file} is not a readable PyTorch file ({type(exc).__name__}: {_first_line(exc)}): "
            "pass the .pt file the reference's train.py saved"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get(MODEL_KEY), dict):
        raise NCNConfigError(
            f"reference_checkpoint={file} has no {MODEL_KEY}: pass a checkpoint the reference's train.py saved "
            "(checkpoint_step_<N>.pt, checkpoint_best.pt)"
        )
    return data


def reference_fields(data: dict[str, Any], file: Path) -> dict[str, Any]:
    """The reference config's fields (its defaults filled in) from a loaded checkpoint dict.

    Raises:
        NCNConfigError: no `config` of the reference's class, or a field the reference never had.
    """
    config = data.get("config")
    if isinstance(config, ReferenceConfig):
        raw = config.fields()
    elif isinstance(config, dict):
        raw = dict(config)
    else:
        raise NCNConfigError(
            f"reference_checkpoint={file}: its config is a {type(config).__name__}, not the reference's NCNConfig: "
            "import a checkpoint saved by the reference's train.py"
        )
    unknown = sorted(set(raw) - set(REFERENCE_DEFAULTS))
    if unknown:
        raise NCNConfigError(
            f"reference_checkpoint={file}: config field {unknown[0]}={raw[unknown[0]]!r} has no counterpart in ncn: "
            "such a model cannot be imported"
        )
    return {**REFERENCE_DEFAULTS, **raw}


def signal_order(fields: dict[str, Any], file: Path) -> list[str]:
    """The reference's signal names in its output order, checked to map onto ncn's signals.

    Raises:
        NCNConfigError: an unknown or repeated name, or num_mod_signals not their count.
    """
    names = [str(n) for n in fields["modulation_signal_names"]]
    for name in names:
        if name not in TARGET_OF:
            raise NCNConfigError(
                f"reference_checkpoint={file}: modulation signal {name!r} has no counterpart in ncn "
                f"(it maps {', '.join(TARGET_OF)}): such a model cannot be imported"
            )
    if len(set(names)) != len(names) or not names or fields["num_mod_signals"] != len(names):
        raise NCNConfigError(
            f"reference_checkpoint={file}: modulation_signal_names={names} with num_mod_signals="
            f"{fields['num_mod_signals']} is not a list of distinct signals of that length: "
            "such a model cannot be imported"
        )
    return names


def model_config(fields: dict[str, Any], file: Path) -> ModelConfig:
    """The `ModelConfig` of the reference's base: RMSNorm with its eps, exact GELU, biases (attention's 0).

    Raises:
        NCNConfigError: an invalid shape (as `ModelConfig` words it, prefixed by the file).
    """
    d_model = int(fields["d_model"])
    try:
        return ModelConfig(
            vocab_size=int(fields["vocab_size"]),
            block_size=int(fields["max_position_embeddings"]),
            d_model=d_model,
            n_layer=int(fields["num_layers"]),
            n_head=int(fields["nhead"]),
            d_ff=int(fields["dim_feedforward"] or 4 * d_model),
            dropout=float(fields["dropout"]),
            tie_weights=bool(fields["tie_weights"]),
            norm="rms",
            activation="gelu",
            bias=True,
            norm_eps=float(fields["layer_norm_eps"]),
        )
    except NCNConfigError as exc:
        raise NCNConfigError(f"reference_checkpoint={file}: {exc}") from None


def modulation_config(fields: dict[str, Any], file: Path) -> ModulationConfig:
    """The `ModulationConfig` of the reference's NCN: global pooling, its transforms and controller MLP.

    Raises:
        NCNConfigError: ncn_input_dim other than d_model, an activation ncn lacks, bad signals.
    """
    names = signal_order(fields, file)
    if fields["ncn_input_dim"] not in (None, fields["d_model"]):
        raise NCNConfigError(
            f"reference_checkpoint={file}: ncn_input_dim={fields['ncn_input_dim']} differs from d_model="
            f"{fields['d_model']}, which the reference's own forward pass cannot run: such a model cannot be imported"
        )
    activation = str(fields["ncn_activation_fn"]).lower()
    if activation not in CONTROLLER_ACTIVATIONS:
        raise NCNConfigError(
            f"reference_checkpoint={file}: ncn_activation_fn={fields['ncn_activation_fn']} has no counterpart "
            f"in ncn (it has {', '.join(CONTROLLER_ACTIVATIONS)})"
        )
    try:
        return ModulationConfig(
            targets=[TARGET_OF[n] for n in SIGNALS if n in names],
            hidden_dim=int(fields["ncn_hidden_dim"]),
            heads=int(fields["ncn_heads"]),
            pooling="global",
            homeostatic_lambda=float(fields["homeostatic_lambda"]),
            precision_max=REFERENCE_PRECISION_MAX,
            activation="gate",
            parametrisation="reference",
            controller_activation=activation,
            controller_norm="none",
        )
    except NCNConfigError as exc:
        raise NCNConfigError(f"reference_checkpoint={file}: {exc}") from None


def _shape(value: Tensor, expected: tuple[int, ...], key: str, file: Path) -> None:
    if tuple(value.shape) != expected:
        raise NCNConfigError(
            f"reference_checkpoint={file}: {key} has shape {tuple(value.shape)}, its config implies {expected}: "
            "the tensor and the config do not belong together"
        )


def convert(
    state: dict[str, Tensor], fields: dict[str, Any], target: dict[str, Tensor], file: Path
) -> dict[str, Tensor]:
    """The reference's `model_state_dict` as a state dict for the model `target` was taken from (the table above).

    `target` is that model's own state dict: it gives every expected name and shape. float32.

    Raises:
        NCNConfigError: a tensor with a NaN or inf, one with no counterpart, one of the wrong shape,
            a missing one, or an untied output head in a tied model (each named).
    """
    for key, tensor in state.items():  # before any comparison: a NaN differs from itself (the tied head)
        bad = int((~torch.isfinite(tensor.detach().float())).sum())
        if bad:
            raise NCNConfigError(
                f"reference_checkpoint={file}: tensor {key} holds {bad} non-finite values (NaN or inf): "
                "the checkpoint is damaged; import one saved before the run diverged"
            )
    d = int(fields["d_model"])
    names = signal_order(fields, file)
    out: dict[str, Tensor] = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        value = tensor.detach().float()
        if key in _RENAME:
            out[_RENAME[key]] = value
        elif key == "ncn.control_query":
            _shape(value, (1, 1, d), key, file)
            out["controller.salience.query"] = value.view(d)
        elif key == "ncn.pooling_attn.in_proj_weight":
            _shape(value, (3 * d, d), key, file)
            q, k, v = value.split(d)
            out.update({f"controller.salience.{n}_proj.weight": w for n, w in zip("qkv", (q, k, v), strict=True)})
        elif key == "ncn.pooling_attn.in_proj_bias":
            _shape(value, (3 * d,), key, file)
            q, _, v = value.split(d)  # the key bias: constant per head inside the softmax, dropped
            out["controller.salience.q_proj.bias"] = q
            out["controller.salience.v_proj.bias"] = v
        elif key in ("ncn.layer2.weight", "ncn.layer2.bias"):
            out[key.replace("ncn.layer2", "controller.fc2")] = _reorder(value, names, fields, key, file)
        elif (layer := _LAYER.match(key)) is not None and layer.group(2) in _LAYER_RENAME:
            out[f"blocks.{layer.group(1)}.{_LAYER_RENAME[layer.group(2)]}"] = value
        elif layer is not None and layer.group(2) in _QKV:
            qkv.setdefault(int(layer.group(1)), {})[layer.group(2)] = value
        else:
            raise NCNConfigError(
                f"reference_checkpoint={file}: tensor {key} {tuple(value.shape)} has no counterpart in ncn: "
                "such a model cannot be imported"
            )
    for index, parts in sorted(qkv.items()):
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise NCNConfigError(f"reference_checkpoint={file} lacks transformer_layers.{index}.{missing[0]}")
        for p in _QKV:
            _shape(parts[p], (d, d), f"transformer_layers.{index}.{p}", file)
        out[f"blocks.{index}.attn.qkv.weight"] = torch.cat([parts[p] for p in _QKV])
        out[f"blocks.{index}.attn.qkv.bias"] = torch.zeros(3 * d)  # the reference's projections have no bias
        out[f"blocks.{index}.attn.proj.bias"] = torch.zeros(d)
    if bool(fields["tie_weights"]):
        head, emb = out.get("lm_head.weight"), out.get("tok_emb.weight")
        if head is not None and emb is not None and not torch.equal(head, emb):
            raise NCNConfigError(
                f"reference_checkpoint={file}: output_head.weight differs from token_embeddings.weight although "
                "its config has tie_weights=True: the checkpoint is inconsistent"
            )
        if emb is not None:
            out["lm_head.weight"] = emb
    missing = sorted(set(target) - set(out))
    if missing:
        raise NCNConfigError(
            f"reference_checkpoint={file} lacks the tensor for {missing[0]} ({len(missing)} missing): "
            "the checkpoint is incomplete or of another version of the reference"
        )
    extra = sorted(set(out) - set(target))
    if extra:
        raise NCNConfigError(
            f"reference_checkpoint={file}: {extra[0]} has no place in the model its config describes: "
            "the tensors and the config do not belong together"
        )
    for key, value in out.items():
        if value.shape != target[key].shape:
            raise NCNConfigError(
                f"reference_checkpoint={file}: the tensor for {key} has shape {tuple(value.shape)}, "
                f"its config implies {tuple(target[key].shape)}: the tensors and the config do not belong together"
            )
    return out


def _reorder(value: Tensor, names: list[str], fields: dict[str, Any], key: str, file: Path) -> Tensor:
    """Rows of the reference's output layer, laid out (layer, its signal order), in ncn's (layer, `SIGNALS` order)."""
    layers, width = int(fields["num_layers"]), len(names)
    if value.shape[0] != layers * width:
        raise NCNConfigError(
            f"reference_checkpoint={file}: {key} has {value.shape[0]} rows, its config implies "
            f"num_layers × num_mod_signals = {layers * width}: the tensor and the config do not belong together"
        )
    order = [names.index(n) for n in SIGNALS if n in names]
    return value.view(layers, width, *value.shape[1:])[:, order].reshape(value.shape)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def import_checkpoint(file: Path, cfg: RunConfig, checkpoints: Path, unsafe_unpickle: bool = False) -> Path:
    """Convert the reference checkpoint `file` into an ncn checkpoint folder under `checkpoints`; returns it.

    The folder is an ordinary ncn checkpoint (`ncn.training.checkpoint.save`) at the reference's
    `global_step`, with `tokens_seen` its `processed_tokens`, the data loader at the start of
    `cfg.data`, a fresh AdamW state of `cfg.optim` over the parameters `cfg.trainer.freeze` leaves
    trainable (no moments: `trainer.resume` fine-tunes from it) and no val loss (the reference's
    was measured on its own data). Its config is `cfg` with the model and ncn groups of the
    reference (`model_config`, `modulation_config`) and `cfg.data` (with
    `data.pad_vocab_to=1` when its padding would exceed the reference's vocabulary), which
    task=eval then evaluates on. train_state.json names the source file (`imported_from`).

    Raises:
        NCNConfigError: see `read_reference`, `reference_fields`, `model_config`,
            `modulation_config`, `convert`; a control input (the reference has none); a data
            tokenizer whose ids exceed the reference's vocabulary (naming the tokenizers that fit).
    """
    if cfg.control.active:
        raise NCNConfigError(
            f"control={cfg.control.kind}: the reference's model has no control input; import with control=none"
        )
    data = read_reference(file, unsafe_unpickle)
    fields = reference_fields(data, file)
    model_cfg, modulation_cfg = model_config(fields, file), modulation_config(fields, file)
    needed, vocab = TOKENIZERS[cfg.data.tokenizer], model_cfg.vocab_size
    if needed > vocab:
        fits = [f"data.tokenizer={name}" for name, ids in TOKENIZERS.items() if ids <= vocab]
        smallest = min(TOKENIZERS, key=TOKENIZERS.__getitem__)
        fix = (
            f"choose the data's tokenizer the reference was trained with ({' or '.join(fits)} fits)"
            if fits
            else f"no tokenizer of ncn fits (the smallest, data.tokenizer={smallest}, has {TOKENIZERS[smallest]}): "
            "such a model cannot be imported"
        )
        raise NCNConfigError(
            f"data.tokenizer={cfg.data.tokenizer} has {needed} token ids, the reference model {vocab}: {fix}"
        )
    model = ModulatedGPT(model_cfg, modulation_cfg)
    model.load_state_dict(convert(data[MODEL_KEY], fields, model.state_dict(), file))
    data_cfg = cfg.data
    if vocab_size(data_cfg.tokenizer, data_cfg.pad_vocab_to) > model_cfg.vocab_size:  # training checks this
        data_cfg = dataclasses.replace(data_cfg, pad_vocab_to=1)
    run = dataclasses.replace(
        cfg,
        model=model_cfg,
        data=data_cfg,
        ncn=modulation_cfg,
        control=ControlConfig(),
        task="train",
        reference_checkpoint=None,
        unsafe_unpickle=False,
        run_name=cfg.run_name or f"reference-{file.stem}",
    )
    state = TrainState(
        step=_int(data.get("global_step")),
        tokens_seen=_int(data.get("processed_tokens")),
        data={"epoch": 0, "position": 0},
        run_name=run.run_name,
    )
    if cfg.trainer.freeze == "base":  # the optimizer a resume builds holds the controller's parameters only
        freeze_base(model)
    optim = {"optimizer": build_optimizer(model, cfg.optim).state_dict()}  # no moments yet: a fresh AdamW
    extra = {"imported_from": str(file.resolve())}
    return save(checkpoints, Snapshot(state, model.state_dict(), optim, dataclasses.asdict(run), extra), keep=1)
