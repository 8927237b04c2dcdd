"""Screenshot of a sweep's runs side by side in the MLflow UI's compare view, and an end-to-end
check that the parent/child runs and their params render there (exit 1 when they don't).

Run: python scripts/mlflow_screenshot.py [--uri sqlite:////abs/mlflow.db] [--sweep ablation]
         [--out docs/img/mlflow_ablation.png]
Starts `mlflow ui` on 127.0.0.1 (a free port) and drives Debian's headless chromium
(/usr/bin/chromium); without chromium it prints "skipped" and exits 0 (CI machines without it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
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
# Params whose rows must appear in the compare view (present in every training run).
PARAM_ROWS = ["ncn.targets", "n_params", "controller_share_pct"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_runs(uri: str, sweep: str) -> tuple[object, list]:
    """(newest parent run tagged ncn.sweep=<sweep>, its child runs sorted by name)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    # the sweep name is user text: matched in Python, never put into a filter string
    runs = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=50000)
    parents = [r for r in runs if r.data.tags.get("ncn.sweep") == sweep]
    if not parents:
        raise SystemExit(f"error: no sweep named {sweep} in {uri}: run python run.py -cd sweeps -cn {sweep} first")
    parent = parents[0]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, sorted(children, key=lambda r: r.info.run_name)


def chromium(binary: str, url: str, *args: str, budget_ms: int, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args, url],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=f"sqlite:///{Path('mlflow.db').absolute()}", help="tracking URI")
    parser.add_argument("--sweep", default="ablation", help="sweep name (tag ncn.sweep); its newest launch")
    parser.add_argument("--out", type=Path, default=Path("docs/img/mlflow_ablation.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--window", default="1600,1300", help="screenshot size W,H in pixels")
    parser.add_argument("--budget-ms", type=int, default=30000, help="chromium virtual time for the page to render")
    args = parser.parse_args(argv)
    binary = shutil.which(args.chromium)
    if binary is None:
        print(f"skipped: {args.chromium} not found (apt install chromium)")
        return 0
    parent, children = sweep_runs(args.uri, args.sweep)
    if not children:
        print(f"error: sweep run {parent.info.run_id} has no child runs", file=sys.stderr)
        return 1
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            args.uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print(f"error: mlflow ui did not start on port {port}", file=sys.stderr)
                    return 1
                time.sleep(1)
        query = urllib.parse.urlencode(
            {
                "runs": json.dumps([r.info.run_id for r in children]),
                "experiments": json.dumps([parent.info.experiment_id]),
            }
        )
        url = f"{base}/#/compare-runs?{query}"
        dom = chromium(binary, url, "--dump-dom", budget_ms=args.budget_ms, timeout=300).stdout
        missing = [r.info.run_name for r in children if r.info.run_name not in dom]
        missing += [f"param {p}" for p in PARAM_ROWS if p not in dom]
        if missing:
            print(f"error: the compare view at {url} does not show: {', '.join(missing)}", file=sys.stderr)
            return 1
        args.out.parent.mkdir(parents=True, exist_ok=True)
        chromium(
            binary,
            url,
            f"--screenshot={args.out.absolute()}",
            f"--window-size={args.window}",
            budget_ms=args.budget_ms,
            timeout=300,
        )
        if not args.out.is_file() or args.out.stat().st_size < 10_000:
            print(f"error: chromium wrote no screenshot to {args.out}", file=sys.stderr)
            return 1
        print(
            f"{args.out}: compare view of {len(children)} runs of sweep {args.sweep} "
            f"(parent {parent.info.run_id}), all run names and params {', '.join(PARAM_ROWS)} rendered"
        )
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own process group: the server's workers go with it
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
