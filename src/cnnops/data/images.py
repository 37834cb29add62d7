"""Image folders: which files are read, decoding any format Pillow reads to the target size and
channels, and the cache of decoded images keyed by content hash."""

from __future__ import annotations

from pathlib import PurePath

JUNK_NAMES = {"Thumbs.db", "desktop.ini", "__MACOSX"}


def is_junk(relative: PurePath | str) -> bool:
    """Files no user means as data, in folders and archives alike: hidden files and folders
    (".DS_Store", ".git"), macOS AppleDouble files ("._x.jpg") and `__MACOSX/`, Windows'
    Thumbs.db and desktop.ini."""
    return any(part.startswith(".") or part in JUNK_NAMES for part in PurePath(relative).parts)
