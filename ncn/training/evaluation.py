"""Evaluation: validation loss, perplexity, bits per byte, the leak audit and signal statistics (NCN paper §4, §5, §8).

`evaluate` is used by training at every eval and by `task=eval`; `leak_audit` measures how much
of a `global`-pooling model's val loss comes from seeing future tokens; `run_signals` gives the
signals of one sequence (the probe heatmaps, `task=analyze`). All are pure functions of a model
and fixed inputs. The metric keys added here are the constants below (docs/sweeps.md "Metrics").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ncn.errors import NCNConfigError
from ncn.model.compute import SkipPlan
from ncn.model.gpt import ModulatedGPT
from ncn.training.runtime import autocast

Batches = list[tuple[torch.Tensor, torch.Tensor]]

# The leak audit's position buckets: positions [0, EARLY_POSITIONS) of each val block are "early"
# (little past context, so a view of the future helps most there), the rest "late".
EARLY_POSITIONS = 16

# Metric keys this module adds to val/loss and val/ppl; a rename is one edit here.
VAL_BPB = "val/bpb"  # bits per UTF-8 byte of val text (compares tokenizations)
VAL_LOSS_CAUSAL = "val/leak/causal_loss"  # val CE of the same weights under causal salience pooling
VAL_LEAK = "val/leak/all"  # val/leak/causal_loss - val/loss: the CE the view of the future buys (nats/token)
VAL_LEAK_EARLY = "val/leak/early"  # the same over positions < EARLY_POSITIONS of each block
VAL_LEAK_LATE = "val/leak/late"  # ... over positions >= EARLY_POSITIONS
LEAK_KEYS = (VAL_LOSS_CAUSAL, VAL_LEAK, VAL_LEAK_EARLY, VAL_LEAK_LATE)


def uses_future(model: ModulatedGPT) -> bool:
    """Whether `model`'s signals at position t depend on tokens after t (salience pooling "global")."""
    salience = model.controller.salience if model.controller is not None else None
    return salience is not None and not salience.causal


def with_pooling(model: ModulatedGPT, pooling: str) -> ModulatedGPT:
    """`model`'s weights under salience `pooling` ("causal" or "global"): same tensors, another mask.

    Built as `ModulatedGPT(model.config, ModulationConfig(..., pooling=pooling))` on the meta
    device, then given `model`'s state dict with `assign=True`, so its parameters share
    `model`'s storage (no copy, no init) on `model`'s device; the salience module's parameters
    do not depend on the pooling mode, so every key matches. Same train/eval mode as `model`.

    Raises:
        NCNConfigError: `model` has no salience pooling (plain Transformer or pooling "none"),
            or `pooling` is not "causal" or "global".
    """
    if pooling not in ("causal", "global"):
        raise NCNConfigError(f"pooling={pooling!r}: a salience pooling mask is 'causal' or 'global'")
    if model.controller is None or model.controller.salience is None:
        raise NCNConfigError(
            f"the model has no salience pooling (ncn.targets={model.modulation_config.targets}, "
            f"ncn.pooling={model.modulation_config.pooling}): there is no pooling mask to change"
        )
    cfg = dataclasses.replace(model.modulation_config, pooling=pooling)
    with torch.device("meta"):
        twin = ModulatedGPT(model.config, cfg)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.train(model.training)


@torch.no_grad()
def _position_ce(
    model: ModulatedGPT,
    batches: Batches,
    device: torch.device,
    precision: str,
    moments: dict | None = None,
    skip: SkipPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position t of the block: (sum of next-token CE over all val rows, number of rows), both (T,) float64 on CPU.

    CE is computed under autocast as the model computes its training CE. When `moments` is a
    dict, it collects per signal the (L, 3) count, sum, sum of squares over tokens (and heads).
    `skip`: evaluate with those gated units skipped (inference that skips, `ncn.model.compute`).
    Runs in eval mode and restores the module's train/eval mode afterwards.
    """
    was_training = model.training
    model.eval()
    sums = counts = None
    try:
        for x, y in batches:
            y = y.to(device)
            with autocast(device, precision):
                out = model(x.to(device), skip=skip)
                ce = F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)  # (B, T)
            batch = ce.double().sum(0).cpu()  # (T,)
            sums = batch if sums is None else sums + batch
            counts = torch.full_like(batch, y.shape[0]) + (0 if counts is None else counts)
            if moments is None:
                continue
            for name, s in out.signals.items():
                per_layer = s.detach().double().movedim(2, 0).reshape(s.shape[2], -1)  # (L, B*T[*H])
                stats = torch.stack(
                    [torch.full_like(per_layer[:, 0], per_layer.shape[1]), per_layer.sum(1), per_layer.square().sum(1)],
                    dim=1,
                )
                moments[name] = moments.get(name, 0) + stats.cpu()
    finally:
        model.train(was_training)
    if sums is None:
        raise ValueError("no validation batches: nothing to evaluate")
    return sums, counts


def leak_audit(
    model: ModulatedGPT,
    batches: Batches,
    device: torch.device,
    precision: str = "fp32",
    early: int = EARLY_POSITIONS,
    trained: tuple[torch.Tensor, torch.Tensor] | None = None,
    skip: SkipPlan | None = None,
) -> dict[str, float]:
    """The val CE that `model`'s view of future tokens buys (NCN paper §5; the reference's `global` pooling).

    Evaluates the same weights under causal salience pooling (`with_pooling(model, "causal")`)
    on the same (x, y) int64 (B, T) `batches` and returns, in nats/token:
    `val/leak/causal_loss` (token-weighted mean CE under causal pooling), `val/leak/all` = val/leak/causal_loss
    − val/loss (> 0: the model relies on the future), `val/leak/early` and `val/leak/late`, the
    same difference over positions [0, early) and [early, T) of each block (a bucket with no
    positions is left out). `trained`: the (per-position CE sums, counts) of `model` itself if
    already computed. A model without global pooling sees no future: its causal loss is its
    loss and every leak is exactly 0.0 (nothing is re-evaluated).
    """
    sums, counts = trained if trained is not None else _position_ce(model, batches, device, precision)
    if uses_future(model):
        causal = _position_ce(with_pooling(model, "causal"), batches, device, precision, skip=skip)[0]
    else:
        causal = sums
    metrics = {VAL_LOSS_CAUSAL: float(causal.sum() / counts.sum())}
    for key, part in ((VAL_LEAK, slice(None)), (VAL_LEAK_EARLY, slice(0, early)), (VAL_LEAK_LATE, slice(early, None))):
        if counts[part].sum() > 0:
            metrics[key] = float((causal[part].sum() - sums[part].sum()) / counts[part].sum())
    return metrics


def evaluate(
    model: ModulatedGPT,
    batches: Batches,
    device: torch.device,
    precision: str = "fp32",
    bits_per_byte: Callable[[float], float] | None = None,
    early: int = EARLY_POSITIONS,
    skip: SkipPlan | None = None,
) -> dict[str, float]:
    """Validation metrics of `model` on `batches` of (x, y) int64 (B, T), under autocast `precision`.

    Returns `val/loss` (token-weighted mean CE, nats/token), `val/ppl` = exp(val/loss) (the
    homeostatic term excluded, NCN paper §4), `val/bpb` = bits_per_byte(val/loss) when given
    (`DataModule.bits_per_byte`), the leak audit (`leak_audit`: `val/leak/causal_loss`, `val/leak/all`,
    `val/leak/early`, `val/leak/late`; leaks exactly 0.0 unless the model pools globally), and
    per signal and layer the mean and std over all val tokens (and heads):
    `val/signals/<name>/L<i>/mean|std`. `skip`: every number with those gated units skipped
    (`ncn.model.compute.SkipPlan`). Restores the module's train/eval mode afterwards.
    """
    moments: dict[str, torch.Tensor] = {}  # name -> (L, 3): count, sum, sum of squares
    sums, counts = _position_ce(model, batches, device, precision, moments, skip)
    loss = float(sums.sum() / counts.sum())
    metrics = {"val/loss": loss, "val/ppl": math.exp(min(loss, 700.0))}
    if bits_per_byte is not None:
        metrics[VAL_BPB] = bits_per_byte(loss)
    metrics.update(leak_audit(model, batches, device, precision, early, trained=(sums, counts), skip=skip))
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
