"""Token ids to text deltas for streaming: decode everything so far and emit what is new,
holding back a trailing partial UTF-8 character until the next ids complete it."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextDeltas:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith(REPLACEMENT):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        delta, self.sent = text[len(self.sent):], text
        return delta
