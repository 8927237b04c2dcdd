"""Generation: incremental UTF-8 detokenizing, seeded sampling, cached vs uncached decoding.

Runs `python run.py task=generate` on the session's tiny trained checkpoint (see
tests/tiny_checkpoint.py). Run: `python -m pytest tests/test_generate.py`.
"""

from __future__ import annotations

import re

import pytest
import torch

from ncn.data.tokenizer import EOT_TOKEN, encode_prompt, get_encoding, gpt2_encoding, stream_text
from ncn.errors import NCNConfigError
from ncn.tasks.generate import main
from ncn.training import checkpoint

from conftest import run_cli
from tiny_checkpoint import TinyRun, tiny_run

TEXT = "héllo 世界 🦙 ᚠᛇᚻ robot\n"


def test_stream_text_joins_characters_split_over_tokens():
    encoding = gpt2_encoding()
    ids = encoding.encode(TEXT)
    alone = [encoding.decode_single_token_bytes(i) for i in ids]
    split = [b for b in alone if b.decode("utf-8", errors="replace").count("\ufffd")]
    assert len(split) >= 6  # the test means something: several tokens are partial characters
    pieces = list(stream_text(iter(ids), encoding))
    assert "".join(pieces) == TEXT == encoding.decode(ids)
    assert "" not in pieces and all("\ufffd" not in p for p in pieces)
    # "世" is the bytes of two tokens: it appears once, with the second of them
    assert "世" in pieces and len(pieces) < len(ids)


def test_stream_text_incomplete_tail_and_unknown_ids():
    encoding = gpt2_encoding()
    llama = encoding.encode("🦙")  # 3 tokens of one 4-byte character
    assert list(stream_text(llama[:2], encoding)) == ["\ufffd"]  # cut short: one replacement at the end
    assert list(stream_text([llama[0], 50300, *encoding.encode(" ok")], encoding)) == ["\ufffd\ufffd", " ok"]


def test_encode_prompt():
    encoding = gpt2_encoding()
    assert encode_prompt("", encoding) == [EOT_TOKEN]
    assert encode_prompt(None, encoding) == [EOT_TOKEN]
    assert encode_prompt("a<|endoftext|>b", encoding) == [64, EOT_TOKEN, 65]
    assert encode_prompt("1984", encoding) == [
        28296
    ]  # prompt=1984 reaches the task as a string (RunConfig.prompt: str)
    assert encode_prompt(None, get_encoding("bytes")) == [256] and encode_prompt("hé", get_encoding("bytes")) == [
        104,
        195,
        169,
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory, _mlflow_template) -> TinyRun:
    return tiny_run(tmp_path_factory, _mlflow_template)


@pytest.fixture(scope="module")
def model(run):
    return checkpoint.load_model(checkpoint.load(run.checkpoint))


def test_cli_same_seed_same_text_and_speed_line(run, model, tmp_path, capsys, task_config):
    args = [
        "task=generate",
        f"checkpoint={run.checkpoint}",
        "prompt=To be",
        "max_new_tokens=20",
        "temperature=0.8",
        "top_k=50",
    ]
    first = run_cli([*args, "seed=0", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    found = re.search(r"^(\d+) tokens in [\d.]+ s: ([\d.]+) tokens/s \(KV cache, cpu\)$", first.stderr, re.M)
    assert found and int(found.group(1)) == 20 and float(found.group(2)) > 0
    assert first.stderr.startswith("checkpoint of run tiny-full-s0 at step 6 (val loss ")  # named before it is used
    assert f": {run.checkpoint} (MLflow run " in first.stderr.splitlines()[0]
    # in-process with the same seed: the same text, token for token
    speed = main(*task_config([*args, "seed=0"]))
    assert capsys.readouterr().out == first.stdout and speed > 0
    main(*task_config([*args, "seed=1"]))
    assert capsys.readouterr().out != first.stdout
    # stdout is the prompt followed by the text of exactly the tokens generate() samples
    encoding = gpt2_encoding()
    prompt = encoding.encode("To be")
    ids = model.generate(torch.tensor([prompt]), 20, 0.8, 50, torch.Generator().manual_seed(0))
    assert ids.shape == (1, len(prompt) + 20)
    assert first.stdout == "To be" + encoding.decode(ids[0, len(prompt) :].tolist()) + "\n"


def test_stream_equals_generate(model):
    prompt = torch.tensor([gpt2_encoding().encode("Good morrow")])
    streamed = list(model.stream(prompt, 12, 0.8, 50, torch.Generator().manual_seed(3)))
    generated = model.generate(prompt, 12, 0.8, 50, torch.Generator().manual_seed(3))
    assert all(t.shape == (1, 1) for t in streamed)
    assert torch.equal(torch.cat([prompt, *streamed], dim=1), generated)


def test_cached_equals_uncached_greedy(model):
    block = model.config.block_size  # 32 for model=tiny
    prompt = torch.tensor([gpt2_encoding().encode("Now is the winter of our discontent")])
    new = block - prompt.shape[1]  # the whole block: every cached position is exercised
    cached = model.generate(prompt, new, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, new, temperature=0.0, use_cache=False)
    assert cached.shape == (1, block)
    assert torch.equal(cached, uncached)


def test_prompt_longer_than_block_is_cropped_with_warning(run, capsys, task_config):
    prompt = " ".join(["word"] * 50)  # 50 tokens > block_size 32
    args = ["task=generate", f"checkpoint={run.checkpoint}", f"prompt={prompt}", "max_new_tokens=5", "temperature=0"]
    cfg = task_config(args)
    with pytest.warns(UserWarning, match="prompt of 50 tokens is longer than block_size=32: using its last 32 tokens"):
        main(*cfg)
    out = capsys.readouterr().out
    assert out.startswith(prompt) and len(gpt2_encoding().encode(out[len(prompt) : -1])) <= 5


def test_bad_sampling_setting_fails_before_output(run, capsys, task_config):
    with pytest.raises(NCNConfigError, match=r"^top_k=0 must be >= 1 \(or null for no top-k filtering\)$"):
        main(*task_config(["task=generate", f"checkpoint={run.checkpoint}", "prompt=Hello", "top_k=0"]))
    assert capsys.readouterr().out == ""


def test_global_pooling_checkpoint_generates_without_cache(run, tmp_path, capsys, task_config):
    """ncn.pooling=global cannot decode incrementally: task=generate decodes uncached, with one warning line."""
    import shutil

    import yaml

    ckpt = tmp_path / "global" / "step_000006"
    shutil.copytree(run.checkpoint, ckpt)
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    config["ncn"]["pooling"] = "global"  # same parameters as causal pooling: only the mask differs
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    main(*task_config(["task=generate", f"checkpoint={ckpt}", "prompt=To be", "max_new_tokens=3", "temperature=0"]))
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warning == [
        "warning: ncn.pooling=global (the leaking mode) cannot use the KV cache: "
        "re-running the full forward pass for every token (slower)"
    ]
    assert re.search(r"^3 tokens in [\d.]+ s: [\d.]+ tokens/s \(no cache, cpu\)$", err, re.M)
