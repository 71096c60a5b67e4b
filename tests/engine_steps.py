"""Driving a serving engine step by step in tests: submit conversations, collect their events."""

from __future__ import annotations

from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.serve.engine import Engine, EngineConfig
from qwen2vl.serve.sequence import Delta, Finish, Request


def engine_for(pipe, **config) -> Engine:
    return Engine(pipe.model, pipe.processor, EngineConfig(**config))


class Collected:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def tokens(self):
        return [t for e in self.events if isinstance(e, Delta) for t in e.tokens]

    @property
    def text(self):
        return "".join(e.text for e in self.events if isinstance(e, Delta))

    @property
    def finish(self):
        return self.events[-1] if self.events and isinstance(self.events[-1], Finish) else None


def submit(engine, pipe, messages, **sampling) -> Collected:
    enc = pipe.processor.encode(messages, add_generation_prompt=True)
    out = Collected()
    engine.submit(Request(enc.ids, enc.visuals, params=SamplingParams(**sampling)), out)
    return out


def run_until_done(engine, outs, max_steps=5000):
    for _ in range(max_steps):
        if all(o.finish for o in outs):
            return
        engine.step()
    raise AssertionError("the engine did not finish")
