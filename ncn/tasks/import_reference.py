"""`python run.py task=import reference_checkpoint=<file.pt> [data=...]`: a reference checkpoint as an ncn checkpoint.

Converts a checkpoint written by the reference implementation's `train.py` (its `ModulatedLLM`
state dict and `NCNConfig`) with `ncn.integrations.reference` into `<run dir>/checkpoints/step_<N>`,
which task=eval (with the leak audit of its global pooling), analyze, generate and trainer.resume
then use like any checkpoint. `unsafe_unpickle=true` is needed only for a file that holds more
than tensors and the config (it can run code: only for files you trust).
"""

from __future__ import annotations

from pathlib import Path

from ncn.config import RunConfig, RunContext, python_command, shell_override
from ncn.errors import NCNConfigError
from ncn.integrations.reference import import_checkpoint


def main(cfg: RunConfig, ctx: RunContext) -> None:
    """Convert `cfg.reference_checkpoint`; prints the new checkpoint folder and the command that evaluates it.

    Raises:
        NCNConfigError: no reference_checkpoint given; a `model.*` or `ncn.*` override (or the
            group), which the reference's own settings replace; anything `import_checkpoint` refuses.
    """
    refused = sorted(k for k in ctx.overridden if k.split(".")[0] in ("model", "ncn"))
    if refused:
        raise NCNConfigError(
            f"{refused[0]} cannot be set with task=import: the model and controller come from the reference "
            f"checkpoint: drop {refused[0]}"
        )
    if not cfg.reference_checkpoint:
        raise NCNConfigError(
            "task=import needs reference_checkpoint=<file.pt>: the checkpoint the reference's train.py saved"
        )
    source = Path(cfg.reference_checkpoint).expanduser()
    if not source.is_absolute():
        source = ctx.launch_dir / source
    folder = import_checkpoint(source, cfg, ctx.run_dir / "checkpoints", cfg.unsafe_unpickle)
    print(f"imported {source} as {folder}", flush=True)
    print(f"evaluate it: {python_command('run.py', 'task=eval', shell_override('checkpoint', folder))}", flush=True)
