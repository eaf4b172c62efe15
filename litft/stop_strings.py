"""Stop strings: text that ends a reply, as OpenAI's `stop` does, cut out of text that arrives piece by piece.

A stop string can arrive split over several tokens ("\\nUs" then "er:"), so text that might be the start of one
cannot be shown yet: the longest end of the text that begins a stop string is held back until more text shows
whether it goes on into one. At the first stop string the text ends, before it.

    stops = StopStrings(["\\nUser:"])
    stops.add("Red.\\nUs")    -> "Red."   "\\nUs" is held back: it begins "\\nUser:"
    stops.add("er: and")     -> ""       "\\nUser:" arrived: the text ends before it, "Red.", and stops.stopped
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStrings:
    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max(map(len, self.stops), default=1) - 1
        self.text, self.shown, self.stopped = "", 0, False

    def add(self, piece: str, final: bool = False) -> str:
        """Add `piece`; return the text that can be shown now (all that is left when `final`). After a stop string
        has arrived (`stopped`), the text is complete and nothing more is added."""
        if self.stopped:
            return ""
        self.text += piece
        start = max(0, self.shown - self.hold)  # a stop string cannot begin in text already shown
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True
        end = len(self.text) if final or self.stopped else len(self.text) - self.held()
        new, self.shown = self.text[self.shown:end], max(self.shown, end)
        return new

    def held(self) -> int:
        """How many of the text's last characters begin a stop string (and so cannot be shown yet)."""
        return max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
