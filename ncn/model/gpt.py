"""ModulatedGPT: the base GPT plus the NCN controller, with cached generation.

Deviations from nanoGPT's GPT: RMSNorm instead of LayerNorm by default (`model.norm=layer`,
`model.activation=gelu_tanh` give GPT-2's exact architecture, `model=gpt2`); every block takes per-token
modulation signals computed by the controller in one batched pass before the blocks (NCN
paper §3); causal salience pooling by default (§5); the homeostatic penalty is part of the
loss (§4), and so is the compute cost of the gates when `ncn.compute_lambda` > 0 (§6.1);
generation keeps a KV cache and the controller's constant-size salience state; a `SkipPlan`
makes inference skip the gated-off FFNs, heads and blocks (§8, `ncn.model.compute`). An
optional control input (a label per token, or an operational mode m per sequence; NCN paper
§3.2, §6.1) is embedded and added to the controller's input (route "ncn") or to the token
embeddings (route "embedding").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ncn.config import ControlConfig, ModelConfig, ModulationConfig, check_compatible
from ncn.errors import NCNConfigError
from ncn.model.blocks import Block, KVCache, make_norm
from ncn.model.compute import SkipMasks, SkipPlan, compute_cost, masked_signals, present, threshold_masks
from ncn.model.controller import Controller, SalienceState
from ncn.model.signals import GATES, hard_gates, homeostatic_loss, mode_loss, signal_names


@dataclass
class ModelOutput:
    """Result of `ModulatedGPT.forward`.

    logits (B, T, vocab_size); ce_loss: mean next-token cross-entropy (None without
    targets); reg_loss: homeostatic penalty, 0-dim (0 for the baseline); compute_loss:
    ncn.compute_lambda × `compute_cost` of the gates, 0-dim (0 when off); mode_loss: the
    operational-mode penalty (control=mode), 0-dim (0 otherwise); loss = ce_loss + reg_loss +
    compute_loss + mode_loss (None without targets); perplexity is exp(ce_loss) only (NCN paper §4).
    signals: name -> (B, T, n_layer) or (B, T, n_layer, n_head), with gradients; {} for the baseline
    (the controller's values: with ncn.gate_mode=hard the blocks use 1[gate >= 0.5] instead).
    skipped: the units a `SkipPlan` skipped (None: dense).
    """

    logits: Tensor
    loss: Tensor | None
    ce_loss: Tensor | None
    reg_loss: Tensor
    signals: dict[str, Tensor]
    compute_loss: Tensor | None = None
    skipped: SkipMasks | None = None
    mode_loss: Tensor | None = None


class ParamCount(NamedTuple):
    """Trainable parameters; tied weights counted once. controller_share_pct = 100·controller/total;
    control: the control input's embedding (0 without one), counted in `total` and `base`."""

    total: int
    base: int
    controller: int
    controller_share_pct: float
    control: int = 0


@dataclass
class DecodeState:
    """Everything incremental decoding carries between tokens: KV cache and salience state.

    skipped: the units the last chunk skipped (None: it ran dense).
    """

    kv: KVCache
    salience: SalienceState | None
    skipped: SkipMasks | None = None


class ModulatedGPT(nn.Module):
    """GPT-style LM whose layers are modulated per token and layer by an NCN (NCN paper §2–§5).

    `modulation_cfg.targets == []` builds no controller: the plain Transformer baseline.
    Set `activation_checkpointing = True` to recompute each block in backward (training only).
    `control_cfg` (None = kind "none") adds a control input when `control_cfg.active`: an
    `nn.Embedding(len(vocabulary), d_model)` for labels, an `nn.Linear(1, d_model)` without
    bias for the mode m; the forward pass then needs `control`.

    Init: see `_init_base_weights` (base, first), `Controller.init_weights` (controller,
    neutral output biases last), then the control embedding at 0 (a fresh controlled model
    computes what the same-seed uncontrolled one does).

    Raises:
        NCNConfigError: invalid or incompatible configs; a labelled control without a vocabulary.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        modulation_cfg: ModulationConfig | None = None,
        control_cfg: ControlConfig | None = None,
    ) -> None:
        super().__init__()
        modulation_cfg = modulation_cfg if modulation_cfg is not None else ModulationConfig()
        control_cfg = control_cfg if control_cfg is not None else ControlConfig()
        check_compatible(model_cfg, modulation_cfg)
        self.config, self.modulation_config, self.control_config = model_cfg, modulation_cfg, control_cfg
        self.activation_checkpointing = False
        c = model_cfg
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.block_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_head, c.ffn_dim, c.dropout, i, c.norm, c.activation, c.bias, c.norm_eps)
            for i in range(c.n_layer)
        )
        self.norm = make_norm(c.norm, c.d_model, c.bias, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self._init_base_weights()
        m = modulation_cfg
        self.controller = None
        if m.targets:
            self.controller = Controller(
                c.d_model,
                c.n_layer,
                c.n_head,
                signal_names(m.targets, m.activation),
                m.hidden_dim,
                m.heads,
                m.pooling,
                m.precision_max,
                m.per_head_precision,
                m.parametrisation,
                m.controller_activation,
                m.controller_norm,
            )
            self.controller.init_weights()
        self.control: nn.Module | None = None
        if control_cfg.active:
            self.control = self._build_control(control_cfg, c.d_model, self.controller is not None)

    @staticmethod
    def _build_control(cfg: ControlConfig, d_model: int, has_controller: bool) -> nn.Module:
        """The control input's embedding, initialised to 0 (built last: the base and controller init draw
        the same random numbers as without it)."""
        if cfg.route == "ncn" and not has_controller:
            raise NCNConfigError(
                "control.route=ncn feeds the controller, but this model has none (ncn.targets=[]): "
                "use control.route=embedding"
            )
        if cfg.kind == "mode":
            module: nn.Module = nn.Linear(1, d_model, bias=False)
        else:
            if not cfg.vocabulary:
                raise NCNConfigError(
                    f"control={cfg.kind} has an empty control.vocabulary: the label names come from the token "
                    "cache when training starts (or from a checkpoint)"
                )
            module = nn.Embedding(len(cfg.vocabulary), d_model)
        nn.init.zeros_(module.weight)
        return module

    @torch.no_grad()
    def _init_base_weights(self) -> None:
        """Base model init (NCN paper §2), run before the controller exists.

        | parameter | init |
        |---|---|
        | Linear and Embedding weights (tied head = token embedding) | normal(0, 0.02) |
        | Linear biases | 0 |
        | RMSNorm / LayerNorm weights, LayerNorm biases | 1, 0 (PyTorch defaults) |

        The controller initialises itself afterwards (`Controller.init_weights`), so the base
        weights of a same-seed baseline are identical and its neutral biases survive.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> ParamCount:
        """Parameter counts split into base model and controller (NCN paper §8)."""
        total = sum(p.numel() for p in self.parameters())
        ctrl = sum(p.numel() for p in self.controller.parameters()) if self.controller is not None else 0
        control = sum(p.numel() for p in self.control.parameters()) if self.control is not None else 0
        return ParamCount(total, total - ctrl, ctrl, 100.0 * ctrl / total, control)

    def _control_vectors(self, control: Tensor | None, B: int, T: int) -> Tensor | None:
        """The control input as vectors (B, T, d), or None when the model takes none.

        control: label ids, int64 (B, T) per token or (B,) per sequence, in [0, len(vocabulary));
        or mode values m, float (B, T) or (B,), in [-1, 1].

        Raises:
            NCNConfigError: the model takes a control and none was given.
        """
        if self.control is None:
            return None
        if control is None:
            raise NCNConfigError(
                f"this model was trained with control={self.control_config.kind}: give the control input "
                "(control.label=<label> or control.value=<m>)"
            )
        if control.dim() == 1:
            control = control[:, None].expand(B, T)
        if isinstance(self.control, nn.Linear):
            return self.control(control.to(self.control.weight.dtype).unsqueeze(-1))  # (B, T, 1) -> (B, T, d)
        return self.control(control)  # (B, T) -> (B, T, d)

    def _trunk(
        self, idx: Tensor, state: DecodeState | None, skip: SkipPlan | None = None, control: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor], SkipMasks | None]:
        """Final hidden states (B, T, d), signals and skipped units for idx (B, T), continuing `state` if given."""
        B, T = idx.shape
        start = 0 if state is None else state.kv.pos
        if start + T > self.config.block_size:
            raise NCNConfigError(
                f"sequence length T={start + T} exceeds model.block_size={self.config.block_size}: "
                f"crop the input to the last {self.config.block_size} tokens or train with a larger block_size"
            )
        pos = torch.arange(start, start + T, device=idx.device)
        e = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, d)
        vectors = self._control_vectors(control, B, T)
        if vectors is not None and self.control_config.route == "embedding":
            e = e + vectors
        e = self.drop(e)
        signals: dict[str, Tensor] = {}
        if self.controller is not None:
            u = e + vectors if vectors is not None and self.control_config.route == "ncn" else e
            signals, salience = self.controller(u, None if state is None else state.salience)
            if state is not None:
                state.salience = salience
        masks = None
        if skip is not None and signals:
            masks = present(skip.masks, signals) if skip.masks is not None else threshold_masks(signals, skip.threshold)
        applied = hard_gates(signals) if self.modulation_config.gate_mode == "hard" else signals
        if masks is not None and not skip.gather:
            applied = masked_signals(applied, masks)
        gathered = masks is not None and skip.gather
        per_layer = {name: self._per_block(s) for name, s in applied.items()}
        x = e
        for i, block in enumerate(self.blocks):
            mod = {name: s[i] for name, s in per_layer.items()}
            if gathered:
                mod["skip"] = masks.block(i)
            if self.activation_checkpointing and self.training and state is None:
                x = checkpoint(block, x, **mod, use_reentrant=False)
            else:
                x = block(x, **mod, cache=None if state is None else state.kv)
        if state is not None:
            state.kv.advance(T)
            state.skipped = masks
        return self.norm(x), signals, masks

    @staticmethod
    def _per_block(s: Tensor) -> Tensor:
        """(B, T, L[, H]) -> (L, B, T, 1 or H): one slice per block, broadcast over features/heads."""
        return s.movedim(2, 0) if s.dim() == 4 else s.movedim(2, 0).unsqueeze(-1)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, skip: SkipPlan | None = None, control: Tensor | None = None
    ) -> ModelOutput:
        """Logits, losses and signals for token ids idx (B, T), T <= block_size.

        targets (B, T) int64 next-token ids. skip: skip gated-off units (inference; None = dense).
        control: the control input (see `_control_vectors`; ignored by a model without one). With
        control=mode the precision's homeostatic term is replaced by the mode penalty toward span^m
        (`mode_loss`).
        Raises NCNConfigError if T > block_size, or the model needs a control and gets none.
        """
        x, signals, masks = self._trunk(idx, None, skip, control)
        logits = self.lm_head(x)  # (B, T, V)
        m = self.modulation_config
        mode = self.control_config.kind == "mode" and self.control is not None and "precision" in signals
        mode_term = torch.zeros((), device=idx.device, dtype=logits.dtype)
        if mode:
            modes = control if control.dim() == 2 else control[:, None].expand(idx.shape)
            c = self.control_config
            mode_term = mode_loss(signals["precision"], modes, c.span, c.mode_lambda)
            signals_held = {k: v for k, v in signals.items() if k != "precision"}
        else:
            signals_held = signals
        if signals_held:
            reg = homeostatic_loss(signals_held, m.homeostatic_lambda, gates=m.compute_lambda == 0)
        else:
            reg = torch.zeros((), device=idx.device, dtype=logits.dtype)
        cost = None
        if m.compute_lambda > 0:
            cost = m.compute_lambda * compute_cost(signals, self.config).to(reg.device)
        ce = loss = None
        if targets is not None:
            # CE straight from the logits: no copy, no dtype cast (the 50k-way head dominates step time).
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
            loss = ce + reg if cost is None else ce + reg + cost
            loss = loss + mode_term if mode else loss
        return ModelOutput(logits, loss, ce, reg, signals, cost, masks, mode_term)

    def new_decode_state(self, batch: int) -> DecodeState:
        """Empty KV cache and salience state for `batch` sequences.

        Raises NCNConfigError for pooling="global", whose pooled context at position t uses
        tokens after t: no incremental computation can match its full forward pass.
        """
        c, m = self.config, self.modulation_config
        if self.controller is not None and m.pooling == "global":
            raise NCNConfigError(
                "ncn.pooling=global cannot decode incrementally (its salience pools over future tokens): "
                "call generate()/stream() with the Python argument use_cache=False (task=generate does so "
                "itself), or use a model trained with ncn.pooling=causal"
            )
        sal = None
        if self.controller is not None and self.controller.salience is not None:
            w = self.tok_emb.weight
            sal = self.controller.salience.empty_state(batch, w.device, w.dtype)
        return DecodeState(KVCache(c.n_layer, c.block_size), sal)

    def decode(
        self, idx: Tensor, state: DecodeState, skip: SkipPlan | None = None, control: Tensor | None = None
    ) -> Tensor:
        """Logits (B, Tc, V) for a chunk idx (B, Tc) that continues `state` (updated in place).

        A chunk of any length (a whole prompt or one token) gives the same logits as the full
        forward pass over prefix + chunk, up to float rounding (NCN paper §5); with `skip`, the
        same as the full forward pass with that skip plan. control: this chunk's control input,
        (B,) per sequence or (B, Tc) per token.
        """
        x, _, _ = self._trunk(idx, state, skip, control)
        return self.lm_head(x)

    def stream(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        skip_threshold: float = 0.0,
        control: Tensor | None = None,
    ) -> Iterator[Tensor]:
        """Yield max_new_tokens sampled tokens, each (B, 1) int64, continuing the prompt idx (B, T).

        Runs in the module's current mode: call `model.eval()` first to disable dropout.
        temperature 0 or top_k=1 is greedy; `generator` makes sampling reproducible.
        use_cache=True: one prefill of the prompt, then O(1) controller work and one cached
        attention step per token. When the cache is full (block_size positions) the last
        block_size // 2 tokens are re-prefilled into a fresh cache and salience state, so
        the context then slides in half-block jumps. use_cache=False re-runs the full
        forward on the last block_size tokens for every token (nanoGPT style).
        skip_threshold τ > 0 skips every FFN, head and block whose gate is below τ
        (`SkipPlan`); 0 is the dense model.
        control: (B,) label ids or mode values applied to every token (models with a control input).
        A prompt longer than block_size is cropped from the left with a warning.
        Arguments are checked here, before the first token is produced.

        Raises:
            NCNConfigError: pooling="global" with use_cache=True; temperature < 0; top_k < 1;
                max_new_tokens < 0; skip_threshold outside [0, 1], or > 0 for a model without gates.
        """
        if not 0.0 <= skip_threshold <= 1.0:
            raise NCNConfigError(
                f"skip_threshold={skip_threshold} is outside [0, 1]: use 0 (dense) or a gate value such as 0.5"
            )
        if max_new_tokens < 0:
            raise NCNConfigError(f"max_new_tokens={max_new_tokens} is negative: use a value >= 0")
        if temperature < 0:
            raise NCNConfigError(f"temperature={temperature} is negative: use 0 (greedy) or a positive value")
        if top_k is not None and top_k < 1:
            raise NCNConfigError(f"top_k={top_k} must be >= 1 (or null for no top-k filtering)")
        if skip_threshold > 0 and not (self.controller is not None and set(GATES) & set(self.controller.signals)):
            raise NCNConfigError(  # SkipPlan would find no gate and skip nothing, silently
                f"skip_threshold={skip_threshold:g} needs a model with gates (ffn_gate, head_gate or layer_gate), and "
                f"ncn.targets={self.modulation_config.targets} has none: use 0 (dense) or a model with gates"
            )
        block = self.config.block_size
        if idx.shape[1] > block:
            warnings.warn(
                f"prompt of {idx.shape[1]} tokens is longer than block_size={block}: using its last {block} tokens",
                stacklevel=2,
            )
            idx = idx[:, -block:]
        sample = partial(_sample, temperature=temperature, top_k=top_k, generator=generator)
        skip = SkipPlan(skip_threshold) if skip_threshold > 0 else None
        if use_cache:
            return self._stream_cached(idx, max_new_tokens, sample, self.new_decode_state(idx.shape[0]), skip, control)
        return self._stream_uncached(idx, max_new_tokens, sample, skip, control)

    @torch.no_grad()
    def _stream_cached(
        self,
        idx: Tensor,
        max_new_tokens: int,
        sample: Callable[[Tensor], Tensor],
        state: DecodeState,
        skip: SkipPlan | None = None,
        control: Tensor | None = None,
    ) -> Iterator[Tensor]:
        block = self.config.block_size
        ctx = idx
        logits = self.decode(idx, state, skip, control)  # prefill: the whole prompt in one chunk
        for i in range(max_new_tokens):
            nxt = sample(logits[:, -1])
            yield nxt
            if i + 1 == max_new_tokens:
                break
            ctx = torch.cat([ctx, nxt], dim=1)
            if state.kv.pos == block:
                state = self.new_decode_state(idx.shape[0])
                logits = self.decode(ctx[:, -max(1, block // 2) :], state, skip, control)
            else:
                logits = self.decode(nxt, state, skip, control)

    @torch.no_grad()
    def _stream_uncached(
        self,
        idx: Tensor,
        max_new_tokens: int,
        sample: Callable[[Tensor], Tensor],
        skip: SkipPlan | None = None,
        control: Tensor | None = None,
    ) -> Iterator[Tensor]:
        ctx = idx
        for _ in range(max_new_tokens):
            nxt = sample(self(ctx[:, -self.config.block_size :], skip=skip, control=control).logits[:, -1])
            yield nxt
            ctx = torch.cat([ctx, nxt], dim=1)

    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        skip_threshold: float = 0.0,
        control: Tensor | None = None,
    ) -> Tensor:
        """Prompt idx (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens).

        Same arguments, policy and errors as `stream`; the returned prompt part is uncropped.
        """
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, generator, use_cache, skip_threshold, control))
        return torch.cat([idx, *new], dim=1)


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Next token (B, 1) from last-position logits (B, V): greedy, or softmax(logits / T) over the top k."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
