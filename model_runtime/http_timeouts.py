"""Cut off slow or stalled clients (slowloris): uvicorn's HTTP protocol with two deadlines.

- headers: from the connection's first byte (or its opening) to the end of the request headers;
- body: from the end of the headers to the end of the request body.
Past a deadline the client gets a 408 (when nothing was answered yet) and the connection closes;
the handler waiting on the body sees a disconnect. uvicorn itself only times out idle keep-alive
connections, so without this a half-sent request holds its connection forever.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def timed_protocol(header_timeout_s: float, body_timeout_s: float) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol class with these deadlines (uvicorn.Config(http=...) takes a class)."""

    class TimedHttpToolsProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self, seconds: float, what: str) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired, what)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self, what: str) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            answered = cycle is not None and (cycle.response_started or cycle.response_complete)
            begun = what == "body" or bool(getattr(self, "url", b""))  # a request was under way
            if not answered and begun:
                body = json.dumps({"error": f"request {what} not received within the server's time limit"}).encode()
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm(header_timeout_s, "headers")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm(header_timeout_s, "headers")

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._arm(body_timeout_s, "body")

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

    return TimedHttpToolsProtocol
