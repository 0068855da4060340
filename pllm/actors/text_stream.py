"""Token ids arriving in chunks -> text deltas that are safe to send.

Byte-level BPE tokens can split a UTF-8 character, so text ending in an incomplete character
(decoded as U+FFFD) is held back until the next chunk completes it. With stop strings, text that could
be the start of a stop string is held back too, and the first stop string ends the answer."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer, self.stop = tokenizer, stop or []
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already sent

    def feed(self, token_ids: list[int], final: bool = False) -> tuple[str, bool]:
        """Add tokens; returns (text to send now, whether a stop string ended the answer)."""
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids)
        for stop in self.stop:
            at = text.find(stop)
            if at != -1:
                delta = text[self.sent:at] if at > self.sent else ""
                self.sent = max(self.sent, at)
                return delta, True
        safe = len(text)
        if not final:
            while safe > self.sent and text[safe - 1] == "\ufffd":
                safe -= 1
            for stop in self.stop:  # a suffix that may grow into a stop string
                for k in range(min(len(stop) - 1, safe - self.sent), 0, -1):
                    if text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
        delta = text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return delta, False
