"""A small stdlib asyncio HTTP/1.1 client for the serving benchmarks (bench serve, soak): streamed lines of one
request, JSON replies, and the error a non-200 status raises. It needs nothing beyond the standard library.
"""
from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar "
         "papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu river mountain").split()


class HTTPError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status, self.body = status, body


async def _chunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk
        yield data


async def _until_eof(reader: asyncio.StreamReader, length: int | None) -> AsyncIterator[bytes]:
    if length is not None:
        yield await reader.readexactly(length)
        return
    while data := await reader.read(65536):
        yield data


async def request_lines(url: str, method: str, path: str, payload: Any = None,
                        headers: dict[str, str] | None = None) -> AsyncIterator[str]:
    """Send one HTTP/1.1 request and yield the reply body's lines as they arrive (SSE events, NDJSON).

    Raises HTTPError for a non-200 status. Closing the iterator early closes the connection, which is how a
    client disconnects mid-stream.
    """
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    reader, writer = await asyncio.open_connection(u.hostname, port, ssl=u.scheme == "https" or None)
    try:
        body = b"" if payload is None else json.dumps(payload).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {u.netloc}", "Connection: close",
                 f"Content-Length: {len(body)}", "Content-Type: application/json",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        reply: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            reply[key.strip().lower()] = value.strip()
        length = int(reply["content-length"]) if "content-length" in reply else None
        chunked = reply.get("transfer-encoding") == "chunked"
        chunks = _chunked(reader) if chunked else _until_eof(reader, length)
        if status != 200:
            raise HTTPError(status, b"".join([c async for c in chunks]).decode(errors="replace"))
        buffer = b""
        async for chunk in chunks:
            *complete, buffer = (buffer + chunk).split(b"\n")
            for line in complete:
                yield line.decode()
        if buffer:
            yield buffer.decode()
    finally:
        writer.close()


async def request_json(url: str, method: str, path: str, payload: Any = None,
                       headers: dict[str, str] | None = None) -> Any:
    return json.loads("\n".join([line async for line in request_lines(url, method, path, payload, headers)]))
