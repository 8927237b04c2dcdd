"""One `error:` line per failure (docs/errors.md): no Hydra report above it, clean warnings, unknown options.

A failed single run prints only ncn's `error:` line; a failed sweep job adds Hydra's one line naming
the job ("Error executing job with overrides: [...]", once) and the sweep's account. A config group
option that does not exist is one line naming the value and the options. A warning is one
`warning: <message>` line (a task's real warning: tests/test_cli_errors.py, the cropped prompt).
Run: python -m pytest -q tests/test_error_lines.py (~1 min).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest

from ncn import cli
from ncn.errors import show_warning

from conftest import REPO, run_cli

HYDRA_LINE = "Error executing job with overrides"
MISSING = "checkpoint=/nonexistent/x: no checkpoint folder, run name or MLflow run id matches this path"


def _lines(stderr: str, start: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(start)]


@pytest.mark.parametrize("multirun", [False, True], ids=["single", "multirun"])
def test_a_job_with_a_bad_checkpoint_prints_its_error_once(
    tmp_path: Path, _mlflow_template: Path, multirun: bool
) -> None:
    store = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template, store)
    args = ["task=eval", "checkpoint=/nonexistent/x", f"tracking.uri=sqlite:///{store}"]
    if multirun:
        args = ["-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    else:
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = _lines(done.stderr, "error: ")
    assert "Traceback" not in done.stderr
    if not multirun:  # the command itself identifies the job
        assert _lines(done.stderr, HYDRA_LINE) == []
        assert len(errors) == 1 and errors[0].startswith(f"error: {MISSING}")
        assert done.stderr.strip().splitlines()[-1] == errors[0]
        return
    # the job's identification once (it was printed once per reader of the job's result), its error, the account
    hydra_lines = _lines(done.stderr, HYDRA_LINE)
    assert len(hydra_lines) == 1 and hydra_lines[0].startswith(
        f"{HYDRA_LINE}: ['task=eval', 'checkpoint=/nonexistent/x',"
    )
    assert len(errors) == 2 and errors[0].startswith(f"error: {MISSING}")
    assert errors[1].startswith(f"error: 1 of 1 jobs failed (job 0: usage error (exit 2), CheckpointError: {MISSING}")


@pytest.mark.parametrize("multirun", [False, True], ids=["single", "multirun"])
def test_a_training_job_that_fails_prints_its_error_once(tmp_path: Path, multirun: bool) -> None:
    """A config error raised inside the job (the typed config's check) and a divergence (exit 3)."""
    args = ["model=tiny", "trainer=smoke", "tracking=none"]
    if multirun:
        done = run_cli(["-m", *args, "trainer.skip_nonfinite=-1", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
        assert done.returncode == 2, done.stderr[-3000:]
        assert _lines(done.stderr, HYDRA_LINE) == [
            f"{HYDRA_LINE}: ['model=tiny', 'trainer=smoke', 'tracking=none', 'trainer.skip_nonfinite=-1']"
        ]
        assert _lines(done.stderr, "error: ") == [
            "error: trainer.skip_nonfinite=-1 must be >= 0: e.g. trainer.skip_nonfinite=0"
        ]
        return
    done = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, faults=["--nan-steps", "2"])
    assert done.returncode == 3, done.stderr[-3000:]
    assert _lines(done.stderr, HYDRA_LINE) == []
    errors = _lines(done.stderr, "error: ")
    assert len(errors) == 1 and errors[0].startswith("error: non-finite loss or gradient at step 2: training diverged")
    assert done.stderr.strip().splitlines()[-1] == errors[0]


def _options(group: str) -> str:
    """The options of an app group, as its folder under conf/ holds them, sorted."""
    return ", ".join(sorted(f.stem for f in (REPO / "conf" / group).glob("*.yaml")))


OPTIONS = {
    "ncn": _options("ncn"),
    "model": _options("model"),
    "control": _options("control"),
    "hydra/launcher": "basic, joblib, slurm, submitit_local, submitit_slurm",  # Hydra's, its plugins' and ours
}


@pytest.mark.parametrize("group", sorted(OPTIONS))
def test_an_unknown_group_option_is_one_line_with_the_options(tmp_path: Path, group: str) -> None:
    done = run_cli([f"{group}=nonexistent", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {group}=nonexistent is not an option of {group}: check the spelling, valid options are "
        f"{OPTIONS[group]}"
    ]
    assert not (tmp_path / "run").exists()


def test_an_unknown_option_in_a_config_file_names_the_file() -> None:
    hydra_message = "In 'experiment/mine': Could not find 'model/tiniest'"
    assert cli.unknown_option("model/tiniest", ["small", "tiny"], hydra_message) == (
        "model=tiniest is not an option of model (named in experiment/mine): check the spelling, "
        "valid options are small, tiny"
    )
    assert cli.unknown_option("model/tiniest", ["tiny"], "In 'config': Could not find 'model/tiniest'") == (
        "model=tiniest is not an option of model: check the spelling, valid options are tiny"
    )


def test_a_warning_is_one_clean_line(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show_warning
        warnings.warn("checkpoint=latest names 2 runs:\n  using the newest", stacklevel=1)
        warnings.warn("an old argument", FutureWarning, stacklevel=1)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "warning: checkpoint=latest names 2 runs: using the newest"
    assert err[1].startswith("warning: an old argument (FutureWarning, tests/test_error_lines.py:")
    assert len(err) == 2
