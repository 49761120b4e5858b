"""Indexed file names as text, as URLs and back, and the containment check done before serving a file.

File names are bytes on POSIX. Python lists them as ``str`` with undecodable bytes kept as lone
surrogates (``os.fsdecode``: ``b"bad\\xff.png"`` -> ``"bad\\udcff.png"``), which is what the index
stores, so every file is indexed, whatever its name. Such strings cannot be written as UTF-8, so:
  * `display_name` is the text shown (JSON, the page): invalid bytes become U+FFFD;
  * `image_url` percent-encodes the name's exact bytes (``/images/bad%FF.png``); characters with a
    meaning in URLs or HTML (``#``, ``?``, ``<``, spaces) are encoded too;
  * `name_from_raw_path` turns the request's raw path back into the indexed name, byte for byte
    (the ASGI ``path`` is already decoded as UTF-8 with replacement, which would lose them).
`contained` resolves a file at serve time and refuses it when it (or a symlink that replaced it
after indexing) leads outside the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

IMAGES_PREFIX = "/images/"


def name_bytes(name: str) -> bytes:
    """The bytes of an indexed name (inverse of the surrogate-escaping decode of file names)."""
    return name.encode("utf-8", "surrogateescape")


def display_name(name: str) -> str:
    """``name`` as valid text: bytes that are not UTF-8 shown as U+FFFD (for JSON and HTML)."""
    return name_bytes(name).decode("utf-8", "replace")


def image_url(name: str) -> str:
    """The URL path that serves the indexed file ``name`` (its bytes percent-encoded, ``/`` kept)."""
    return IMAGES_PREFIX + quote(name_bytes(name), safe="/")


def name_from_raw_path(raw_path: bytes, root_path: str = "") -> str | None:
    """The indexed name a request's raw (still percent-encoded) path asks for, or None if it is not /images/."""
    prefix = (root_path.rstrip("/") + IMAGES_PREFIX).encode("ascii", "replace")
    if not raw_path.startswith(prefix):
        return None
    return unquote_to_bytes(raw_path[len(prefix) :]).decode("utf-8", "surrogateescape")


def contained(root: Path, name: str) -> Path | None:
    """``root / name`` resolved (symlinks followed) if it is a regular file inside ``root`` (itself
    resolved), else None. Checked on every request: a symlink that replaced an indexed file after
    indexing, or a folder swapped for a link, is refused too."""
    try:
        real = Path(os.path.realpath(root / name, strict=True))
    except (OSError, ValueError):  # missing, a symlink loop, or a NUL in the name
        return None
    if not real.is_relative_to(root) or not real.is_file():
        return None
    return real


def within(root_real: str, real: str) -> bool:
    """Whether the resolved path ``real`` is ``root_real`` (resolved) or lies below it."""
    return os.path.commonpath([root_real, real]) == root_real


__all__ = ["IMAGES_PREFIX", "contained", "display_name", "image_url", "name_bytes", "name_from_raw_path", "within"]
