"""The one rule for adapter names, shared by the validator and the store (no torch needed here).

One part, or two joined by one '/' as hub ids are (`org/name`). A part is 1 to 128 characters of
letters, digits, '.', '_', '-', starting with a letter or digit; no '..' anywhere. Usable in a URL
path (and hashed, never used, as a file name), never a path traversal.
"""

from __future__ import annotations

import re

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(rf"{_PART}(?:/{_PART})?", re.ASCII)

NAME_RULE = ("use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit, "
             "without '..', optionally as org/name (one '/' between two such parts)")


def is_valid_adapter_name(name: object) -> bool:
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and ".." not in name


def shown_name(name: object) -> object:
    """The name as error messages show it: long names are cut to 64 characters."""
    return name if not isinstance(name, str) or len(name) <= 64 else name[:64] + "..."
