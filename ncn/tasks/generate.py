"""`python run.py task=generate checkpoint=latest prompt="..." ...`: sample text from a checkpoint, streamed.

Decodes with the KV cache and the controller's constant-size salience state (NCN paper §5);
the same seed gives the same text. A checkpoint trained with ncn.pooling=global (the leaking
reference mode) cannot decode incrementally: it is decoded without the cache (the full forward
per token), with a one-line warning. A checkpoint trained with a control input takes
`control.label=<label>` (labels) or `control.value=<m>` (mode, default 0): NCN paper §3.2, §6.1.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import torch

from ncn.analysis.compute import require_gates
from ncn.config import RunConfig, RunContext
from ncn.data.tokenizer import encode_prompt, get_encoding, stream_text
from ncn.errors import CheckpointError
from ncn.training.checkpoint import CONTROL_USE_KEYS, control_setting, load_model, open_checkpoint
from ncn.training.runtime import default_device


def main(cfg: RunConfig, ctx: RunContext) -> float:
    """Stream a sample from `cfg.checkpoint` to stdout; returns the decoding speed in tokens/s.

    Reads cfg.checkpoint, cfg.prompt (None = a fresh document), cfg.max_new_tokens,
    cfg.temperature (0 = greedy), cfg.top_k (null or >= 1) and cfg.seed; the model is rebuilt
    from the checkpoint's own saved config. The checkpoint is named on stderr first, the prompt is
    echoed, then each token's text is flushed as soon as it is complete; the speed line goes to stderr.

    Raises:
        NCNConfigError: negative max_new_tokens or temperature, top_k < 1 (checked by
            `ModulatedGPT.stream` before any output), skip_threshold > 0 for a checkpoint without
            gates (`require_gates`); CheckpointError: unusable checkpoint, a
            control setting the checkpoint does not know (`control_setting`), no label for a
            labelled checkpoint.
    """
    ckpt = open_checkpoint(cfg.checkpoint, ctx.launch_dir, ctx.overridden, allowed=CONTROL_USE_KEYS)
    print(ckpt.describe(), file=sys.stderr, flush=True)
    setting = control_setting(ckpt, cfg.control.label, cfg.control.value)
    device = default_device()
    model = load_model(ckpt, device)
    if cfg.skip_threshold > 0:
        require_gates(model, f"skip_threshold={cfg.skip_threshold:g}", str(ckpt.path))
    control = None
    if model.control is not None:
        trained = ckpt.config.control
        if setting is None and trained.kind != "mode":
            raise CheckpointError(
                f"{ckpt.path} was trained with control={trained.kind}: give control.label=<one of "
                f"{', '.join(trained.vocabulary)}>"
            )
        mode = trained.kind == "mode"
        value = 0.0 if setting is None else setting
        control = torch.tensor([value], dtype=torch.float32 if mode else torch.long, device=device)
        shown = f"control.value={value:+.2f}" if mode else f"control.label={trained.vocabulary[int(value)]}"
        print(f"generating with {shown}", file=sys.stderr, flush=True)
    encoding = get_encoding(ckpt.config.data.tokenizer)
    prompt = encode_prompt(cfg.prompt, encoding)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    # global pooling's salience at t sees tokens after t: no KV cache can reproduce its forward pass
    use_cache = model.controller is None or model.modulation_config.pooling != "global"
    if not use_cache:
        print(
            "warning: ncn.pooling=global (the leaking mode) cannot use the KV cache: "
            "re-running the full forward pass for every token (slower)",
            file=sys.stderr,
        )

    # stream() checks its arguments when called, so a bad setting fails before any output.
    new_tokens = model.stream(
        idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator, use_cache, cfg.skip_threshold, control
    )
    count = 0

    def counted() -> Iterator[int]:
        nonlocal count
        for token in new_tokens:
            count += 1
            yield int(token[0, 0])

    sys.stdout.write(cfg.prompt or "")
    sys.stdout.flush()
    start = time.perf_counter()
    for piece in stream_text(counted(), encoding):
        sys.stdout.write(piece)
        sys.stdout.flush()
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    speed = count / seconds
    mode = "KV cache" if use_cache else "no cache"
    print(f"{count} tokens in {seconds:.2f} s: {speed:.1f} tokens/s ({mode}, {device.type})", file=sys.stderr)
    return speed
