"""Parallel safety: two training jobs started at the same moment on a cold token cache and a fresh
(never migrated) MLflow sqlite store. The cache is built once under its file lock, the store is
created once, both runs finish and both are recorded.
Run: python -m pytest -q tests/test_parallel.py   (~40 s on 2 cores; marked slow)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO, time_left

ARGS = [
    "model=tiny",
    "trainer=smoke",
    "trainer.max_steps=3",
    "trainer.checkpoint_every=3",
    "trainer.eval_every=3",
    "trainer.eval_batches=1",
    "trainer.probe_tokens=0",
    "trainer.threads=1",
]


@pytest.mark.slow
def test_two_jobs_share_a_cold_cache_and_a_fresh_store(tmp_path: Path) -> None:
    cache, db = tmp_path / "cache", tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    env = {**os.environ, "NCN_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "run.py"),
                *ARGS,
                f"tracking.uri={uri}",
                f"run_name=job{i}",
                f"hydra.run.dir={tmp_path / f'job{i}'}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [job.communicate(timeout=time_left()) for job in jobs]
    for job, (_, err) in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, err[-3000:]

    summaries = [next(line for line in out.splitlines() if line.startswith("data shakespeare:")) for out, _ in outputs]
    assert sorted("tokenized in" in s for s in summaries) == [False, True]  # one job built the cache ...
    assert sorted("cache hit" in s for s in summaries) == [False, True]  # ... the other used it
    [built] = [p for p in cache.iterdir() if p.is_dir()]
    assert built.name.startswith("shakespeare-") and all(s.endswith(f"-> {built}") for s in summaries)
    assert sorted(p.name for p in built.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert sorted(p.name for p in cache.iterdir()) == [built.name, f"{built.name}.lock"]  # no .tmp-* leftovers

    client = MlflowClient(uri)
    experiments = [e for e in client.search_experiments() if e.name == "ncn"]
    assert len(experiments) == 1  # created once, not once per job
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("job0", "FINISHED"), ("job1", "FINISHED")]
    histories = [
        sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss")) for r in runs
    ]
    assert [s for s, _ in histories[0]] == [1, 2, 3]
    assert histories[0] == histories[1]  # same seed, same cache bytes: the same training
