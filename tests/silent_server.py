"""A TCP server that accepts connections, reads what it is sent and never answers.

What a hung store looks like from the client: a Redis server (or a network disk)
that took the connection and then stopped. ``redis://`` stores pointed at it
block in every write until their timeout. :meth:`SilentServer.close` drops every
connection, so the writes fail at once and nothing is left hanging after a test.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class SilentServer:
    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="silent-server", daemon=True).start()

    def redis_url(self, timeout: float = 300) -> str:
        """A store URL whose writes wait up to ``timeout`` seconds for a reply."""
        return f"redis://127.0.0.1:{self.port}/0?timeout={timeout}"

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._connections.append(conn)
            threading.Thread(target=self._swallow, args=(conn,), daemon=True).start()

    @staticmethod
    def _swallow(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
