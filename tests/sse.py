"""Reading server-sent events in tests: a small parser that follows the WHATWG rules."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass
class Message:
    """One dispatched event (`kind` None for a comment-only block), as a browser would see it."""

    kind: str | None
    data: dict | None
    id: str | None
    comments: list[str]
    retry: int | None = None


def parse(lines: Iterable[str]) -> Iterator[Message]:
    """Messages from the stream's lines (without their line endings)."""
    kind = event_id = retry = None
    data: list[str] = []
    comments: list[str] = []
    for line in lines:
        if line == "":
            if data or kind or event_id or comments or retry is not None:
                yield Message(kind or ("message" if data else None),
                              json.loads("\n".join(data)) if data else None, event_id, comments,
                              retry)
            kind = event_id = retry = None
            data, comments = [], []
            continue
        if line.startswith(":"):
            comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
        elif name == "retry":
            retry = int(value)


def parse_text(text: str) -> list[Message]:
    return list(parse(text.split("\n")))


def order(event_id: str) -> tuple[int, int]:
    """The increasing part of a Headstart event id: (seq, index)."""
    seq, index = event_id.split(".")[:2]
    return int(seq), int(index)
