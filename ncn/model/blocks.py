"""Pre-norm GPT block (NCN paper §2) that takes its modulation as explicit forward arguments.

Every signal argument is optional: None computes exactly the plain Transformer, so the
baseline and the NCN model share one code path (no hooks). Precision scales the queries
before `F.scaled_dot_product_attention`, which keeps flash kernels and the KV cache valid.
"""

from __future__ import annotations

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


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection and precision-scaled queries.

    precision β (NCN paper §3): (B, T, 1) per layer, or (B, T, n_head) per head; Q' = β·Q,
    so the softmax temperature changes per token while K and V (and their cache) do not.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float, layer: int) -> None:
        super().__init__()
        self.n_head, self.dropout, self.layer = n_head, dropout, layer
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, precision: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
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
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """FFN Linear(d, d_ff) -> activation -> Linear(d_ff, d) (NCN paper §2).

    activation_beta None: GELU. Otherwise the Swish-β shape x·sigmoid(β·x) with β (B, T, 1)
    from the controller (NCN paper §7); β = 1.702 approximates GELU.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, activation_beta: Tensor | None = None) -> Tensor:
        h = self.fc(x)  # (B, T, d_ff)
        h = F.gelu(h) if activation_beta is None else h * torch.sigmoid(activation_beta * h)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm block: x += g·Attn(N(x)); x += g·γ·FFN(N(x)) (NCN paper §2, §3 table).

    Signals, all optional, per token for this layer: gain g (B, T, 1), precision β (B, T, 1)
    or (B, T, n_head), ffn_gate γ (B, T, 1), activation_beta (B, T, 1).
    """

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float, layer: int) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout, layer)
        self.norm2 = nn.RMSNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout)

    def forward(
        self,
        x: Tensor,
        gain: Tensor | None = None,
        precision: Tensor | None = None,
        ffn_gate: Tensor | None = None,
        activation_beta: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        a = self.attn(self.norm1(x), precision, cache)
        x = x + a if gain is None else torch.addcmul(x, gain, a)  # addcmul: one pass instead of two
        m = self.mlp(self.norm2(x), activation_beta)
        scale = gain if ffn_gate is None else (ffn_gate if gain is None else gain * ffn_gate)  # (B, T, 1)
        return x + m if scale is None else torch.addcmul(x, scale, m)
