"""Submitting a searcher command to a Ray cluster as a Ray job (``ray job submit`` semantics).

The job gets searcher's code (the ``searcher``, ``spaces`` and ``latency_models`` packages),
the submitting directory as its working directory, and searcher's pinned requirements as
its pip environment; its entrypoint is ``python -m searcher ARGS`` on the head node.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from searcher.cluster import (
    SET_TOKEN,
    check_address,
    no_token_error,
    token_source,
    wrong_token_hint,
)
from searcher.errors import SearcherError
from searcher.store import has_password

PACKAGES = ("searcher", "spaces", "latency_models")
# what never belongs in a job's working directory
EXCLUDES = [".venv", ".git", "results", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache"]


@dataclass
class Submission:
    job_id: str
    address: str
    status: str | None = None


def requirements() -> list[str]:
    """searcher's own pinned dependencies, as installed here (no dev extras)."""
    reqs = metadata.requires("searcher") or []
    return [r for r in reqs if "extra ==" not in r]


def runtime_env(working_dir: str, ship_requirements: bool = True) -> dict[str, Any]:
    import importlib

    modules = [str(Path(importlib.import_module(p).__file__).parent) for p in PACKAGES]
    env: dict[str, Any] = {
        "working_dir": str(Path(working_dir).resolve()),
        "excludes": EXCLUDES,
        "py_modules": modules,
        "env_vars": {"TOKENIZERS_PARALLELISM": "false"},
    }
    if ship_requirements:
        env["pip"] = requirements()
    return env


def auth_error(address: str, exc: Exception) -> SearcherError:
    """One line for Ray's AuthenticationError: the job server's 401 or 403, or no token here."""
    # Ray's message, without the paragraph of help that str() appends
    message = getattr(exc, "message", str(exc))
    if message.startswith("Authentication required"):  # 401: this client sent no token
        return SearcherError(f"{address} wants Ray's auth token and got none: {SET_TOKEN}")
    if message.startswith("Authentication failed"):  # 403: not the cluster's token
        return SearcherError(
            f"{address} rejected the Ray auth token in {token_source()}: {wrong_token_hint()}"
        )
    return no_token_error(address)


def submit(
    address: str,
    args: list[str],
    working_dir: str = ".",
    ship_requirements: bool = True,
    wait: bool = False,
    on_log: Callable[[str], None] = lambda text: None,
) -> Submission:
    """Submit ``searcher ARGS`` to the Ray cluster whose dashboard is at ``address``."""
    if not args or args[0] not in ("run", "eval"):
        raise SearcherError("submit: give the command after --, e.g. `submit ... -- run ARGS`")
    if not Path(working_dir).is_dir():
        raise SearcherError(f"--working-dir {working_dir}: not a directory")
    if any("://" in a and has_password(a) for a in args):
        raise SearcherError(
            "a password in a URL would be visible in the cluster's job table: give it with "
            "PGPASSWORD or ~/.pgpass on the head instead"
        )
    check_address(address, schemes=("http", "https"))
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(
            entrypoint=shlex.join(["python", "-m", "searcher", *args]),
            runtime_env=runtime_env(working_dir, ship_requirements),
            metadata={"tool": "searcher"},
        )
    except AuthenticationError as exc:
        raise auth_error(address, exc) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise SearcherError(f"submit to {address}: {reason}") from None
    result = Submission(job_id, address)
    if not wait:
        return result
    seen = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > seen:
            on_log(logs[seen:])
            seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            result.status = str(status.value)
            return result
        time.sleep(1.0)
