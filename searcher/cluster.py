"""Connecting to Ray: a local instance sized to the workers, or an existing cluster."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from searcher.errors import SearcherError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# how a machine gets a cluster's auth token, for the messages about a missing or wrong one
COPY_TOKEN = (
    "copy the head's token (`ray get-auth-token` on the head) into RAY_AUTH_TOKEN, a file named "
    "by RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
)
SET_TOKEN = f"{COPY_TOKEN}, and set RAY_AUTH_MODE=token"


def token_source() -> str:
    """Where Ray reads its auth token from here, in Ray's order of precedence."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return "~/.ray/auth_token"


def no_token_error(address: str) -> SearcherError:
    """Ray is in token mode here (RAY_AUTH_MODE=token) but finds no token to send."""
    return SearcherError(
        f"{address}: RAY_AUTH_MODE=token but there is no Ray auth token in {token_source()}: "
        f"{COPY_TOKEN}"
    )


def wrong_token_hint() -> str:
    """What to do when the cluster rejects the token Ray sent from here."""
    return f"put the head's token (`ray get-auth-token` on the head) in {token_source()} instead"


def check_address(address: str, schemes: tuple[str, ...] = ("ray",)) -> tuple[str, int] | None:
    """Validate ``auto``, ``local`` (a new local instance), ``host:port`` or
    ``SCHEME://host:port``; return (host, port) to probe.

    A cluster that cannot be reached fails here in seconds, with one line, instead of
    inside Ray's own connection retries.
    """
    if address in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    scheme_ok = parts.scheme in (*schemes, "tcp") if "://" in address else True
    try:
        port = parts.port
    except ValueError:
        port = None
    if not scheme_ok or not parts.hostname or port is None:
        allowed = " or ".join(f"{s}://HOST:PORT" for s in schemes)
        raise SearcherError(f"--address {address!r}: expected auto, HOST:PORT or {allowed}")
    try:
        with socket.create_connection((parts.hostname, port), timeout=5):
            pass
    except OSError as exc:
        raise SearcherError(
            f"--address {address}: cannot reach {parts.hostname}:{port} ({exc.strerror or exc}); "
            "is the Ray head running there?"
        ) from None
    return parts.hostname, port


@contextmanager
def connected(address: str | None, cpus: int, gpus: int = 0) -> Iterator[None]:
    """Ray, for the length of the block: the running cluster at ``address``, or a local
    instance with ``cpus`` CPUs (and ``gpus`` GPUs) whose dashboard, if any, is on loopback.

    When Ray is already initialised in this process (a notebook, a test), it is used as is.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]  # inside a Ray job: use the job's cluster
    if address == "local":
        address = None
    if address is not None:
        _join(address)
    else:
        # Ray's notice that it turned its token authentication on (it stays on) is not news
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        ray.init(
            address="local",  # a new instance, never a cluster someone else started here
            num_cpus=cpus,
            num_gpus=gpus,
            include_dashboard=False,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,  # Ray's own servers listen on loopback only
            object_store_memory=512 << 20,  # windows and the dense reference: tens of MB
            logging_level=logging.WARNING,
            log_to_driver=False,
            # Ray starts workers at niceness 15, for workers that do light work beside others;
            # ours are the work, and at 15 anything else busy on the machine starves them
            _system_config={"worker_niceness": 0},
        )
    try:
        yield
    finally:
        ray.shutdown()


def _join(address: str) -> None:
    """Join the running cluster at ``address``, or fail with one line."""
    import ray
    from ray.exceptions import AuthenticationError

    check_address(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except AuthenticationError:
        raise no_token_error(f"--address {address}") from None
    except (ConnectionError, RuntimeError) as exc:
        # a head that rejects the token (or gets none) only shows as a failed connection
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            hint = f"if the head rejected this Ray auth token, {wrong_token_hint()}"
        else:
            hint = f"if the cluster wants Ray's auth token, {SET_TOKEN}"
        reason = " ".join(str(exc).split())
        raise SearcherError(
            f"--address {address}: cannot join the Ray cluster ({reason}); {hint}"
        ) from None
