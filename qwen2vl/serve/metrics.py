"""Server metrics in the Prometheus text format (version 0.0.4), without a client library.

The engine reports events (tokens, first tokens, finishes, encoder-cache lookups) from its thread;
gauges that describe the present (queue length, running sequences) are read from the engine when
/metrics is rendered. Counters are plain ints: their updates come from the engine thread only.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self) -> None:
        self.generated_tokens = 0
        self.prompt_tokens_total = 0
        self.requests: Counter[str] = Counter()
        self.encoder_hits = 0
        self.encoder_misses = 0
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode steps
        self._lock = threading.Lock()

    # ---- reported by the engine --------------------------------------------------------------

    def generated(self, n: int) -> None:
        self.generated_tokens += n
        with self._lock:
            self._recent.append((time.monotonic(), n))

    def prompt_tokens(self, n: int) -> None:
        self.prompt_tokens_total += n

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, reason: str) -> None:
        self.requests[reason] += 1

    def encoder_cache(self, *, hit: bool) -> None:
        if hit:
            self.encoder_hits += 1
        else:
            self.encoder_misses += 1

    def prefix_cache(self, queried: int, hit: int) -> None:
        """A prompt of ``queried`` tokens of which ``hit`` were reused from the prefix cache."""
        self.prefix_queried_tokens += queried
        self.prefix_hit_tokens += hit

    # ---- read by the HTTP side ---------------------------------------------------------------

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last RATE_WINDOW_S seconds."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self, gauges: Mapping[str, int]) -> str:
        """The exposition text; ``gauges`` is Engine.stats()."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, values: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *values])

        p = "qwen2vl_"
        metric(
            f"{p}queue_length",
            "gauge",
            "Requests waiting for a slot.",
            [f"{p}queue_length {gauges['waiting']}"],
        )
        metric(
            f"{p}running_sequences",
            "gauge",
            "Sequences decoding or prefilling.",
            [f"{p}running_sequences {gauges['running']}"],
        )
        metric(
            f"{p}free_slots",
            "gauge",
            "KV-cache slots not held by a sequence.",
            [f"{p}free_slots {gauges['free_slots']}"],
        )
        metric(
            f"{p}tokens_per_second",
            "gauge",
            f"Generated tokens per second over the last {RATE_WINDOW_S:.0f} s.",
            [f"{p}tokens_per_second {self.tokens_per_second():.3f}"],
        )
        metric(
            f"{p}generated_tokens_total",
            "counter",
            "Tokens generated.",
            [f"{p}generated_tokens_total {self.generated_tokens}"],
        )
        metric(
            f"{p}prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            [f"{p}prompt_tokens_total {self.prompt_tokens_total}"],
        )
        outcomes = sorted(self.requests.items())
        metric(
            f"{p}requests_total",
            "counter",
            "Finished sequences by outcome.",
            [f'{p}requests_total{{outcome="{k}"}} {v}' for k, v in outcomes],
        )
        metric(
            f"{p}encoder_cache_lookups_total",
            "counter",
            "Vision encoder cache lookups.",
            [
                f'{p}encoder_cache_lookups_total{{result="hit"}} {self.encoder_hits}',
                f'{p}encoder_cache_lookups_total{{result="miss"}} {self.encoder_misses}',
            ],
        )
        metric(
            f"{p}prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            [f"{p}prefix_cache_queries_total {self.prefix_queried_tokens}"],
        )
        metric(
            f"{p}prefix_cache_hits_total",
            "counter",
            "Prompt tokens whose keys/values came from the prefix cache.",
            [f"{p}prefix_cache_hits_total {self.prefix_hit_tokens}"],
        )
        rate = (
            self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0
        )
        metric(
            f"{p}prefix_cache_hit_rate",
            "gauge",
            "Share of looked-up prompt tokens found in the prefix cache, since start.",
            [f"{p}prefix_cache_hit_rate {rate:.4f}"],
        )
        metric(f"{p}time_to_first_token_seconds", "histogram",
               "Seconds from submission to the first generated token.",
               self.ttft.lines(f"{p}time_to_first_token_seconds"))  # fmt: skip
        return "\n".join(lines) + "\n"
