"""Labels travel with the tokens (control=genre / control=labels): the labelled token cache and its loaders.

Per-token label files beside the ids, the label vocabulary in meta.json, a cache key that changes with
labelling, a stratified split (every label has val tokens), and labels from every loader path (shuffled,
resumed, DDP-sharded) and the stratified val batches. Byte-level tokens, temporary folders; a few seconds.
`python -m pytest -q tests/test_control_data.py`.
"""

import json

import numpy as np
import pytest

from ncn.config import ControlConfig, DataConfig
from ncn.data import token_cache
from ncn.data.loader import BlockLoader, DataModule, stratified_blocks
from ncn.data.sources import Shakespeare, TextFiles
from ncn.errors import NCNConfigError

GENRES = ["comedies", "histories", "problems", "roman", "romances", "tragedies"]
# label folder -> files; byte tokens: every document is len(text) + 1 (end-of-text) tokens
TEXTS = {
    "alpha/a1.txt": "a" * 300,
    "alpha/a2.txt": "b" * 200,
    "alpha/a3.txt": "c" * 250,
    "beta/b1.txt": "x" * 280,
    "beta/b2.txt": "y" * 220,
}


@pytest.fixture
def labelled_folder(tmp_path):
    root = tmp_path / "texts"
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _prepare(root, cache, labels=True, **kw):
    rule = {"kind": "labels", "column": None} if labels else None
    return token_cache.prepare(TextFiles(str(root)), cache, "bytes", val_fraction=0.3, labels=rule, **kw)


def test_every_token_carries_its_documents_label_across_boundaries(labelled_folder, tmp_path):
    info = _prepare(labelled_folder, tmp_path / "cache")
    assert info.label_names == ["alpha", "beta"]
    val_names = set(info.meta["split"]["val_names"])
    for split in ("train", "val"):
        ids = np.fromfile(info.cache_dir / f"{split}.bin", dtype=np.uint16)
        labels = np.fromfile(info.cache_dir / token_cache.LABEL_FILES[split], dtype=np.uint16)
        docs = [n for n in sorted(TEXTS) if (n in val_names) == (split == "val")]
        expected = np.concatenate([np.full(len(TEXTS[n]) + 1, n.startswith("beta")) for n in docs])
        assert labels.shape == ids.shape
        assert np.array_equal(labels, expected)
        meta_counts = info.meta["labels"][f"{split}_tokens"]
        assert meta_counts == [int((expected == 0).sum()), int((expected == 1).sum())]
    # a block that spans a document boundary: each token keeps its own document's label
    train_docs = [n for n in sorted(TEXTS) if n not in val_names]
    boundary = len(TEXTS[train_docs[0]]) + 1
    loader = BlockLoader(info.cache_dir / "train.bin", 1, 63, seed=0, labels=info.cache_dir / "train_labels.bin")
    block = (boundary - 5) // 64  # the 64-token row holding the boundary
    x, y, lab = loader.blocks.batch(np.array([block]))
    start = block * 64
    truth = np.concatenate([np.full(len(TEXTS[n]) + 1, n.startswith("beta")) for n in train_docs])
    assert lab[0].tolist() == truth[start : start + 63].tolist()
    if train_docs[0].startswith("alpha") and train_docs[1].startswith("beta"):
        assert len(set(lab[0].tolist())) == 2


def test_stratified_split_gives_every_label_val_tokens(labelled_folder, tmp_path):
    info = _prepare(labelled_folder, tmp_path / "cache")
    val = set(info.meta["split"]["val_names"])
    assert {n.split("/")[0] for n in val} == {"alpha", "beta"}  # one document of each label, not of one only
    assert all(n > 0 for n in info.meta["labels"]["val_tokens"])


def test_cache_key_changes_with_labelling(labelled_folder, tmp_path):
    plain = _prepare(labelled_folder, tmp_path / "cache", labels=False)
    labelled = _prepare(labelled_folder, tmp_path / "cache")
    assert plain.meta["fingerprint"] != labelled.meta["fingerprint"]
    assert plain.cache_dir != labelled.cache_dir
    assert sorted(p.name for p in plain.cache_dir.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert "labels" not in plain.meta and plain.label_names == []
    assert sorted(p.name for p in labelled.cache_dir.iterdir()) == [
        "meta.json",
        "train.bin",
        "train_labels.bin",
        "val.bin",
        "val_labels.bin",
    ]
    assert _prepare(labelled_folder, tmp_path / "cache").cache_hit


def test_damaged_label_file_is_rebuilt(labelled_folder, tmp_path, capsys):
    info = _prepare(labelled_folder, tmp_path / "cache")
    (info.cache_dir / "val_labels.bin").write_bytes(b"\0")
    again = _prepare(labelled_folder, tmp_path / "cache")
    assert not again.cache_hit
    assert "val_labels.bin holds 1 bytes" in capsys.readouterr().out


def test_label_with_one_document_is_refused(labelled_folder, tmp_path):
    (labelled_folder / "gamma").mkdir()
    (labelled_folder / "gamma" / "g.txt").write_text("g" * 100)
    with pytest.raises(NCNConfigError, match="label 'gamma' has 1 non-empty document"):
        _prepare(labelled_folder, tmp_path / "cache")


def test_file_outside_a_label_folder_is_refused(labelled_folder, tmp_path):
    (labelled_folder / "loose.txt").write_text("z" * 100)
    with pytest.raises(NCNConfigError, match="lies directly in data.path"):
        _prepare(labelled_folder, tmp_path / "cache")


def test_genre_labels_of_the_embedded_corpus(tmp_path):
    info = token_cache.prepare(Shakespeare(), tmp_path, "bytes", labels={"kind": "genre", "column": None})
    assert info.label_names == GENRES
    labels = info.meta["labels"]
    assert all(n > 0 for n in labels["val_tokens"]) and all(n > 0 for n in labels["train_tokens"])
    assert sum(labels["train_tokens"]) == info.train_tokens and sum(labels["val_tokens"]) == info.val_tokens
    assert {n.split("/")[0] for n in info.meta["split"]["val_names"]} == set(GENRES)
    meta = json.loads((info.cache_dir / "meta.json").read_text())
    assert meta["split"]["labels"] == {"kind": "genre", "column": None}


@pytest.fixture
def numbered(tmp_path):
    """tokens[i] = i, labels[i] = (i // 10) % 3: a batch's labels follow from its token ids."""
    n = 4000
    np.arange(n, dtype=np.uint16).tofile(tmp_path / "train.bin")
    ((np.arange(n) // 10) % 3).astype(np.uint16).tofile(tmp_path / "labels.bin")
    return tmp_path / "train.bin", tmp_path / "labels.bin"


def _check(batch):
    x, y, labels = batch
    assert labels.shape == x.shape
    assert labels.tolist() == ((x // 10) % 3).tolist()


def test_every_loader_path_yields_matching_labels(numbered):
    tokens, labels = numbered
    shuffled = BlockLoader(tokens, 4, 15, seed=3, labels=labels)
    it = iter(shuffled)
    reference = [next(it) for _ in range(12)]
    for batch in reference:
        _check(batch)
    # resumed after 5 batches: the same batches, labels included
    first = BlockLoader(tokens, 4, 15, seed=3, labels=labels)
    it = iter(first)
    for _ in range(5):
        next(it)
    resumed = BlockLoader(tokens, 4, 15, seed=3, labels=labels)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    for ref in reference[5:]:
        got = next(it)
        assert all(a.equal(b) for a, b in zip(got, ref, strict=True))
    # DDP: two ranks of 2 rows each make the single-rank batch of 4
    whole = next(iter(BlockLoader(tokens, 4, 15, seed=3, labels=labels)))
    ranks = [next(iter(BlockLoader(tokens, 2, 15, seed=3, rank=r, world_size=2, labels=labels))) for r in (0, 1)]
    for part in ranks:
        _check(part)
    assert np.array_equal(np.concatenate([r[2].numpy() for r in ranks]), whole[2].numpy())
    # workers
    worker = next(iter(BlockLoader(tokens, 4, 15, seed=3, labels=labels, num_workers=1)))
    assert all(a.equal(b) for a, b in zip(worker, reference[0], strict=True))


def test_stratified_blocks_take_turns_over_labels():
    first = np.array([0, 0, 0, 0, 1, 2, 2, 1])
    assert stratified_blocks(first, 5).tolist() == [0, 4, 5, 1, 7]
    assert stratified_blocks(first, 8).tolist() == [0, 4, 5, 1, 7, 6, 2, 3]


def test_data_module_val_batches_cover_every_label(labelled_folder, tmp_path):
    cfg = DataConfig(source="text_files", tokenizer="bytes", path=str(labelled_folder), val_fraction=0.3)
    cfg.cache_dir = str(tmp_path / "cache")
    data = DataModule(cfg, ControlConfig(kind="labels", route="ncn"))
    assert data.label_names == ["alpha", "beta"]
    batches = data.val_batches(2, 31, max_batches=1)
    x, y, labels = batches[0]
    assert sorted({int(row[0]) for row in labels}) == [0, 1]  # the first batch holds both labels
    plain = DataModule(cfg)
    assert len(plain.val_batches(2, 31, max_batches=1)[0]) == 2  # unlabelled: (x, y) as before
    first_val = sorted(data.prepare().meta["split"]["val_names"])[0]  # val.bin is in document order
    assert data.probe_labels(4) == [int(first_val.startswith("beta"))] * 4
