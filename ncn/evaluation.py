"""Evaluation: validation loss, perplexity and per-layer signal statistics (NCN paper §4, §8).

`evaluate` is used by training at every eval and by `task=eval`; `run_signals` gives the
signals of one sequence (the probe heatmaps, `task=analyze`). Both are pure functions of a model
and fixed inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ncn.gpt import ModulatedGPT
from ncn.runtime import autocast

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def evaluate(model: ModulatedGPT, batches: Batches, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Validation metrics of `model` on `batches` of (x, y) int64 (B, T), under autocast `precision`.

    Returns `val/loss` (token-weighted mean CE, nats/token), `val/ppl` = exp(val/loss) (the
    homeostatic term excluded, NCN paper §4), and per signal and layer the mean and std over all
    val tokens (and heads): `val/signals/<name>/L<i>/mean|std`. Runs in eval mode and restores the
    module's train/eval mode afterwards.
    """
    was_training = model.training
    model.eval()
    ce_sum, n_tokens = 0.0, 0
    moments: dict[str, torch.Tensor] = {}  # name -> (L, 3): count, sum, sum of squares
    try:
        for x, y in batches:
            with autocast(device, precision):
                out = model(x.to(device), y.to(device))
            ce_sum += out.ce_loss.item() * y.numel()
            n_tokens += y.numel()
            for name, s in out.signals.items():
                per_layer = s.detach().double().movedim(2, 0).reshape(s.shape[2], -1)  # (L, B*T[*H])
                stats = torch.stack(
                    [torch.full_like(per_layer[:, 0], per_layer.shape[1]), per_layer.sum(1), per_layer.square().sum(1)],
                    dim=1,
                )
                moments[name] = moments.get(name, 0) + stats.cpu()
    finally:
        model.train(was_training)
    metrics = {"val/loss": ce_sum / n_tokens, "val/ppl": math.exp(min(ce_sum / n_tokens, 700.0))}
    for name, stats in moments.items():
        for layer, (count, total, squares) in enumerate(stats.tolist()):
            mean = total / count
            metrics[f"val/signals/{name}/L{layer}/mean"] = mean
            metrics[f"val/signals/{name}/L{layer}/std"] = math.sqrt(max(squares / count - mean * mean, 0.0))
    return metrics


def run_signals(model: ModulatedGPT, token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """Signals (each (1, T, L[, H]), float32 on CPU) of one forward pass of `model` over `token_ids`.

    Uses the last block_size tokens if the sequence is longer; runs in eval mode without
    gradients and restores the module's train/eval mode afterwards. {} for a plain Transformer.
    """
    device = next(model.parameters()).device
    idx = torch.tensor([list(token_ids)[-model.config.block_size :]], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            signals = model(idx).signals
    finally:
        model.train(was_training)
    return {name: value.float().cpu() for name, value in signals.items()}
