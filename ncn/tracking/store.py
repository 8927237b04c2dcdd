"""Health of a sqlite MLflow store, checked before MLflow opens it, and its atomic creation.

MLflow would try to finish a half-done schema migration and fail half-way, or race parallel
jobs on a fresh file; so the file is read first (`usable_sqlite_tables`), refused with one line
naming the fix when it is a folder, not a database, or half-migrated (`broken_store`), and a
new store is built whole next to it and renamed into place (`create_sqlite_store`).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sqlite3
import tempfile
from pathlib import Path

from ncn.errors import NCNConfigError


def default_uri(launch_dir: Path) -> str:
    """The default store: `sqlite:////<launch dir>/mlflow.db` (absolute, four slashes)."""
    return f"sqlite:///{Path(launch_dir).absolute() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """File of a sqlite URI (`sqlite:///rel` is relative to the cwd, `sqlite:////abs` absolute)."""
    return Path(uri[len("sqlite:///") :]).absolute() if uri.startswith("sqlite:///") else None


def count_runs(db: Path) -> int | None:
    """Runs recorded in the sqlite store `db` (0 without a runs table yet; None: unreadable)."""
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return int(con.execute("SELECT count(*) FROM runs").fetchone()[0]) if "runs" in tables else 0
    except sqlite3.DatabaseError:
        return None


def usable_sqlite_tables(uri: str, db: Path) -> set[str]:
    """Table names of the sqlite store file `db` (empty: no file yet, or an empty one), read-only,
    before MLflow opens it: MLflow would try to finish a half-done migration and fail half-way.

    Raises:
        NCNConfigError: `db` is a folder, not a sqlite database, unreadable, or left half-migrated
            (a `_alembic_tmp_*` table: an interrupted schema migration).
    """
    if db.is_dir():
        raise NCNConfigError(
            f"tracking.uri={uri} names a folder, not a store file: point tracking.uri at a file in it "
            f"(sqlite:///{db / 'mlflow.db'})"
        )
    if not db.exists():
        return set()
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise NCNConfigError(
                f"tracking.uri={uri} is not an MLflow store ({exc}): point tracking.uri at a new file "
                f"(e.g. sqlite:///{db.parent / 'mlflow.db'}) or move {db} away"
            ) from None
        raise NCNConfigError(f"tracking.uri={uri} cannot be read ({exc}): check the file's permissions") from None
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftovers:
        raise broken_store(uri, db, f"an interrupted migration left table {leftovers[0]}")
    return tables


def broken_store(uri: str, db: Path, why: str) -> NCNConfigError:
    """The error for an existing sqlite store MLflow cannot open; its fix depends on whether it holds runs."""
    runs = count_runs(db)
    path = shlex.quote(str(db))
    if runs == 0:
        return NCNConfigError(
            f"tracking.uri={uri} is a half-created MLflow store with no runs ({why}): delete it (rm {path}) and rerun"
        )
    held = f" and holds {runs} runs" if runs is not None else ""
    return NCNConfigError(
        f"tracking.uri={uri} cannot be opened ({why}){held}: restore it from a backup, "
        f"or move it away (mv {path} {shlex.quote(str(db) + '.broken')}) to start a new store"
    )


def deleted_experiment(uri: str, name: str, experiment_id: str) -> NCNConfigError:
    return NCNConfigError(
        f"experiment {name} (id {experiment_id}) is deleted in {uri}: restore it "
        f"(MLFLOW_TRACKING_URI={shlex.quote(uri)} mlflow experiments restore --experiment-id {experiment_id}) "
        "or use tracking.experiment=<new name>"
    )


def create_sqlite_store(db: Path) -> None:
    """Create the MLflow schema in a new sqlite file `db`, whole or not at all.

    MLflow migrates a new store in ~50 steps; an interrupt in between leaves a file every later
    run rejects. So the schema is built in `<db>.creating` next to it (the caller holds the
    store's file lock) and moved into place with `os.replace`, which is atomic.
    """
    from mlflow import MlflowClient

    tmp = db.with_name(db.name + ".creating")
    # MLflow puts the Default experiment's artifacts under <cwd>/mlruns and writes that path into
    # raw SQL with repr(): a path holding both ' and " breaks it. Next to the store, if it can.
    where = db.parent if not {"'", '"'} <= set(str(db.parent)) else Path(tempfile.gettempdir())
    cwd = os.getcwd()
    try:
        tmp.unlink(missing_ok=True)  # left by a process killed while creating (we hold the lock)
        os.chdir(where)
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
        os.replace(tmp, db)
    finally:
        os.chdir(cwd)
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + "-journal").unlink(missing_ok=True)
