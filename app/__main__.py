"""``python -m app``: serve the app with uvicorn, its server-level limits taken from the settings.

This is the way to run the service (``make run``, the container image): the connection
defences (header and idle timeouts, the header-size cap, the connection cap, JSON answers to
malformed requests) and the bounded shutdown live in the server, not in the ASGI app, so a
bare ``uvicorn app.main:app`` serves the same API without them.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import uvicorn

from app.server import server_config
from app.settings import SettingsError, get_settings


def main(argv: list[str] | None = None) -> int:
    """Parse ``--host``, ``--port`` and ``--log-level``, then serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level of the server and the app (default info)",
    )
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    config = server_config(settings, host=args.host, port=args.port, log_level=args.log_level)
    # uvicorn re-raises the SIGINT it stopped on; its own CLI swallows it the same way.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
