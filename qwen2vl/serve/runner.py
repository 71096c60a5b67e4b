"""The engine's model side: every call that runs the model or changes its KV caches.

Letters: B batch, P prompt tokens, V vocabulary, n running rows.

The engine (engine.py) schedules and samples; the ``Runner`` holds the model, the slots of the
running sequences (``SlotCache``), the private cache of the prompt being prefilled and the prefix
cache, and does what the engine asks of them. Under tensor parallelism the model's forward is a
collective: every rank must run the same calls in the same order. Rank 0's engine then gets a
``Runner`` with a ``Leader``, which sends each call (its name and arguments, tensors on the CPU)
to the other ranks before running it; there ``follow`` replays it on their own ``Runner``. Every
rank's caches so go through the same changes, and the engine's scheduling, sampling and clocks
stay on rank 0 alone. The vision tower runs on rank 0 only (its features travel with the call
that embeds the prompt), so the other ranks hold it but never run it.

A rank that is lost makes the next call fail with ``RankLost``; the engine then fails every
request with a 503 and the server exits. While idle, rank 0 sends a ``ping`` every
``HEARTBEAT_S`` seconds, so the other ranks never wait on a collective long enough to time out.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from qwen2vl.errors import Qwen2VLError
from qwen2vl.generation.kv_cache import KVCache
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.serve.prefix_cache import PrefixCache
from qwen2vl.serve.slots import SlotCache

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0


class RankLost(Qwen2VLError):
    """A tensor-parallel rank stopped answering: the model cannot run any more."""


def _mirrored(method: Callable) -> Callable:
    """Under a leader, send the call to the other ranks first."""

    @functools.wraps(method)
    def call(self: Runner, *args):
        if self.leader is not None:
            self.leader.send(method.__name__, args)
        try:
            return method(self, *args)
        except Exception as e:
            if _in_collective(e):  # inside the model's all-reduce: only under TP
                raise RankLost("a tensor-parallel rank was lost") from e
            raise

    return call


class Runner:
    def __init__(
        self,
        model: Qwen2VL,
        *,
        slots: int,
        capacity: int,
        prefix_cache_bytes: int = 0,
        leader: Leader | None = None,
    ):
        self.model, self.leader = model, leader
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.cache = SlotCache(
            model.cfg.text, slots, capacity, dtype=self.dtype, device=self.device
        )
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.prompt: KVCache | None = None  # the private cache of the prompt being prefilled
        self._ids: torch.Tensor | None = None  # [1, P]
        self._positions: torch.Tensor | None = None  # [3, 1, P]
        self._embeds: torch.Tensor | None = None  # [1, P, E]
        self._hashes: list[bytes] = []

    def encode(self, pixels: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """Vision features of one image or video (on this rank only: not mirrored)."""
        return self.model.encode_visual(pixels.to(self.device), torch.tensor([grid_thw]))

    @_mirrored
    @torch.inference_mode()
    def start_prompt(
        self,
        ids: list[int],
        image_feats: torch.Tensor | None,
        video_feats: torch.Tensor | None,
        position_inputs: dict[str, torch.Tensor | None],
        hashes: list[bytes],
    ) -> tuple[int, int]:
        """Positions, embeddings and a private cache for a prompt whose visual features are
        given; the held prefix blocks of ``hashes`` are copied in. Returns (rope delta, tokens
        reused from the prefix cache: at least one is always left to prefill)."""
        self._ids = torch.tensor([ids], device=self.device)
        feats = [f if f is None else f.to(self.device) for f in (image_feats, video_feats)]
        inputs = {k: v if v is None else v.to(self.device) for k, v in position_inputs.items()}
        self._positions, delta = self.model.positions(self._ids, None, **inputs)
        self._embeds = self.model.embed(self._ids, *feats)
        self.prompt = KVCache(
            self.model.cfg.text, 1, len(ids), dtype=self.dtype, device=self.device
        )
        self._hashes = hashes if self.prefix is not None else []
        reused = 0
        if self._hashes:
            n = min(self.prefix.match(hashes), (len(ids) - 1) // self.prefix.block)
            if n:
                k, v = self.prefix.load(hashes[:n])
                reused = k.shape[2]
                self.prompt.k[:, 0, :, :reused] = k
                self.prompt.v[:, 0, :, :reused] = v
                self.prompt.commit(reused)
        return int(delta[0]), reused

    @_mirrored
    @torch.inference_mode()
    def prefill(self, a: int, b: int) -> torch.Tensor:
        """Prefill prompt tokens [a, b) into the private cache; the logits [V] after token b-1."""
        out = self.model(
            self._ids[:, a:b],
            position_ids=self._positions[:, :, a:b],
            kv_cache=self.prompt,
            inputs_embeds=self._embeds[:, a:b],
            logits_to_keep=1,
        )
        self.prompt.commit(b - a)
        return out.logits[0, -1].float()

    @_mirrored
    def admit(self) -> int:
        """Move the prefilled prompt into a slot (and its whole blocks into the prefix cache);
        returns its row."""
        p, P = self.prompt, self.prompt.length
        k, v = p.k[:, 0, :, :P], p.v[:, 0, :, :P]
        if self._hashes:
            self.prefix.store(self._hashes, k, v)
        row = self.cache.add(k, v)
        self._forget_prompt()
        return row

    @_mirrored
    def drop_prompt(self) -> None:
        """Forget the prompt being prefilled (failed or cancelled)."""
        self._forget_prompt()

    def _forget_prompt(self) -> None:
        self.prompt = self._ids = self._positions = self._embeds = None
        self._hashes = []

    @_mirrored
    def release(self, row: int) -> int | None:
        """Free a row; returns the row that moved into it, if any (SlotCache.remove)."""
        return self.cache.remove(row)

    @_mirrored
    def scrub(self, row: int) -> None:
        """Zero a failed row's keys/values: NaN there would outlive it, since masked columns
        still multiply their values (0 * NaN = NaN) and ``release`` copies over only the
        columns the row moved into it owns."""
        self.cache.k[:, row].zero_()
        self.cache.v[:, row].zero_()

    @_mirrored
    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One decode step of the running rows (token and M-RoPE position of each); the
        logits [n, V]."""
        n = len(tokens)
        ids = torch.tensor(tokens, device=self.device).view(n, 1)
        pos = torch.tensor(positions, device=self.device).view(1, n, 1).expand(3, n, 1)
        mask = self.cache.begin_step()  # [n, S]
        # Embedded directly: a generated placeholder token is plain text, not a visual slot.
        x = self.model.model.embed_tokens(ids)
        out = self.model(ids, mask, position_ids=pos, kv_cache=self.cache, inputs_embeds=x)
        self.cache.end_step()
        return out.logits[:, -1].float()

    @_mirrored
    def ping(self) -> None:
        """Nothing: keeps the other ranks' wait for the next call short of its timeout."""


# ---- tensor parallelism --------------------------------------------------------------------


class Leader:
    """Rank 0's side: sends each mirrored call to the other ranks of ``group``."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group

    def send(self, name: str, args: tuple) -> None:
        _broadcast((name, _to_cpu(args)), self.group)

    def stop(self) -> None:
        try:
            _broadcast(("stop", ()), self.group)
        except RankLost:
            pass


def follow(runner: Runner, group: dist.ProcessGroup | None = None) -> None:
    """A rank other than 0: replay rank 0's calls on ``runner`` until it stops (or is lost:
    then RankLost). A call that fails here fails on rank 0 as well, which reports it."""
    while True:
        name, args = _broadcast(None, group)
        if name == "stop":
            return
        try:
            getattr(runner, name)(*args)
        except RankLost:
            raise
        except Exception as e:
            log.debug("rank %d: %s failed as on rank 0: %s", dist.get_rank(), name, e)


def _broadcast(obj, group):
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=0, group=group)
    except RuntimeError as e:  # gloo raises a plain RuntimeError for a peer gone
        raise RankLost("a tensor-parallel rank was lost") from e
    return box[0]


def _in_collective(e: BaseException) -> bool:
    """Whether ``e`` came out of torch.distributed (a peer gone or timed out), rather than out
    of the model itself, which fails alike on every rank."""
    if isinstance(e, dist.DistError):
        return True
    tb = e.__traceback__
    while tb is not None:
        if "torch/distributed/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, tuple | list):
        return type(x)(_to_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return x
