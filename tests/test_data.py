"""Tests of ncn.data.loader / ncn.data.sources: the embedded Shakespeare corpus, text_files, local and hub
datasets (glob characters in paths, edits in place), byte-level data, short splits, resumable
DDP-sharded batches and conf/data/*.yaml (NCN paper §6).

The embedded corpus is tokenized once per session into the session's NCN_CACHE_DIR (about 2 s).
Run: pytest tests/test_data.py  (offline)
"""

import errno
import glob
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ncn.config import DataConfig, RunConfig, RunContext
from ncn.data import token_cache
from ncn.data.loader import BlockLoader, DataModule
from ncn.data.sources import (
    HubDataset,
    LocalDataset,
    Shakespeare,
    TextFiles,
    dataset_identity,
    strip_play_markdown,
)
from ncn.data.token_cache import val_prefix
from ncn.data.tokenizer import EOT_TOKEN, gpt2_encoding
from ncn.errors import DiskFullError, NCNConfigError, exit_code
from ncn.tasks import prepare as prepare_task

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "data"


def _dm(**kwargs):
    return DataModule(DataConfig(**kwargs))


@pytest.fixture(scope="session")
def shakespeare_cache(ncn_cache_dir):
    dm = _dm(cache_dir=str(ncn_cache_dir))
    return dm, dm.prepare()


@pytest.fixture
def shakespeare(shakespeare_cache):
    return shakespeare_cache[0]


# ---------------------------------------------------------------- embedded corpus


def test_embedded_corpus_size_and_split(shakespeare_cache):
    dm, info = shakespeare_cache
    split = info.meta["split"]
    assert (split["train_documents"], split["val_documents"], split["rule"]) == (36, 2, "documents")
    # The default run's numbers: the same 2 held-out plays and token counts as before the split by tokens.
    assert (info.train_tokens, info.val_tokens) == (1_455_905, 75_654)
    assert split["val_names"] == ["problems/the-taming-of-the-shrew", "roman/titus-andronicus"]
    assert split["val_document_tokens"] == [39_162, 36_492]
    assert (split["documents_found"], split["skipped_empty"]) == (38, 0)
    assert info.train_bytes + info.val_bytes == info.meta["text_bytes"] == 4_987_034
    val = np.fromfile(info.cache_dir / "val.bin", dtype=np.uint16)
    train = np.fromfile(info.cache_dir / "train.bin", dtype=np.uint16)
    assert (len(train), len(val)) == (info.train_tokens, info.val_tokens)
    assert (train == EOT_TOKEN).sum() == 36 and (val == EOT_TOKEN).sum() == 2  # one EOS per play
    assert train[-1] == val[-1] == EOT_TOKEN
    assert dm.vocab_size == 50304 and int(max(train.max(), val.max())) == EOT_TOKEN


def test_embedded_corpus_has_no_markdown():
    corpus = Shakespeare().load(Path("unused"))
    texts = corpus.documents["text"]
    assert len(texts) == 38 and len(corpus.names) == 38
    assert corpus.names[0] == "comedies/a-midsummer-night-s-dream" and "tragedies/hamlet" in corpus.names
    for name, text in zip(corpus.names, texts, strict=True):
        assert "**" not in text and "*" not in text and "_" not in text and "\\" not in text, name
        assert not re.search(r"^#", text, re.MULTILINE), name
        assert not re.search(r"[ \t]+$", text, re.MULTILINE), name
        assert "\n\n\n" not in text and text.endswith("\n") and not text.endswith("\n\n"), name
    hamlet = texts[corpus.names.index("tragedies/hamlet")]
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.\n\n")
    assert "FRANCISCO at his post. Enter to him BERNARDO\n\nBERNARDO:\nWho's there?\n" in hamlet
    assert sum(len(t.encode()) for t in texts) == 4_987_034


def test_strip_play_markdown_rules():
    md = (
        "# Title\n\n## ACT I\n\n#### SCENE I. Rome.\n\n_Enter TWO, with\nothers_\n\n"
        "**ONE**  \nA line,  \nanother line.\n\n\n\n**TWO**  \n__\\[Aside]_  \n\\--Sir, *[Reads.]* O\\.\n"
    )
    assert strip_play_markdown(md) == (
        "Title\n\nACT I\n\nSCENE I. Rome.\n\nEnter TWO, with\nothers\n\n"
        "ONE:\nA line,\nanother line.\n\nTWO:\n[Aside]\n--Sir, [Reads.] O.\n"
    )


def test_second_prepare_is_a_cache_hit_under_a_second(shakespeare_cache):
    dm, info = shakespeare_cache
    start = time.perf_counter()
    again = _dm(cache_dir=str(dm.cache_dir)).prepare()
    assert time.perf_counter() - start < 1.0
    assert again.cache_hit and again.cache_dir == info.cache_dir and again.meta == info.meta


def test_total_tokens_is_checked(shakespeare_cache):
    dm, info = shakespeare_cache
    total = info.train_tokens + info.val_tokens
    assert _dm(cache_dir=str(dm.cache_dir), total_tokens=total).prepare().train_tokens == info.train_tokens
    with pytest.raises(NCNConfigError, match=rf"data.total_tokens=1000 does not match .*meta.json .*= {total} tokens"):
        _dm(cache_dir=str(dm.cache_dir), total_tokens=1000).prepare()


def test_probe_and_val_batches_are_fixed(shakespeare):
    enc = gpt2_encoding()
    probe = shakespeare.probe_tokens(12)
    assert len(probe) == 12 and enc.decode(probe).startswith("The Taming of the Shrew\n\nPROLOGUE")
    first = shakespeare.val_batches(batch_size=4, block_size=64, max_batches=3)
    again = shakespeare.val_batches(batch_size=4, block_size=64, max_batches=3)
    assert len(first) == 3
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(x[:, 1:], y[:, :-1])
    assert first[0][0][0, :12].tolist() == probe  # blocks in file order from the start of val
    everything = shakespeare.val_batches(batch_size=100, block_size=1023)
    n_blocks = shakespeare.prepare().val_tokens // 1024
    assert sum(len(x) for x, _ in everything) == n_blocks and len(everything) == -(-n_blocks // 100)


def test_train_loader_blocks_follow_the_seeded_order(shakespeare):
    loader = shakespeare.train_loader(batch_size=4, block_size=32, seed=5)
    train = np.fromfile(shakespeare.prepare().cache_dir / "train.bin", dtype=np.uint16)
    assert loader.blocks_per_epoch == len(train) // 33
    order = loader.order(0)
    assert sorted(order.tolist()) == list(range(loader.blocks_per_epoch)) and not np.array_equal(order, loader.order(1))
    x, y = next(iter(loader))
    blocks = train[: loader.blocks_per_epoch * 33].reshape(-1, 33)[order[:4]].astype(np.int64)
    assert torch.equal(x, torch.from_numpy(blocks[:, :-1])) and torch.equal(y, torch.from_numpy(blocks[:, 1:]))
    assert loader.state_dict() == {"epoch": 0, "position": 4}


def test_block_size_too_large_names_split_and_numbers(shakespeare):
    val_tokens = shakespeare.prepare().val_tokens
    with pytest.raises(NCNConfigError, match=rf"val split has {val_tokens} tokens .*val.bin.*block_size \+ 1 = 100001"):
        shakespeare.train_loader(batch_size=1, block_size=100_000, seed=0)


# ---------------------------------------------------------------- batch sampler


@pytest.fixture
def numbered_tokens(tmp_path):
    """A token file whose block b (8 tokens per block) starts with token 8 * b: 50 blocks + 3 spare tokens."""
    path = tmp_path / "train.bin"
    np.arange(50 * 8 + 3, dtype=np.uint16).tofile(path)
    return path


def _block_ids(x):
    return (x[:, 0] // 8).tolist()


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_epochs_drop_the_last_incomplete_global_batch(numbered_tokens):
    loader = BlockLoader(numbered_tokens, batch_size=4, block_size=7, seed=1)
    assert loader.blocks_per_epoch == 50
    batches = _take(loader, 13)  # 12 full batches per epoch (48 blocks); the 13th opens epoch 1
    epoch0 = [b for x, _ in batches[:12] for b in _block_ids(x)]
    assert epoch0 == loader.order(0)[:48].tolist()
    assert _block_ids(batches[12][0]) == loader.order(1)[:4].tolist()
    assert loader.state_dict() == {"epoch": 1, "position": 4}
    x, y = batches[0]
    assert torch.equal(y, x + 1)  # y is x shifted by one token


def test_data_order_is_the_documented_permutation_of_the_seed(numbered_tokens):
    """Epoch e of seed s hands out the blocks in np.random.default_rng((s, e)).permutation(blocks), as
    BlockLoader's docstring states (computed here, not by the loader); other seeds, other orders."""
    orders = {}
    for seed in (0, 1, 7):
        batches = _take(BlockLoader(numbered_tokens, batch_size=4, block_size=7, seed=seed), 24)  # 2 epochs
        seen = [b for x, _ in batches for b in _block_ids(x)]
        expected = [np.random.default_rng((seed, epoch)).permutation(50)[:48].tolist() for epoch in (0, 1)]
        assert seen == expected[0] + expected[1]
        orders[seed] = seen
    assert orders[0] != orders[1] and orders[0] != orders[7] and orders[1] != orders[7]


@pytest.mark.parametrize("interrupt_at", [3, 12, 17])  # mid-epoch, at the epoch's end, in the next epoch
def test_resume_gives_the_same_batches(numbered_tokens, interrupt_at):
    reference = _take(BlockLoader(numbered_tokens, 4, 7, seed=3), 30)
    first = BlockLoader(numbered_tokens, 4, 7, seed=3)
    head = _take(first, interrupt_at)
    state = dict(first.state_dict())
    resumed = BlockLoader(numbered_tokens, 4, 7, seed=3)
    resumed.load_state_dict(state)
    tail = _take(resumed, 30 - interrupt_at)
    for (x, y), (rx, ry) in zip(head + tail, reference, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resume_with_another_batch_size_continues_at_the_same_block(numbered_tokens):
    first = BlockLoader(numbered_tokens, 4, 7, seed=0)
    _take(first, 3)
    bigger = BlockLoader(numbered_tokens, 6, 7, seed=0)
    bigger.load_state_dict(first.state_dict())
    order = bigger.order(0)
    (x1, _), (x2, _) = _take(bigger, 2)
    assert _block_ids(x1) == order[12:18].tolist() and _block_ids(x2) == order[18:24].tolist()
    assert bigger.state_dict() == {"epoch": 0, "position": 24}


def test_ddp_shards_are_disjoint_and_cover_the_epoch(numbered_tokens):
    world = 3
    loaders = [BlockLoader(numbered_tokens, 4, 7, seed=9, rank=r, world_size=world) for r in range(world)]
    steps = 50 // (4 * world)  # 4 global batches of 12 blocks; 2 blocks dropped
    seen = [[b for x, _ in _take(loader, steps) for b in _block_ids(x)] for loader in loaders]
    flat = [b for rank in seen for b in rank]
    assert len(flat) == len(set(flat)) == steps * 4 * world
    assert sorted(flat) == sorted(loaders[0].order(0)[: steps * 12].tolist())
    order = loaders[0].order(0)
    for r in range(world):
        assert seen[r][:4] == order[4 * r : 4 * r + 4].tolist()  # rank r: its slice of each global batch
        assert loaders[r].state_dict() == {"epoch": 0, "position": steps * 12}


def test_workers_give_identical_batches_and_state(numbered_tokens):
    plain = _take(BlockLoader(numbered_tokens, 4, 7, seed=2), 8)
    workers = BlockLoader(numbered_tokens, 4, 7, seed=2, num_workers=2, pin_memory=False)
    got = _take(workers, 5)
    assert workers.state_dict() == {"epoch": 0, "position": 20}  # prefetched batches are not counted
    got += _take(workers, 3)
    for (x, y), (px, py) in zip(got, plain, strict=True):
        assert torch.equal(x, px) and torch.equal(y, py)


def test_bad_loader_arguments_are_refused(numbered_tokens):
    with pytest.raises(NCNConfigError, match="rank=2, world_size=2"):
        BlockLoader(numbered_tokens, 4, 7, seed=0, rank=2, world_size=2)
    with pytest.raises(NCNConfigError, match="batch_size=0"):
        BlockLoader(numbered_tokens, 0, 7, seed=0)
    with pytest.raises(NCNConfigError, match=r"train split has 50 blocks .* = 8 tokens, .* = 51"):
        BlockLoader(numbered_tokens, 17, 7, seed=0, world_size=3)


def test_bad_state_is_refused(numbered_tokens):
    loader = BlockLoader(numbered_tokens, 4, 7, seed=0)
    with pytest.raises(NCNConfigError, match="position 51 is outside the epoch of 50 blocks"):
        loader.load_state_dict({"epoch": 0, "position": 51})


# ---------------------------------------------------------------- text_files and errors


def test_text_files_folder(tmp_path):
    root = tmp_path / "training_data"
    (root / "sub").mkdir(parents=True)
    stories = {f"s{i}.txt": f"Story {i}. Once upon a time there was a robot number {i}.\n" * 20 for i in range(5)}
    for i, (name, text) in enumerate(stories.items()):
        (root / ("sub" if i % 2 else "") / name).write_text(text, encoding="utf-8")
    dm = _dm(source="text_files", path=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.2, pad_vocab_to=1)
    info = dm.prepare()
    enc = gpt2_encoding()
    assert dm.vocab_size == 50257
    assert (info.meta["split"]["train_documents"], info.meta["split"]["val_documents"]) == (4, 1)
    assert info.train_tokens + info.val_tokens == sum(len(enc.encode_ordinary(t)) + 1 for t in stories.values())
    x, y = next(iter(dm.train_loader(batch_size=2, block_size=16, seed=0)))
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert enc.decode(dm.probe_tokens(3)).startswith("Story ")


def test_empty_folder_error(tmp_path):
    (tmp_path / "notes.md").write_text("markdown is not text_files input")
    with pytest.raises(NCNConfigError, match=rf"data.path={re.escape(str(tmp_path))} contains no .txt files"):
        _dm(source="text_files", path=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_non_utf8_file_error_names_the_file(tmp_path):
    (tmp_path / "good.txt").write_text("fine text\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    dm = _dm(source="text_files", path=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(NCNConfigError, match=r"latin1.txt is not UTF-8 \(byte 3 of 13 is 0xe9; likely LATIN1\)"):
        dm.prepare()


@pytest.mark.parametrize(
    ("text", "encoding", "named"),
    [
        ("caf\u00e9 au lait\n", "latin-1", "LATIN1"),
        ("na\u00efve \u201cquotes\u201d \u2014 caf\u00e9\n", "cp1252", "CP1252"),  # quotes and dash in 0x80-0x9f
        ("caf\u00e9 \u4e2d\u6587\n", "utf-16", "UTF-16"),  # with its byte-order mark
        ("caf\u00e9\n", "utf-32", "UTF-32"),
    ],
)
def test_the_re_encoding_hint_is_a_command_that_works(tmp_path, text: str, encoding: str, named: str) -> None:
    """The suggested iconv command, run as printed, turns the file into UTF-8 text equal to the original."""
    folder = tmp_path / "it's a corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes(text.encode(encoding))
    dm = _dm(source="text_files", path=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(NCNConfigError) as refused:
        dm.prepare()
    command = re.search(r"e\.g\. (iconv .*) > <new file>\.txt", str(refused.value)).group(1)
    assert command.startswith(f"iconv -f {named} -t UTF-8 ")
    converted = subprocess.run(["bash", "-c", command], capture_output=True, check=True).stdout
    assert converted.decode("utf-8").lstrip("\ufeff") == text


def test_an_unwritable_cache_folder_names_the_cache_settings(tmp_path) -> None:
    """A cache folder that cannot be made (a file in its path; /sys is read-only) names data.cache_dir and
    NCN_CACHE_DIR, not the run folder."""
    (tmp_path / "doc.txt").write_text("some text " * 200, encoding="utf-8")
    (tmp_path / "a_file").write_text("")
    for cache, why in ((tmp_path / "a_file" / "cache", "Not a directory"), (Path("/sys/ncn_cache"), None)):
        dm = _dm(source="text_files", path=str(tmp_path / "doc.txt"), cache_dir=str(cache))
        with pytest.raises(NCNConfigError) as refused:
            dm.prepare()
        message = str(refused.value)
        assert message.startswith(f"cannot write the token cache in {cache} (")
        assert message.endswith(
            "): point data.cache_dir=<writable folder> (or the environment's NCN_CACHE_DIR) at a folder you can write"
        )
        assert why is None or f"({why}: {cache})" in message


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_while_writing_the_token_cache_is_one_error(tmp_path, monkeypatch, code) -> None:
    """No space left (or the quota spent) while the cache is written: one DiskFullError (exit 2) naming the
    cache folder, the free space and the settings that move it; no temporary folder is left behind."""
    (tmp_path / "doc.txt").write_text("some text " * 200, encoding="utf-8")
    cache = tmp_path / "cache"

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(cache / "x" / "train.bin"))

    monkeypatch.setattr(token_cache, "_build", full)
    dm = _dm(source="text_files", path=str(tmp_path / "doc.txt"), cache_dir=str(cache))
    with pytest.raises(DiskFullError) as refused:
        dm.prepare()
    message = str(refused.value)
    assert message.startswith(f"no space left in {cache} for the token cache of {tmp_path / 'doc.txt'} (")
    assert " MB free; the cache takes about 2 bytes per token): free some space or point data.cache_dir=" in message
    assert exit_code(refused.value) == 2
    assert [p.name for p in cache.rglob(".tmp-*")] == []


def test_corpus_shorter_than_a_block_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("Just a few words here.\n" * 3, encoding="utf-8")  # 22 tokens with EOS
    (tmp_path / "tinier.txt").write_text("Five words and no more.\n", encoding="utf-8")  # 8 tokens with EOS
    dm = _dm(source="text_files", path=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    info = dm.prepare()
    assert info.meta["split"]["val_names"] == ["tiny.txt"] and (info.train_tokens, info.val_tokens) == (8, 22)
    path = re.escape(str(tmp_path))
    with pytest.raises(NCNConfigError, match=rf"{path}: the val split has 22 tokens .*block_size \+ 1 = 65"):
        dm.train_loader(batch_size=1, block_size=64, seed=0)
    with pytest.raises(NCNConfigError) as short_train:
        dm.train_loader(batch_size=1, block_size=8, seed=0)
    assert str(short_train.value) == (
        f"data source {tmp_path}: the train split has 8 tokens ({info.cache_dir / 'train.bin'}; 1 train documents), "
        "fewer than block_size + 1 = 9: set model.block_size=7 (or smaller), or add text"
    )
    with pytest.raises(NCNConfigError, match=r"train split has 1 blocks of block_size \+ 1 = 5 tokens, .* = 2"):
        dm.train_loader(batch_size=1, block_size=4, seed=0, world_size=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_workers": -1}, r"data.num_workers=-1 must be an integer >= 0 or 'auto'"),
        ({"num_workers": "many"}, r"data.num_workers='many'"),
        ({"num_proc": 0}, r"data.num_proc=0 must be an integer >= 1"),
        ({"val_fraction": 0.0}, r"data.val_fraction=0.0 must be in \(0, 1\)"),
        ({"pin_memory": "yes"}, r"data.pin_memory='yes'"),
        ({"total_tokens": -5}, r"data.total_tokens=-5"),
        ({"source": "wikipedia"}, r"data.source=wikipedia is unknown"),
        ({"source": "hf"}, r"data.source=hf needs data.path"),
    ],
)
def test_config_errors(tmp_path, kwargs, match):
    with pytest.raises(NCNConfigError, match=match):
        _dm(cache_dir=str(tmp_path), **kwargs)


def test_auto_workers_and_pin_memory(tmp_path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)))
    assert _dm(cache_dir=str(tmp_path), num_workers="auto").num_workers == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    assert _dm(cache_dir=str(tmp_path), num_workers="auto").num_workers == 4
    assert _dm(cache_dir=str(tmp_path), pin_memory="auto").pin_memory == torch.cuda.is_available()
    assert _dm(cache_dir=str(tmp_path), pin_memory=False).pin_memory is False


# ---------------------------------------------------------------- hub sources


@pytest.fixture
def hf_caches(tmp_path, monkeypatch):
    """Keep every HF cache write inside tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))


def test_tinystories_offline_fails_fast(tmp_path, monkeypatch, hf_caches):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_DATASETS_OFFLINE=1 sets
    dm = DataModule(
        DataConfig(
            **OmegaConf.to_container(OmegaConf.load(CONF / "tinystories.yaml")), cache_dir=str(tmp_path / "cache")
        )
    )
    start = time.perf_counter()
    with pytest.raises(NCNConfigError, match=r"data.path=roneneldan/TinyStories is not in the local HF cache"):
        dm.prepare()
    assert time.perf_counter() - start < 5.0


def test_unreachable_hub_is_detected_without_offline_flag(tmp_path, monkeypatch, hf_caches):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    probed = []
    real_connect = socket.create_connection

    def recording_connect(addr, *args, **kwargs):
        probed.append(addr)
        return real_connect(addr, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording_connect)
    start = time.perf_counter()
    with pytest.raises(NCNConfigError, match=r"data.path=someone/some-dataset .*unreachable"):
        HubDataset(DataConfig(source="hf", path="someone/some-dataset")).fingerprint()
    assert probed == [("127.0.0.1", 9)] and time.perf_counter() - start < 5.0
    assert datasets.config.HF_HUB_OFFLINE is False  # offline mode was only switched on for the call


def test_hf_local_loader_with_its_own_validation_split(tmp_path, hf_caches):
    for split, n in (("train", 6), ("validation", 2)):
        rows = "\n".join(f'{{"story": "{split} story {i}: the end."}}' for i in range(n))
        (tmp_path / f"{split}.jsonl").write_text(rows + "\n", encoding="utf-8")
    files = {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "validation.jsonl")}
    dm = _dm(
        source="hf", path="json", data_files=files, val_split="validation", text_column="story", cache_dir=str(tmp_path)
    )
    info = dm.prepare()
    enc = gpt2_encoding()
    assert info.meta["split"]["rule"] == "source"
    assert (info.meta["split"]["train_documents"], info.meta["split"]["val_documents"]) == (6, 2)
    assert info.val_tokens == sum(len(enc.encode_ordinary(f"validation story {i}: the end.")) + 1 for i in range(2))
    assert info.cache_dir.name.startswith("hf-json-")
    with pytest.raises(NCNConfigError, match=r"data.text_column=text is not a column of json \(columns: story\)"):
        _dm(source="hf", path="json", data_files=files, cache_dir=str(tmp_path)).prepare()


# ---------------------------------------------------------------- configs and task=prepare


@pytest.mark.parametrize("option", ["shakespeare", "text_files", "tinystories", "hf"])
def test_yaml_options_share_keys_and_defaults(option, compose_config, monkeypatch, tmp_path):
    cfg = compose_config([f"data={option}"]).data
    assert cfg.source == ("shakespeare" if option == "shakespeare" else option.replace("tinystories", "hf"))
    assert (cfg.val_fraction, cfg.num_workers, cfg.pad_vocab_to, cfg.total_tokens) == (0.05, 0, 64, None)
    assert cfg.cache_dir is None and cfg.tokenizer == "gpt2"
    if option in ("text_files", "hf"):  # the path is the user's to give
        assert OmegaConf.is_missing(cfg, "path") or cfg.path is None
        with pytest.raises(NCNConfigError, match=f"data.source={option} needs data.path"):
            DataConfig(**{**OmegaConf.to_container(cfg), "path": None})
    else:
        assert DataConfig(**OmegaConf.to_container(cfg)).path == cfg.path
    monkeypatch.setenv("NCN_CACHE_DIR", str(tmp_path))  # cache_dir null: $NCN_CACHE_DIR, else ~/.cache/ncn
    assert _dm().cache_dir == tmp_path
    monkeypatch.delenv("NCN_CACHE_DIR")
    assert _dm().cache_dir == Path("~/.cache/ncn").expanduser()


def test_task_prepare_prints_the_summary(shakespeare_cache, capsys):
    dm, info = shakespeare_cache
    capsys.readouterr()
    assert prepare_task.main(RunConfig(data=DataConfig(cache_dir=str(dm.cache_dir))), RunContext.here()) is None
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("data shakespeare: 38 documents (36 train / 2 val), ")
    assert f"gpt2 tokens train {info.train_tokens:,} / val {info.val_tokens:,}" in line
    assert "5.0 MB text" in line and line.endswith(f"-> {info.cache_dir}")


# ---------------------------------------------------------------- paths with glob characters


GLOB_DOCS = {
    "notes[1].txt": "Notes, first of their kind, on brackets in names.\n" * 12,
    "a*b.txt": "A star between a and b, and this text inside.\n" * 9,
    "q?.txt": "Questions about question marks in file names?\n" * 7,
    "qa.txt": "Answers, in a file the pattern q? would also match.\n" * 5,
    "with space.txt": "Spaces in a name are nothing special.\n" * 11,
    "ünïcödé 日本.txt": "Non-ASCII names: café, naïve, 日本語.\n" * 8,
}


@pytest.fixture
def glob_corpus(tmp_path):
    """A corpus folder inside a folder named "[X]" whose file names hold glob characters, plus one empty file."""
    root = tmp_path / "[X]" / "corpus"
    root.mkdir(parents=True)
    for name, text in GLOB_DOCS.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    return root


def _n_tokens(text):
    return len(gpt2_encoding().encode_ordinary(text)) + 1


def test_text_files_folder_with_glob_characters(glob_corpus, tmp_path, capsys):
    dm = _dm(source="text_files", path=str(glob_corpus), cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    info = dm.prepare()
    split = info.meta["split"]
    assert (split["documents_found"], split["skipped_empty"]) == (7, 1)
    assert split["train_documents"] + split["val_documents"] == 6
    assert info.train_tokens + info.val_tokens == sum(_n_tokens(t) for t in GLOB_DOCS.values())
    assert info.val_tokens == sum(_n_tokens(GLOB_DOCS[n]) for n in split["val_names"])
    assert set(split["val_names"]) < set(GLOB_DOCS)
    assert info.meta["text_bytes"] == sum(len(t.encode()) for t in GLOB_DOCS.values())
    assert "6 documents (" in capsys.readouterr().out.splitlines()[-1] and "1 empty skipped" in info.summary()


def test_text_files_existing_paths_are_literal_and_missing_paths_are_globs(glob_corpus):
    assert TextFiles(str(glob_corpus / "q?.txt")).files == [glob_corpus / "q?.txt"]  # not qa.txt
    assert TextFiles(str(glob_corpus / "a*b.txt")).files == [glob_corpus / "a*b.txt"]
    assert TextFiles(str(glob_corpus / "notes[1].txt")).files == [glob_corpus / "notes[1].txt"]
    pattern = glob.escape(str(glob_corpus)) + "/q*.txt"
    assert TextFiles(pattern).files == [glob_corpus / "q?.txt", glob_corpus / "qa.txt"]
    assert len(TextFiles(str(glob_corpus.parent)).files) == 7  # the folder "[X]" itself, searched recursively
    unescaped = str(glob_corpus) + "/*.txt"  # "[X]" in a pattern is a character class: it matches a folder "X"
    with pytest.raises(NCNConfigError) as no_match:
        TextFiles(unescaped)
    assert str(no_match.value) == (
        f"data.path={unescaped} does not exist, and as a glob pattern it matches no .txt file: check the path "
        "(in a pattern, escape [ ] * ? of real names, e.g. [[]X] for a folder named [X])"
    )


def test_single_text_file_with_glob_characters(glob_corpus, tmp_path):
    info = _dm(source="text_files", path=str(glob_corpus / "q?.txt"), cache_dir=str(tmp_path / "cache")).prepare()
    assert info.meta["split"]["rule"] == "token_tail" and info.meta["split"]["documents_found"] == 1
    assert info.train_tokens + info.val_tokens == _n_tokens(GLOB_DOCS["q?.txt"])


def _jsonl(path, texts, column="text"):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({column: t}) + "\n" for t in texts), encoding="utf-8")


def test_hf_local_folder_with_glob_characters(tmp_path, hf_caches):
    folder = tmp_path / "[X] data*" / "set?"
    train = [f"training story {i}: the [end]." for i in range(5)]
    val = [f"validation story {i}." for i in range(2)]
    _jsonl(folder / "train.jsonl", train)
    _jsonl(folder / "validation.jsonl", val)
    dm = _dm(source="hf", path=str(folder), val_split="validation", cache_dir=str(tmp_path / "cache"))
    assert isinstance(dm.source, LocalDataset)
    info = dm.prepare()
    split = info.meta["split"]
    assert (split["rule"], split["train_documents"], split["val_documents"], split["documents_found"]) == (
        "source",
        5,
        2,
        7,
    )
    assert (info.train_tokens, info.val_tokens) == (sum(map(_n_tokens, train)), sum(map(_n_tokens, val)))
    assert split["val_document_tokens"] == [_n_tokens(t) for t in val]


def test_hf_json_data_files_with_glob_characters(tmp_path, hf_caches):
    texts = [f"row {i} of a file with brackets in its name" for i in range(4)]
    _jsonl(tmp_path / "[X]" / "train[1].jsonl", texts)
    _jsonl(tmp_path / "[X]" / "train1.jsonl", ["a file the pattern train[1] would match instead"])
    dm = _dm(
        source="hf",
        path="json",
        data_files={"train": str(tmp_path / "[X]" / "train[1].jsonl")},
        cache_dir=str(tmp_path / "cache"),
    )
    info = dm.prepare()
    assert info.meta["split"]["documents_found"] == 4
    assert info.train_tokens + info.val_tokens == sum(map(_n_tokens, texts))
    with pytest.raises(NCNConfigError, match=r"data.data_files entry .*missing\*.jsonl matches no file"):
        _dm(source="hf", path="json", data_files=str(tmp_path / "missing*.jsonl"), cache_dir=str(tmp_path))
    with pytest.raises(NCNConfigError, match=r"data.path=json is a loader that reads data.data_files"):
        _dm(source="hf", path="json", cache_dir=str(tmp_path))


# ---------------------------------------------------------------- local data edited in place


def _decoded(info):
    ids = np.concatenate([np.fromfile(info.cache_dir / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    return gpt2_encoding().decode([int(i) for i in ids if i != EOT_TOKEN])


@pytest.mark.parametrize("layout", ["folder", "json loader"])
def test_hf_local_edit_of_the_same_size_with_mtime_restored_is_rebuilt(tmp_path, hf_caches, layout):
    folder = tmp_path / "stories"
    _jsonl(folder / "train.jsonl", [f"story {i}: the cat sat on the mat." for i in range(6)])
    kwargs = {"path": str(folder)} if layout == "folder" else {"path": "json", "data_files": str(folder / "*.jsonl")}
    first = _dm(source="hf", cache_dir=str(tmp_path / "cache"), **kwargs).prepare()
    assert _decoded(first).count("cat") == 6
    file = folder / "train.jsonl"
    stat = file.stat()
    edited = file.read_text().replace("cat", "dog")
    assert len(edited) == stat.st_size
    file.write_text(edited)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p, tar -x or a checkout leave it
    assert (file.stat().st_size, file.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = _dm(source="hf", cache_dir=str(tmp_path / "cache"), **kwargs).prepare()
    assert not second.cache_hit and second.cache_dir != first.cache_dir
    text = _decoded(second)
    assert text.count("dog") == 6 and "cat" not in text
    assert (second.train_tokens, second.val_tokens) == (first.train_tokens, first.val_tokens)


def test_dataset_identity_uses_public_cache_files_or_content(tmp_path, hf_caches):
    # Hub splits are identified through `Dataset.cache_files` (public API): if datasets changes
    # what it returns, this test fails instead of the cache silently keying on nothing.
    _jsonl(tmp_path / "d.jsonl", ["one", "two", "three"])
    loaded = datasets.load_dataset(
        "json", data_files=str(tmp_path / "d.jsonl"), split="train", cache_dir=str(tmp_path / "hf")
    )
    kind, files, rows = dataset_identity(loaded, "text")
    assert (kind, rows) == ("arrow", 3) and files and all(f.endswith(".arrow") and Path(f).is_file() for f in files)
    again = datasets.load_dataset(
        "json", data_files=str(tmp_path / "d.jsonl"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert dataset_identity(again, "text") == ["arrow", files, 3]
    memory = dataset_identity(datasets.Dataset.from_dict({"text": ["one", "two", "three"]}), "text")
    assert memory[0] == "content" and memory[2] == 3
    assert dataset_identity(datasets.Dataset.from_dict({"text": ["one", "two", "thre3"]}), "text") != memory
    assert dataset_identity(datasets.Dataset.from_dict({"text": ["one", "two", None]}), "text") != memory


# ---------------------------------------------------------------- byte-level data and bits per byte


def test_shakespeare_bytes(shakespeare_cache):
    dm = _dm(tokenizer="bytes", cache_dir=str(shakespeare_cache[0].cache_dir))
    info = dm.prepare()
    gpt2 = shakespeare_cache[1]
    assert dm.vocab_size == 320 and info.cache_dir.name.startswith("shakespeare-bytes-")
    assert info.meta["split"]["val_names"] == gpt2.meta["split"]["val_names"]  # the same 2 plays held out
    assert (info.train_bytes, info.val_bytes) == (gpt2.train_bytes, gpt2.val_bytes)
    assert (info.train_tokens, info.val_tokens) == (info.train_bytes + 36, info.val_bytes + 2)
    x, _ = dm.val_batches(batch_size=2, block_size=64, max_batches=1)[0]
    assert int(x.max()) < 257 and bytes(x[0].tolist()).decode().startswith("The Taming of the Shrew")
    ce = 1.1
    assert dm.bits_per_byte(ce) == ce * info.val_tokens / (math.log(2) * info.val_bytes)
    assert gpt2.bits_per_byte(ce) == ce * 75_654 / (math.log(2) * gpt2.val_bytes)


def test_text_files_and_hf_with_bytes(glob_corpus, tmp_path, hf_caches):
    dm = _dm(source="text_files", tokenizer="bytes", path=str(glob_corpus), cache_dir=str(tmp_path / "cache"))
    info = dm.prepare()
    assert dm.vocab_size == 320 and dm.encoding.n_vocab == 257
    assert info.train_tokens + info.val_tokens == sum(len(t.encode()) + 1 for t in GLOB_DOCS.values())
    texts = [f"byte-level row {i}: ünï" for i in range(4)]
    _jsonl(tmp_path / "rows.jsonl", texts)
    hf = _dm(
        source="hf",
        tokenizer="bytes",
        path="json",
        data_files=str(tmp_path / "rows.jsonl"),
        cache_dir=str(tmp_path / "cache"),
    ).prepare()
    assert hf.cache_dir.name.startswith("hf-json-bytes-")
    assert hf.train_tokens + hf.val_tokens == sum(len(t.encode()) + 1 for t in texts)
    assert hf.val_tokens == hf.val_bytes + hf.meta["split"]["val_documents"]


# ---------------------------------------------------------------- splits too short for a block


def test_val_split_too_short_names_documents_and_fixes(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    (root / "a.txt").write_text("A short note.\n", encoding="utf-8")  # 6 tokens with EOS
    for name in ("b.txt", "c.txt", "d.txt"):
        (root / name).write_text(f"The long {name} document goes on and on.\n" * 30, encoding="utf-8")
    dm = _dm(source="text_files", path=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.02, split_seed=1)
    info = dm.prepare()
    assert info.meta["split"]["val_names"] == ["a.txt"] and info.val_tokens == 6  # the seed puts a.txt first
    with pytest.raises(NCNConfigError) as short:
        dm.val_batches(batch_size=1, block_size=64)
    assert str(short.value) == (
        f"data source {root}: the val split has 6 tokens ({info.cache_dir / 'val.bin'}; val documents: "
        "a.txt (6 tokens)), fewer than block_size + 1 = 65: set model.block_size=5 (or smaller) "
        "or data.val_fraction=0.18, or add text"
    )
    order = np.array(info.meta["split"]["order_tokens"])
    assert order[: val_prefix(order, 0.18)].sum() >= 65 and order[: val_prefix(order, 0.17)].sum() < 65
    fixed = _dm(source="text_files", path=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.18, split_seed=1)
    assert len(fixed.val_batches(batch_size=1, block_size=64)) >= 1


def test_warm_prepare_imports_no_torch_datasets_pyarrow(shakespeare_cache):
    dm, _ = shakespeare_cache
    code = (
        "import sys\nfrom ncn.config import DataConfig\nfrom ncn.data.loader import DataModule\n"
        f"info = DataModule(DataConfig(cache_dir={str(dm.cache_dir)!r})).prepare()\n"
        "print(info.cache_hit, sorted(m for m in ('torch', 'datasets', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.splitlines()[-1] == "True []"
