"""Connection timeouts of `samout serve`: a client may not hold a connection without sending
its request. uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but sets no
limit on a request's headers or body: a half-sent request held its connection forever.

- Headers: `timed_protocol(seconds)` is uvicorn's HTTP protocol (httptools or h11) with a
  timer from a request's first byte (or the connection's opening) to its complete headers.
- Body: `BodyDeadline`, an ASGI middleware, gives the app's reads of the body a deadline
  counted from the complete headers; past it the client gets 408 and the connection closes.
"""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse

from samout.serve import protocol as P

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_KEEP_ALIVE_TIMEOUT = 5  # uvicorn's own default
_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def timed_protocol(header_timeout: float) -> type:
    """uvicorn's automatic HTTP protocol class, closing a connection whose request headers
    take longer than `header_timeout` seconds (408 when part of a request came)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class TimedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _partial = False  # bytes of the awaited request have come

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and not self._in_request():
                self._arm()  # a new request on a kept-alive connection
            self._partial = True
            super().data_received(data)
            if self._in_request():  # the headers are complete (both parsers run synchronously)
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is not None and not cycle.response_complete

        def _arm(self) -> None:
            self._partial = False
            self._header_timer = asyncio.get_running_loop().call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if self._in_request() or self.transport.is_closing():
                return
            if self._partial:
                self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

    return TimedHTTPProtocol


class BodyDeadline:
    """A request body must arrive within `seconds` of its headers: past that the client gets
    408 (an OpenAI error body) and the connection is closed; the app reading the body is told
    the client went away, and nothing it sends afterwards goes out."""

    def __init__(self, app, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done, timed_out = False, False

        async def receive_in_time():
            nonlocal body_done, timed_out
            if body_done or timed_out:  # afterwards: the disconnect watcher waits unbounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                timed_out = True
                body = P.error_body(f"the request body did not arrive within {self.seconds:g} s "
                                    "(--timeout-body)", code="body_timeout")
                answer = JSONResponse(body, status_code=408, headers={"Connection": "close"})
                await answer(scope, receive, send)
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_unless_answered(message) -> None:
            if not timed_out:
                await send(message)

        try:
            await self.app(scope, receive_in_time, send_unless_answered)
        except Exception:
            if not timed_out:  # the app's failure to read the body it was denied: answered
                raise
