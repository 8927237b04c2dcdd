"""README.md followed top to bottom: every command of its bash blocks, in order, in an empty folder.

Commands run as written except for the substitutions below, which only shrink budgets (a smaller
model, fewer steps, a server stopped once it answers) or stand in for hardware this machine lacks;
each is listed with its reason. After each command the test checks the promise its README comment
makes (a resumed run continues the same MLflow run, the same seed gives the same text, the report
writes its table, ...). A README command this test does not know fails it, so a new command
needs a promise here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO, time_left

# The shape of the tiny GPT-2 that stands in for the hub's and the local folder's weights.
TINY_GPT2 = {"d_model": 32, "n_layer": 2, "n_head": 2, "block_size": 32}
# (README text, what runs instead, why). Applied to each command in this order.
SUBSTITUTIONS = [
    ("model=small", "model=tiny", "a smaller model"),
    ("trainer.max_steps=300", "trainer.max_steps=9", "fewer steps: resume 3 steps past the smoke run's 6"),
    ("max_new_tokens=100", "max_new_tokens=20", "fewer tokens"),
    ("-cd sweeps", f"-cd {REPO / 'sweeps'}", "README runs from the clone's root, this test in an empty folder"),
    ("model.init_from=gpt2", "model.init_from=$PWD/tiny_gpt2", "no network: a tiny GPT-2 saved by transformers"),
    ("model.init_from=/path/to/gpt2", "model.init_from=$PWD/tiny_gpt2", "the same tiny GPT-2 as the local folder"),
    ("model=gpt2", "model=gpt2 " + " ".join(f"model.{k}={v}" for k, v in TINY_GPT2.items()), "GPT-2, shrunk"),
    (
        "reference_checkpoint=/path/to/checkpoint_best.pt",
        "reference_checkpoint=$PWD/checkpoint_best.pt",
        "no released checkpoint here: a random tests/reference_model.py model saved as the reference's train.py saves",
    ),
    (
        "checkpoint=reference-checkpoint_best",
        "checkpoint=reference-checkpoint_best trainer.eval_batches=2",
        "2 val batches",
    ),
    (
        "--tasks hellaswag,lambada_openai",
        "--tasks ncn_tiny_choice --include_path tests/lm_eval_task",
        "no network: the local lm-eval task of tests/test_harness.py (copied into the folder)",
    ),
]
# Training commands (no task= or task=train) also get `trainer=smoke` (6 steps) before their own
# overrides, and `model=tiny` when they name no model and resume nothing (a resume takes the
# checkpoint's); sweeps get both from README already.
SMOKE = "trainer=smoke"
TINY = "model=tiny"
# Commands that need what this machine has not got: checked as far as it can be done here.
STAND_INS = {
    "mlflow ui": "started in the background, stopped once /health answers",
    "hydra/launcher=slurm": "no SLURM here: composed with --cfg hydra, the launcher's settings checked",
    "sbatch": "no SLURM here: the script's syntax is checked with bash -n",
}
SKIPPED = {
    "pip install": "the install is what CI runs before this suite (.ci/run)",
    "python -m pytest": "the test command itself",
}


def readme_commands() -> list[str]:
    """Every command of README.md's ```bash blocks, continuation lines joined, comments stripped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def _is_training(words: list[str]) -> bool:
    return "run.py" in " ".join(words[:3]) and not any(w.startswith(("task=", "-cd", "--")) for w in words)


def prepared(command: str, cwd: Path) -> list[str]:
    """The argv that runs for README's `command` in `cwd` (SUBSTITUTIONS applied, `trainer=smoke`
    added, `$PWD` expanded as bash would)."""
    for old, new, _ in SUBSTITUTIONS:
        command = command.replace(old, new)
    words = [w.replace("$PWD", str(cwd)) for w in shlex.split(command)]
    if words[0] == "python":
        words[0] = sys.executable
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    script = next((i for i, w in enumerate(words) if w == "run.py"), None)
    if script is not None:
        words[script] = str(REPO / "run.py")
        training = _is_training(words[script:]) or words[0].endswith("torch.distributed.run")
        if training and not any(w.startswith("trainer=") for w in words):
            words.insert(script + 1, SMOKE)
        if training and not any(w.startswith(("model=", "trainer.resume=")) for w in words):
            words.insert(script + 1, TINY)
    return words


def _run(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=time_left())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}:\n{out[-3000:]}"
    return out


def _serve_until_healthy(argv: list[str], cwd: Path, env: dict[str, str]) -> int:
    port = argv[argv.index("--port") + 1]
    server = subprocess.Popen(
        argv, cwd=cwd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + time_left()
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    return response.status
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow ui did not answer on port {port} (exit status {server.poll()})")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _runs(workdir: Path) -> dict[str, list]:
    """run name -> runs of experiment ncn in the folder's store (newest first)."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ncn")
    runs: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        runs.setdefault(run.info.run_name, []).append(run)
    return runs


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~25 commands, each a fresh process: 900 s ran out at load 7-9 (2026-12-07)
def test_readme_commands_work_in_order_as_written(tmp_path: Path) -> None:
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    env = {**os.environ, "NCN_CACHE_DIR": os.environ.get("NCN_CACHE_DIR", str(tmp_path / "cache"))}
    env.pop("NCN_PARENT_RUN_ID", None)
    commands = readme_commands()
    assert len(commands) >= 15, commands
    if any("model.init_from=" in c for c in commands):
        _save_tiny_gpt2(workdir / "tiny_gpt2")
    if any("reference_checkpoint=" in c for c in commands):
        _save_reference_checkpoint(workdir / "checkpoint_best.pt")
    shutil.copytree(REPO / "tests" / "lm_eval_task", workdir / "tests" / "lm_eval_task")
    seen = []
    for command in commands:
        if any(key in command for key in SKIPPED):
            seen.append("skipped")
            continue
        argv = prepared(command, workdir)
        if command.startswith("mlflow ui"):
            assert _serve_until_healthy(argv, workdir, env) == 200
            seen.append("mlflow ui")
            continue
        if command.startswith("sbatch"):
            script = next(w for w in argv if w.endswith(".sbatch"))
            _run(["bash", "-n", str(REPO / script)], workdir, env)
            seen.append("sbatch")
            continue
        if "hydra/launcher=slurm" in command:
            out = _run([w for w in argv if w != "-m"] + ["--cfg", "hydra"], workdir, env)  # --cfg excludes -m
            assert "tasks_per_node: 4" in out and "gpus_per_node: 4" in out
            seen.append("slurm")
            continue
        out = _run(argv, workdir, env)
        seen.append(_check_promise(command, out, workdir, env, argv))
    # every kind of command README shows was run and checked
    assert {
        "train",
        "resume",
        "eval",
        "generate",
        "analyze",
        "variant",
        "help",
        "cfg",
        "resolve",
        "sweep",
        "report",
        "pooling",
        "torchrun",
        "mlflow ui",
        "slurm",
        "sbatch",
        "pretrained",
        "harness",
        "reference import",
        "reference eval",
        "control train",
        "control eval",
        "control generate",
        "control analyze",
    } <= set(seen), seen


def _save_tiny_gpt2(folder: Path) -> None:
    """A random GPT-2 of shape TINY_GPT2 over GPT-2's vocabulary, saved as HF-format weights."""
    import torch
    import transformers

    torch.manual_seed(0)
    t = TINY_GPT2
    shape = {"n_embd": t["d_model"], "n_layer": t["n_layer"], "n_head": t["n_head"], "n_positions": t["block_size"]}
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, **shape)).save_pretrained(folder)


def _save_reference_checkpoint(file: Path) -> None:
    """A random reference model (tests/reference_model.py, 2 layers of width 32), saved as its train.py saves."""
    from reference_model import ModulatedLLM, NCNConfig, randomise, save_reference_checkpoint

    config = NCNConfig(d_model=32, nhead=2, num_layers=2, max_position_embeddings=32, ncn_hidden_dim=16)
    model = ModulatedLLM(config)
    randomise(model, seed=0)
    save_reference_checkpoint(file, model)


def _check_promise(command: str, out: str, workdir: Path, env: dict[str, str], argv: list[str]) -> str:
    """Assert what README's comment on `command` promises; returns the kind of command."""
    if "control=genre" in command or "byte_small-full-genre-tokenizer_bytes-s0" in command:
        return _check_control_promise(command, out, workdir, env, argv)
    if command == "python run.py":
        runs = _runs(workdir)["tiny-full-s0"]
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert "browse: mlflow ui --backend-store-uri" in out and "done: val loss" in out
        return "train"
    if "trainer.resume=latest" in command:
        runs = _runs(workdir)["tiny-full-s0"]
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run, continued
        assert f"resuming run tiny-full-s0 (MLflow run {runs[0].info.run_id}) at step 6" in out
        assert runs[0].data.metrics["train/tokens_seen"] > 0 and "step 9/9" in out
        return "resume"
    if "task=import" in command:
        folders = sorted(workdir.glob("outputs/*/*/checkpoints/step_000500"))
        assert len(folders) == 1 and f"as {folders[0]}" in out
        assert "pooling: global" in (folders[0] / "config.yaml").read_text()
        return "reference import"
    if "checkpoint=reference-checkpoint_best" in command:
        assert "checkpoint of run reference-checkpoint_best at step 500" in out
        assert "leak audit (trained with ncn.pooling=global)" in out
        return "reference eval"
    if "task=eval" in command:
        assert "checkpoint of run tiny-full-s0 at step 9" in out and re.search(r"val loss \d+\.\d+", out)
        assert "val bpb" in out
        return "eval"
    if "task=generate" in command:
        assert "checkpoint of run tiny-full-s0 at step 9" in out
        again = _run(argv, workdir, env)  # same seed, same text
        text = [line for line in out.splitlines() if "tokens/s" not in line and "outputs/" not in line]
        assert text == [line for line in again.splitlines() if "tokens/s" not in line and "outputs/" not in line]
        return "generate"
    if "task=analyze" in command:
        pngs = sorted(workdir.glob("outputs/*/*/analysis/signals.png"))
        assert len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG"
        summary = json.loads((pngs[0].parent / "summary.json").read_text())
        assert summary and "checkpoint of run tiny-full-s0" in out
        return "analyze"
    if "ncn=temperature_only" in command:
        runs = _runs(workdir)["tiny-temperature_only-s0"]
        assert runs[0].data.params["ncn.targets"] == "[temperature]"
        return "variant"
    if command.endswith("--help"):
        groups = out.split("== Configuration groups ==")[1].split("== Config ==")[0]
        assert "model: byte_small, gpt2, gpt2_124m" in groups and "schema" not in groups
        assert "--cfg job --resolve" in out
        return "help"
    if command.endswith("--resolve"):
        assert "vocab_size: 50304" in out and "${" not in out.split("model:")[1].split("ncn:")[0]
        return "resolve"
    if command.endswith("--cfg job"):
        assert "vocab_size: ${vocab_size:" in out
        return "cfg"
    if "-cn ablation" in command:
        runs = _runs(workdir)
        assert [r.info.status for r in runs["ablation"]] == ["FINISHED"]
        assert {r.info.status for name in ("tiny-none-s0", "tiny-full-s0") for r in runs[name][:1]} == {"FINISHED"}
        assert re.search(r"parent run [0-9a-f]{32}", out)
        return "sweep"
    if "task=report" in command:
        reports = sorted(workdir.glob("outputs/*/*/report/report.md"))
        assert reports and "| full |" in reports[-1].read_text() and "| none |" in reports[-1].read_text()
        return "report"
    if "-cn pooling" in command:
        parent = _runs(workdir)["pooling"][0]
        assert parent.info.status == "FINISHED" and "3 of 3 job runs FINISHED" in out
        return "pooling"
    if "model.init_from=" in command:
        assert "base weights of model.init_from=" in out and "trainer.freeze=base: " in out
        # the command-line model.* and ncn.* values join the run name: gpt2-full-<them>-s0
        runs = [r for name, found in _runs(workdir).items() if name.startswith("gpt2-full-") for r in found]
        assert runs and all(r.info.status == "FINISHED" and r.data.params["trainer.freeze"] == "base" for r in runs)
        assert int(runs[0].data.params["n_params_frozen"]) > int(runs[0].data.params["n_params_trainable"]) > 0
        return "pretrained"
    if "ncn.integrations.harness" in command:
        assert "ncn_tiny_choice" in out and "acc" in out  # lm-eval's results table
        return "harness"
    if "torchrun" in command:
        assert _runs(workdir)["tiny-full-s0"][0].data.params["world_size"] == "2"
        return "torchrun"
    raise AssertionError(f"README command without a promise in tests/test_readme.py: {command}")


def _check_control_promise(command: str, out: str, workdir: Path, env: dict[str, str], argv: list[str]) -> str:
    """README's control example: train with genre labels, the control matrix, a comedy and a tragedy, heatmaps."""
    name = "byte_small-full-genre-tokenizer_bytes-s0"
    if "control=genre" in command:
        runs = _runs(workdir)[name]
        assert [r.info.status for r in runs] == ["FINISHED"] and "val/control/gain" in runs[0].data.metrics
        assert runs[0].data.params["n_params_control"] == str(6 * 128)
        return "control train"
    assert f"checkpoint of run {name}" in out
    if "task=eval" in command:
        assert "control matrix:" in out and re.search(r"control gain [+-]\d+\.\d+ nats/token", out)
        return "control eval"
    if "task=generate" in command:
        label = "comedies" if "comedies" in command else "tragedies"
        assert f"generating with control.label={label}" in out
        again = _run(argv, workdir, env)  # same seed, same text
        text = [line for line in out.splitlines() if "tokens/s" not in line]
        assert text == [line for line in again.splitlines() if "tokens/s" not in line]
        return "control generate"
    if "task=analyze" in command:
        newest = max(workdir.glob("outputs/*/*/analysis/signals.csv"), key=lambda p: p.stat().st_mtime)
        controls = {line.split(",")[-1] for line in newest.read_text().splitlines()[1:]}
        assert controls == {"comedies", "histories", "problems", "roman", "romances", "tragedies"}
        return "control analyze"
    raise AssertionError(f"README control command without a promise in tests/test_readme.py: {command}")
