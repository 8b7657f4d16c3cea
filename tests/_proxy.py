"""A loopback TCP proxy that loses replies or holds them, for tests of lost
connections and of slow servers.

It forwards every request of its clients to the server and every reply back, except
that a request the test marks (``drop(request) -> True``) is forwarded, and when the
server's reply to it arrives, both connections are closed instead: the server applied
the request, and the client never hears of it — a server crash after the write, or a
load balancer resetting a connection. With ``delay``, every reply is held that long
before it is passed on: a server (or a network) that answers slowly.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable


class ReplyDropper:
    """Listens on a free port of 127.0.0.1 and forwards to ``(host, port)``.

    Args:
        target: the server's address.
        drop: called with the bytes of each request read from a client; True drops the
            reply to it. None: no reply is dropped.
        delay: seconds each reply is held before it is passed on.
        answer: called with each request read from a client; bytes answer it in the
            server's place (the request is not passed on). None: the server answers.
    """

    def __init__(
        self,
        target: tuple[str, int],
        drop: Callable[[bytes], bool] | None = None,
        *,
        delay: float = 0.0,
        answer: Callable[[bytes], bytes | None] | None = None,
    ) -> None:
        self.target = target
        self.drop = drop or (lambda request: False)
        self.answer = answer or (lambda request: None)
        self.delay = delay
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        accept = threading.Thread(target=self._accept, name="reply-dropper", daemon=True)
        accept.start()
        self._threads.append(accept)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            server = socket.create_connection(self.target)
            pipe = threading.Thread(target=self._pipe, args=(client, server), daemon=True)
            pipe.start()
            self._threads.append(pipe)

    def _pipe(self, client: socket.socket, server: socket.socket) -> None:
        doomed = False
        with selectors.DefaultSelector() as sel, client, server:
            sel.register(client, selectors.EVENT_READ)
            sel.register(server, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1):
                    sock = key.fileobj
                    try:
                        data = sock.recv(1 << 20)  # type: ignore[union-attr]
                    except OSError:
                        return
                    if not data:
                        return
                    if sock is client:
                        instead = self.answer(data)
                        if instead is not None:
                            client.sendall(instead)
                            continue
                        doomed = doomed or self.drop(data)
                        server.sendall(data)
                    elif doomed:
                        # The server answered: it applied the request. The client
                        # never learns of it: every other time the connection is reset
                        # (as a crashed host or a load balancer does), else closed.
                        with self._lock:
                            self.dropped += 1
                            reset = self.dropped % 2 == 0
                        if reset:
                            client.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                        return
                    else:
                        if self.delay:
                            time.sleep(self.delay)
                        client.sendall(data)
