"""A streaming multipart/form-data reader for kubo's ``add`` (what aioipfs and the ipfs CLI send).

Each part is a file (``application/octet-stream``) or a directory
(``application/x-directory``) whose ``filename`` is its percent-encoded path, e.g.
``results%2Foutputs%2Fa.txt``. Bodies are written straight to disk as they arrive, so an add of
any size uses a couple of MiB of memory. Blocking: run it on a worker thread.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import unquote_plus

_CHUNK = 1 << 20
UNNAMED = "__unnamed__"  # where an unnamed single file (aioipfs add_bytes) is written
_MAX_HEADERS = 16 * 1024
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class MultipartError(ValueError):
    """The body is not the multipart form expected, or a part's path is unsafe."""


@dataclass(frozen=True)
class Part:
    """One added entry: its path relative to the upload root, and its kind."""

    path: str  # "" for an unnamed single file (add_bytes)
    directory: bool


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type."""
    media, _, rest = content_type.partition(";")
    if media.strip().lower() != "multipart/form-data":
        raise MultipartError(f"expected multipart/form-data, got {media.strip() or 'nothing'}")
    params = _params(";" + rest)
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise MultipartError("multipart/form-data without a usable boundary")
    return boundary.encode("latin-1")


def _params(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, raw in _PARAM.findall(text):
        value = raw.strip()
        if value.startswith('"') and value.endswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out[key.lower()] = value
    return out


def _safe_path(raw: str) -> str:
    name = unquote_plus(raw)  # kubo reads names with Go's QueryUnescape
    if "\0" in name or name.startswith("/") or "\\" in name:
        raise MultipartError(f"unsafe path in the upload: {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) and name != "":
        raise MultipartError(f"unsafe path in the upload: {name!r}")
    return name


def _part_of(headers: bytes) -> Part:
    fields: dict[str, str] = {}
    for line in headers.decode("utf-8", "replace").split("\r\n"):
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    disposition = _params(";" + fields.get("content-disposition", "").partition(";")[2])
    filename = disposition.get("filename*")
    if filename is not None and "''" in filename:
        filename = filename.split("''", 1)[1]
    if filename is None:
        filename = disposition.get("filename", "")
    kind = fields.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if kind == "application/symlink":
        raise MultipartError(f"symlinks are not accepted: {unquote_plus(filename)!r}")
    return Part(_safe_path(filename), kind == "application/x-directory")


class _Buffer:
    def __init__(self, reader: IO[bytes]) -> None:
        self._reader = reader
        self.data = bytearray()
        self.eof = False

    def fill(self) -> None:
        chunk = self._reader.read(_CHUNK)
        if chunk:
            self.data += chunk
        else:
            self.eof = True


def read_into_tree(reader: IO[bytes], boundary: bytes, root: Path, *, max_bytes: int) -> list[Part]:
    """Write every part under ``root`` (an unnamed file becomes ``root/UNNAMED``); returns parts.

    Raises :class:`MultipartError` for a malformed body or an unsafe path, and when file
    content exceeds ``max_bytes``.
    """
    buf = _Buffer(reader)
    dash = b"--" + boundary
    marker = b"\r\n" + dash
    parts: list[Part] = []
    total = 0
    # Preamble: everything up to the first delimiter.
    while True:
        at = buf.data.find(dash)
        if at >= 0:
            del buf.data[: at + len(dash)]
            break
        if buf.eof:
            raise MultipartError("no multipart delimiter in the body")
        del buf.data[: max(0, len(buf.data) - len(dash))]
        buf.fill()
    while True:
        while len(buf.data) < 2 and not buf.eof:
            buf.fill()
        if buf.data[:2] == b"--":
            return parts
        if buf.data[:2] != b"\r\n":
            raise MultipartError("malformed multipart delimiter")
        del buf.data[:2]
        while (end := buf.data.find(b"\r\n\r\n")) < 0:
            if buf.eof or len(buf.data) > _MAX_HEADERS:
                raise MultipartError("malformed or oversized part headers")
            buf.fill()
        part = _part_of(bytes(buf.data[:end]))
        del buf.data[: end + 4]
        target = root / (part.path or UNNAMED)
        if part.directory:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = None if part.directory else open(os.open(target, flags, 0o644), "wb")  # noqa: SIM115
        try:
            while True:
                at = buf.data.find(marker)
                take = at if at >= 0 else len(buf.data) - len(marker) + 1
                if take > 0:
                    if out is not None:
                        total += take
                        if total > max_bytes:
                            raise MultipartError(f"the upload exceeds {max_bytes} bytes")
                        out.write(buf.data[:take])
                    del buf.data[:take]
                if at >= 0:
                    del buf.data[: len(marker)]
                    break
                if buf.eof:
                    raise MultipartError("the multipart body ends in the middle of a part")
                buf.fill()
        finally:
            if out is not None:
                out.close()
        parts.append(part)
