"""`mrtune serve RUN`: the run's model behind an HTTP API (uvicorn), until Ctrl-C or SIGTERM."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path

from mrtune.errors import MrtuneError

API_KEY_ENV = "MRTUNE_API_KEY"


def is_local(host: str) -> bool:
    """Whether `host` is a loopback address, reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_options(host: str, port: int, api_key: str | None, max_batch: int | None, timeout_s: float) -> list[str]:
    """Every problem with the options, before the model loads."""
    problems = []
    if api_key is not None and not api_key.strip():
        problems.append(f"the API key (--api-key or {API_KEY_ENV}) is empty: give a long random string")
    if not is_local(host) and not api_key:
        problems.append(
            f"--host {host} makes the server reachable from other machines: also set an API key "
            f"({API_KEY_ENV}=... in the environment, or --api-key KEY), or serve on 127.0.0.1"
        )
    if not 0 <= port <= 65535:
        problems.append(f"--port {port} is not a port number: use 1-65535 (or 0 for any free port)")
    if max_batch is not None and not 1 <= max_batch <= 1024:
        problems.append(f"--max-batch {max_batch} is out of range: use 1-1024")
    if not timeout_s > 0:
        problems.append(f"--timeout {timeout_s} must be a positive number of seconds")
    return problems


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound here so that a busy port fails before the model loads."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        raise MrtuneError(
            f"cannot listen on {host}:{port} ({error.strerror or error}): choose another --port"
        ) from None


def serve(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int | None = None,
    timeout_s: float = 60.0,
    batch_window_ms: float = 10.0,
    log_level: str = "info",
    ensemble: list[str] | tuple[str, ...] = (),
) -> None:
    """Serve a finished run until SIGTERM or Ctrl-C; requests in flight are answered before it returns.

    `max_batch` (default: the run's eval.batch_size) caps the rows decoded together. The API key defaults to the
    MRTUNE_API_KEY environment variable; a bind to a non-loopback address needs one. `ensemble`: more runs whose
    models are loaded beside the run's and vote on every answer.
    """
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV)
    problems = check_options(host, port, api_key, max_batch, timeout_s)
    if problems:
        raise MrtuneError("; ".join(problems))
    sock = listen(host, port)
    try:
        _run(sock, run_dir, host, api_key, max_batch, timeout_s, batch_window_ms, log_level, ensemble)
    finally:
        sock.close()


def _run(sock, run_dir, host, api_key, max_batch, timeout_s, batch_window_ms, log_level, ensemble) -> None:
    import uvicorn

    from mrtune.serve.app import ServeSettings, create_app
    from mrtune.serve.engine import Engine

    engine = Engine.load(run_dir, max_batch, ensemble)
    settings = ServeSettings(api_key=api_key or None, timeout_s=timeout_s, batch_window_s=batch_window_ms / 1000)
    app = create_app(engine, settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=log_level,
            # Requests in flight at SIGTERM are answered: they end within their own timeout.
            timeout_graceful_shutdown=timeout_s + 5,
        )
    )
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {engine.name} on http://{shown}:{port} ({engine.device}, batches of up to {engine.max_batch}): "
        "the page at /, POST /v1/parse, OpenAI API at /v1",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again so the process ends as if killed by
    # it; with this handler in place that second SIGTERM is ignored and a graceful stop exits 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
