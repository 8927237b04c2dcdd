"""Evaluation: val loss, perplexity, bits per byte, the leak audit, signal statistics, the control measurement.

NCN paper §3.2, §4, §5, §6.1, §8.

`evaluate` is used by training at every eval and by `task=eval`; `leak_audit` measures how much
of a `global`-pooling model's val loss comes from seeing future tokens; `run_signals` gives the
signals of one sequence (the probe heatmaps, `task=analyze`); `control_metrics` measures what a
control input controls (the control matrix and gain of labels, the mode's precision and entropy
curve). All are pure functions of a model and fixed inputs. The metric keys added here are the
constants below (docs/sweeps.md "Metrics").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ncn.config import MODE_GRID
from ncn.errors import NCNConfigError
from ncn.model.compute import SkipPlan
from ncn.model.gpt import ModulatedGPT
from ncn.training.runtime import autocast

# (x, y) or, from a labelled cache, (x, y, labels): int64 (B, T) each.
Batches = list[tuple[torch.Tensor, ...]]

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
# The control measurement (NCN paper §3.2, §6.1): its own metric section.
VAL_CONTROL = "val/control"
VAL_CONTROL_GAIN = "val/control/gain"  # mean off-diagonal - mean diagonal of the control matrix (nats/token)
VAL_CONTROL_DIAGONAL = "val/control/diagonal"  # mean CE of each label's tokens under their own label
VAL_CONTROL_OFF_DIAGONAL = "val/control/off_diagonal"  # ... under every other label


def control_matrix_key(true: str, forced: str) -> str:
    """Metric key of one control-matrix cell: val CE of label `true`'s tokens with every token forced to `forced`."""
    return f"{VAL_CONTROL}/matrix/{true}/{forced}"


def mode_key(m: float, what: str) -> str:
    """Metric key of the mode sweep at m, e.g. `val/control/mode/m-0.5/entropy` or `.../m1.0/precision/L0`."""
    return f"{VAL_CONTROL}/mode/m{m:.1f}/{what}"


def eval_control(model: ModulatedGPT, labels: Sequence[torch.Tensor], batch: int, device: torch.device):
    """The control input an evaluation uses: the true labels (B, T), m = 0 per sequence (B,) for mode, or None."""
    if model.control is None:
        return None
    if model.control_config.kind == "mode":
        return torch.zeros(batch, device=device)
    return labels[0].to(device) if labels else None


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
        twin = ModulatedGPT(model.config, cfg, model.control_config)
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
        for x, y, *labels in batches:
            y = y.to(device)
            control = eval_control(model, labels, x.shape[0], device)
            with autocast(device, precision):
                out = model(x.to(device), skip=skip, control=control)
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
    control_names: Sequence[str] = (),
) -> dict[str, float]:
    """Validation metrics of `model` on `batches` of (x, y) int64 (B, T), under autocast `precision`.

    Returns `val/loss` (token-weighted mean CE, nats/token), `val/ppl` = exp(val/loss) (the
    homeostatic term excluded, NCN paper §4), `val/bpb` = bits_per_byte(val/loss) when given
    (`DataModule.bits_per_byte`), the leak audit (`leak_audit`: `val/leak/causal_loss`, `val/leak/all`,
    `val/leak/early`, `val/leak/late`; leaks exactly 0.0 unless the model pools globally), and
    per signal and layer the mean and std over all val tokens (and heads):
    `val/signals/<name>/L<i>/mean|std`. `skip`: every number with those gated units skipped
    (`ncn.model.compute.SkipPlan`). For a run with a control, `control_metrics` (labels: pass the
    vocabulary as `control_names`). Restores the module's train/eval mode afterwards.
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
    metrics.update(control_metrics(model, batches, device, control_names, precision))
    return metrics


@torch.no_grad()
def control_matrix(
    model: ModulatedGPT, batches: Batches, device: torch.device, names: Sequence[str], precision: str = "fp32"
) -> torch.Tensor:
    """The control matrix (NCN paper §3.2): M[i, j] = mean val CE (nats/token) of the tokens whose true
    label is i when every token of the batch is given label j. Shape (n_labels, n_labels), float64.

    `batches` are labelled (x, y, labels). A model without a control input ignores the label: one
    pass fills every column alike (gain 0 up to float rounding). A row whose label has no val tokens is NaN.
    Restores the module's train/eval mode afterwards.
    """
    n = len(names)
    sums = torch.zeros(n, n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for x, y, labels in batches:
            x, y = x.to(device), y.to(device)
            counts += torch.bincount(labels.flatten(), minlength=n).double()
            for forced in range(n if model.control is not None else 1):
                control = torch.full_like(x, forced) if model.control is not None else None
                with autocast(device, precision):
                    logits = model(x, control=control).logits
                    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")  # (B*T,)
                per_label = torch.zeros(n, dtype=torch.float64).index_add_(0, labels.flatten(), ce.double().cpu())
                if model.control is None:
                    sums += per_label[:, None]
                else:
                    sums[:, forced] += per_label
    finally:
        model.train(was_training)
    return sums / counts[:, None]


def control_gain(matrix: torch.Tensor) -> tuple[float, float, float]:
    """(gain, mean diagonal, mean off-diagonal) of a control matrix (n, n), n >= 2, over its finite rows.

    gain = mean off-diagonal − mean diagonal (nats/token): how much worse each label's tokens are
    predicted under a wrong label than under their own; 0 when the control is ignored.
    """
    rows = torch.isfinite(matrix).all(1)
    m = matrix[rows][:, rows]
    eye = torch.eye(len(m), dtype=torch.bool)
    diagonal, off = float(m[eye].mean()), float(m[~eye].mean())
    return off - diagonal, diagonal, off


@torch.no_grad()
def mode_curve(
    model: ModulatedGPT, batches: Batches, device: torch.device, grid: Sequence[float], precision: str = "fp32"
) -> dict[str, float]:
    """For each m of `grid`: the mean precision per layer and the mean entropy (nats) of the next-token
    distribution over the val tokens, and the val CE, with m given to every sequence (control=mode,
    NCN paper §6.1). Keys `mode_key(m, "precision/L<i>")`, `mode_key(m, "entropy")`, `mode_key(m, "loss")`.
    """
    metrics: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for m in grid:
            tokens, entropy, ce, precision_sum = 0, 0.0, 0.0, None
            for x, y, *_ in batches:
                x, y = x.to(device), y.to(device)
                with autocast(device, precision):
                    out = model(x, control=torch.full((x.shape[0],), float(m), device=device))
                logp = F.log_softmax(out.logits.float(), dim=-1)
                entropy += float(-(logp.exp() * logp).sum(-1).sum())
                ce += float(F.nll_loss(logp.flatten(0, 1), y.flatten(), reduction="sum"))
                p = out.signals["precision"].double()  # (B, T, L[, H])
                per_layer = p.movedim(2, 0).reshape(p.shape[2], -1).sum(1).cpu()
                precision_sum = per_layer if precision_sum is None else precision_sum + per_layer
                tokens += y.numel()
            heads = out.signals["precision"].shape[3] if out.signals["precision"].dim() == 4 else 1
            for layer, total in enumerate(precision_sum.tolist()):
                metrics[mode_key(m, f"precision/L{layer}")] = total / (tokens * heads)
            metrics[mode_key(m, "entropy")] = entropy / tokens
            metrics[mode_key(m, "loss")] = ce / tokens
    finally:
        model.train(was_training)
    return metrics


def control_metrics(
    model: ModulatedGPT,
    batches: Batches,
    device: torch.device,
    names: Sequence[str] = (),
    precision: str = "fp32",
) -> dict[str, float]:
    """What the control input controls, in its own metric section `val/control/...`:

    labels (`names`, the vocabulary): every control-matrix cell (`control_matrix_key`), the gain,
    the mean diagonal and off-diagonal (`control_gain`); mode: `mode_curve` over `MODE_GRID`.
    {} for a model trained without a control (kind "none").
    """
    kind = model.control_config.kind
    if kind == "mode":
        return mode_curve(model, batches, device, MODE_GRID, precision) if model.control is not None else {}
    if kind == "none" or not names:
        return {}
    matrix = control_matrix(model, batches, device, names, precision)
    metrics = {
        control_matrix_key(true, forced): float(matrix[i, j])
        for i, true in enumerate(names)
        for j, forced in enumerate(names)
    }
    gain, diagonal, off = control_gain(matrix)
    return {**metrics, VAL_CONTROL_GAIN: gain, VAL_CONTROL_DIAGONAL: diagonal, VAL_CONTROL_OFF_DIAGONAL: off}


def run_signals(
    model: ModulatedGPT, token_ids: Sequence[int], control: float | int | Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Signals (each (1, T, L[, H]), float32 on CPU) of one forward pass of `model` over `token_ids`.

    control: for a model with a control input, a label id or mode value for every token, or a
    label id per token (the last len(token_ids) used); None means label 0 / m = 0.
    Uses the last block_size tokens if the sequence is longer; runs in eval mode without
    gradients and restores the module's train/eval mode afterwards. {} for a plain Transformer.
    """
    device = next(model.parameters()).device
    ids = list(token_ids)[-model.config.block_size :]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    given = None
    if model.control is not None:
        mode = model.control_config.kind == "mode"
        if control is None or isinstance(control, (int, float)):
            value = 0 if control is None else control
            given = torch.tensor([float(value) if mode else int(value)], device=device)
        else:
            given = torch.tensor([list(control)[-len(ids) :]], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            signals = model(idx, control=given).signals
    finally:
        model.train(was_training)
    return {name: value.float().cpu() for name, value in signals.items()}
