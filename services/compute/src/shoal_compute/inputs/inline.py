"""Inline inputs: data carried in the job itself, as a ``data:`` URL or plain text.

A ``data:`` URL whose media type is a tar (optionally gzipped) is unpacked as a directory,
as the reference system did for inline folders; anything else becomes one file.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

from shoal_common.content_store import UnsafeArchiveError, safe_extract_tar
from shoal_compute.inputs.errors import InputError

_ARCHIVE_TYPES = frozenset(
    {"application/x-tar", "application/tar", "application/gzip", "application/x-gzip"}
)


@dataclass(frozen=True)
class InlineData:
    data: bytes
    media_type: str

    @property
    def is_archive(self) -> bool:
        return self.media_type in _ARCHIVE_TYPES


def decode_inline(text: str | None, max_bytes: int) -> InlineData:
    """Decode and size-check inline data; raises :class:`InputError`."""
    if text is None:
        raise InputError("an inline input needs its data (a data: URL or text)")
    if not text.startswith("data:"):
        raw = text.encode()
        _check_size(len(raw), max_bytes)
        return InlineData(raw, "text/plain")
    header, sep, payload = text[5:].partition(",")
    if not sep:
        raise InputError("malformed data: URL (no ',' before the data)")
    params = header.split(";")
    media_type = (params[0] or "text/plain").strip().lower()
    if "base64" in (p.strip().lower() for p in params[1:]):
        # Refuse before decoding: the decoded size is known from the text length.
        _check_size(len(payload) * 3 // 4 - payload.count("=", -2), max_bytes)
        try:
            raw = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"inline data is not valid base64: {exc}") from exc
    else:
        raw = unquote_to_bytes(payload)
    _check_size(len(raw), max_bytes)
    return InlineData(raw, media_type)


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise InputError(
            f"inline data of {size} bytes is above this node's limit of {max_bytes} bytes",
            hint="upload it with `shoal put` and pass its CID instead",
        )


def materialise_inline(inline: InlineData, directory: Path, name: str, max_bytes: int) -> Path:
    """Write inline data under ``directory``: a file ``name``, or a folder for archives."""
    directory.mkdir(parents=True, exist_ok=True)
    if inline.is_archive:
        target = directory / name
        try:
            safe_extract_tar(io.BytesIO(inline.data), target, max_bytes=max_bytes)
        except UnsafeArchiveError as exc:
            raise InputError(f"inline archive refused: {exc}") from exc
        except (OSError, EOFError, ValueError) as exc:  # tarfile.ReadError is an OSError...
            raise InputError(f"inline archive is not a readable tar: {exc}") from exc
        return target
    target = directory / name
    target.write_bytes(inline.data)
    return target
