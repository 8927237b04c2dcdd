"""Typed configuration of every part of a run, plus the context a run was launched in.

One dataclass per config group of `conf/` (NCN paper §2, §3, §6): `ModelConfig` (base GPT),
`ModulationConfig` (the controller), `ControlConfig` (control inputs, NCN paper §3.2, §6.1),
`DataConfig`, `OptimConfig`, `TrainerConfig`, `TrackingConfig`, and `RunConfig`, the whole
composed config. Each validates itself on
construction and raises `NCNConfigError` with one line naming the value and the fix. The
defaults here are the only defaults: the YAML options in `conf/` set what differs. This module
imports neither torch nor Hydra, so composing and validating a config is fast.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ncn.errors import NCNConfigError

TARGETS = ("temperature", "gain", "activation", "head_gate", "layer_gate")
# The paper's three targets (NCN paper §3): the default; head_gate and layer_gate are its §8 extensions.
PAPER_TARGETS = ("temperature", "gain", "activation")
# Targets whose signal gates a unit of compute that inference may skip (NCN paper §6.1, §8).
GATE_TARGETS = ("activation", "head_gate", "layer_gate")
POOLINGS = ("causal", "global", "none")
ACTIVATIONS = ("gate", "swish_beta")
# Base-model choices (ModelConfig): the normalisation layer and the FFN nonlinearity.
NORMS = ("rms", "layer")
FFN_ACTIVATIONS = ("gelu", "gelu_tanh")
# Signal parametrisations (ModulationConfig.parametrisation, docs/method.md §3).
PARAMETRISATIONS = ("paper", "exact_neutral", "reference")
# The controller MLP (ModulationConfig.controller_activation, .controller_norm).
CONTROLLER_ACTIVATIONS = ("tanh", "relu", "gelu", "sigmoid")
CONTROLLER_NORMS = ("rms", "none")
GATE_MODES = ("soft", "hard")
SOURCES = ("shakespeare", "text_files", "hf")
# Tokenizers a token cache can be built with, and their vocabulary sizes (end-of-text included).
TOKENIZERS = {"gpt2": 50257, "bytes": 257}
PRECISIONS = ("fp32", "bf16", "fp16")
FREEZES = ("none", "base")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("mlflow", "none")
TASKS = ("train", "prepare", "generate", "analyze", "eval", "report", "import")
# Control inputs (`conf/control/`): what the control is, and where it enters the model.
CONTROL_KINDS = ("none", "genre", "labels", "mode")
CONTROL_ROUTES = ("ncn", "embedding", "none")
# The operational-mode values every evaluation of a `control=mode` run measures (NCN paper §6.1).
MODE_GRID = (-1.0, -0.5, 0.0, 0.5, 1.0)
# ncn options that build the plain Transformer (no targets); the run name says so.
BASELINE_OPTIONS = ("none", "none_iso")
# Keys a resume may set to a value other than the checkpoint's; every other model/ncn/data key,
# and the seed, come from the checkpoint (the trainer, optim and tracking groups may all change).
RESUME_MUTABLE = frozenset(
    {
        "model.dropout",
        "ncn.homeostatic_lambda",
        "data.cache_dir",
        "data.num_proc",
        "data.num_workers",
        "data.pin_memory",
        "data.total_tokens",
        "control.label",
        "control.value",
        "control.mode_lambda",
    }
)
RESUME_FIXED_GROUPS = ("model", "ncn", "data", "control")
# Keys the config computes from others (conf/config.yaml: the vocabulary from data.tokenizer; conf/ncn/none_iso.yaml:
# the iso-parameter FFN width): a refused resume names the key they follow, unless they were typed themselves.
RESUME_DERIVED = frozenset({"model.vocab_size", "model.d_ff"})
# Keys outside those groups that a resume must keep as the checkpoint has them (the optimizer's
# parameter set depends on trainer.freeze).
RESUME_FIXED_KEYS = frozenset({"seed", "trainer.freeze"})


def _default(cfg: object, name: str) -> Any:
    default = next(f for f in fields(cfg) if f.name == name)  # type: ignore[arg-type]
    return None if default.default is MISSING else default.default


def _positive(cfg: object, group: str, name: str, optional: bool = False) -> None:
    """Raise unless field `name` of dataclass `cfg` is an int > 0 (or None when `optional`)."""
    value = getattr(cfg, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        example = _default(cfg, name)
        example = "null" if example is None else example  # d_ff: null = 4 * d_model
        raise NCNConfigError(f"{group}.{name}={value!r} must be a positive integer: set e.g. {group}.{name}={example}")


def _choice(key: str, value: Any, choices: tuple[str, ...] | dict[str, Any]) -> None:
    """Raise unless `value` (of config key `key`) is one of `choices`."""
    if value not in choices:
        raise NCNConfigError(f"{key}={value} is unknown: choose one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """Shape of the base pre-norm GPT (NCN paper §2).

    vocab_size: token ids are in [0, vocab_size); conf/config.yaml sets it from the data's
        tokenizer (GPT-2's 50257 padded to 50304, or 257 bytes padded to 320).
    block_size: longest sequence (positions of the learned position embedding).
    d_model, n_layer, n_head: width, depth, attention heads (d_model % n_head == 0).
    d_ff: FFN hidden width; None means 4 * d_model.
    dropout: on embeddings, attention probabilities and both residual branches, in [0, 1).
    tie_weights: share the output head with the token embedding.
    norm: "rms" (RMSNorm, no bias) or "layer" (LayerNorm, eps 1e-5, GPT-2's) before each
        sublayer and before the head.
    activation: FFN nonlinearity, "gelu" (exact, erf) or "gelu_tanh" (the tanh approximation,
        GPT-2's `gelu_new`).
    bias: biases in the attention and FFN linears (and in LayerNorm); the head has none.
    norm_eps: the norms' epsilon; None = RMSNorm's machine epsilon of the dtype, LayerNorm's
        1e-5 (the reference implementation's checkpoints carry their own, 1e-5 by default).
    init_from: None, or a Hugging Face hub id (e.g. "gpt2") or a local folder of HF-format
        GPT-2 weights (config.json + model.safetensors or pytorch_model.bin) that a fresh
        training run loads into the base model (`ncn.integrations.pretrained`).

    Raises:
        NCNConfigError: a non-positive size, d_model not divisible by n_head, dropout outside
            [0, 1), an unknown norm or activation, a norm_eps <= 0, an empty init_from.
    """

    vocab_size: int = 50304
    block_size: int = 256
    d_model: int = 256
    n_layer: int = 6
    n_head: int = 8
    d_ff: int | None = None
    dropout: float = 0.0
    tie_weights: bool = True
    norm: str = "rms"
    activation: str = "gelu"
    bias: bool = True
    norm_eps: float | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        _choice("model.norm", self.norm, NORMS)
        _choice("model.activation", self.activation, FFN_ACTIVATIONS)
        if self.init_from is not None and not str(self.init_from).strip():
            raise NCNConfigError(
                "model.init_from is empty: name a hub id (e.g. model.init_from=gpt2), a local folder, or null"
            )
        for name in ("vocab_size", "block_size", "d_model", "n_layer", "n_head"):
            _positive(self, "model", name)
        _positive(self, "model", "d_ff", optional=True)
        if self.d_model % self.n_head != 0:
            example = self.n_head * max(1, round(self.d_model / self.n_head))
            raise NCNConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}: "
                f"choose d_model as a multiple of n_head (e.g. model.d_model={example})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise NCNConfigError(f"model.dropout={self.dropout} is outside [0, 1): use e.g. model.dropout=0.1")
        if self.norm_eps is not None and not self.norm_eps > 0.0:
            raise NCNConfigError(
                f"model.norm_eps={self.norm_eps} is not positive: use e.g. model.norm_eps=1e-5, or null for the default"
            )

    @property
    def ffn_dim(self) -> int:
        """FFN hidden width: `d_ff`, or 4 * d_model when `d_ff` is None."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model


@dataclass
class ModulationConfig:
    """The NCN controller and what it modulates (NCN paper §3, §4, §5, §7).

    targets: subset of ("temperature", "gain", "activation", "head_gate", "layer_gate");
        [] is the plain Transformer baseline and builds no controller. temperature -> signal
        `precision` (attention inverse temperature), gain -> `gain` (both residual branches),
        activation -> `ffn_gate` (activation="gate") or `activation_beta`
        (activation="swish_beta"), head_gate -> `head_gate` (one gate per attention head,
        before the output projection), layer_gate -> `layer_gate` (the block's whole residual
        update: dynamic depth). Gates lie in (0, 1) and start at 0.95 (NCN paper §8).
    hidden_dim: controller MLP width h. heads: salience attention heads (must divide d_model).
    pooling: "causal" (default, leak-free), "global" (the reference's leaking mode, kept to
        quantify the leak; cannot decode incrementally) or "none" (phasic only, no salience).
    homeostatic_lambda: weight λ >= 0 of the homeostatic penalty (NCN paper §4).
    precision_max: upper clamp of the precision β, >= 1 so the neutral β = 1 is reachable.
    per_head_precision: one β per attention head instead of one per layer (NCN paper §7).
    activation: "gate" (paper's FFN output gate) or "swish_beta" (FFN activation x·sigmoid(β·x)).
    compute_lambda: weight >= 0 of the compute cost, the FLOP-weighted mean of the gates
        (`ncn.model.compute.compute_cost`); 0 = off. When > 0 the homeostatic penalty leaves
        the gates (ffn_gate, head_gate, layer_gate) alone, so it does not pull them back to 1.
    parametrisation: "paper" (the transforms and near-neutral init of NCN paper §3),
        "exact_neutral" (gain, precision and FFN gate exactly 1 at init, so a pretrained base
        keeps its logits; docs/method.md §3) or "reference" (as "paper" but the reference
        implementation's gain sigmoid(z) + 0.5 in (0.5, 1.5); what `task=import` builds).
        exact_neutral has no swish_beta, head_gate or layer_gate.
    controller_activation: the controller MLP's nonlinearity, "tanh" (default), "relu" (the
        reference implementation's default), "gelu" or "sigmoid".
    controller_norm: "rms" (RMSNorm on the controller's input, default) or "none" (the
        reference implementation has none).
    gate_mode: "soft" (a gate scales its unit by g) or "hard" (the unit runs at full weight
        where g >= 0.5 and not at all below, in training and inference alike; gradients reach g
        straight through, Bengio et al. 2013). Under a compute cost soft gates can shrink while
        the unit's weights grow to make up for it (docs/compute.md); hard gates cannot.

    Raises:
        NCNConfigError: unknown target/pooling/activation/parametrisation/controller_activation/
            controller_norm, repeated target, bad
            sizes or ranges, exact_neutral with swish_beta, head_gate or layer_gate.
    """

    targets: list[str] = field(default_factory=lambda: list(PAPER_TARGETS))
    hidden_dim: int = 64
    heads: int = 2
    pooling: str = "causal"
    homeostatic_lambda: float = 0.01
    precision_max: float = 4.0
    per_head_precision: bool = False
    activation: str = "gate"
    compute_lambda: float = 0.0
    parametrisation: str = "paper"
    gate_mode: str = "soft"
    controller_activation: str = "tanh"
    controller_norm: str = "rms"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            raise NCNConfigError(f"ncn.targets={self.targets!r} must be a list: write ncn.targets=[{self.targets}]")
        self.targets = [str(t) for t in self.targets]
        for target in self.targets:
            if target not in TARGETS:
                raise NCNConfigError(
                    f"ncn.targets contains unknown target {target!r}: choose from {', '.join(TARGETS)}"
                )
        if len(set(self.targets)) != len(self.targets):
            raise NCNConfigError(f"ncn.targets={self.targets} repeats a target: list each target once")
        _choice("ncn.pooling", self.pooling, POOLINGS)
        _choice("ncn.activation", self.activation, ACTIVATIONS)
        _choice("ncn.parametrisation", self.parametrisation, PARAMETRISATIONS)
        if self.parametrisation == "exact_neutral" and self.activation == "swish_beta" and "activation" in self.targets:
            raise NCNConfigError(
                "ncn.parametrisation=exact_neutral has no neutral Swish-β (x·sigmoid(1.702·x) only approximates GELU): "
                "use ncn.activation=gate, or ncn.parametrisation=paper"
            )
        gates = [t for t in self.targets if t in ("head_gate", "layer_gate")]
        if self.parametrisation == "exact_neutral" and gates:
            raise NCNConfigError(
                f"ncn.parametrisation=exact_neutral covers temperature, gain and activation, not {gates[0]}: "
                "drop it from ncn.targets, or use ncn.parametrisation=paper"
            )
        _choice("ncn.gate_mode", self.gate_mode, GATE_MODES)
        _choice("ncn.controller_activation", self.controller_activation, CONTROLLER_ACTIVATIONS)
        _choice("ncn.controller_norm", self.controller_norm, CONTROLLER_NORMS)
        _positive(self, "ncn", "hidden_dim")
        _positive(self, "ncn", "heads")
        if not self.homeostatic_lambda >= 0.0:
            raise NCNConfigError(
                f"ncn.homeostatic_lambda={self.homeostatic_lambda} is negative: use a value >= 0 (default 0.01)"
            )
        if not self.compute_lambda >= 0.0:
            raise NCNConfigError(
                f"ncn.compute_lambda={self.compute_lambda} is negative: use a value >= 0 (0 = no compute cost)"
            )
        if not self.precision_max >= 1.0:
            raise NCNConfigError(
                f"ncn.precision_max={self.precision_max} is below the neutral precision 1: "
                "use a value >= 1 (default 4.0)"
            )


@dataclass
class ControlConfig:
    """Control inputs fed to the model: task labels or an operational-mode slider (NCN paper §3.2, §6.1).

    kind: "none" (no control input: today's model), "genre" (the embedded plays' genre
        folder, 6 labels), "labels" (your labels: for data=text_files the first sub-folder
        under data.path, for data=hf the column `column`), or "mode" (a value m in [-1, 1]).
    route: where the control enters: "ncn" (a learned embedding added to the controller's
        input only), "embedding" (added to the token embeddings instead, the non-NCN way) or
        "none" (labels loaded but unused: the control for everything else). "ncn" needs a
        controller (ncn.targets not empty).
    column: the label column of data=hf (kind "labels").
    vocabulary: label names in id order; filled from the token cache when training starts and
        saved with every checkpoint ([] before that, and for kinds "none" and "mode").
    label: generate/analyze: force this label on every token (None = each label in turn for analyze).
    value: generate/analyze: the mode value m in [-1, 1] (None: 0 for generate, the grid for analyze).
    span: mode set point of the precision β* = span^m (> 1; span 2: β* from 0.5 to 2).
    mode_lambda: weight >= 0 of the mode penalty mean((β − β*)²), logged as train/mode_loss.

    Raises:
        NCNConfigError: an unknown kind or route, a value outside its range, kind "labels" on
            the embedded corpus, kind "labels" on data=hf without a column.
    """

    kind: str = "none"
    route: str = "ncn"
    column: str | None = None
    vocabulary: list[str] = field(default_factory=list)
    label: str | None = None
    value: float | None = None
    span: float = 2.0
    mode_lambda: float = 0.1

    def __post_init__(self) -> None:
        _choice("control.kind", self.kind, CONTROL_KINDS)
        _choice("control.route", self.route, CONTROL_ROUTES)
        self.vocabulary = [str(v) for v in self.vocabulary]
        if not self.span > 1.0:
            raise NCNConfigError(f"control.span={self.span} must be > 1: e.g. control.span=2 (β* from 0.5 to 2)")
        if not self.mode_lambda >= 0.0:
            raise NCNConfigError(f"control.mode_lambda={self.mode_lambda} is negative: use a value >= 0 (default 0.1)")
        if self.value is not None and not -1.0 <= self.value <= 1.0:
            raise NCNConfigError(f"control.value={self.value} is outside [-1, 1]: e.g. control.value=0.5")

    @property
    def labelled(self) -> bool:
        """Whether the data carries per-token labels (kinds genre and labels)."""
        return self.kind in ("genre", "labels")

    @property
    def active(self) -> bool:
        """Whether the model takes a control input (a labelled or mode kind with route ncn or embedding)."""
        return self.kind != "none" and self.route != "none"


def check_control(control: ControlConfig, modulation: ModulationConfig, data: DataConfig) -> None:
    """Check the constraints between the control, the controller and the data.

    Raises:
        NCNConfigError: route ncn without a controller; mode without the temperature target or
            with span above ncn.precision_max; genre off the embedded corpus; labels without a
            label source.
    """
    if control.kind == "none":
        return
    if control.route == "ncn" and not modulation.targets:
        raise NCNConfigError(
            "control.route=ncn feeds the control to the controller, but ncn.targets=[] builds none: "
            "use control.route=embedding with the baseline, or an ncn option with a controller (e.g. ncn=full)"
        )
    if control.kind == "mode":
        if "temperature" not in modulation.targets:
            raise NCNConfigError(
                f"control=mode sets the precision's set point, but ncn.targets={modulation.targets} has no "
                "temperature: use an ncn option with temperature (e.g. ncn=full)"
            )
        if control.span > modulation.precision_max:
            raise NCNConfigError(
                f"control.span={control.span} exceeds ncn.precision_max={modulation.precision_max}: "
                f"the set point span^1 is out of reach; use control.span<={modulation.precision_max}"
            )
    if control.kind == "genre" and data.source != "shakespeare":
        raise NCNConfigError(
            f"control=genre labels the embedded plays, not data.source={data.source}: use control=labels "
            "(text_files: the first sub-folder under data.path; hf: control.column=<label column>)"
        )
    if control.kind == "labels" and data.source == "shakespeare":
        raise NCNConfigError("control=labels reads your data's labels: with data=shakespeare use control=genre")
    if control.kind == "labels" and data.source == "hf" and not control.column:
        raise NCNConfigError("control=labels with data=hf reads a label column: set control.column=<column name>")


def check_skip_threshold(tau: float, shown: str | None = None) -> None:
    """Refuse a gate threshold τ outside [0, 1] (0 = dense; NCN paper §8): a gate lies in [0, 1].

    shown: how the value is named in the message (default `skip_threshold=<tau>`).

    Raises:
        NCNConfigError: tau outside [0, 1] (or NaN).
    """
    if not 0.0 <= tau <= 1.0:
        raise NCNConfigError(
            f"{shown or f'skip_threshold={tau}'} is outside [0, 1]: use 0 (dense) or a gate value such as 0.5"
        )


def check_compatible(model: ModelConfig, modulation: ModulationConfig) -> None:
    """Check the constraints that involve both configs.

    Raises:
        NCNConfigError: salience heads do not divide d_model (only when a salience pool is built).
    """
    if modulation.targets and modulation.pooling != "none" and model.d_model % modulation.heads != 0:
        nearest = max(h for h in range(1, modulation.heads) if model.d_model % h == 0)
        raise NCNConfigError(
            f"ncn.heads={modulation.heads} does not divide model.d_model={model.d_model}: "
            f"choose ncn.heads among the divisors of d_model (e.g. ncn.heads={nearest})"
        )


def check_baseline_choice(choices: Mapping[str, str], targets: list[str]) -> None:
    """Refuse empty `ncn.targets` under an NCN option, so the run name never claims a controller it lacks.

    Raises:
        NCNConfigError: targets == [] while the ncn option is not a baseline option (none, none_iso).
    """
    option = choices.get("ncn")
    if not targets and option is not None and option not in BASELINE_OPTIONS:
        raise NCNConfigError(
            f"ncn.targets=[] builds the plain Transformer: use ncn=none (the baseline option) "
            f"instead of emptying ncn={option}'s targets"
        )


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized and split (`conf/data/*.yaml`, NCN paper §6).

    source: "shakespeare" (the embedded plays), "text_files" (`path`: a folder searched
        recursively, a glob, or one file of UTF-8 .txt) or "hf" (`path`: a hub id or a local
        dataset folder, opened by `datasets.load_dataset`).
    tokenizer: "gpt2" (GPT-2 BPE, 50,257 ids, the paper's) or "bytes" (257 ids: one per byte
        plus end-of-text).
    name, data_files, split, val_split, text_column: passed to `datasets.load_dataset` (hf);
        val_split None holds out `val_fraction` of the documents, chosen with `split_seed`.
    cache_dir: parent of the token caches; None = $NCN_CACHE_DIR, else ~/.cache/ncn.
    num_proc: tokenizer processes, int >= 1 or "auto". num_workers: DataLoader workers,
        int >= 0 or "auto". pin_memory: true, false or "auto" (= CUDA available).
    pad_vocab_to: `model.vocab_size` is the tokenizer's vocabulary rounded up to this multiple.
    total_tokens: None, or the train + val token count the cache must hold (a check).

    Raises:
        NCNConfigError: an unknown source or tokenizer, a value outside the ranges above.
    """

    source: str = "shakespeare"
    tokenizer: str = "gpt2"
    path: str | None = None
    name: str | None = None
    data_files: Any = None
    split: str = "train"
    val_split: str | None = None
    text_column: str = "text"
    cache_dir: str | None = None
    val_fraction: float = 0.05
    split_seed: int = 42
    num_proc: Any = "auto"
    num_workers: Any = 0
    pin_memory: Any = "auto"
    pad_vocab_to: int = 64
    total_tokens: int | None = None

    def __post_init__(self) -> None:
        _choice("data.source", self.source, SOURCES)
        _choice("data.tokenizer", self.tokenizer, TOKENIZERS)
        if self.source != "shakespeare" and not self.path:
            what = (
                "<folder|glob|file> of .txt files" if self.source == "text_files" else "<hub id|local dataset folder>"
            )
            raise NCNConfigError(f"data.source={self.source} needs data.path: set data.path={what}")
        if not 0.0 < self.val_fraction < 1.0:
            raise NCNConfigError(
                f"data.val_fraction={self.val_fraction} must be in (0, 1): e.g. data.val_fraction=0.05"
            )
        if self.num_proc != "auto" and not (isinstance(self.num_proc, int) and self.num_proc >= 1):
            raise NCNConfigError(f"data.num_proc={self.num_proc!r} must be an integer >= 1 or 'auto'")
        if self.num_workers != "auto" and not (isinstance(self.num_workers, int) and self.num_workers >= 0):
            raise NCNConfigError(
                f"data.num_workers={self.num_workers!r} must be an integer >= 0 or 'auto': e.g. data.num_workers=0"
            )
        if self.pin_memory not in (True, False, "auto"):
            raise NCNConfigError(f"data.pin_memory={self.pin_memory!r} must be true, false or 'auto'")
        _positive(self, "data", "pad_vocab_to")
        if self.total_tokens is not None and not (isinstance(self.total_tokens, int) and self.total_tokens > 0):
            raise NCNConfigError(
                f"data.total_tokens={self.total_tokens!r} must be a positive integer or null (counted for you)"
            )


def vocab_size(tokenizer: str, pad_to: int) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of `pad_to` (gpt2: 64 -> 50304; bytes: 64 -> 320).

    Raises:
        NCNConfigError: an unknown tokenizer, or pad_to < 1.
    """
    _choice("data.tokenizer", tokenizer, TOKENIZERS)
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
        raise NCNConfigError(f"data.pad_vocab_to={pad_to!r} must be an integer >= 1: use 1 (no padding) or 64")
    return -(-TOKENIZERS[tokenizer] // pad_to) * pad_to


@dataclass
class OptimConfig:
    """AdamW and learning-rate schedule settings (`conf/optim/adamw.yaml`, NCN paper §6).

    lr: peak learning rate (> 0), reached after `warmup_steps` optimizer steps.
    min_lr: floor of the cosine decay, in [0, lr]; held after the last scheduled step.
    warmup_steps: linear warm-up length in optimizer steps (>= 0).
    weight_decay: decoupled AdamW decay (>= 0), applied to >= 2-D weights only.
    beta1, beta2: Adam moment coefficients in [0, 1). eps: Adam epsilon (> 0).
    fused: fused AdamW kernel; None = on when the parameters live on CUDA.

    Raises:
        NCNConfigError: a value outside the ranges above.
    """

    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    fused: bool | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise NCNConfigError(f"optim.lr={self.lr} must be > 0: use e.g. optim.lr=6e-4")
        if not 0 <= self.min_lr <= self.lr:
            raise NCNConfigError(
                f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]: use e.g. optim.min_lr={self.lr / 10:g}"
            )
        if self.warmup_steps < 0:
            raise NCNConfigError(
                f"optim.warmup_steps={self.warmup_steps} must be >= 0: use e.g. optim.warmup_steps=100"
            )
        if not self.weight_decay >= 0:
            raise NCNConfigError(
                f"optim.weight_decay={self.weight_decay} must be >= 0: use e.g. optim.weight_decay=0.1"
            )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise NCNConfigError(f"optim.{name}={getattr(self, name)} must be in [0, 1): use e.g. optim.{name}=0.9")
        if not self.eps > 0:
            raise NCNConfigError(f"optim.eps={self.eps} must be > 0: use e.g. optim.eps=1e-8")


@dataclass
class TrainerConfig:
    """How to train (`conf/trainer/*.yaml`). Steps are optimizer steps; defaults = the CPU default run.

    Bounds (the first reached stops; at least one is required): max_steps, epochs (passes over
    the train split, may be fractional), max_tokens (tokens over all ranks).
    batch_size: sequences per micro-batch and rank; grad_accum: micro-batches per step.
    grad_clip: max global grad norm (0 = no clipping). precision: fp32 | bf16 | fp16 (fp16
    needs CUDA and uses a GradScaler). compile: torch.compile the model. device: auto | cpu | cuda.
    eval_every / eval_batches: evaluate every N steps (and at the end) on the first
    eval_batches fixed val batches of batch_size. log_every: train metrics every N steps.
    checkpoint_every / keep_checkpoints: checkpoint every N steps (and at the end), keep the
    last K (and the best). resume: null | latest | best | PATH | run name | MLflow run id.
    skip_nonfinite: skip up to N steps with a NaN/Inf loss or grad norm instead of stopping.
    activation_checkpointing: recompute blocks in backward. threads: torch CPU threads per
    process (null = cores / local processes). deterministic: deterministic algorithms (exact
    resume on CPU). progress: tqdm bar on an interactive terminal. probe_tokens: at each eval,
    log the signal heatmaps of the first N val tokens (0 = off; NCN paper §8). freeze: "none"
    (train everything) or "base" (train only the controller and a control input's embedding;
    the base LM's weights stay as initialised or loaded by model.init_from: NCN paper §3.1's
    fixed θ; needs a controller; fixed on resume).

    Raises:
        NCNConfigError: no bound, a non-positive count, an unknown precision, device or freeze.
    """

    max_steps: int | None = 250
    epochs: float | None = None
    max_tokens: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str = "fp32"
    compile: bool = False
    device: str = "auto"
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    resume: str | None = None
    skip_nonfinite: int = 0
    activation_checkpointing: bool = False
    threads: int | None = None
    deterministic: bool = True
    progress: bool = True
    probe_tokens: int = 32
    freeze: str = "none"

    def __post_init__(self) -> None:
        if self.max_steps is None and self.epochs is None and self.max_tokens is None:
            raise NCNConfigError(
                "trainer.max_steps, trainer.epochs and trainer.max_tokens are all null: "
                "set one, e.g. trainer.max_steps=300"
            )
        for name in (
            "batch_size",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "max_steps",
            "max_tokens",
            "threads",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise NCNConfigError(f"trainer.{name}={value} must be >= 1: e.g. trainer.{name}=1")
        if self.epochs is not None and not self.epochs > 0:
            raise NCNConfigError(f"trainer.epochs={self.epochs} must be > 0: e.g. trainer.epochs=1")
        for name in ("skip_nonfinite", "grad_clip", "probe_tokens"):
            if not getattr(self, name) >= 0:
                raise NCNConfigError(f"trainer.{name}={getattr(self, name)} must be >= 0: e.g. trainer.{name}=0")
        _choice("trainer.precision", self.precision, PRECISIONS)
        _choice("trainer.device", self.device, DEVICES)
        _choice("trainer.freeze", self.freeze, FREEZES)


@dataclass
class TrackingConfig:
    """Where runs are recorded (`conf/tracking/*.yaml`).

    backend: "mlflow" or "none" (only the local metrics.jsonl).
    uri: MLflow tracking URI; None = `sqlite:///<launch dir>/mlflow.db` (an absolute path, so
        every job and `mlflow ui` see one store).
    experiment: experiment name. parent_run_id: a sweep's parent run (set by the sweep).
    artifact_location: None = `<store folder>/mlartifacts/<experiment>`.

    Raises:
        NCNConfigError: an unknown backend, an empty experiment name.
    """

    backend: str = "mlflow"
    uri: str | None = None
    experiment: str = "ncn"
    parent_run_id: str | None = None
    artifact_location: str | None = None

    def __post_init__(self) -> None:
        _choice("tracking.backend", self.backend, BACKENDS)
        if not self.experiment:
            raise NCNConfigError("tracking.experiment is empty: name the experiment, e.g. tracking.experiment=ncn")


@dataclass
class RunConfig:
    """The composed config of one `python run.py` (conf/config.yaml explains each key).

    control: the control input (`ControlConfig`; kind "none" by default).
    task: what to run (`TASKS`). seed: init, data order and sampling seed. run_name: None =
    `<model>-<ncn>[-<data>][-<optim>][-<overrides>]-s<seed>` (`ncn.tracking.default_run_name`).
    checkpoint: what generate/analyze/eval load (latest | best | PATH | run name | MLflow run
    id). prompt: generate/analyze text (None =
    generate from a fresh document; analyze the training probe). max_new_tokens, temperature
    (0 = greedy), top_k: sampling. sweep_run: the sweep a report is about. reference_log: a
    training log in the reference implementation's text format whose SEI a report states (and
    draws beside the sweep's curves, docs/method.md §9). baseline: the variant label (or
    `<key>=<value>` of a swept key) every Δ of a report compares with; None = the first value of
    `ncn` (else of the first swept key), docs/sweeps.md. sweep_resume: a
    multirun continues this earlier sweep (its MLflow parent run id or its sweep folder):
    finished jobs are skipped, interrupted ones resume from their latest checkpoint
    (docs/sweeps.md "Resuming a sweep"). skip_threshold τ in [0, 1]: eval, generate and analyze
    skip every FFN, head and block whose gate is below τ (0 = dense). skip_grid: thresholds in
    (0, 1] at which eval (and train, after its last step) measures the FLOPs skipped and Δ val
    loss against random skipping at the same rate, with skip_draws >= 1 random draws
    (NCN paper §6.1, §8; docs/compute.md). reference_checkpoint: the .pt file of the reference
    implementation's train.py that task=import converts; unsafe_unpickle: let task=import fully
    unpickle a file that needs it (can run code; `ncn.integrations.reference`).

    Raises:
        NCNConfigError: an unknown task, a threshold out of range, skip_draws < 1,
            trainer.freeze=base without a controller (ncn.targets=[]); a control the model or data
            cannot carry (`check_control`).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    ncn: ModulationConfig = field(default_factory=ModulationConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    task: str = "train"
    run_name: str | None = None
    checkpoint: str | None = None
    prompt: str | None = None
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    sweep_run: str | None = None
    reference_log: str | None = None
    baseline: str | None = None
    sweep_resume: str | None = None
    skip_threshold: float = 0.0
    skip_grid: list[float] = field(default_factory=list)
    skip_draws: int = 3
    reference_checkpoint: str | None = None
    unsafe_unpickle: bool = False

    def __post_init__(self) -> None:
        _choice("task", self.task, TASKS)
        check_skip_threshold(self.skip_threshold)
        for tau in self.skip_grid:
            if not 0.0 < tau <= 1.0:
                raise NCNConfigError(
                    f"skip_grid contains {tau}, outside (0, 1]: list gate thresholds, e.g. skip_grid=[0.1,0.3,0.5]"
                )
        if isinstance(self.skip_draws, bool) or not isinstance(self.skip_draws, int) or self.skip_draws < 1:
            raise NCNConfigError(f"skip_draws={self.skip_draws!r} must be an integer >= 1: e.g. skip_draws=3")
        if self.trainer.freeze == "base" and not self.ncn.targets:
            raise NCNConfigError(
                "trainer.freeze=base leaves nothing to train in a model without a controller (ncn=none): "
                "choose an NCN option (e.g. ncn=full) or trainer.freeze=none"
            )
        check_control(self.control, self.ncn, self.data)
        if self.control.active and self.skip_grid:
            raise NCNConfigError(
                f"skip_grid={self.skip_grid} measures skipping without a control input, but "
                f"control={self.control.kind} gives one: drop skip_grid (or use control=none)"
            )


SWEPT_ENV = "NCN_SWEPT_KEYS"  # comma-separated keys a sweep varies, set for its jobs (ncn.tasks.sweep)


@dataclass(frozen=True)
class RunContext:
    """Where and how a run was launched; built once by the entry point (run.py) from Hydra.

    run_dir: the run's output folder (checkpoints, logs). launch_dir: where `run.py` was
    started (`latest` and the default MLflow store are searched there). choices: the chosen
    option of each config group ({"model": "small", "ncn": "full", ...}). overridden: config
    keys and groups set on the command line ({"model", "trainer.max_steps", ...}). config: the
    resolved composed config as plain containers (logged to MLflow, saved in checkpoints).
    command: the command line. job: a sweep job's number, None outside a sweep. swept: the keys
    the sweep varies (`ncn.pooling`, `seed`, ...), which the job's run name shows; empty outside a
    sweep (the sweep's callback exports them to its jobs as `SWEPT_ENV`).
    """

    run_dir: Path
    launch_dir: Path
    choices: dict[str, str] = field(default_factory=dict)
    overridden: frozenset[str] = frozenset()
    config: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    job: int | None = None
    swept: frozenset[str] = frozenset()

    @classmethod
    def here(cls, config: dict[str, Any] | None = None) -> RunContext:
        """Context of a run outside Hydra (tests, notebooks): run and launch dir = the current directory."""
        return cls(Path.cwd(), Path.cwd(), config=config or {})


def shell_override(key: str, value: object) -> str:
    """`key=value` as one bash word that Hydra reads back as exactly `value` (for printed commands).

    Plain when the value needs no quoting (`sweep_run=3f2a...`); else the value is a Hydra quoted
    string (backslashes before a quote or at the end doubled, quotes escaped) and the whole word
    is quoted for bash: in double quotes when nothing in it is special there, else with
    `shlex.quote`, so paths with spaces or quotes survive both.
    """
    text = str(value)
    if re.fullmatch(r"[\w./-]+", text):
        return f"{key}={text}"
    word = f"{key}='" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text) + "'"
    return f'"{word}"' if not set(word) & set('"$`\\!') else shlex.quote(word)


def python_command(script: str, *overrides: str) -> str:
    """`python <script> <overrides>` to paste into bash: the script path quoted, overrides as given
    (build each with `shell_override`)."""
    return " ".join(["python", shlex.quote(script), *overrides])


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A `RunConfig` from plain containers (a checkpoint's config.yaml), typed and validated.

    Keys missing from `data` take the schema's defaults (configs written before a field
    existed still load).

    Raises:
        NCNConfigError: a key that is not a setting, a value of the wrong type or out of range
            (the message names the key); TypeError: `data` is not a mapping.
    """
    from omegaconf import OmegaConf  # only readers of saved configs pay for it
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(data, dict):
        raise TypeError(f"a config is a mapping of groups, not {type(data).__name__}")
    try:
        run = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), data))
    except OmegaConfBaseException as exc:
        if isinstance(exc.__cause__, NCNConfigError):
            raise exc.__cause__ from None
        where = f"{exc.full_key}: " if getattr(exc, "full_key", None) else ""
        raise NCNConfigError(where + str(exc).strip().splitlines()[0]) from None
    assert isinstance(run, RunConfig)
    return run
