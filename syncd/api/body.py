"""Reading a response body with a bound on its size, decompressed by syncd itself.

httpx decompresses a whole chunk at once (a 64 KiB chunk of a gzip bomb is 64 MiB of output), so the
client asks for the raw bytes and inflates them here with zlib's ``max_length``: what a body may
grow to is bounded before the bytes exist.
"""

from __future__ import annotations

import zlib

import httpx

from syncd.errors import InvalidResponseError, ResponseTooLargeError

ACCEPT_ENCODING = "gzip, deflate"  # what syncd can inflate; httpx would also offer br and zstd


class _Inflater:
    """zlib decompression that never produces more than it is allowed to."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        # gzip: a gzip header (wbits 16+); deflate: a zlib stream, or by some servers raw deflate.
        self._z = zlib.decompressobj(zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS)
        self._started = False

    def feed(self, data: bytes, room: int) -> bytes:
        """Inflate ``data`` into at most ``room + 1`` bytes (one more than room tells it is too much)."""
        try:
            out = self._z.decompress(data, room + 1)
        except zlib.error as exc:
            if self._encoding == "deflate" and not self._started:
                self._z = zlib.decompressobj(-zlib.MAX_WBITS)
                self._started = True
                return self.feed(data, room)
            raise InvalidResponseError(f"the {self._encoding} body is corrupt ({exc})") from None
        self._started = True
        return out

    def finish(self) -> None:
        """InvalidResponseError if the compressed stream was cut short."""
        if not self._z.eof:
            raise InvalidResponseError(f"the {self._encoding} body ends before its compressed stream does")


def read_body(response: httpx.Response, limit: int, *, truncate: bool = False) -> bytes:
    """The decoded body, at most ``limit`` bytes of it.

    A longer body raises :class:`ResponseTooLargeError` (message to be completed by the caller), or
    with ``truncate`` is cut at ``limit`` (for error bodies, of which only a snippet is kept).
    """
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
    if encoding not in ("identity", "gzip", "deflate"):
        raise InvalidResponseError(f"the body's Content-Encoding {encoding[:40]!r} was not asked for")
    declared = response.headers.get("Content-Length", "")
    if encoding == "identity" and declared.isdigit() and int(declared) > limit and not truncate:
        raise ResponseTooLargeError("")
    inflater = _Inflater(encoding) if encoding != "identity" else None
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_raw():
        room = limit - size
        data = inflater.feed(chunk, room) if inflater else chunk
        if len(data) > room:
            if not truncate:
                raise ResponseTooLargeError("")
            chunks.append(data[:room])
            break
        chunks.append(data)
        size += len(data)
    else:
        if inflater is not None and size:
            inflater.finish()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
