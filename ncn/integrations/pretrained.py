"""HF-format GPT-2 weights into the base of a `ModulatedGPT`: `model.init_from=<hub id | local folder>`.

The source is a folder holding `config.json` and `model.safetensors` (or `pytorch_model.bin`,
read with `torch.load(weights_only=True)`): a local folder as written by `transformers`'
`save_pretrained`, or a Hugging Face hub id (e.g. `gpt2`) fetched with `huggingface_hub` into
its cache (network on the first use; `HF_HUB_OFFLINE=1` reads the cache only). Only GPT-2
(`model_type` "gpt2") maps; its config must describe the chosen `ModelConfig` (`model=gpt2`,
`gpt2_medium`), each mismatch refused in one line. The controller is not touched: with
`ncn.parametrisation=exact_neutral` the step-0 logits are the pretrained model's (NCN paper §3.1,
docs/method.md §3).

| HF GPT-2 tensor (`transformer.` prefix optional) | `ModulatedGPT` parameter |
|---|---|
| `wte.weight` (V, d) | `tok_emb.weight` (and the tied `lm_head.weight`) |
| `wpe.weight` (n_positions, d) | `pos_emb.weight`: its first `block_size` rows |
| `h.{i}.ln_1`, `h.{i}.ln_2`, `ln_f` (weight, bias) | `blocks.{i}.norm1`, `blocks.{i}.norm2`, `norm` |
| `h.{i}.attn.c_attn`, `.attn.c_proj` (Conv1D, weight (in, out)) | `blocks.{i}.attn.qkv`, `.attn.proj` (transposed) |
| `h.{i}.mlp.c_fc`, `.mlp.c_proj` (Conv1D) | `blocks.{i}.mlp.fc`, `.mlp.proj` (weight transposed) |
| `lm_head.weight` (untied models only) | `lm_head.weight` |
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ncn.config import ModelConfig
from ncn.errors import NCNConfigError
from ncn.model.gpt import ModulatedGPT

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# HF GPT-2's activation names -> model.activation
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# Buffers some GPT-2 files carry (the causal mask and its fill value): not weights.
_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_LAYER = re.compile(r"^h\.(\d+)\.(.+)$")
_RENAME = {
    "ln_1": "norm1",
    "ln_2": "norm2",
    "attn.c_attn": "attn.qkv",
    "attn.c_proj": "attn.proj",
    "mlp.c_fc": "mlp.fc",
    "mlp.c_proj": "mlp.proj",
}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "gpt2", "openai-community/gpt2"


def locate(spec: str) -> Path:
    """The folder holding `spec`'s config.json and weights: `spec` itself if it is a folder, else
    the hub id's files in the huggingface_hub cache (downloaded when missing).

    Raises:
        NCNConfigError: neither a folder nor a hub id; a folder without the files; a hub id that
            cannot be fetched (unknown repository, no network), in one line.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise NCNConfigError(
                f"model.init_from={spec}: {path} has no {CONFIG_FILE}: pass a folder written by "
                "transformers' save_pretrained (config.json + model.safetensors or pytorch_model.bin)"
            )
        return path
    if path.exists() or not _HUB_ID.fullmatch(spec):
        raise NCNConfigError(
            f"model.init_from={spec} is neither a folder nor a hub id: pass a local folder of HF-format "
            "weights or a hub id such as gpt2"
        )
    return _download(spec)


def _download(repo_id: str) -> Path:
    """config.json and the first weight file `repo_id` has, via huggingface_hub; their cache folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(hf_hub_download(repo_id, CONFIG_FILE)).parent
        for name in WEIGHT_FILES:
            try:
                hf_hub_download(repo_id, name)
                return folder
            except EntryNotFoundError:
                continue
    except LocalEntryNotFoundError:
        raise NCNConfigError(
            f"model.init_from={repo_id}: not in the local hub cache and the hub cannot be reached: "
            "connect to the network once, or pass a local folder of HF-format weights"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NCNConfigError(
            f"model.init_from={repo_id} is no local folder and cannot be fetched from the hub ({detail}): "
            "check the id (e.g. gpt2) or the folder's path"
        ) from None
    raise NCNConfigError(
        f"model.init_from={repo_id} has neither {' nor '.join(WEIGHT_FILES)} on the hub: "
        "choose a repository with HF-format GPT-2 weights"
    )


def read_hf_config(folder: Path) -> dict[str, Any]:
    """The parsed config.json of `folder`.

    Raises:
        NCNConfigError: unreadable, or not GPT-2 (`model_type` other than "gpt2").
    """
    file = folder / CONFIG_FILE
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NCNConfigError(
            f"{file} is unreadable ({type(exc).__name__}): pass a folder with a valid config.json"
        ) from None
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        kind = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise NCNConfigError(
            f"{file}: model_type={kind} cannot be mapped onto ncn's base: model.init_from loads GPT-2 "
            "(model_type gpt2) only"
        )
    return hf


def check_hf_config(hf: dict[str, Any], model: ModelConfig, file: Path) -> None:
    """Refuse an HF GPT-2 config that does not describe `model` (shapes, norm, activation, head).

    Raises:
        NCNConfigError: the first mismatch, naming the HF key, its value and the ncn key to set.
    """
    if model.norm != "layer" or not model.bias:
        raise NCNConfigError(
            f"model.norm={model.norm}, model.bias={model.bias} is not GPT-2's base (LayerNorm with bias): "
            "use model=gpt2 (model.norm=layer model.bias=true)"
        )
    n_embd = int(hf.get("n_embd", 768))
    pairs = [
        ("n_embd", n_embd, "d_model", model.d_model),
        ("n_layer", int(hf.get("n_layer", 12)), "n_layer", model.n_layer),
        ("n_head", int(hf.get("n_head", 12)), "n_head", model.n_head),
        ("vocab_size", int(hf.get("vocab_size", 50257)), "vocab_size", model.vocab_size),
        ("n_inner", int(hf.get("n_inner") or 4 * n_embd), "d_ff", model.ffn_dim),
        ("activation_function", ACTIVATIONS.get(hf.get("activation_function", "gelu_new")), "activation", None),
        ("tie_word_embeddings", bool(hf.get("tie_word_embeddings", True)), "tie_weights", model.tie_weights),
    ]
    for hf_key, value, key, ours in pairs:
        if key == "activation":
            if value is None:
                raise NCNConfigError(
                    f"{file}: activation_function={hf.get('activation_function')} cannot be mapped: "
                    f"ncn has {', '.join(ACTIVATIONS)}"
                )
            ours = model.activation
        if value != ours:
            hint = "model.vocab_size follows data.pad_vocab_to: model=gpt2 sets 1" if key == "vocab_size" else ""
            raise NCNConfigError(
                f"{file}: {hf_key}={hf.get(hf_key, value)} does not match model.{key}={ours}: set model.{key}={value} "
                f"or choose the matching option (model=gpt2, gpt2_medium){'; ' + hint if hint else ''}"
            )
    positions = int(hf.get("n_positions", 1024))
    if model.block_size > positions:
        raise NCNConfigError(
            f"{file}: n_positions={positions} is below model.block_size={model.block_size}: "
            f"use model.block_size<={positions}"
        )
    if float(hf.get("layer_norm_epsilon", 1e-5)) != 1e-5:
        raise NCNConfigError(
            f"{file}: layer_norm_epsilon={hf['layer_norm_epsilon']} is not 1e-5, the only LayerNorm eps ncn builds"
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise NCNConfigError(f"{file}: {flag}=true has no counterpart in ncn's attention: such a model cannot map")
    if hf.get("scale_attn_weights", True) is False:
        raise NCNConfigError(f"{file}: scale_attn_weights=false has no counterpart in ncn's attention (1/sqrt(d_head))")


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The tensors of `folder`'s model.safetensors, else its pytorch_model.bin (weights_only=True).

    Raises:
        NCNConfigError: no weight file; a file that is corrupt or would need full unpickling.
    """
    safetensors_file, bin_file = (folder / name for name in WEIGHT_FILES)
    if safetensors_file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(safetensors_file)
        except (SafetensorError, OSError) as exc:
            raise NCNConfigError(f"{safetensors_file} is corrupt ({exc}): download it again") from None
    if bin_file.is_file():
        try:
            return torch.load(bin_file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NCNConfigError(
                f"{bin_file} cannot be read as tensors only ({detail}): convert it to model.safetensors"
            ) from None
    raise NCNConfigError(f"{folder} has neither {' nor '.join(WEIGHT_FILES)}: pass a folder that holds the weights")


def convert(hf_state: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    """HF GPT-2 tensors -> `ModulatedGPT` base parameters (the table above); float32, positions cropped.

    Raises:
        NCNConfigError: a tensor that has no place in the base (named).
    """
    out: dict[str, Tensor] = {}
    for name, tensor in hf_state.items():
        key = name.removeprefix("transformer.")
        if _BUFFERS.match(key):
            continue
        value = tensor.float()
        if key == "wte.weight":
            out["tok_emb.weight"] = value
        elif key == "wpe.weight":
            out["pos_emb.weight"] = value[: model.block_size]
        elif key in ("ln_f.weight", "ln_f.bias"):
            out["norm." + key.split(".")[1]] = value
        elif key == "lm_head.weight":
            out["lm_head.weight"] = value
        elif (layer := _LAYER.match(key)) is not None:
            index, rest = layer.groups()
            module, leaf = rest.rsplit(".", 1)
            if module not in _RENAME:
                raise NCNConfigError(f"tensor {name} has no counterpart in ncn's GPT-2 base: such a model cannot map")
            out[f"blocks.{index}.{_RENAME[module]}.{leaf}"] = value.t() if rest in _CONV1D else value
        else:
            raise NCNConfigError(f"tensor {name} has no counterpart in ncn's GPT-2 base: such a model cannot map")
    if model.tie_weights and "lm_head.weight" in out and not torch.equal(out["lm_head.weight"], out["tok_emb.weight"]):
        raise NCNConfigError("lm_head.weight differs from wte.weight in a tied model: set model.tie_weights=false")
    if model.tie_weights:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


def load_pretrained(model: ModulatedGPT, spec: str) -> Path:
    """Load the HF GPT-2 weights `spec` (hub id or folder) into `model`'s base; returns their folder.

    Every base parameter is replaced; the controller and the control input's embedding keep their
    initialisation.

    Raises:
        NCNConfigError: see `locate`, `read_hf_config`, `check_hf_config`, `read_weights`,
            `convert`; a missing tensor or one of another shape (named).
    """
    folder = locate(spec)
    hf = read_hf_config(folder)
    check_hf_config(hf, model.config, folder / CONFIG_FILE)
    weights = convert(read_weights(folder), model.config)
    state = model.state_dict()
    base = {k for k in state if not k.startswith(("controller.", "control."))}
    missing = sorted(base - weights.keys())
    if missing:
        raise NCNConfigError(f"{folder} lacks {missing[0]} ({len(missing)} tensors missing): the file is incomplete")
    for key, value in weights.items():
        if value.shape != state[key].shape:
            raise NCNConfigError(
                f"{folder}: {key} has shape {tuple(value.shape)}, the model expects {tuple(state[key].shape)}: "
                "choose the model option the weights were trained with (model=gpt2, gpt2_medium)"
            )
    model.load_state_dict({**state, **weights})
    return folder
