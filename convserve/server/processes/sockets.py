"""Ending a drain at the transport: shutting down the gRPC port's TCP sockets under grpc core.

grpc core's own shutdown (``server.stop``) answers CANCELLED to every call it has received but not yet
handed to the application, and to every call that arrives on a connection before the client has read
the GOAWAY. Clients, proxies and retry policies do not retry CANCELLED: to a client it means the call
may have run. Shutting the sockets down first (``shutdown(2)``, which leaves the descriptors to grpc)
ends each connection with a FIN instead; a client then fails whatever is outstanding on it with
UNAVAILABLE ("Socket closed"), which everything retries, and grpc core has nobody left to cancel.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

log = logging.getLogger(__name__)

__all__ = ["shut_down_port"]

_FD_DIR = "/proc/self/fd"


def _sockets() -> list[int]:
    try:
        names = os.listdir(_FD_DIR)
    except OSError:  # no /proc (not Linux): the caller falls back to grpc's own shutdown
        return []
    fds = []
    for name in names:
        try:
            fd = int(name)
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                fds.append(fd)
        except (ValueError, OSError):  # the listing's own descriptor, or one closed meanwhile
            continue
    return fds


def shut_down_port(port: int, unix_path: str | None = None) -> int:
    """Shut down (both directions) every TCP socket of this process whose local port is ``port`` (and,
    given ``unix_path``, every Unix socket bound to or accepted on that path): the listener first (no
    connection completes after it), then each accepted connection. Returns how many; 0 where descriptors
    cannot be listed."""
    mine = []
    for fd in _sockets():
        try:
            dup = socket.socket(fileno=os.dup(fd))  # a duplicate: closing it leaves grpc's descriptor
        except OSError:
            continue
        try:
            if dup.type == socket.SOCK_STREAM and (
                (dup.family in (socket.AF_INET, socket.AF_INET6) and dup.getsockname()[1] == port)
                or (unix_path is not None and dup.family == socket.AF_UNIX and dup.getsockname() == unix_path)
            ):
                mine.append(dup)
                continue
        except OSError:
            pass
        dup.close()
    mine.sort(key=_connected)  # listeners (not connected) first
    done = 0
    for dup in mine:
        with dup:
            try:
                dup.shutdown(socket.SHUT_RDWR)
                done += 1
            except OSError:  # already closed by grpc meanwhile
                continue
    return done


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:
        return False
