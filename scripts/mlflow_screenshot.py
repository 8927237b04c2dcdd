"""Screenshot of a sweep's runs in the MLflow UI's runs table, and an end-to-end check that the table
renders them with the columns people compare (`val/loss`, `ncn.targets`, ...); exit 1 when it does not.

Run: python scripts/mlflow_screenshot.py [--uri sqlite:////abs/mlflow.db] [--sweep ablation] [--out shot.png]
Works on a copy of the store (the user's store is never written): adds a saved view there (what the
UI's Views > Save writes: columns, the sweep's runs only, sorted by val/loss; the URL cannot choose
columns), serves the copy with `mlflow ui` on a free port and renders that view with Debian's
headless chromium (/usr/bin/chromium). `--virtual-time-budget` lets the page finish rendering (a
plain screenshot shows grey loading bars). The PNG goes to a temporary folder unless --out is
given. Without chromium it prints "skipped" and exits 0 (CI machines without it).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from contextlib import closing, suppress
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# Columns of the view, in MLflow's column ids; the header texts must render.
METRICS = ["val/loss", "val/ppl", "train/tokens_per_s"]
PARAMS = ["ncn.targets", "seed", "n_params", "controller_share_pct"]
VIEW_KEY = "ncn-sweep"  # experiment tag mlflow.sharedViewState.<key>, opened by ?viewStateShareKey=<key>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def saved_view(name: str, parent_id: str) -> str:
    """A saved view as MLflow 3.17's UI stores it (Views > Save as new view): JSON whose `state` is
    `deflate;` + base64 of the zlib-compressed page state (search facets + table layout)."""
    state = {
        "searchFilter": f"tags.mlflow.parentRunId = '{parent_id}'",  # a filter also un-nests the children
        "orderByKey": "metrics.`val/loss`",
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [f"metrics.`{m}`" for m in METRICS] + [f"params.`{p}`" for p in PARAMS],
        "columnOrder": [],
        "columnWidths": {},
        "runsHiddenMode": "SHOW_ALL",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
    }
    packed = base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    now = int(time.time() * 1000)
    return json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": f"deflate;{packed}"})


def chromium(binary: str, url: str, *args: str, budget_ms: int, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args, url],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def serve(uri: str, port: int) -> subprocess.Popen:
    """`mlflow ui` on 127.0.0.1:`port` in its own process group (its workers stop with it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_healthy(server: subprocess.Popen, base: str, seconds: float = 180) -> bool:
    deadline = time.monotonic() + seconds
    while server.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=5)
            return True
        except OSError:
            time.sleep(1)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=f"sqlite:///{Path('mlflow.db').absolute()}", help="sqlite tracking URI")
    parser.add_argument("--sweep", default="ablation", help="sweep: parent run id, experiment or sweep name")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: in a new temporary folder)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--window", default="2000,1000", help="screenshot size W,H in pixels")
    parser.add_argument("--budget-ms", type=int, default=30000, help="chromium virtual time for the page to render")
    parser.add_argument("--view", choices=["table", "chart"], default="table", help="runs table or chart view")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below: stop the server
    binary = shutil.which(args.chromium)
    if binary is None:
        print(f"skipped: {args.chromium} not found (apt install chromium)")
        return 0
    from ncn.tracking import MLflowTracker
    from ncn.tracking.store import sqlite_path

    source = sqlite_path(args.uri)
    if source is None or not source.is_file():
        print(f"error: --uri {args.uri} is not a sqlite store file: pass sqlite:////abs/mlflow.db", file=sys.stderr)
        return 1
    tracker = MLflowTracker(args.uri)
    parent = tracker.find_sweep(args.sweep)
    children = sorted(tracker.child_runs(parent.run_id), key=lambda r: r.name)
    if not children:
        print(f"error: sweep run {parent.run_id} has no child runs", file=sys.stderr)
        return 1
    out = args.out or Path(tempfile.mkdtemp(prefix="mlflow_screenshot_")) / f"mlflow_{parent.name}.png"
    with tempfile.TemporaryDirectory() as work:
        copy = Path(work) / "mlflow.db"
        with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(copy)) as dst:
            src.backup(dst)  # consistent even while jobs write to the store
        view = saved_view(f"ncn: sweep {parent.name}", parent.run_id)
        from mlflow import MlflowClient

        MlflowClient(f"sqlite:///{copy}").set_experiment_tag(
            parent.experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", view
        )
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = serve(f"sqlite:///{copy}", port)
        try:
            if not wait_healthy(server, base):
                print(f"error: mlflow ui did not start on port {port}", file=sys.stderr)
                return 1
            url = (
                f"{base}/#/experiments/{parent.experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
                f"&workflowType=machine_learning&compareRunsMode={args.view.upper()}"
            )
            size = f"--window-size={args.window}"  # the table renders only the columns in view
            dom = chromium(binary, url, "--dump-dom", size, budget_ms=args.budget_ms, timeout=300).stdout
            missing = [f"run {r.name}" for r in children if f">{r.name}<" not in dom]
            if args.view == "table":
                missing += [f"column {c}" for c in METRICS + PARAMS if f">{c}<" not in dom]
            else:  # chart sections: loss sections before the per-layer signals (docs/mlflow_ui.md)
                first = {s: dom.find(f">{s}<") for s in ("train", "val", "val/signals/")}
                order = sorted((i, s) for s, i in first.items() if i >= 0)
                if [s for _, s in order] != ["train", "val"] + (["val/signals/"] if first["val/signals/"] >= 0 else []):
                    missing.append(f"chart sections train, val before val/signals/ (found in order {order})")
            if missing:
                print(f"error: the runs table at {url} does not show: {', '.join(missing)}", file=sys.stderr)
                return 1
            out.parent.mkdir(parents=True, exist_ok=True)
            chromium(binary, url, f"--screenshot={out.absolute()}", size, budget_ms=args.budget_ms, timeout=300)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                server.wait(timeout=20)
            with suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)  # its job workers can outlive the server
    if not out.is_file() or out.stat().st_size < 10_000:
        print(f"error: chromium wrote no screenshot to {out}", file=sys.stderr)
        return 1
    print(
        f"{out}: {args.view} view of {len(children)} runs of sweep {parent.name} (parent {parent.run_id}), all run "
        + ("names and columns " + ", ".join(METRICS + PARAMS) if args.view == "table" else "names and chart sections")
        + " rendered"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
