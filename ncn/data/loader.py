"""Training data (NCN paper §6): a token cache plus resumable, DDP-sharded block batches.

`DataModule(DataConfig)` prepares the token cache of a source and serves epochs of
non-overlapping `block_size + 1`-token blocks in a seeded per-epoch order; a labelled cache
(control=genre / labels) adds each input token's label id to every batch. torch is imported
only where batches are made, so `task=prepare` on a warm cache imports neither torch nor
`datasets` and builds no tokenizer.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ncn.config import ControlConfig, DataConfig, vocab_size
from ncn.data import token_cache
from ncn.data.sources import make_source
from ncn.data.token_cache import TOKEN_DTYPE, PreparedData
from ncn.data.tokenizer import get_encoding
from ncn.errors import NO_SPACE, DiskFullError, NCNConfigError, mb

# errors of a folder the user cannot write: a permission, a read-only filesystem, a file in the path
UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST})

if TYPE_CHECKING:
    import tiktoken
    import torch

    # (x, y) or, from a labelled cache, (x, y, labels): int64 (B, block_size) each.
    Batch = tuple[torch.Tensor, ...]


def _n_tokens(path: Path) -> int:
    return path.stat().st_size // np.dtype(TOKEN_DTYPE).itemsize


class _Blocks:
    """Rows of `block_size + 1` tokens of one token file (and of its label file, if given); a map-style
    dataset indexed by arrays of block ids."""

    def __init__(self, path: Path, block_size: int, labels: Path | None = None) -> None:
        self.path, self.width, self.labels = path, block_size + 1, labels
        self.n_blocks = _n_tokens(path) // self.width
        self._rows: np.ndarray | None = None
        self._label_rows: np.ndarray | None = None

    def __getstate__(self) -> dict:
        # Each DataLoader worker maps the file itself instead of receiving a pickled copy.
        return {**self.__dict__, "_rows": None, "_label_rows": None}

    def _map(self, path: Path) -> np.ndarray:
        tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        return tokens[: self.n_blocks * self.width].reshape(self.n_blocks, self.width)

    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = self._map(self.path)
        return self._rows

    def label_rows(self) -> np.ndarray:
        """(n_blocks, block_size + 1) label ids; only for a labelled file."""
        assert self.labels is not None
        if self._label_rows is None:
            self._label_rows = self._map(self.labels)
        return self._label_rows

    def __len__(self) -> int:
        return self.n_blocks

    def batch(self, ids: np.ndarray) -> Batch:
        """(x, y) int64 (B, T) of the blocks `ids`, plus the labels of x's tokens when labelled."""
        import torch

        rows = self.rows()[ids]  # (B, T+1) uint16
        x, y = torch.from_numpy(rows[:, :-1].astype(np.int64)), torch.from_numpy(rows[:, 1:].astype(np.int64))
        if self.labels is None:
            return x, y
        return x, y, torch.from_numpy(self.label_rows()[ids][:, :-1].astype(np.int64))

    def __getitem__(self, item: tuple[int, int, np.ndarray]) -> tuple:
        epoch, position, ids = item
        return (*self.batch(ids), epoch, position)


class BlockLoader:
    """Infinite iterator of training batches over the blocks of one token file.

    An epoch is a permutation of all `blocks_per_epoch` non-overlapping blocks of
    `block_size + 1` tokens, drawn from `np.random.default_rng((seed, epoch))`; each step
    consumes one global batch of `batch_size * world_size` consecutive entries of it, of
    which rank r takes entries [r * batch_size, (r + 1) * batch_size). The last incomplete
    global batch of an epoch is dropped. State: `epoch` and `position` (blocks of the
    permutation already yielded, counted over all ranks), so `load_state_dict` resumes at
    the exact next batch, also with another batch size. Call `iter()` again after it.

    Yields:
        (x, y): int64 CPU tensors (batch_size, block_size); y is x shifted by one token; with a
        `labels` file (x, y, labels), labels[b, t] the label id of token x[b, t].
    Raises:
        NCNConfigError: bad batch_size/rank/world_size, or fewer blocks than one global batch.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        block_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        labels: str | os.PathLike | None = None,
    ) -> None:
        if not (batch_size >= 1 and world_size >= 1 and 0 <= rank < world_size):
            raise NCNConfigError(
                f"batch_size={batch_size}, rank={rank}, world_size={world_size}: need batch_size >= 1 "
                "and 0 <= rank < world_size"
            )
        self.blocks = _Blocks(Path(path), block_size, None if labels is None else Path(labels))
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.blocks_per_epoch = self.blocks.n_blocks
        self.global_batch = batch_size * world_size
        if self.blocks_per_epoch < self.global_batch:
            raise NCNConfigError(
                f"{path}: the {self.blocks.path.stem} split has {self.blocks_per_epoch} blocks of block_size + 1 = "
                f"{block_size + 1} tokens, fewer than one global batch of batch_size * world_size = "
                f"{self.global_batch}: lower the batch size or block_size, or add text"
            )
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict[str, int]:
        """{"epoch": int, "position": int}: where the next batch starts."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict()`; the next `iter()` yields the batch that followed it."""
        if not 0 <= int(state["position"]) <= self.blocks_per_epoch:
            raise NCNConfigError(
                f"data loader position {state['position']} is outside the epoch of {self.blocks_per_epoch} blocks: "
                "the checkpoint was made with other data or another block_size"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of block ids of `epoch`, shape (blocks_per_epoch,)."""
        return np.random.default_rng((self.seed, epoch)).permutation(self.blocks_per_epoch)

    def _schedule(self, epoch: int, position: int) -> Iterator[tuple[int, int, np.ndarray]]:
        while True:
            order = self.order(epoch)
            while position + self.global_batch <= self.blocks_per_epoch:
                start = position + self.rank * self.batch_size
                position += self.global_batch
                yield epoch, position, order[start : start + self.batch_size]
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        import torch

        loader = torch.utils.data.DataLoader(
            self.blocks,
            sampler=self._schedule(self.epoch, self.position),
            batch_size=None,  # the schedule already yields whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        for *batch, epoch, position in loader:
            # The state advances only as batches are handed out, not as workers prefetch.
            self.epoch, self.position = epoch, position
            yield tuple(batch)


def _resolve_workers(num_workers: int | str) -> int:
    if num_workers == "auto":
        # Gathering blocks from a memory map is cheap: workers only pay off on larger hosts.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return 0 if cpus < 8 else min(4, cpus // 4)
    return num_workers


class DataModule:
    """A text source, its token cache, and the batches cut from it (`DataConfig`, NCN paper §6).

    Attributes:
        cfg: the data config. source: its `ncn.data.sources` source. cache_dir: parent of the
            token caches. num_workers: DataLoader workers. vocab_size: the tokenizer's ids
            padded to `cfg.pad_vocab_to` (gpt2 50304, bytes 320 with the default 64).
        encoding, pin_memory: built on first use (a tokenizer; torch's CUDA check).

    Raises:
        NCNConfigError: the source cannot be found (a missing path, no .txt files).
    """

    def __init__(self, cfg: DataConfig, control: ControlConfig | None = None) -> None:
        self.cfg = cfg
        self.control = control if control is not None else ControlConfig()
        self.source = make_source(cfg)
        if self.control.labelled and hasattr(self.source, "label_column"):
            self.source.label_column = self.control.column
        self.cache_dir = Path(cfg.cache_dir or os.environ.get("NCN_CACHE_DIR") or "~/.cache/ncn").expanduser()
        self.num_workers = _resolve_workers(cfg.num_workers)
        self.vocab_size = vocab_size(cfg.tokenizer, cfg.pad_vocab_to)
        self._prepared: PreparedData | None = None

    @functools.cached_property
    def encoding(self) -> tiktoken.Encoding:
        """The `tiktoken.Encoding` of `cfg.tokenizer` (the token cache does not need it when warm)."""
        return get_encoding(self.cfg.tokenizer)

    @functools.cached_property
    def pin_memory(self) -> bool:
        """`cfg.pin_memory`, with "auto" = CUDA is available."""
        if self.cfg.pin_memory != "auto":
            return bool(self.cfg.pin_memory)
        import torch

        return torch.cuda.is_available()

    def prepare(self, announce: bool = True) -> PreparedData:
        """Build or verify the token cache; print the one-line summary on first call when `announce`
        (False on every rank but 0 of a multi-process run, so the summary appears once).

        Raises:
            NCNConfigError: the source cannot be loaded, `total_tokens` disagrees with it, or the
                cache folder cannot be written (read-only, not a folder, no permission).
        """
        if self._prepared is None:
            num_proc = None if self.cfg.num_proc == "auto" else self.cfg.num_proc
            try:
                info = token_cache.prepare(
                    self.source,
                    self.cache_dir,
                    self.cfg.tokenizer,
                    self.cfg.val_fraction,
                    self.cfg.split_seed,
                    num_proc,
                    labels=self.labelling,
                )
            except OSError as exc:
                if exc.errno in NO_SPACE:
                    raise DiskFullError(
                        f"no space left in {self.cache_dir} for the token cache of {self.source.describe()} "
                        f"({mb(shutil.disk_usage(self.cache_dir).free)} free; the cache takes about 2 bytes per "
                        "token): free some space or point data.cache_dir=<folder on a disk with space> (or the "
                        "environment's NCN_CACHE_DIR) there"
                    ) from None
                if exc.errno not in UNWRITABLE:
                    raise
                raise NCNConfigError(
                    f"cannot write the token cache in {self.cache_dir} ({exc.strerror}: {exc.filename}): point "
                    "data.cache_dir=<writable folder> (or the environment's NCN_CACHE_DIR) at a folder you can write"
                ) from None
            counted = info.train_tokens + info.val_tokens
            if self.cfg.total_tokens is not None and self.cfg.total_tokens != counted:
                raise NCNConfigError(
                    f"data.total_tokens={self.cfg.total_tokens} does not match {info.cache_dir / 'meta.json'} "
                    f"(train {info.train_tokens} + val {info.val_tokens} = {counted} tokens): "
                    f"set data.total_tokens=null (tokens are counted for you) or {counted}"
                )
            if announce:
                print(info.summary(), flush=True)
            self._prepared = info
        return self._prepared

    @property
    def labelling(self) -> dict | None:
        """The token cache's labelling rule (`token_cache.prepare`'s `labels`), None without labels."""
        if not self.control.labelled:
            return None
        column = self.control.column if self.cfg.source == "hf" else None
        return {"kind": self.control.kind, "column": column}

    @property
    def label_names(self) -> list[str]:
        """The label vocabulary (id = index) of a labelled cache, [] without labels; prepares the cache."""
        return self.prepare().label_names if self.control.labelled else []

    def _label_file(self, split: str) -> Path | None:
        if not self.control.labelled:
            return None
        return self.prepare().cache_dir / token_cache.LABEL_FILES[split]

    def bits_per_byte(self, ce: float) -> float:
        """Bits per UTF-8 byte of val text for a val cross-entropy `ce` in nats per token.

        See `PreparedData.bits_per_byte`; prepares the cache if needed.
        """
        return self.prepare().bits_per_byte(ce)

    def _split_file(self, split: str, block_size: int) -> Path:
        info = self.prepare()
        path = info.cache_dir / f"{split}.bin"
        n = info.train_tokens if split == "train" else info.val_tokens
        if not (isinstance(block_size, int) and block_size >= 1):
            raise NCNConfigError(f"block_size={block_size!r} must be a positive integer")
        if n < block_size + 1:
            raise NCNConfigError(
                f"data source {self.source.describe()}: the {split} split has {n} tokens ({path}; "
                f"{_documents(info, split)}), fewer than block_size + 1 = {block_size + 1}: "
                f"{_fixes(info, block_size + 1)}"
            )
        return path

    def train_loader(
        self, batch_size: int, block_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> BlockLoader:
        """Training batches of this rank (see `BlockLoader`); prepares the cache if needed.

        Raises:
            NCNConfigError: the train or val split is shorter than block_size + 1 tokens,
                or the train split holds fewer blocks than one global batch.
        """
        self._split_file("val", block_size)  # fail now rather than at the first evaluation
        return BlockLoader(
            self._split_file("train", block_size),
            batch_size,
            block_size,
            seed,
            rank,
            world_size,
            self.num_workers,
            self.pin_memory,
            self._label_file("train"),
        )

    def val_batches(self, batch_size: int, block_size: int, max_batches: int | None = None) -> list[Batch]:
        """Fixed validation batches: the first blocks of the val split in order (labelled: `stratified_blocks`).

        Returns up to `max_batches` (all when None) pairs (x, y) of int64 tensors
        (batch_size, block_size), or triples (x, y, labels) from a labelled cache; the last one
        may hold fewer rows.
        """
        blocks = _Blocks(self._split_file("val", block_size), block_size, self._label_file("val"))
        n = blocks.n_blocks if max_batches is None else min(blocks.n_blocks, max_batches * batch_size)
        order = stratified_blocks(blocks.label_rows()[:, 0], n) if blocks.labels is not None else np.arange(n)
        return [blocks.batch(order[i : i + batch_size]) for i in range(0, n, batch_size)]

    def probe_labels(self, n_tokens: int) -> list[int]:
        """The label ids of `probe_tokens(n_tokens)` ([] without labels)."""
        path = self._label_file("val")
        return [] if path is None else np.memmap(path, dtype=TOKEN_DTYPE, mode="r")[:n_tokens].tolist()

    def probe_tokens(self, n_tokens: int) -> list[int]:
        """The first `n_tokens` token ids of the val split: a fixed probe prompt."""
        info = self.prepare()
        if not 1 <= n_tokens <= info.val_tokens:
            raise NCNConfigError(
                f"probe of {n_tokens} tokens: the val split has {info.val_tokens} tokens ({info.cache_dir})"
            )
        return np.memmap(info.cache_dir / "val.bin", dtype=TOKEN_DTYPE, mode="r")[:n_tokens].tolist()


def stratified_blocks(first_labels: np.ndarray, n: int) -> np.ndarray:
    """`n` block ids, taken round-robin over the labels (each label's blocks in file order).

    first_labels: the label id of each block's first token, shape (n_blocks,). Every label with
    a block gets one of the first `n_labels` picks, so a small eval budget still measures every
    label (the control matrix needs each row); ids come back sorted by pick, not by position.
    """
    queues = [np.flatnonzero(first_labels == label) for label in np.unique(first_labels)]
    picks = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    return np.asarray(picks[:n], dtype=np.int64)


def _documents(info: PreparedData, split: str) -> str:
    """The documents of `split`, for an error: the val ones with names and token counts where meta.json lists them."""
    m = info.meta["split"]
    if split == "train":
        return f"{m['train_documents']:,} train documents"
    if m["rule"] == "token_tail":
        return f"the last {info.val_tokens:,} tokens of {m.get('val_names', ['the only document'])[0]}"
    counts = m.get("val_document_tokens")
    if counts is None:
        return f"{m['val_documents']:,} val documents"
    names = m.get("val_names") or [f"#{i + 1}" for i in range(len(counts))]
    listed = [f"{name} ({count:,} tokens)" for name, count in zip(names[:5], counts[:5], strict=True)]
    more = f" and {len(counts) - 5:,} more" if len(counts) > 5 else ""
    return f"val documents: {', '.join(listed)}{more}"


def _fixes(info: PreparedData, need: int) -> str:
    """What makes both splits hold `need` = block_size + 1 tokens: a block size that fits, a val_fraction, more text."""
    fixes = []
    if min(info.train_tokens, info.val_tokens) >= 2:
        fixes.append(f"model.block_size={min(info.train_tokens, info.val_tokens) - 1} (or smaller)")
    if (fraction := info.val_fraction_for(need)) is not None:
        fixes.append(f"data.val_fraction={fraction}")
    return f"set {' or '.join(fixes)}, or add text" if fixes else "add text"
