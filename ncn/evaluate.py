"""Validation loss and perplexity of a checkpoint on a data config.

`python run.py task=eval checkpoint=latest [data=<option>]` rebuilds the checkpoint's model,
runs the fixed validation batches of the data (the checkpoint's own data config unless `data`
is overridden on the command line) and prints CE loss and perplexity = exp(CE) (NCN paper §4).
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ncn.checkpoint import load_model, resolve
from ncn.errors import NCNConfigError
from ncn.generate import default_device
from ncn.runtime import build, run_context
from ncn.train import evaluate


def _data_overridden() -> bool:
    """True when the command line set the data group or one of its keys (data=..., data.x=...)."""
    if not HydraConfig.initialized():
        return False
    keys = (o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task)
    return any(k == "data" or k.startswith("data.") for k in keys)


def main(cfg: DictConfig) -> float:
    """Print and return the val CE loss of `cfg.checkpoint`.

    Data: the checkpoint's saved `data` config, or the command line's when `data` is
    overridden there. Batches: `trainer.eval_batches` fixed val batches of
    `trainer.batch_size` × the model's block_size (`DataModule.val_batches`), in fp32, through
    the training loop's own `ncn.train.evaluate` (token-weighted mean CE; perplexity = exp(CE),
    the homeostatic term excluded, NCN paper §4).

    Raises:
        CheckpointError: unusable checkpoint; NCNConfigError: data whose val split is shorter
            than one block, or whose tokenizer vocabulary exceeds the model's.
    """
    path = resolve(cfg.checkpoint, run_context()[1])  # "latest" is searched in the launch dir
    model, saved = load_model(path, default_device())
    data_cfg = cfg.data if _data_overridden() else saved.data
    datamodule = build(data_cfg)
    if datamodule.encoding.n_vocab > model.config.vocab_size:
        raise NCNConfigError(
            f"data tokenizer has {datamodule.encoding.n_vocab} tokens but {path} was trained with "
            f"model.vocab_size={model.config.vocab_size}: evaluate on data tokenized with the model's tokenizer"
        )
    batches = datamodule.val_batches(int(cfg.trainer.batch_size), model.config.block_size, int(cfg.trainer.eval_batches))
    device = next(model.parameters()).device
    metrics = evaluate(model, batches, device)
    tokens = sum(y.numel() for _, y in batches)
    print(
        f"val loss {metrics['val/loss']:.4f} | val ppl {metrics['val/ppl']:.3f} | {tokens} tokens in "
        f"{len(batches)} batches | data {datamodule.source.describe()} | checkpoint {path}",
        flush=True,
    )
    return metrics["val/loss"]
