"""Local paths and pyarrow filesystem URIs (s3://, gs://, file://...) behind one small API."""

from __future__ import annotations

import os
import re
from typing import Any

import pyarrow.fs as pafs

from kiln.errors import KilnError

URI_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str) -> bool:
    """True for `scheme://...` locations, False for plain paths."""
    return bool(URI_PATTERN.match(location))


def open_location(location: str, *, field: str = "location") -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a pyarrow filesystem URI.

    Raises:
        KilnError: naming `field` when the URI's filesystem cannot be opened.
    """
    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except (ValueError, OSError) as exc:
            raise KilnError(f"{field}: {location!r} cannot be opened: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def join(base: str, *parts: str) -> str:
    """Join with '/', for paths and URIs alike."""
    return "/".join([base.rstrip("/"), *parts]) if base else "/".join(parts)


def read_bytes(fs: Any, path: str) -> bytes:
    """The whole file, uncompressed whatever its name."""
    with fs.open_input_stream(path, compression=None) as f:
        return bytes(f.read())


def write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write a file (compression=None: pyarrow would otherwise gzip a name ending in .gz)."""
    with fs.open_output_stream(path, compression=None) as f:
        f.write(data)


def exists(fs: Any, path: str) -> bool:
    """Whether a file or directory exists at `path`."""
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)
