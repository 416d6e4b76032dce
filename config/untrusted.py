"""Text that came from outside (file names, job files, prompts) made safe to print and log.

Whoever drops files chooses their names and prompts. A newline in a name would forge a
real-looking log line; ESC and OSC sequences would drive the terminal of whoever runs
``status`` or ``show``; a NUL byte ends a C string early in tools reading the log; bidirectional
overrides reorder what a reader sees. ``printable`` shows every such character as a visible
escape (``\\n``, ``\\x1b``, ``\\u202e``) and leaves all other text, accents and emoji included,
as it is. ``control_characters`` finds them, for refusing names at validation.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, line/paragraph separators, bidirectional embeddings, overrides
# and isolates, the BOM / zero-width no-break space.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` with every control, separator and bidirectional-override character escaped."""
    return _UNSAFE.sub(_escape, str(text))


def control_characters(text: str) -> list[str]:
    """The unsafe characters in ``text``, each as its visible escape (empty when there are none)."""
    return [_escape(match) for match in _UNSAFE.finditer(text)]
