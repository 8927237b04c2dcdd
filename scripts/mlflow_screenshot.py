"""Screenshot of a sweep's runs in the MLflow UI's runs table, and an end-to-end check that the table
renders them with the columns people compare (`val/loss`, `ncn.targets`, ...); exit 1 when it does not.

Run: python scripts/mlflow_screenshot.py [--uri sqlite:////abs/mlflow.db] [--sweep ablation] [--out shot.png]
Works on a copy of the store (the user's store is never written): adds a saved view there (what the
UI's Views > Save writes: columns, the sweep's runs only, sorted by val/loss; the URL cannot choose
columns), serves the copy with `mlflow ui` on a free port and drives Debian's headless chromium
(/usr/bin/chromium) over the DevTools protocol on a pipe (`--remote-debugging-pipe`, no extra
package): open the view, wait until the run names and columns are on the page, close MLflow 3.17's
Assistant panel, then take the screenshot. The panel opens by itself on a browser's first visit to a
server on localhost or 127.0.0.1 and covers the right third of the table; `mlflow ui` 3.17.2 has no
setting that turns it off, so the script clicks the panel's own close control, found by its role
and accessible name (a button labelled "Close" in the region titled "MLflow Assistant"), and
waits until the panel is gone. The PNG goes to a temporary folder unless --out is given. Without
chromium it prints "skipped" and exits 0 (CI machines without it).
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


# Run in the page: the Assistant panel's state, after clicking its close control when `click` is true.
# The panel is the region the UI marks data-assistant-ui whose title reads "MLflow Assistant"; its close
# control is the button (role) whose accessible name (aria-label) is "Close". Closed, the panel leaves a
# round 40 px launcher button, also marked data-assistant-ui and named "MLflow Assistant" (MLflow 3.17.2):
# anything no wider than LAUNCHER_PX is that button, not the panel (500 px wide when open).
LAUNCHER_PX = 100
ASSISTANT_PANEL = """((click) => {
  const panels = [...document.querySelectorAll('[data-assistant-ui]')]
    .filter((p) => p.textContent.includes('MLflow Assistant') && p.getBoundingClientRect().width > LAUNCHER_PX);
  if (panels.length === 0) return 'absent';
  const close = panels
    .flatMap((p) => [...p.querySelectorAll('button, [role="button"]')])
    .find((b) => b.getAttribute('aria-label') === 'Close');
  if (close === undefined) return 'open, without a Close button';
  if (click) close.click();
  return 'open';
})""".replace("LAUNCHER_PX", str(LAUNCHER_PX))


class DevTools:
    """A headless chromium driven over the Chrome DevTools Protocol on a pipe: chromium reads commands from
    its fd 3 and writes replies and events to its fd 4, each a JSON message ending in a NUL byte. One page,
    attached as a flat session; `call` sends a command and returns its result (events are skipped)."""

    def __init__(self, binary: str, width: int, height: int, profile: str) -> None:
        # fd 3 <- our stdin pipe (commands), fd 4 -> our stdout pipe (replies); chromium's own stdio is muted
        self.proc = subprocess.Popen(
            [
                "sh",
                "-c",
                'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null 2>/dev/null',
                binary,
                *CHROMIUM_FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.next_id = 0
        self.buffer = b""
        self.session: str | None = None
        page = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=page, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: object) -> dict:
        """Send `method` with `params` (to the page once attached) and return its result.

        Raises:
            RuntimeError: the command failed, or chromium closed the pipe.
        """
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        self.proc.stdin.write(json.dumps(message).encode() + b"\0")
        self.proc.stdin.flush()
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the DevTools pipe during {method}")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message', reply['error'])}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> object:
        """The value of the JavaScript `expression` in the page."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, seconds: float) -> bool:
        """Poll `expression` in the page until it is true (True) or `seconds` pass (False)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return True
            time.sleep(0.5)
        return False

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # chromium's helper processes go with it
        self.proc.wait(timeout=30)


def close_assistant(browser: DevTools, settle_s: float = 2.0) -> str | None:
    """Close the Assistant panel if it is open (its close control, by role and accessible name) and wait until
    it is gone, then check again after `settle_s` (it opens from an effect that may run after the table
    renders). None once the page has no open panel; else what went wrong."""
    for _ in range(5):
        state = browser.evaluate(f"{ASSISTANT_PANEL}(true)")
        if state == "open":  # clicked: wait until it is gone, then look again
            if not browser.wait_for(f"{ASSISTANT_PANEL}(false) === 'absent'", 10):
                return "the Assistant panel stayed open after its Close button was clicked"
            continue
        if state != "absent":
            return f"the Assistant panel is {state}"
        time.sleep(settle_s)  # the table takes the panel's width back; a late panel shows up here
        if browser.evaluate(f"{ASSISTANT_PANEL}(false)") == "absent":
            return None
    return "the Assistant panel kept opening again after its Close button was clicked"


def page_check(dom: str, children: list[str], view: str) -> list[str]:
    """What the rendered page `dom` lacks: run names (`children`), and the columns (table view) or the chart
    sections train, val before val/signals/ (chart view, docs/mlflow_ui.md)."""
    missing = [f"run {name}" for name in children if f">{name}<" not in dom]
    if view == "table":
        return missing + [f"column {c}" for c in METRICS + PARAMS if f">{c}<" not in dom]
    first = {s: dom.find(f">{s}<") for s in ("train", "val", "val/signals/")}
    order = sorted((i, s) for s, i in first.items() if i >= 0)
    if [s for _, s in order] != ["train", "val"] + (["val/signals/"] if first["val/signals/"] >= 0 else []):
        missing.append(f"chart sections train, val before val/signals/ (found in order {order})")
    return missing


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
    parser.add_argument("--budget-ms", type=int, default=30000, help="time the page may take to render its runs")
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
            width, height = (int(x) for x in args.window.split(","))  # the table renders only the columns in view
            names = [r.name for r in children]
            with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
                browser = DevTools(binary, width, height, profile)
                try:
                    browser.call("Page.navigate", url=url)
                    wanted = json.dumps([f">{n}<" for n in names])
                    browser.wait_for(
                        f"{wanted}.every((s) => document.body.innerHTML.includes(s))", args.budget_ms / 1e3
                    )
                    missing = page_check(str(browser.evaluate("document.documentElement.outerHTML")), names, args.view)
                    if missing:
                        print(f"error: the runs table at {url} does not show: {', '.join(missing)}", file=sys.stderr)
                        return 1
                    if (problem := close_assistant(browser)) is not None:
                        print(f"error: {problem}", file=sys.stderr)
                        return 1
                    out.parent.mkdir(parents=True, exist_ok=True)
                    browser.screenshot(out.absolute())
                finally:
                    browser.close()
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
        + " rendered, with no Assistant panel over them"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
