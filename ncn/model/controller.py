"""The Neuromodulatory Control Network: salience pooling, phasic integration, controller MLP.

From the embedded sequence E (B, T, d) it computes, in one batched pass, every layer's
modulation signals for every token (NCN paper §3). Salience pooling is causal by default;
its constant-size online-softmax state lets generation spend O(1) controller work per token
(NCN paper §5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncn.model.signals import NEUTRAL_BIAS, transform

# The controller MLP's nonlinearity (ModulationConfig.controller_activation); the reference's are these four.
CONTROLLER_ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "sigmoid": torch.sigmoid}

# Causal pooling works on chunks of this many positions: memory and work O(T·chunk), not O(T²).
_CHUNK = 64


@dataclass
class SalienceState:
    """Running state of causal salience pooling over a prefix, per sequence and head.

    Equivalent to the online-softmax triple (running max m, normaliser l, weighted sum acc):
    lse = m + log(l), shape (B, heads), and value = acc / l, shape (B, heads, head_dim), the
    softmax-weighted mean of the prefix's values. An empty prefix has lse = the dtype's most
    negative finite number (weight exactly 0, but no -inf to turn gradients into NaN), value 0.
    """

    lse: Tensor
    value: Tensor


def causal_pool(scores: Tensor, v: Tensor, state: SalienceState, chunk: int = _CHUNK) -> tuple[Tensor, SalienceState]:
    """Causal softmax pooling o_t = Σ_{s<=t} softmax(scores)_s v_s, continuing the prefix `state`.

    scores (B, H, T), v (B, H, T, hs) -> o (B, H, T, hs) and the state after position T-1.
    Exact online softmax in parallel form: every chunk of positions is summarised by its
    (log-sum-exp, weighted mean); the prefix before a chunk is a softmax over those summaries;
    inside a chunk each position attends to [prefix summary, chunk positions <= it].
    """
    B, H, T, hs = v.shape
    C = min(chunk, T)
    N = -(-T // C)
    neg = torch.finfo(scores.dtype).min
    if N * C != T:  # pad the tail; causality keeps the padding out of every real position
        scores = F.pad(scores, (0, N * C - T), value=neg)
        v = F.pad(v, (0, 0, 0, N * C - T))
    a = scores.view(B, H, N, C)
    vc = v.view(B, H, N, C, hs)
    chunk_lse = a.logsumexp(-1)  # (B, H, N)
    chunk_val = ((a - chunk_lse.unsqueeze(-1)).exp().unsqueeze(-2) @ vc).squeeze(-2)  # (B, H, N, hs)
    keys_lse = torch.cat([state.lse.unsqueeze(-1), chunk_lse], dim=-1)  # (B, H, 1+N): initial state, chunks
    keys_val = torch.cat([state.value.unsqueeze(2), chunk_val], dim=2)  # (B, H, 1+N, hs)
    sees = torch.ones(N, N + 1, dtype=torch.bool, device=v.device).tril()  # chunk j: state + chunks < j
    pre_logits = keys_lse.unsqueeze(2).masked_fill(~sees, float("-inf"))  # (B, H, N, 1+N)
    pre_lse = pre_logits.logsumexp(-1)  # (B, H, N)
    pre_val = pre_logits.softmax(-1) @ keys_val  # (B, H, N, hs)
    causal = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
    inner = a.unsqueeze(3).expand(B, H, N, C, C).masked_fill(~causal, float("-inf"))  # (B, H, N, C, C)
    w = torch.cat([pre_lse[..., None, None].expand(B, H, N, C, 1), inner], dim=-1).softmax(-1)
    o = w[..., :1] * pre_val.unsqueeze(3) + w[..., 1:] @ vc  # (B, H, N, C, hs)
    o = o.view(B, H, N * C, hs)[:, :, :T]
    return o, SalienceState(keys_lse.logsumexp(-1), o[:, :, -1])


class SaliencePooling(nn.Module):
    """A learned query vector attending over E with its own multi-head attention (NCN paper §3.1).

    pooling="causal": c_t pools positions s <= t. pooling="global": c pools all T positions
    (the reference's leaking mode) and is broadcast over time. Output c: (B, T, d) or (B, 1, d).
    """

    def __init__(self, d_model: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.causal = heads, d_model // heads, causal
        self.query = nn.Parameter(torch.zeros(d_model))
        self.q_proj = nn.Linear(d_model, d_model)
        # No key bias: it adds the same constant to all of a head's scores, which the softmax
        # ignores, so it would never get a gradient (the reference carries these 256 dead weights).
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _scores_values(self, e: Tensor) -> tuple[Tensor, Tensor]:
        B, T, d = e.shape
        H, hs = self.heads, self.head_dim
        q = self.q_proj(self.query).view(H, hs)  # one fixed query per head
        # q·k_s = (W_kᵀq)·e_s: against a fixed query, scoring needs no per-token K projection.
        key_dir = torch.einsum("hc,hcd->hd", q, self.k_proj.weight.view(H, hs, d)) / math.sqrt(hs)  # (H, d)
        scores = (e @ key_dir.t()).transpose(1, 2)  # (B, H, T)
        v = self.v_proj(e).view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        return scores, v

    def _out(self, o: Tensor) -> Tensor:
        B, _, T, _ = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(B, T, -1))  # (B, T, d)

    def forward(self, e: Tensor) -> Tensor:
        """Pool the whole sequence e (B, T, d) at once; returns c (B, T, d) or (B, 1, d) (global)."""
        scores, v = self._scores_values(e)
        if self.causal:
            o, _ = causal_pool(scores, v, self.empty_state(e.shape[0], e.device, e.dtype))
        else:
            o = scores.softmax(-1).unsqueeze(2) @ v  # (B, H, 1, hs): one context for all positions
        return self._out(o)

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> SalienceState:
        """State of an empty prefix for `batch` sequences."""
        lse = torch.full((batch, self.heads), torch.finfo(dtype).min, device=device, dtype=dtype)
        return SalienceState(lse, torch.zeros(batch, self.heads, self.head_dim, device=device, dtype=dtype))

    def step(self, e: Tensor, state: SalienceState) -> tuple[Tensor, SalienceState]:
        """Causal pooling of a new chunk e (B, Tc, d) that continues the prefix summarised by `state`.

        Returns c (B, Tc, d) and the state after the chunk; O(1) work for a single token.
        """
        scores, v = self._scores_values(e)
        o, state = causal_pool(scores, v, state)
        return self._out(o), state


class Controller(nn.Module):
    """The NCN: salience pooling + phasic integration + MLP -> signals for all layers (NCN paper §3).

    z_t = W2 · tanh(W1 · RMSNorm(c_t + E_t) + b1) + b2, reshaped to (n_layer, width) and split
    into signals; each signal is one column per layer, or n_head columns for head_gate and
    for precision when it is per head. Output dict: name -> (B, T, n_layer) or (B, T, n_layer, n_head).
    activation ("tanh", "relu", "gelu", "sigmoid") replaces the tanh and norm="none" drops the
    RMSNorm (`ModulationConfig.controller_activation`, `.controller_norm`): the reference
    implementation's controller is W2 · relu(W1 · (c_t + E_t) + b1) + b2.
    """

    def __init__(
        self,
        d_model: int,
        n_layer: int,
        n_head: int,
        signals: list[str],
        hidden_dim: int,
        heads: int,
        pooling: str,
        precision_max: float,
        per_head_precision: bool,
        parametrisation: str = "paper",
        activation: str = "tanh",
        norm: str = "rms",
    ) -> None:
        super().__init__()
        self.n_layer, self.signals, self.precision_max = n_layer, signals, precision_max
        self.parametrisation = parametrisation
        self.activation = CONTROLLER_ACTIVATIONS[activation]
        self.widths = [n_head if (s == "precision" and per_head_precision) or s == "head_gate" else 1 for s in signals]
        self.salience = SaliencePooling(d_model, heads, causal=pooling == "causal") if pooling != "none" else None
        self.norm = nn.RMSNorm(d_model) if norm == "rms" else nn.Identity()
        self.fc1 = nn.Linear(d_model, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, n_layer * sum(self.widths))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise the controller (run after the base model's init, docs/method.md §6).

        | parameter | init |
        |---|---|
        | all Linear weights except fc2, salience query | normal(0, 0.02) |
        | fc2.weight (the output layer) | normal(0, 0.002) |
        | all biases except fc2's | 0 |
        | RMSNorm weight | 1 |
        | fc2.bias | neutral bias of each signal's column (NCN paper §3 table) |

        The small output layer (as in adaLN-Zero) keeps every signal of a fresh model within
        about 0.03 of neutral at any width (with 0.02, d_model=768 starts with precision
        spread ±0.18), yet is non-zero so every controller parameter gets a gradient at
        step one. The neutral biases come last so nothing can undo them (the reference's
        generic init zeroed them).

        parametrisation "exact_neutral": fc2's weight and bias are 0 instead, so z = 0 for every
        token and every signal is exactly 1 (`transform`); fc2 gets a gradient at step one, the
        layers before it from step two (as adaLN-Zero).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.002 if module is self.fc2 else 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.salience is not None:
            nn.init.normal_(self.salience.query, 0.0, 0.02)
        if isinstance(self.norm, nn.RMSNorm):
            nn.init.ones_(self.norm.weight)
        if self.parametrisation == "exact_neutral":
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)
            return
        bias = torch.cat([torch.full((w,), NEUTRAL_BIAS[s]) for s, w in zip(self.signals, self.widths, strict=True)])
        self.fc2.bias.copy_(bias.repeat(self.n_layer))

    def forward(self, e: Tensor, state: SalienceState | None = None) -> tuple[dict[str, Tensor], SalienceState | None]:
        """Signals for embedded tokens e (B, T, d).

        state None: e is a whole sequence (training / full forward). Otherwise e continues the
        prefix summarised by `state` (incremental decoding, causal pooling only) and the new
        state is returned.
        """
        if self.salience is None:
            u = e  # pooling="none": phasic signal only
        elif state is None:
            u = e + self.salience(e)
        else:
            c, state = self.salience.step(e, state)
            u = e + c
        z = self.fc2(self.activation(self.fc1(self.norm(u))))  # (B, T, L * width)
        B, T, _ = z.shape
        parts = z.view(B, T, self.n_layer, sum(self.widths)).split(self.widths, dim=3)
        out = {}
        for name, width, raw in zip(self.signals, self.widths, parts, strict=True):
            raw = raw.squeeze(3) if width == 1 else raw  # (B, T, L) or (B, T, L, n_head)
            out[name] = transform(name, raw, self.precision_max, self.parametrisation)
        return out, state
