"""Pre-norm GPT block (NCN paper §2) that takes its modulation as explicit forward arguments.

Every signal argument is optional: None computes exactly the plain Transformer, so the
baseline and the NCN model share one code path (no hooks). Precision scales the queries
before `F.scaled_dot_product_attention`, which keeps flash kernels and the KV cache valid.
Given a `BlockSkip`, a block skips the gated-off work (NCN paper §6.1, §8): it gathers the
tokens that still run, computes them and scatters them back; keys and values are computed for
every token, so later tokens and the KV cache see exactly what the masked dense block gives.
The norm (RMSNorm or GPT-2's LayerNorm), the FFN's GELU (exact or tanh-approximated) and the
linears' biases are chosen by `ModelConfig.norm`, `.activation` and `.bias`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KVCache:
    """Keys/values of every layer for incremental decoding, up to `block_size` positions.

    Per layer a (B, n_head, block_size, head_dim) buffer, allocated on the first write with
    the dtype of the keys (so it matches under autocast); `pos` is the number of positions
    already cached. Layers write at [pos, pos + Tc); `advance(Tc)` after all layers.
    """

    def __init__(self, n_layer: int, block_size: int) -> None:
        self.block_size = block_size
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer
        self.pos = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nh, Tc, hs) of `layer` and return all cached keys/values (B, nh, pos+Tc, hs)."""
        if self.k[layer] is None:
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nh, self.block_size, hs)
            self.v[layer] = v.new_zeros(B, nh, self.block_size, hs)
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


def make_norm(kind: str, d_model: int, bias: bool, eps: float | None = None) -> nn.Module:
    """Normalisation over the last dim of size d_model: "rms" -> RMSNorm (no bias, eps = the
    dtype's machine epsilon); "layer" -> LayerNorm (eps 1e-5 as GPT-2, bias if `bias`).
    eps (`ModelConfig.norm_eps`) replaces that default when given."""
    if kind == "rms":
        return nn.RMSNorm(d_model, eps=eps)
    return nn.LayerNorm(d_model, eps=1e-5 if eps is None else eps, bias=bias)


@dataclass
class BlockSkip:
    """Which work one block skips, per token (True = skipped). Each field may be None (nothing skipped).

    ffn (B, T): the FFN; head (B, T, n_head): that head's attention output; layer (B, T): the
    whole block (its residual update), except the token's key and value.
    """

    ffn: Tensor | None = None
    head: Tensor | None = None
    layer: Tensor | None = None


def _kept_positions(run: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of the True entries of run (B, T), left-packed per row: idx (B, Tq) int64, valid (B, Tq) bool.

    Tq = the largest count of a row; a row with fewer is padded with its skipped positions
    (distinct, so a scatter through idx writes each position at most once), valid False there.
    """
    order = torch.argsort((~run).to(torch.int8), dim=1, stable=True)  # kept positions first, in order
    counts = run.sum(1)  # (B,)
    tq = int(counts.max()) if run.numel() else 0
    valid = torch.arange(tq, device=run.device) < counts.unsqueeze(1)
    return order[:, :tq], valid


def _take(t: Tensor | None, idx: Tensor) -> Tensor | None:
    """Rows idx (B, Tq) of t (B, T, ...) along time: (B, Tq, ...)."""
    if t is None:
        return None
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection and precision-scaled queries.

    precision β (NCN paper §3): (B, T, 1) per layer, or (B, T, n_head) per head; Q' = β·Q,
    so the softmax temperature changes per token while K and V (and their cache) do not.
    head_gate (B, T, n_head) in [0, 1] scales each head's output before the output projection
    (NCN paper §8, attention-head gating).
    """

    def __init__(self, d_model: int, n_head: int, dropout: float, layer: int, bias: bool = True) -> None:
        super().__init__()
        self.n_head, self.dropout, self.layer = n_head, dropout, layer
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        precision: Tensor | None = None,
        cache: KVCache | None = None,
        head_gate: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, d) -> (B, T, d). With `cache`, x continues the cached prefix."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q = q.view(B, T, self.n_head, d // self.n_head)  # (B, T, nh, hs)
        if precision is not None:
            q = q * precision.unsqueeze(-1)  # (B, T, 1 or nh, 1) broadcasts over heads and hs
        q = q.transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, d // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, d // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        if cache is None or cache.pos == 0:
            if cache is not None:
                k, v = cache.update(self.layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)
            # The chunk's query i sits at position start + i and may see keys 0 .. start + i.
            # (is_causal would align the mask top-left, wrong for Tc < keys; the reference
            # dropped the mask altogether when a cache was given, docs/method.md §7.)
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        if head_gate is not None:
            y = y * head_gate.transpose(1, 2).unsqueeze(-1)  # (B, nh, T, 1): one gate per head and token
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.resid_dropout(self.proj(y))

    def forward_rows(
        self,
        x: Tensor,
        idx: Tensor,
        valid: Tensor,
        precision: Tensor | None,
        head_gate: Tensor | None,
        head_skip: Tensor | None,
        cache: KVCache | None,
    ) -> Tensor:
        """Attention output (B, Tq, d) for the queries at positions idx (B, Tq) of x (B, T, d) only.

        Keys and values are computed (and cached) for all T tokens. precision, head_gate and
        head_skip (B, Tq, 1 or n_head) belong to the selected queries; a skipped head's output
        is 0, and a head skipped by every valid query is left out of the attention kernel.
        Rows where valid (B, Tq) is False are padding (their output is meaningless).
        """
        B, T, d = x.shape
        nh, hs = self.n_head, d // self.n_head
        w, b = self.qkv.weight, self.qkv.bias
        k, v = F.linear(x, w[d:], b[d:]).split(d, dim=2)  # every token's key and value
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        start = 0 if cache is None else cache.pos
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        tq = idx.shape[1]
        if tq == 0:
            return x.new_zeros(B, 0, d)
        q = F.linear(_take(x, idx), w[:d], b[:d]).view(B, tq, nh, hs)  # (B, Tq, nh, hs)
        if precision is not None:
            q = q * precision.unsqueeze(-1)
        q = q.transpose(1, 2)  # (B, nh, Tq, hs)
        # query i sits at position start + idx[i] and sees keys 0 .. start + idx[i]
        mask = torch.arange(k.shape[2], device=x.device) <= (start + idx).unsqueeze(-1)  # (B, Tq, keys)
        gate, heads = head_gate, None
        if head_skip is not None:
            gate = (torch.ones_like(head_skip, dtype=x.dtype) if gate is None else gate).masked_fill(head_skip, 0.0)
            live = ~(head_skip | ~valid.unsqueeze(-1)).all(dim=1).all(dim=0)  # (nh,)
            if not bool(live.all()):
                heads = live.nonzero().squeeze(1)
        if heads is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))  # (B, nh, Tq, hs)
        else:  # skipped heads contribute 0 and stay out of the kernel
            y = q.new_zeros(B, nh, tq, hs)
            if heads.numel():
                part = F.scaled_dot_product_attention(
                    q[:, heads], k[:, heads], v[:, heads], attn_mask=mask.unsqueeze(1)
                )
                y = y.index_copy(1, heads, part)
        if gate is not None:
            y = y * gate.transpose(1, 2).unsqueeze(-1)
        y = y.transpose(1, 2).reshape(B, tq, d)  # (B, Tq, d)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """FFN Linear(d, d_ff) -> activation -> Linear(d_ff, d) (NCN paper §2).

    activation_beta None: GELU, exact ("gelu") or tanh-approximated ("gelu_tanh", GPT-2's).
    Otherwise the Swish-β shape x·sigmoid(β·x) with β (B, T, 1) from the controller (NCN paper
    §7); β = 1.702 approximates GELU.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.approximate = "tanh" if activation == "gelu_tanh" else "none"

    def forward(self, x: Tensor, activation_beta: Tensor | None = None) -> Tensor:
        h = self.fc(x)  # (B, T, d_ff)
        if activation_beta is None:
            h = F.gelu(h, approximate=self.approximate)
        else:
            h = h * torch.sigmoid(activation_beta * h)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm block: x += g·Attn(N(x)); x += g·γ·FFN(N(x)) (NCN paper §2, §3 table).

    Signals, all optional, per token for this layer: gain g (B, T, 1), precision β (B, T, 1)
    or (B, T, n_head), ffn_gate γ (B, T, 1), activation_beta (B, T, 1), head_gate
    (B, T, n_head), layer_gate λ (B, T, 1). With a layer gate the block computes
    u = g·Attn(N(x)) + g·γ·FFN(N(x + g·Attn(N(x)))) and returns x + λ·u (dynamic depth, NCN
    paper §8). `skip` (inference): the skipped work is not computed, and the result equals
    the block with those gates set to 0, up to float rounding.
    norm, activation, bias, norm_eps: see `make_norm` and `MLP` (`ModelConfig.norm`, `.activation`, `.bias`,
    `.norm_eps`).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_ff: int,
        dropout: float,
        layer: int,
        norm: str = "rms",
        activation: str = "gelu",
        bias: bool = True,
        norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, d_model, bias, norm_eps)
        self.attn = CausalSelfAttention(d_model, n_head, dropout, layer, bias)
        self.norm2 = make_norm(norm, d_model, bias, norm_eps)
        self.mlp = MLP(d_model, d_ff, dropout, activation, bias)

    def forward(
        self,
        x: Tensor,
        gain: Tensor | None = None,
        precision: Tensor | None = None,
        ffn_gate: Tensor | None = None,
        activation_beta: Tensor | None = None,
        head_gate: Tensor | None = None,
        layer_gate: Tensor | None = None,
        cache: KVCache | None = None,
        skip: BlockSkip | None = None,
    ) -> Tensor:
        scale = gain if ffn_gate is None else (ffn_gate if gain is None else gain * ffn_gate)  # (B, T, 1)
        if skip is not None and any(m is not None and bool(m.any()) for m in (skip.ffn, skip.head, skip.layer)):
            return self._forward_skip(x, gain, precision, scale, activation_beta, head_gate, layer_gate, cache, skip)
        a = self.attn(self.norm1(x), precision, cache, head_gate)
        if layer_gate is not None:
            ga = a if gain is None else gain * a
            h = x + ga
            m = self.mlp(self.norm2(h), activation_beta)
            return torch.addcmul(x, layer_gate, ga + (m if scale is None else scale * m))
        x = x + a if gain is None else torch.addcmul(x, gain, a)  # addcmul: one pass instead of two
        m = self.mlp(self.norm2(x), activation_beta)
        return x + m if scale is None else torch.addcmul(x, scale, m)

    def _forward_skip(
        self,
        x: Tensor,
        gain: Tensor | None,
        precision: Tensor | None,
        scale: Tensor | None,
        activation_beta: Tensor | None,
        head_gate: Tensor | None,
        layer_gate: Tensor | None,
        cache: KVCache | None,
        skip: BlockSkip,
    ) -> Tensor:
        """The block on the tokens that run it (gather), their outputs written back (scatter); x (B, T, d)."""
        B, T, d = x.shape
        run = torch.ones(B, T, dtype=torch.bool, device=x.device) if skip.layer is None else ~skip.layer
        idx, valid = _kept_positions(run)  # (B, Tq)
        a = self.attn.forward_rows(
            self.norm1(x), idx, valid, _take(precision, idx), _take(head_gate, idx), _take(skip.head, idx), cache
        )  # (B, Tq, d)
        xk, g = _take(x, idx), _take(gain, idx)
        ga = a if g is None else g * a
        h = xk + ga
        ffn_run = valid if skip.ffn is None else valid & ~_take(skip.ffn, idx)  # (B, Tq)
        rows = h[ffn_run]  # (N, d): the tokens whose FFN runs
        m = self.mlp(self.norm2(rows), None if activation_beta is None else _take(activation_beta, idx)[ffn_run])
        s = None if scale is None else _take(scale, idx)[ffn_run]
        if layer_gate is None:
            out = h.clone()
            out[ffn_run] = rows + m if s is None else torch.addcmul(rows, s, m)
        else:
            sm = torch.zeros_like(h)
            sm[ffn_run] = m if s is None else s * m
            out = torch.addcmul(xk, _take(layer_gate, idx), ga + sm)
        out = torch.where(valid.unsqueeze(-1), out, xk)  # padding rows keep their input
        return x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), out)
