"""Sample text from a checkpoint, streamed to the terminal as tokens arrive.

`python run.py task=generate checkpoint=latest prompt="Once upon a time" max_new_tokens=200
temperature=0.8 top_k=50 seed=0` decodes with the KV cache and the controller's constant-size
salience state (NCN paper §5); the same seed gives the same text. A checkpoint trained with
ncn.pooling=global (the leaking reference mode) cannot decode incrementally: it is decoded
without the cache (the full forward per token), with a one-line warning.
"""

from __future__ import annotations

import codecs
import sys
import time
from collections.abc import Iterable, Iterator

import tiktoken
import torch
from omegaconf import DictConfig

from ncn.checkpoint import load_model, resolve
from ncn.data import gpt2_encoding
from ncn.runtime import run_context
from ncn.tokenizer import EOT_TOKEN

REPLACEMENT = "\ufffd".encode()  # shown for ids the tokenizer lacks (the padded rows of the output head)


def prompt_text(prompt: object) -> str:
    """The prompt as text: "" for None, `str(prompt)` otherwise (see `encode_prompt`)."""
    return "" if prompt is None else str(prompt)


def encode_prompt(prompt: object, encoding: tiktoken.Encoding) -> list[int]:
    """GPT-2 token ids of `prompt`; `<|endoftext|>` in the text is the EOS token.

    None or "" starts from a single EOS token (a fresh document), as GPT-2 sampling does;
    other values go through `str` (Hydra parses `prompt=1984` as an int). A prompt longer than
    the model's block_size is cropped from the left by the model, with a warning.
    """
    text = prompt_text(prompt)
    if not text:
        return [EOT_TOKEN]
    return encoding.encode(text, allowed_special={"<|endoftext|>"})


def stream_text(token_ids: Iterable[int], encoding: tiktoken.Encoding) -> Iterator[str]:
    """Decode a stream of token ids incrementally into text pieces, as they become printable.

    GPT-2's byte-level BPE can split one UTF-8 character over several tokens (e.g. emoji or
    CJK); decoding each token alone would print replacement characters. The bytes of every
    token go through an incremental UTF-8 decoder that holds back an incomplete character until
    its last byte arrives, so the concatenated pieces equal `encoding.decode(all ids)`. Empty
    pieces are never yielded; invalid byte sequences become U+FFFD.
    """
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_ids:
        try:
            data = encoding.decode_single_token_bytes(token)
        except KeyError:
            data = REPLACEMENT
        piece = utf8.decode(data)
        if piece:
            yield piece
    tail = utf8.decode(b"", final=True)
    if tail:
        yield tail


def default_device() -> torch.device:
    """CUDA when available, else CPU: where generate, analyze and eval run a checkpoint."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(cfg: DictConfig) -> float:
    """Stream a sample from `cfg.checkpoint` to stdout; returns the decoding speed in tokens/s.

    Reads cfg.checkpoint (PATH or "latest"), cfg.prompt, cfg.max_new_tokens, cfg.temperature
    (0 = greedy), cfg.top_k (null or ≥ 1) and cfg.seed; the model is rebuilt from the
    checkpoint's own saved config. The prompt is echoed, then each token's text is flushed as
    soon as it is complete; the speed line goes to stderr.

    Raises:
        NCNConfigError: negative max_new_tokens or temperature, top_k < 1 (checked by
            `ModulatedGPT.stream` before any output); CheckpointError: unusable checkpoint.
    """
    device = default_device()
    path = resolve(cfg.checkpoint, run_context()[1])  # "latest" is searched in the launch dir
    model, _ = load_model(path, device)
    print(f"checkpoint {path}", file=sys.stderr)
    encoding = gpt2_encoding()
    prompt = encode_prompt(cfg.prompt, encoding)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    # global pooling's salience at t sees tokens after t: no KV cache can reproduce its forward pass
    use_cache = model.controller is None or model.modulation_config.pooling != "global"
    if not use_cache:
        print("warning: ncn.pooling=global (the leaking mode) cannot use the KV cache: "
              "re-running the full forward pass for every token (slower)", file=sys.stderr)

    # stream() checks its arguments when called, so a bad setting fails before any output.
    new_tokens = model.stream(idx, int(cfg.max_new_tokens), float(cfg.temperature), cfg.top_k, generator, use_cache)
    count = 0

    def counted() -> Iterator[int]:
        nonlocal count
        for token in new_tokens:
            count += 1
            yield int(token[0, 0])

    sys.stdout.write(prompt_text(cfg.prompt))
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
