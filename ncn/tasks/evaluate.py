"""`python run.py task=eval checkpoint=latest [data=<option>] [ncn.pooling=causal]`: val metrics of a checkpoint.

Rebuilds the checkpoint's model, runs the fixed validation batches of the data (the checkpoint's
own data config unless `data` is overridden on the command line) and prints CE loss, perplexity
= exp(CE) (NCN paper §4) and bits per byte; for a checkpoint trained with `global` salience
pooling also the leak audit (the same weights under causal pooling, NCN paper §5).
`ncn.pooling=causal` makes the causal evaluation of such a checkpoint the headline number.
"""

from __future__ import annotations

import math
import sys

from ncn.config import RunConfig, RunContext
from ncn.data.loader import DataModule
from ncn.errors import CheckpointError, NCNConfigError
from ncn.training.checkpoint import Checkpoint, load_model, open_checkpoint
from ncn.training.evaluation import (
    EARLY_POSITIONS,
    VAL_LEAK,
    VAL_LEAK_EARLY,
    VAL_LEAK_LATE,
    VAL_LOSS_CAUSAL,
    evaluate,
    uses_future,
)
from ncn.training.runtime import default_device

# The one model/ncn key task=eval accepts with checkpoint=: evaluate global-trained weights causally.
POOLING_KEY = "ncn.pooling"


def _causal_requested(cfg: RunConfig, ctx: RunContext, ckpt: Checkpoint) -> bool:
    """Whether `ncn.pooling=causal` was given (for a checkpoint trained with global pooling).

    Raises:
        CheckpointError: ncn.pooling set to anything but causal, or for a checkpoint that does
            not pool globally (nothing would change).
    """
    if POOLING_KEY not in ctx.overridden:
        return False
    trained = ckpt.config.ncn
    if cfg.ncn.pooling != "causal":
        raise CheckpointError(
            f"ncn.pooling={cfg.ncn.pooling} cannot be set together with checkpoint=: only ncn.pooling=causal "
            "may be, to evaluate a global-pooling checkpoint's weights causally; drop the override"
        )
    if not trained.targets or trained.pooling != "global":
        what = "no controller" if not trained.targets else f"ncn.pooling={trained.pooling}"
        raise CheckpointError(
            f"ncn.pooling=causal changes nothing for {ckpt.path}, which was trained with {what}: "
            "it applies to checkpoints trained with ncn.pooling=global; drop the override"
        )
    return True


def main(cfg: RunConfig, ctx: RunContext) -> float:
    """Print and return the val CE loss of `cfg.checkpoint` (under causal pooling with `ncn.pooling=causal`).

    Batches: `trainer.eval_batches` fixed val batches of `trainer.batch_size` × the model's
    block_size (`DataModule.val_batches`), in fp32, through the training loop's own
    `ncn.training.evaluation.evaluate` (token-weighted mean CE; perplexity = exp(CE), NCN paper §4;
    bits per byte of the evaluated data's val text). For a global-pooling checkpoint a second
    line gives the leak audit: val loss under causal pooling and the difference, overall and
    for the first `EARLY_POSITIONS` positions of each block vs the rest.

    Raises:
        CheckpointError: unusable checkpoint, a model/ncn override other than ncn.pooling=causal,
            or ncn.pooling=causal for a checkpoint that does not pool globally; NCNConfigError:
            data whose val split is shorter than one block, or whose tokenizer the model was not
            trained with.
    """
    ckpt = open_checkpoint(cfg.checkpoint, ctx.launch_dir, ctx.overridden, allowed=frozenset({POOLING_KEY}))
    print(ckpt.describe(), file=sys.stderr, flush=True)
    causal = _causal_requested(cfg, ctx, ckpt)
    if causal:
        print(
            f"evaluating the weights of {ckpt.path}, trained with ncn.pooling=global, under ncn.pooling=causal",
            file=sys.stderr,
            flush=True,
        )
    model = load_model(ckpt, default_device())
    data_overridden = any(k.split(".")[0] == "data" for k in ctx.overridden)
    data = DataModule(cfg.data if data_overridden else ckpt.config.data)
    if data.cfg.tokenizer != ckpt.config.data.tokenizer:
        raise NCNConfigError(
            f"data.tokenizer={data.cfg.tokenizer}, but {ckpt.path} was trained with "
            f"data.tokenizer={ckpt.config.data.tokenizer}: evaluate on data tokenized the same way "
            f"(data.tokenizer={ckpt.config.data.tokenizer})"
        )
    batches = data.val_batches(cfg.trainer.batch_size, model.config.block_size, cfg.trainer.eval_batches)
    metrics = evaluate(model, batches, next(model.parameters()).device, bits_per_byte=data.bits_per_byte)
    loss = metrics[VAL_LOSS_CAUSAL] if causal else metrics["val/loss"]
    tokens = sum(y.numel() for _, y in batches)
    pooling = "ncn.pooling=causal (trained: global) | " if causal else ""
    print(
        f"val loss {loss:.4f} | val ppl {math.exp(min(loss, 700.0)):.3f} | val bpb {data.bits_per_byte(loss):.4f} | "
        f"{pooling}{tokens} tokens in {len(batches)} batches | "
        f"data {data.source.describe()} | checkpoint {ckpt.path}",
        flush=True,
    )
    if uses_future(model):
        print(_audit_line(metrics, model.config.block_size), flush=True)
    return loss


def _audit_line(metrics: dict[str, float], block_size: int) -> str:
    """The leak audit of a global-pooling model as one line (nats/token; > 0: the model uses the future)."""
    early = min(EARLY_POSITIONS, block_size)
    buckets = f"positions 0-{early - 1}: {metrics[VAL_LEAK_EARLY]:+.4f}"
    if VAL_LEAK_LATE in metrics:
        buckets += f", positions {early}-{block_size - 1}: {metrics[VAL_LEAK_LATE]:+.4f}"
    return (
        f"leak audit (trained with ncn.pooling=global): val loss {metrics['val/loss']:.4f} global, "
        f"{metrics[VAL_LOSS_CAUSAL]:.4f} with the same weights under causal pooling; the future buys "
        f"{metrics[VAL_LEAK]:+.4f} nats/token ({buckets})"
    )
