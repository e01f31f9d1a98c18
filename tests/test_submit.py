"""`searcher submit` against a Ray head started here, on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from searcher.cli import main

ARGS = ["--seq-len", "32", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1", "--evals", "6"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.5)
    return False


@dataclass(frozen=True)
class Head:
    address: str  # the job server (dashboard)
    gcs: str  # what `--address` joins
    token: Path  # the cluster's auth token, in a file of its own


def ray_env(**auth: str) -> dict[str, str]:
    """This process's environment without Ray auth settings of its own, plus ``auth``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    return {**env, **auth}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[Head]:
    """A Ray head (with its job server) on loopback, protected by a token of its own (never
    ~/.ray's), stopped with its whole process group."""
    bindir = Path(sys.executable).parent
    dashboard, gcs = free_port(), free_port()
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    token = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` makes
    token.chmod(0o600)
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit
    env = ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env["PATH"] = f"{bindir}{os.pathsep}{os.environ['PATH']}"
    with log.open("w") as out:
        head = subprocess.Popen(
            [str(bindir / "ray"), "start", "--head", "--block", f"--port={gcs}",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=2",
             "--disable-usage-stats", f"--temp-dir={temp}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        if not wait_for(dashboard, 90):
            pytest.fail(f"the Ray head did not start: {log.read_text()[-2000:]}")
        yield Head(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", token)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)  # the job's environment (a venv copy) is here


def searcher(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The CLI in its own process, as a user runs it (Ray reads RAY_AUTH_MODE once per
    process, so this also keeps other tests' Ray settings out)."""
    return subprocess.run([sys.executable, "-m", "searcher", *args], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip


def client_env(head: Head) -> dict[str, str]:
    """A client that has the cluster's token (RAY_AUTH_TOKEN_PATH wins over ~/.ray)."""
    return ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head.token))


def test_submit_runs_the_search_as_a_ray_job(ray_head: Head, tiny_dir: Path, tmp_path):
    out = tmp_path / "job-run"
    done = searcher("submit", "--address", ray_head.address, "--wait", "--working-dir",
                    str(tmp_path), "--", "run", "--model", str(tiny_dir), "--out", str(out),
                    *ARGS, env=client_env(ray_head))  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stderr
    assert "validation KL" in done.stdout  # the job's own summary, streamed back
    best = json.loads((out / "best.json").read_text())
    assert best["fractions"]["flops"] <= 0.5
    assert (out / "trials.journal").is_file()


def test_submit_without_wait_prints_how_to_follow(ray_head: Head, tmp_path):
    done = searcher("submit", "--address", ray_head.address, "--no-requirements",
                    "--working-dir", str(tmp_path), "--", "eval", str(tmp_path / "missing.json"),
                    env=client_env(ray_head))  # fmt: skip
    assert done.returncode == 0 and "submitted job raysubmit_" in done.stdout, done.stderr
    assert f"ray job logs --address {ray_head.address} --follow raysubmit_" in done.stdout


@pytest.mark.parametrize(
    ("auth", "message"),
    [({}, "wants Ray's auth token and got none"),
     ({"RAY_AUTH_MODE": "token"}, "RAY_AUTH_MODE=token but there is no Ray auth token in ~/.ray"),
     ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "rejected the Ray auth token")],
)  # fmt: skip
def test_submit_without_the_clusters_token_is_one_line(
    ray_head: Head, auth: dict[str, str], message: str, tmp_path
) -> None:
    home = tmp_path / "home"  # a new machine: no ~/.ray/auth_token
    home.mkdir()
    done = searcher("submit", "--address", ray_head.address, "--no-requirements",
                    "--working-dir", str(tmp_path), "--", "eval", "best.json",
                    env=ray_env(HOME=str(home), **auth))  # fmt: skip
    err = done.stderr.strip()
    assert done.returncode == 2 and message in err and len(err.splitlines()) == 1, err
    assert "`ray get-auth-token` on the head" in err


def test_joining_without_the_clusters_token_is_one_line(
    ray_head: Head, tiny_dir: Path, tmp_path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    done = searcher("run", "--model", str(tiny_dir), "--address", ray_head.gcs, "--out",
                    str(tmp_path / "run"), *ARGS,
                    env=ray_env(HOME=str(home), RAY_AUTH_MODE="token"))  # fmt: skip
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"--address {ray_head.gcs}: RAY_AUTH_MODE=token but there is no Ray auth token" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--address", "http://127.0.0.1:1", "--", "run"], "cannot reach 127.0.0.1:1"),
     (["--address", "ray://127.0.0.1:1", "--", "run"], "expected auto, HOST:PORT"),
     (["--address", "http://127.0.0.1:1", "--", "rm", "-rf"], "give the command after --")],
)  # fmt: skip
def test_submit_bad_input_is_one_line(args, message, capsys) -> None:
    code = main(["submit", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
