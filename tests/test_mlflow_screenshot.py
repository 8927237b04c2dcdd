"""scripts/mlflow_screenshot.py's browser side without a browser: the DevTools pipe and closing the Assistant panel.

A fake chromium (below) speaks the DevTools protocol on fds 3 and 4 as chromium does with
--remote-debugging-pipe and plays a page whose Assistant panel is open until its Close button is
clicked. The run against the real UI and chromium is tests/test_sweeps.py
(test_mlflow_ui_compare_view_renders_the_sweep, skipped without chromium).
Run: python -m pytest -q tests/test_mlflow_screenshot.py
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import REPO

PNG = b"\x89PNG\r\n\x1a\nfake"
# A fake chromium: reads NUL-terminated JSON commands on fd 3, writes an event and then the reply on fd 4;
# its page state comes from $FAKE_PAGE, and it logs each command's method and session to $FAKE_LOG.
# The page's Assistant panel is open (`panel` in the page state) until ASSISTANT_PANEL runs with click=true;
# with `reopen`, it opens once more after the first close (the late effect close_assistant checks for).
FAKE = r"""
import base64, json, os, sys
state = json.loads(os.environ["FAKE_PAGE"])
log = open(os.environ["FAKE_LOG"], "a")
buffer = b""
def send(message):
    os.write(4, json.dumps(message).encode() + b"\0")
while True:
    while b"\0" not in buffer:
        chunk = os.read(3, 65536)
        if not chunk:
            sys.exit(0)
        buffer += chunk
    raw, buffer = buffer.split(b"\0", 1)
    command = json.loads(raw)
    log.write(json.dumps([command["method"], command.get("sessionId")]) + "\n")
    log.flush()
    send({"method": "Page.frameNavigated", "params": {}})  # an event: the client skips it
    method, params = command["method"], command["params"]
    result = {}
    if method == "Target.createTarget":
        result = {"targetId": "T1"}
    elif method == "Target.attachToTarget":
        result = {"sessionId": "S1"}
    elif method == "Page.captureScreenshot":
        result = {"data": base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()}
    elif method == "Runtime.evaluate":
        expression = params["expression"]
        if expression.endswith("(true)"):  # the close control is clicked when the panel is open
            value = "open" if state["panel"] else "absent"
            if state["panel"]:
                state["panel"] = False
                state["closed"] = state.get("closed", 0) + 1
            elif state.get("reopen") and state.get("closed") == 1 and not state.get("reopened"):
                state["panel"] = state["reopened"] = True  # the late effect: open again
        elif expression.endswith("(false)"):
            value = "open" if state["panel"] else "absent"
        elif expression.endswith("=== 'absent'"):
            value = not state["panel"]
        else:
            value = state["value"]
        result = {"result": {"type": "string", "value": value}}
    elif method == "Bad.method":
        send({"id": command["id"], "error": {"code": -32601, "message": "'Bad.method' wasn't found"}})
        continue
    send({"id": command["id"], "result": result})
"""


@pytest.fixture(scope="module")
def shot():
    spec = importlib.util.spec_from_file_location("mlflow_screenshot", REPO / "scripts" / "mlflow_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _browser(shot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **state: object):
    fake = tmp_path / "chromium"
    fake.write_text(f"#!{sys.executable}\n{FAKE}")
    fake.chmod(0o755)
    log = tmp_path / "commands.jsonl"
    monkeypatch.setenv("FAKE_PAGE", json.dumps({"panel": False, "value": "ok", **state}))
    monkeypatch.setenv("FAKE_LOG", str(log))
    return shot.DevTools(str(fake), 800, 600, str(tmp_path / "profile")), log


def _methods(log: Path) -> list[list[str | None]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_the_devtools_pipe_attaches_a_page_and_answers_commands(
    shot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    browser, log = _browser(shot, tmp_path, monkeypatch)
    try:
        assert browser.evaluate("1 + 1") == "ok"  # events before the reply are skipped
        browser.screenshot(tmp_path / "shot.png")
        assert (tmp_path / "shot.png").read_bytes() == PNG
        with pytest.raises(RuntimeError, match=r"^Bad.method: 'Bad.method' wasn't found$"):
            browser.call("Bad.method")
    finally:
        browser.close()
    assert _methods(log) == [
        ["Target.createTarget", None],
        ["Target.attachToTarget", None],
        ["Emulation.setDeviceMetricsOverride", "S1"],  # from here on, commands go to the page's session
        ["Runtime.evaluate", "S1"],
        ["Page.captureScreenshot", "S1"],
        ["Bad.method", "S1"],
    ]
    assert browser.proc.returncode is not None


@pytest.mark.parametrize(
    ("state", "closed"),
    [({"panel": False}, 0), ({"panel": True}, 1), ({"panel": True, "reopen": True}, 2)],
    ids=["never_open", "open", "opens_again_late"],
)
def test_the_assistant_panel_is_closed_before_the_screenshot(
    shot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: dict, closed: int
) -> None:
    browser, log = _browser(shot, tmp_path, monkeypatch, **state)
    try:
        assert shot.close_assistant(browser, settle_s=0.0) is None
    finally:
        browser.close()
    clicks = [m for m in _methods(log) if m[0] == "Runtime.evaluate"]
    assert len(clicks) == {0: 2, 1: 4, 2: 8}[closed]  # click-if-open, [wait until absent, click-if-open,] re-check


def test_the_close_control_is_found_by_role_and_accessible_name(shot) -> None:
    script = shot.ASSISTANT_PANEL
    assert "querySelectorAll('button, [role=\"button\"]')" in script
    assert "getAttribute('aria-label') === 'Close'" in script and "'MLflow Assistant'" in script
