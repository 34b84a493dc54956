"""The one rule for adapter names, shared by the validator and the store (no torch needed here).

1 to 128 characters of letters, digits, '.', '_', '-', starting with a letter or digit and without
'..': usable as a file name and in a URL path, never a path traversal.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)

NAME_RULE = ("use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit, "
             "without '..'")


def is_valid_adapter_name(name: object) -> bool:
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and ".." not in name


def shown_name(name: object) -> object:
    """The name as error messages show it: long names are cut to 64 characters."""
    return name if not isinstance(name, str) or len(name) <= 64 else name[:64] + "..."
