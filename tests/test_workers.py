"""The Ray worker pool: same results as one in-process worker, and a killed worker costs
only its evaluation."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from searcher.cli import main
from searcher.cluster import connected
from searcher.errors import SearcherError
from searcher.fitness import Evaluator
from searcher.pool import Job, LocalPool
from searcher.run import SessionKey, open_session
from searcher.workers import RayPool, WorkerSetup
from tests.helpers import candidates

ARGS = ["--seq-len", "32", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1", "--seed", "3",
        "--evals", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (starting one takes seconds)."""
    with connected(None, 2):  # as `searcher run --workers 2` starts one
        yield


def test_two_workers_reach_the_one_worker_result(ray_local, tiny_dir: Path, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["run", "--model", str(tiny_dir), *ARGS]
    assert main([*base, "--out", str(one)]) == 0  # in this process, no Ray
    assert main([*base, "--out", str(two), "--workers", "2"]) == 0
    t1, t2 = (pd.read_parquet(d / "trials.parquet") for d in (one, two))
    assert t1["genes"].map(tuple).tolist() == t2["genes"].map(tuple).tolist()
    assert t1["kl"].tolist() == t2["kl"].tolist()  # bit-identical scores
    b1, b2 = (json.loads((d / "best.json").read_text()) for d in (one, two))
    assert b1["genes"] == b2["genes"] and b1["validation"] == b2["validation"]
    info = json.loads((two / "run.json").read_text())
    assert info["hardware"]["workers"] == 2 and info["worker_retries"] == 0


def driver(tiny_dir: Path, windows: int, fingerprint: str | None = None):
    """What the driver holds (session, evaluator of all ``windows``), and a worker setup."""
    key = SessionKey(str(tiny_dir), None, "width", {}, 32, windows, 1, 2, 4, "cpu", "float32",
                     False)  # fmt: skip
    session = open_session(key)
    evaluator = Evaluator(
        session.loaded.model, session.windows.calibration, session.space.apply,
        session.space.dense(), 4,
    )  # fmt: skip
    setup = WorkerSetup(key, windows, fingerprint or session.space.fingerprint())
    return session, evaluator, setup


def test_a_killed_worker_costs_only_its_evaluation(ray_local, tiny_dir: Path, caplog) -> None:
    session, evaluator, setup = driver(tiny_dir, 4)
    pool = RayPool(setup, session.windows.calibration, evaluator.reference(), workers=2)
    jobs = [Job(c, 0, 4) for c in candidates(session.space, seed=1, n=400)]
    victim = pool.pids[0]

    def kill_when_busy() -> None:
        time.sleep(0.5)  # both workers have calls queued for far longer than this
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy)
    try:
        with caplog.at_level(logging.WARNING, logger="searcher.workers"):
            killer.start()
            t0 = time.perf_counter()
            outcomes = pool.run(jobs)
            seconds = time.perf_counter() - t0
        killer.join()
        assert seconds > 0.5, "the pool finished before the kill: give it more work"
        assert pool.retries >= 1
        assert "died while scoring candidate" in caplog.text and "retrying" in caplog.text
        expected = LocalPool(evaluator).run(jobs)  # every candidate scored, and scored right
        for got, want in zip(outcomes, expected, strict=True):
            np.testing.assert_array_equal(got.kl, want.kl)
            np.testing.assert_array_equal(got.nll, want.nll)
        deadline = time.monotonic() + 120  # the killed worker restarts, reloads, rejoins
        while len(pool.live) < 2 and time.monotonic() < deadline:
            assert len(pool.run(jobs[:2])) == 2  # meanwhile the pool goes on working
            time.sleep(0.2)
        assert len(pool.live) == 2
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("address", "message"),
    [("127.0.0.1:1", "cannot reach 127.0.0.1:1"), ("ray://nohost", "expected auto, HOST:PORT"),
     ("http://127.0.0.1:6379", "expected auto, HOST:PORT")],
)  # fmt: skip
def test_bad_address_is_one_line(address: str, message: str, tiny_dir: Path, tmp_path, capsys):
    code = main(["run", "--model", str(tiny_dir), "--address", address, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_worker_that_builds_another_space_refuses(ray_local, tiny_dir: Path) -> None:
    session, evaluator, setup = driver(tiny_dir, 2, fingerprint="0" * 16)  # other weights
    with pytest.raises(SearcherError, match="built a different width space than the driver"):
        RayPool(setup, session.windows.calibration, evaluator.reference(), workers=1)


def test_a_pool_the_cluster_cannot_place_is_refused(ray_local, tiny_dir: Path, tmp_path, capsys):
    code = main(["run", "--model", str(tiny_dir), *ARGS, "--workers", "3", "--out",
                 str(tmp_path / "run")])  # the local instance has 2 CPUs  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--workers 3 x --threads 1 does not fit the Ray cluster (2 CPUs" in err
