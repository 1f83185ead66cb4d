"""Parse ``swanctl --raw`` output into dicts.

Each line is one vici message, ``<name> <kind> {...}``: sections ``key {...}``,
key/values ``key=value`` and lists ``key=[a b]``. swanctl prints values verbatim, so
a value containing spaces is cut where the next lowercase ``key=`` / ``key {`` /
``}`` begins; vici keys are lowercase, so a DN like ``C=CH, CN=gw`` survives.
"""

from __future__ import annotations

import re
from typing import Any

_NEXT_TOKEN = re.compile(r" (?=[a-z0-9_.-]+=|[^\s{}=]+ \{|\})|(?=\})")
_ENTRY = re.compile(r"([^\s{}=]+)(=\[| \{|=)")


class RawParseError(ValueError):
    pass


def _list_end(text: str, pos: int) -> int:
    """The ``]`` closing the list whose items start at ``pos``: items may hold brackets
    of their own, e.g. a traffic selector ``10.1.0.0/16[tcp/443]``."""
    depth = 1
    for at in range(pos, len(text)):
        if text[at] == "[":
            depth += 1
        elif text[at] == "]":
            depth -= 1
            if depth == 0:
                return at
    raise RawParseError("unterminated list")


def _section(text: str, pos: int) -> tuple[dict[str, Any], int]:
    """Parse the body after ``{`` at ``pos``; return it and the position after ``}``."""
    out: dict[str, Any] = {}
    while True:
        while pos < len(text) and text[pos] == " ":
            pos += 1
        if pos >= len(text):
            raise RawParseError("unterminated section")
        if text[pos] == "}":
            return out, pos + 1
        m = _ENTRY.match(text, pos)
        if m is None:
            raise RawParseError(f"unexpected text at {pos}: {text[pos:pos + 40]!r}")
        key, kind = m.group(1), m.group(2)
        pos = m.end()
        if kind == " {":
            out[key], pos = _section(text, pos)
        elif kind == "=[":
            end = _list_end(text, pos)
            out[key] = text[pos:end].split()
            pos = end + 1
        else:
            stop = _NEXT_TOKEN.search(text, pos)
            end = len(text) if stop is None else stop.start()
            out[key] = text[pos:end]
            pos = end


def parse_raw(text: str) -> list[dict[str, Any]]:
    """The body of every ``event`` message in swanctl's raw output, in order."""
    events = []
    for line in text.splitlines():
        m = re.match(r"(\S+) (\S+) \{", line)
        if m is None:
            continue  # log lines swanctl may print around the messages
        body, end = _section(line, m.end())
        if line[end:].strip():
            raise RawParseError(f"trailing text after message: {line[end:]!r}")
        if m.group(2) == "event":
            events.append(body)
    return events
