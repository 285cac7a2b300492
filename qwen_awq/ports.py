"""A free loopback TCP port: the tensor-parallel rendezvous, the serving sweep's server, the tests' live servers."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on now on 127.0.0.1 (the OS picks it; another process may take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
