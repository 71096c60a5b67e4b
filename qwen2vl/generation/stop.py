"""Stop strings on streamed text: a stop string split across tokens still stops, and is never
emitted; text that might be the start of a stop string is held back until it is not."""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add generated text; return what may be shown now. Sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = self._held_back()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        """The end of generation: held-back text was not a stop string after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of pending text that begins some stop string."""
        for n in range(min(len(self.pending), max((len(s) for s in self.stops), default=0)), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
