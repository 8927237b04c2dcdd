"""Typed configuration of the base Transformer and of the NCN controller.

`ModelConfig` describes the base GPT (NCN paper §2), `ModulationConfig` the controller and
which layer computations it modulates (NCN paper §3, §7). Both validate themselves on
construction and raise `NCNConfigError` with a one-line message that names the value and the fix.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from ncn.errors import NCNConfigError

TARGETS = ("temperature", "gain", "activation")
POOLINGS = ("causal", "global", "none")
ACTIVATIONS = ("gate", "swish_beta")


def _positive(cfg: object, group: str, name: str) -> None:
    """Raise unless field `name` of dataclass `cfg` is an int > 0; the fix suggests the field's default."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        default = next(f.default for f in fields(cfg) if f.name == name)  # type: ignore[arg-type]
        example = "null" if default is None or default is MISSING else default  # d_ff: null = 4 * d_model
        raise NCNConfigError(f"{group}.{name}={value!r} must be a positive integer: set e.g. {group}.{name}={example}")


@dataclass
class ModelConfig:
    """Shape of the base pre-norm GPT (NCN paper §2).

    vocab_size: token ids are in [0, vocab_size); pad GPT-2's 50257 to 50304 for speed.
    block_size: longest sequence (positions of the learned position embedding).
    d_model, n_layer, n_head: width, depth, attention heads (d_model % n_head == 0).
    d_ff: FFN hidden width; None means 4 * d_model.
    dropout: on embeddings, attention probabilities and both residual branches, in [0, 1).
    tie_weights: share the output head with the token embedding.

    Raises:
        NCNConfigError: a non-positive size, d_model not divisible by n_head, dropout outside [0, 1).
    """

    vocab_size: int = 50304
    block_size: int = 256
    d_model: int = 256
    n_layer: int = 6
    n_head: int = 8
    d_ff: int | None = None
    dropout: float = 0.0
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "d_model", "n_layer", "n_head"):
            _positive(self, "model", name)
        if self.d_ff is not None:
            _positive(self, "model", "d_ff")
        if self.d_model % self.n_head != 0:
            example = self.n_head * max(1, round(self.d_model / self.n_head))
            raise NCNConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}: "
                f"choose d_model as a multiple of n_head (e.g. model.d_model={example})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise NCNConfigError(f"model.dropout={self.dropout} is outside [0, 1): use e.g. model.dropout=0.1")

    @property
    def ffn_dim(self) -> int:
        """FFN hidden width: `d_ff`, or 4 * d_model when `d_ff` is None."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model


@dataclass
class ModulationConfig:
    """The NCN controller and what it modulates (NCN paper §3, §4, §5, §7).

    targets: subset of ("temperature", "gain", "activation"); [] is the plain Transformer
        baseline and builds no controller. temperature -> signal `precision` (attention
        inverse temperature), gain -> `gain` (both residual branches), activation ->
        `ffn_gate` (activation="gate") or `activation_beta` (activation="swish_beta").
    hidden_dim: controller MLP width h. heads: salience attention heads (must divide d_model).
    pooling: "causal" (default, leak-free), "global" (the reference's leaking mode, kept to
        quantify the leak; cannot decode incrementally) or "none" (phasic only, no salience).
    homeostatic_lambda: weight λ >= 0 of the homeostatic penalty (NCN paper §4).
    precision_max: upper clamp of the precision β, >= 1 so the neutral β = 1 is reachable.
    per_head_precision: one β per attention head instead of one per layer (NCN paper §7).
    activation: "gate" (paper's FFN output gate) or "swish_beta" (FFN activation x·sigmoid(β·x)).

    Raises:
        NCNConfigError: unknown target/pooling/activation, repeated target, bad sizes or ranges.
    """

    targets: list[str] = field(default_factory=lambda: ["temperature", "gain", "activation"])
    hidden_dim: int = 64
    heads: int = 2
    pooling: str = "causal"
    homeostatic_lambda: float = 0.01
    precision_max: float = 4.0
    per_head_precision: bool = False
    activation: str = "gate"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            raise NCNConfigError(f"ncn.targets={self.targets!r} must be a list: write ncn.targets=[{self.targets}]")
        # Hydra hands over a ListConfig; the model only ever sees plain Python lists.
        self.targets = [str(t) for t in self.targets]
        for target in self.targets:
            if target not in TARGETS:
                raise NCNConfigError(
                    f"ncn.targets contains unknown target {target!r}: choose from {', '.join(TARGETS)}"
                )
        if len(set(self.targets)) != len(self.targets):
            raise NCNConfigError(f"ncn.targets={self.targets} repeats a target: list each target once")
        if self.pooling not in POOLINGS:
            raise NCNConfigError(f"ncn.pooling={self.pooling!r} is unknown: choose one of {', '.join(POOLINGS)}")
        if self.activation not in ACTIVATIONS:
            raise NCNConfigError(
                f"ncn.activation={self.activation!r} is unknown: choose one of {', '.join(ACTIVATIONS)}"
            )
        _positive(self, "ncn", "hidden_dim")
        _positive(self, "ncn", "heads")
        if not self.homeostatic_lambda >= 0.0:
            raise NCNConfigError(
                f"ncn.homeostatic_lambda={self.homeostatic_lambda} is negative: use a value >= 0 (default 0.01)"
            )
        if not self.precision_max >= 1.0:
            raise NCNConfigError(
                f"ncn.precision_max={self.precision_max} is below the neutral precision 1: "
                "use a value >= 1 (default 4.0)"
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
