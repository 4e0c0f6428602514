"""JSON Lines read without trusting the file: a line is never held past a size limit, and a
value that is not JSON (or nests past the parser's limit) is a ShipkitError naming where.

Used for JSONL sources and for the corpus folder's own shards.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import IO

from shipkit.errors import ShipkitError


def bounded_lines(handle: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of a file read line by line; None for a line over `limit` bytes,
    which is skipped without ever being held whole."""
    line_number = 0
    while raw := handle.readline(limit + 1):
        line_number += 1
        if len(raw) <= limit:
            yield line_number, raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = handle.readline(limit)
        yield line_number, None


def parse_json(line: str | bytes, where: str, error_type: type[ShipkitError]) -> object:
    """One JSON value; `error_type` naming `where` when it is not valid JSON or nests too deep."""
    try:
        return json.loads(line)
    except RecursionError:
        raise error_type(f"{where}: JSON nested deeper than the parser's {sys.getrecursionlimit()} "
                         "levels") from None
    except ValueError as error:
        raise error_type(f"{where}: invalid JSON: {error}") from None
