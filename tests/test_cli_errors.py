"""The bad-input table (docs/errors.md): every user mistake ends in one clear line and loses nothing.

Each case runs `python run.py ...` in a subprocess with its own MLflow sqlite store, token cache
and output dir, then checks the exit status (2), that stderr's last line names the problem and the
fix, and that nothing was lost or left half-made: no MLflow run (so none left RUNNING), no partial
token cache, no checkpoint folder. Run: python -m pytest -q tests/test_cli_errors.py (~2 min).
"""

from __future__ import annotations

import errno
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from conftest import REPO, run_cli, time_left
from tiny_checkpoint import TinyRun, tiny_run

WORDS = [
    "the",
    "king",
    "queen",
    "lord",
    "speak",
    "night",
    "day",
    "love",
    "death",
    "crown",
    "sword",
    "heart",
    "blood",
    "fair",
    "foul",
]
TRAIN = ["model=tiny", "trainer=smoke"]


@dataclass(frozen=True)
class Case:
    """One row of the table: overrides (`{name}` = a path of the `paths` fixture) and the
    substrings stderr's last line must hold (the problem, then the fix)."""

    id: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    data: str = "{corpus}"  # data.path of the text_files source (training cases); "" = not set
    uri: str = "{store}"  # tracking.uri


CASES = [
    Case(
        "shape",
        ("model.d_model=100", "model.n_head=3"),
        ("model.d_model=100 is not divisible by model.n_head=3", "choose d_model as a multiple of n_head"),
    ),
    Case(
        "unknown_ncn_option",
        ("ncn=bogus",),
        ("ncn=bogus is not an option of ncn: check the spelling, valid options are activation_only, full,",),
    ),
    Case(
        "unknown_target",
        ("ncn.targets=[temperature,bogus]",),
        ("ncn.targets contains unknown target 'bogus'", "choose from temperature, gain, activation"),
    ),
    Case(
        "block_size_too_large",
        ("model.block_size=4096",),
        (
            "the val split has 602 tokens",
            "val documents: doc3.txt (602 tokens)",
            "fewer than block_size + 1 = 4097",
            "set model.block_size=601 (or smaller), or add text",
        ),
    ),
    Case(
        "empty_data_dir",
        (),
        ("data.path={empty} contains no .txt files", "point data.path at a folder"),
        data="{empty}",
    ),
    Case(
        "not_utf8",
        (),
        ("{latin1}/play.txt is not UTF-8 (byte 3", "re-encode it (e.g. iconv -f LATIN1 -t UTF-8 "),
        data="{latin1}",
    ),
    Case(
        "shorter_than_one_block",
        (),
        ("the val split has 1 tokens", "the last 1 tokens of a.txt", "fewer than block_size + 1 = 33: add text"),
        data="{short}",
    ),
    Case("lr_zero", ("optim.lr=0",), ("optim.lr=0.0 must be > 0", "use e.g. optim.lr=6e-4")),
    Case("lr_negative", ("optim.lr=-1e-3",), ("optim.lr=-0.001 must be > 0", "use e.g. optim.lr=6e-4")),
    Case(
        "fp16_on_cpu",
        ("trainer.precision=fp16",),
        ("trainer.precision=fp16 needs a CUDA GPU", "use trainer.precision=bf16 or fp32 on CPU"),
    ),
    Case(
        "resume_without_checkpoint",
        ("trainer.resume=latest",),
        ("no checkpoint found under {tmp}/outputs or {tmp}/multirun", "train first"),
    ),
    Case(
        "resume_incompatible_model",
        ("trainer.resume={checkpoint}", "model.d_model=64"),
        (
            "model.d_model=64 differs from the checkpoint's model.d_model=32 ({checkpoint})",
            "a resume continues the checkpoint's model, ncn and data settings; drop the override",
        ),
    ),
    Case(
        "resume_other_ncn_option",
        ("trainer.resume={checkpoint}", "ncn=temperature_only"),
        (
            "ncn.targets=['temperature'] differs from the checkpoint's "
            "ncn.targets=['temperature', 'gain', 'activation']",
            "drop the override",
        ),
    ),
    Case(
        "generate_with_model_override",
        ("task=generate", "checkpoint={checkpoint}", "model.d_model=64"),
        (
            "model.d_model cannot be set together with checkpoint=",
            "a checkpoint carries its own model, ncn and control settings",
            "drop the override",
        ),
    ),
    Case(
        "eval_with_ncn_option",
        ("task=eval", "checkpoint={checkpoint}", "ncn=gain_only"),
        ("ncn cannot be set together with checkpoint=", "drop the override"),
    ),
    Case(
        "mlflow_unreachable",
        (),
        ("tracking.uri=http://127.0.0.1:9 is unreachable", "start the server", "or use tracking=none"),
        uri="http://127.0.0.1:9",
    ),
    Case(
        "mlflow_folder_missing",
        (),
        ("folder {tmp}/nowhere does not exist", "create it or point tracking.uri"),
        uri="sqlite:///{tmp}/nowhere/mlflow.db",
    ),
    Case(
        "output_dir_unwritable",
        ("hydra.run.dir={blocker}/run",),
        ("cannot write {blocker}/run (Not a directory)", "hydra.run.dir=<writable folder>"),
    ),
    Case(
        "num_workers_negative",
        ("data.num_workers=-3",),
        ("data.num_workers=-3 must be an integer >= 0 or 'auto'", "e.g. data.num_workers=0"),
    ),
    Case(
        "unknown_key",
        ("trainer.max_step=10",),
        ("trainer.max_step is not a setting", "check the spelling", "max_steps, epochs, max_tokens"),
    ),
    Case(
        "wrong_type",
        ("trainer.batch_size=many",),
        ("trainer.batch_size=many is invalid", "could not be converted to Integer", "trainer.batch_size=4"),
    ),
    Case(
        "no_step_bound",
        ("trainer.max_steps=null",),
        ("trainer.max_steps, trainer.epochs and trainer.max_tokens are all null", "trainer.max_steps=300"),
    ),
    Case("unknown_task", ("task=fit",), ("task=fit is unknown", "choose one of train, prepare, generate")),
    Case(
        "reference_log_missing",
        ("task=report", "reference_log={tmp}/nope.log"),
        ("reference_log={tmp}/nope.log is not a file", "pass the path of the reference's training.log"),
    ),
    Case(
        "reference_log_not_a_log",
        ("task=report", "reference_log={blocker}"),
        ("no 'Step: N ... Loss: x' line", "pass the reference's training.log"),
    ),
    Case("seed_not_int", ("seed=abc",), ("seed=abc is invalid", "could not be converted to Integer", "seed=0")),
    Case(
        "max_new_tokens_not_int",
        ("task=generate", "checkpoint={checkpoint}", "max_new_tokens=abc"),
        ("max_new_tokens=abc is invalid", "use a value like max_new_tokens=200"),
    ),
    Case(
        "data_path_missing",
        (),
        ("data.source=text_files needs data.path", "set data.path=<folder|glob|file> of .txt files"),
        data="",
    ),
    Case(
        "prompt_unquoted",
        ("task=generate", "checkpoint={checkpoint}", "prompt=To", "be,", "or", "not"),
        (
            "cannot parse the override prompt=To be, or not (unquoted, the shell split it into words at its spaces)",
            "quote its value, e.g. \"prompt='To be, or not'\"",
        ),
    ),
    Case(
        "checkpoint_path_with_equals",
        ("task=generate", "checkpoint=/runs/x/step=5"),
        (
            "cannot parse the override checkpoint=/runs/x/step=5 (mismatched input '=' expecting <EOF>)",
            "quote its value, e.g. \"checkpoint='/runs/x/step=5'\"",
        ),
    ),
    Case(
        "resume_missing_folder",
        ("trainer.resume={tmp}/nowhere",),
        (
            "trainer.resume={tmp}/nowhere: no checkpoint folder, run name or MLflow run id matches",
            "pass trainer.resume=latest, trainer.resume=best, a run name, or an existing checkpoint folder",
        ),
    ),
    Case(
        "empty_targets_of_ncn_option",
        ("ncn=full", "ncn.targets=[]"),
        (
            "ncn.targets=[] builds the plain Transformer",
            "use ncn=none (the baseline option) instead of emptying ncn=full's targets",
        ),
    ),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, _mlflow_template: Path) -> TinyRun:
    return tiny_run(tmp_path_factory, _mlflow_template)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Text folders: a small valid corpus (4 files, ~3k tokens), an empty one, a Latin-1 file, 2 words."""
    base = tmp_path_factory.mktemp("corpora")
    rng = random.Random(0)
    for name in ("corpus", "empty", "latin1", "short"):
        (base / name).mkdir()
    for i in range(4):
        (base / "corpus" / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(600)) + "\n")
    (base / "latin1" / "play.txt").write_bytes("Caf\u00e9 of the king\n".encode("latin-1"))
    (base / "short" / "a.txt").write_text("hello world\n")
    return {name: base / name for name in ("corpus", "empty", "latin1", "short")}


def assert_nothing_lost(tmp: Path, store: Path, cache: Path | None = None) -> None:
    """No MLflow run at all in `store` (so none RUNNING), no checkpoint folder under `tmp`, and in
    `cache` (when given) only complete token caches, no half-built `.tmp-*` folder."""
    client = MlflowClient(f"sqlite:///{store}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []
    assert list(tmp.glob("**/checkpoints")) == []
    if cache is not None and cache.exists():
        assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")] == []
        for built in (p for p in cache.iterdir() if p.is_dir()):
            assert {p.name for p in built.iterdir()} == {"meta.json", "train.bin", "val.bin"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_one_clear_line(
    case: Case, tmp_path: Path, corpora: dict[str, Path], trained: TinyRun, _mlflow_template: Path
) -> None:
    if case.id == "fp16_on_cpu" and torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    store, cache, blocker = tmp_path / "mlflow.db", tmp_path / "cache", tmp_path / "blocker"
    shutil.copyfile(_mlflow_template, store)
    blocker.write_text("a file where a folder is expected\n")
    paths = {
        **{k: str(v) for k, v in corpora.items()},
        "tmp": str(tmp_path),
        "store": f"sqlite:///{store}",
        "blocker": str(blocker),
        "checkpoint": str(trained.checkpoint),
    }
    args = [a.format(**paths) for a in case.args]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'outputs' / 'run'}")
    if not any(a.startswith("task=") for a in args):
        args += [*TRAIN, "data=text_files", *([f"data.path={case.data.format(**paths)}"] if case.data else [])]
    args.append(f"tracking.uri={case.uri.format(**paths)}")

    started = time.monotonic()
    done = run_cli(args, cwd=tmp_path, env={"NCN_CACHE_DIR": str(cache)})
    seconds = time.monotonic() - started

    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for part in case.expect:
        assert part.format(**paths) in last, f"{part!r} not in {last!r}"
    assert "Traceback" not in done.stderr
    assert_nothing_lost(tmp_path, store, cache)
    if case.id.startswith("mlflow_") or case.id == "data_path_missing":  # fails fast: before the token cache
        assert not cache.exists() and seconds < 60


@pytest.mark.parametrize(
    "value",
    [
        "/runs/x/step=5",
        "To be, or not",
        "#1 hit",
        "it's",
        'say "hi", then go',
        "a=b, c#d 'e'",
        "naïve café — ünïcode",
        "$HOME and `cmd`!",
    ],
)
def test_a_rejected_override_suggests_a_quoting_that_works(tmp_path: Path, value: str) -> None:
    """The suggestion, pasted into bash, reaches the config as exactly the value that was meant."""
    from ncn.cli import shell_quote_override

    suggestion = shell_quote_override(f"prompt={value}")
    shown = subprocess.run(
        ["bash", "-c", f"{shlex.quote(sys.executable)} {REPO / 'run.py'} --cfg job {suggestion}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=time_left(),
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert yaml.safe_load(shown.stdout)["prompt"] == value


def test_generate_crops_a_prompt_longer_than_block_size(tmp_path: Path, trained: TinyRun) -> None:
    """Documented behaviour (docs/errors.md): not an error; the last block_size tokens are used, with a warning."""
    prompt = " ".join(["king"] * 50)  # 50 tokens > block_size 32 of model=tiny
    done = run_cli(
        [
            "task=generate",
            f"checkpoint={trained.checkpoint}",
            f"prompt='{prompt}'",
            "max_new_tokens=4",
            "temperature=0",
            f"hydra.run.dir={tmp_path / 'gen'}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    warned = [line for line in done.stderr.splitlines() if "prompt of 50 tokens" in line]
    assert warned == ["warning: prompt of 50 tokens is longer than block_size=32: using its last 32 tokens"]
    assert "UserWarning" not in done.stderr and "warnings.warn(" not in done.stderr
    assert done.stdout.startswith(prompt)  # the whole prompt is still echoed
    assert done.stderr.strip().splitlines()[-1].startswith("4 tokens in ")


def test_an_os_error_on_a_written_file_is_one_line_that_names_the_cause(tmp_path: Path) -> None:
    """run.py's line for an OSError with a path: a full disk or spent quota names the file, its folder's
    free space and hydra.run.dir; any other error names the file and the system's reason."""
    from ncn.cli import os_error_line

    target = tmp_path / "run" / "metrics.json"  # its folder does not exist: the free space is its parent's
    for code in (errno.ENOSPC, errno.EDQUOT):
        line = os_error_line(OSError(code, os.strerror(code), str(target)))
        assert re.fullmatch(
            rf"no space left to write {re.escape(str(target))} \([\d,.]+ MB free in {re.escape(str(tmp_path))}\): "
            r"free some space or set hydra.run.dir=<folder on a disk with space>",
            line,
        ), line
    assert os_error_line(OSError(errno.EACCES, "Permission denied", str(target))) == (
        f"cannot write {target} (Permission denied): check the path and its permissions "
        "(e.g. hydra.run.dir=<writable folder>)"
    )
