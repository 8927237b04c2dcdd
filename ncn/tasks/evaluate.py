"""`python run.py task=eval checkpoint=latest [data=<option>]`: validation loss and perplexity of a checkpoint.

Rebuilds the checkpoint's model, runs the fixed validation batches of the data (the checkpoint's
own data config unless `data` is overridden on the command line) and prints CE loss and
perplexity = exp(CE) (NCN paper §4).
"""

from __future__ import annotations

import sys

from ncn.checkpoint import load_model, open_checkpoint
from ncn.config import RunConfig, RunContext
from ncn.data import DataModule
from ncn.errors import NCNConfigError
from ncn.evaluation import evaluate
from ncn.runtime import default_device


def main(cfg: RunConfig, ctx: RunContext) -> float:
    """Print and return the val CE loss of `cfg.checkpoint`.

    Batches: `trainer.eval_batches` fixed val batches of `trainer.batch_size` × the model's
    block_size (`DataModule.val_batches`), in fp32, through the training loop's own
    `ncn.evaluation.evaluate` (token-weighted mean CE; perplexity = exp(CE), NCN paper §4).

    Raises:
        CheckpointError: unusable checkpoint, or a model/ncn override; NCNConfigError: data whose
            val split is shorter than one block, or whose tokenizer the model was not trained with.
    """
    ckpt = open_checkpoint(cfg.checkpoint, ctx.launch_dir, ctx.overridden)
    print(ckpt.describe(), file=sys.stderr, flush=True)
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
    metrics = evaluate(model, batches, next(model.parameters()).device)
    tokens = sum(y.numel() for _, y in batches)
    print(
        f"val loss {metrics['val/loss']:.4f} | val ppl {metrics['val/ppl']:.3f} | {tokens} tokens in "
        f"{len(batches)} batches | data {data.source.describe()} | checkpoint {ckpt.path}",
        flush=True,
    )
    return metrics["val/loss"]
