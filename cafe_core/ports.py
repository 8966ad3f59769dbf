"""Loopback ports for the servers and process groups the project starts on this machine."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port that is free on 127.0.0.1 now (the OS picks it; a small race with other starters remains)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
