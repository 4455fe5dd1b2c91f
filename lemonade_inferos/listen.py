"""Listening sockets for inferos' HTTP servers, bound before a server starts so a bad or busy
port is one clear error line instead of a traceback from inside uvicorn."""

from __future__ import annotations

import argparse
import errno
import socket


class ListenError(ValueError):
    """The address cannot be listened on (message names host, port, the reason and the fix)."""


def port_number(text: str) -> int:
    """argparse ``type=`` for a TCP port: an integer in 0..65535 (0 = any free port).

    Raises:
        argparse.ArgumentTypeError: not an integer or out of range.
    """
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0..65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range (0..65535)")
    return port


def listen_socket(host: str, port: int, *, flag: str = "--port") -> socket.socket:
    """A TCP socket bound to ``(host, port)`` and listening (``SO_REUSEADDR`` set, as
    uvicorn does). Hand it to ``uvicorn.Server.run(sockets=[sock])``.

    Raises:
        ListenError: the port is out of range, in use, not permitted, or the host is not
            an address of this machine.
    """
    if not 0 <= port <= 65535:
        raise ListenError(f"{flag} {port} is out of range (0..65535)")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {host!r}: {e.strerror}; use an address of this machine, e.g. 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ListenError(f"port {port} on {host} is already in use (another server is running there); "
                              f"stop it or choose another port with {flag}") from None
        if e.errno == errno.EACCES:
            raise ListenError(f"no permission to listen on port {port} on {host}; choose a port above 1023 "
                              f"with {flag}") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ListenError(f"{host} is not an address of this machine; use e.g. 127.0.0.1 or 0.0.0.0") from None
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock
