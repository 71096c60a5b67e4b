"""Offline batch inference: a JSONL file of requests in, a JSONL file of answers out.

    qwen2vl run --model M --data requests.jsonl --output answers.jsonl [--max-tokens N ...]
    pipe.run_batch([{"messages": [...]}, ...]) -> one answer dict per request, in order

Each input line is one request in the message schema of the training data and the server:

    {"id": "q1", "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                        {"type": "text", "text": "What is it?"}]}],
     "max_tokens": 64, "temperature": 0, "seed": 1}
    [{"role": "user", "content": "Hi"}]           a bare message list

Any field of an OpenAI chat request may be set per line (max_tokens, temperature, top_p, top_k,
repetition_penalty, stop, seed, tools, tool_choice, response_format, skip_special_tokens ...); the
command's flags are the defaults (greedy, unless a line or --temperature says otherwise); "model"
and "n" > 1 are not taken. A line without an "id" is "line-N" (its line number, from 1). Media
paths are relative to the data file's directory; http(s) media only with --allow-remote-media.

Each output line is written whole and flushed, in the order requests finish:

    {"id": "q1", "text": "A cat.", "finish_reason": "stop",
     "usage": {"prompt_tokens": 80, "completion_tokens": 4, "total_tokens": 84}}
    {"id": "line-7", "error": {"code": "invalid_json", "message": "..."}}

plus "tool_calls" (OpenAI's shape) when the model called a tool and "grounding" (the server's
field: boxes in pixels of the line's last image) when the answer holds boxes. A bad line (bad
JSON, bad schema, a missing or undecodable image) gets an error line; the run goes on. Rerun
the same command to resume: ids already in the output are skipped, and a last line cut short by
a kill is dropped first. An id is answered once: delete its line from the output to ask again.

Requests are prepared (media decoded, tokenized) on the calling thread while the serving engine
(`qwen2vl.serve.engine`, continuous batching) decodes the earlier ones on its own. The lines are
checked with the server's request schema, which needs pydantic (the `serve` extra): imported
when a batch runs, so the CLI itself does without.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen2vl.errors import MediaError, Qwen2VLError
from qwen2vl.processor import Processor
from qwen2vl.serve.engine import Engine, EngineConfig
from qwen2vl.serve.errors import APIError
from qwen2vl.serve.sequence import Delta, Event, Finish
from qwen2vl.train.data import parse_line, read_jsonl, resolve_media

if TYPE_CHECKING:
    from qwen2vl.serve.prepare import Limits, Prepared

logger = logging.getLogger(__name__)

HELP = "answer a JSONL file of requests (batched, resumable)"
DEFAULT_MAX_MODEL_LEN = 8192  # the KV slots are preallocated: slots x 1.5 x this many tokens
MAX_MEDIA = 64  # images (and videos) per request: a data set's own, not a client's, so generous
# Keys of a line that are not a chat request's: the id, and what eval keeps beside the request.
NOT_REQUEST = ("id", "model", "messages", "answers", "options")


@dataclass
class Line:
    """One request of the input: its position (from 0), id, and decoded JSON, or its error."""

    index: int
    id: str | int
    body: Any = None
    error: dict[str, str] | None = None


@dataclass
class Settings:
    """What every request gets unless its line says otherwise, and where its media come from."""

    max_tokens: int = 256
    sampling: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.0})
    base_dir: Path | None = None  # relative media paths are relative to this
    seed: int | None = None


def error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


# ---- reading ----------------------------------------------------------------------------------


def lines_of(numbered: Iterable[tuple[int, Any]]) -> Iterator[Line]:
    """Lines from (line number, decoded JSON or its JSONDecodeError) pairs, as `read_jsonl`
    gives them; a repeated id is an error of the later line."""
    seen: dict[Any, int] = {}
    for index, (number, obj) in enumerate(numbered):
        fallback = f"line-{number}"
        if isinstance(obj, Exception):
            message = f"not valid JSON: {obj.msg} (character {obj.pos})"
            yield Line(index, fallback, error=error("invalid_json", message))
            continue
        rid = obj.get("id", fallback) if isinstance(obj, dict) else fallback
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            yield Line(index, fallback, error=error("invalid_id", "'id' must be a string or int"))
        elif rid in seen:
            message = f"id {rid!r} was used on line {seen[rid]} already"
            yield Line(index, fallback, error=error("duplicate_id", message))
        else:
            seen[rid] = number
            yield Line(index, rid, obj)


def answered(path: str | Path) -> set[str | int]:
    """Ids that have a line in an output file. A last line cut short (a killed run) is cut off
    the file, so the next run appends after whole lines only."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        logger.warning(
            "%s: dropping a last line cut short (%d bytes)", path, len(data) - len(whole)
        )
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    ids = set()
    for number, line in enumerate(whole.decode("utf-8").splitlines(), 1):
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError) as e:
            raise Qwen2VLError(
                f"{path}:{number}: not an answer line of qwen2vl run ({e}); use another --output"
            ) from None
    return ids


# ---- one request ------------------------------------------------------------------------------


def prepare_line(body: Any, processor: Processor, limits: Limits, settings: Settings) -> Prepared:
    """The engine request of one line: its messages and settings through the server's own
    checks and preparation (raises APIError or a Qwen2VLError naming what is wrong)."""
    from pydantic import ValidationError

    from qwen2vl.serve.prepare import check_structure, prepare
    from qwen2vl.serve.protocol import ChatCompletionRequest

    try:
        messages, tools = parse_line(body)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_request") from e
    fields = (
        {k: v for k, v in body.items() if k not in NOT_REQUEST} if isinstance(body, dict) else {}
    )
    if fields.get("n", 1) != 1:
        raise APIError(400, "n > 1 is not supported: repeat the line with other seeds", param="n")
    if settings.seed is not None:
        fields.setdefault("seed", settings.seed)
    if settings.base_dir is not None:
        messages = resolve_media(messages, settings.base_dir)
    request = {**fields, "model": "", "messages": messages, "stream": False}
    if tools is not None:
        request["tools"] = tools
    check_structure(request, limits)
    try:
        parsed = ChatCompletionRequest.model_validate(request)
    except ValidationError as e:
        raise APIError(400, _first_problem(e), code="invalid_request") from e
    return prepare(parsed, processor, limits, settings.sampling)


def _first_problem(e) -> str:
    problems = e.errors(include_url=False, include_input=False)
    where = ".".join(str(p) for p in problems[0]["loc"])
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{where}: {problems[0]['msg']}{more}"


def _failure(e: Exception) -> dict[str, str]:
    media = isinstance(e, MediaError) or isinstance(e.__cause__, MediaError)
    code = getattr(e, "code", None) or ("media_error" if media else "invalid_request")
    if isinstance(e, APIError):
        return error(code, e.message)
    if isinstance(e, Qwen2VLError):
        return error(code, str(e))
    return error(code, f"{type(e).__name__}: {e}")


class _Open:
    """A submitted request: its text so far, turned into the answer when it finishes."""

    def __init__(self, line: Line, prepared: Prepared, engine: Engine):
        from qwen2vl.serve.responses import Choice, grounding_target

        self.line = line
        self.prepared = prepared
        self.seq = None  # the engine's Sequence, once submitted
        model_type = engine.model.cfg.model_type
        target = grounding_target(prepared.requests[0], engine.processor.tokenizer, model_type)
        self.choice = Choice(0, tools_on=prepared.tools_on, grounding=target)

    def answer(self, end: Finish) -> dict[str, Any]:
        if end.reason not in ("stop", "length"):  # "error" (the engine's), "timeout", ...
            code = "engine_error" if end.reason == "error" else end.reason
            return {"id": self.line.id, "error": error(code, end.message or end.reason)}
        message, reason = self.choice.message(end.reason)
        out = {"id": self.line.id, "text": message["content"] or "", "finish_reason": reason}
        for extra in ("tool_calls", "grounding"):
            if message.get(extra):
                out[extra] = message[extra]
        prompt, completion = self.prepared.prompt_tokens, self.choice.tokens
        out["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                        "total_tokens": prompt + completion}  # fmt: skip
        return out


# ---- the batch --------------------------------------------------------------------------------


def answers(
    engine: Engine, lines: Iterable[Line], settings: Settings
) -> Iterator[tuple[Line, dict[str, Any]]]:
    """(line, answer) as each request finishes. Keeps every slot busy and as many requests
    again prepared and waiting; starts the engine's thread for the run unless it runs already."""
    limits = limits_for(engine, settings)
    events: queue.Queue[tuple[int, Event]] = queue.Queue()
    running: dict[int, _Open] = {}
    window = min(2 * engine.config.max_num_seqs, engine.config.max_queue)  # never QueueFull
    pending = iter(lines)
    owner = not engine.started
    if owner:
        engine.start()
    try:
        more = True
        while more or running:
            while more and len(running) < window:
                line = next(pending, None)
                more = line is not None
                if more:
                    failed = _submit(engine, line, limits, settings, events, running)
                    if failed is not None:
                        yield line, failed
            if running:
                index, event = events.get()
                job = running[index]
                if isinstance(event, Delta):
                    job.choice.push(event)
                else:
                    del running[index]
                    yield job.line, job.answer(event)
    finally:
        for job in running.values():
            engine.cancel(job.seq)
        if owner:
            engine.stop()


def _submit(engine, line: Line, limits, settings, events, running) -> dict[str, Any] | None:
    """Prepare and queue one line; its error answer if it cannot run."""
    if line.error is not None:
        return {"id": line.id, "error": line.error}
    try:
        prepared = prepare_line(line.body, engine.processor, limits, settings)
        job = _Open(line, prepared, engine)
        on_event = lambda event, i=line.index: events.put((i, event))  # noqa: E731
        job.seq = engine.submit(prepared.requests[0], on_event)
    except Exception as e:  # a bad line is recorded, never fatal
        if not isinstance(e, (APIError, Qwen2VLError, ValueError, OSError)):
            logger.exception("line %s failed", line.id)
        return {"id": line.id, "error": _failure(e)}
    running[line.index] = job
    return None


def make_engine(
    model,
    processor: Processor,
    *,
    stop_token_ids: Sequence[int] = (),
    max_num_seqs: int = 8,
    max_model_len: int | None = None,
) -> Engine:
    """An engine over a loaded model (its thread starts with each batch)."""
    require_packages()
    native = model.cfg.text.max_position_embeddings
    max_len = max_model_len or min(native, DEFAULT_MAX_MODEL_LEN)
    config = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_model_len=max_len,
        max_queue=2 * max_num_seqs,
    )
    return Engine(model, processor, config, stop_token_ids=list(stop_token_ids))


def require_packages() -> None:
    try:
        import pydantic  # noqa: F401
    except ModuleNotFoundError:
        raise Qwen2VLError(
            'batch runs check each line with the server\'s schema: pip install "qwen2vl[serve]"',
            code="missing_package",
        ) from None


def limits_for(engine: Engine, settings: Settings) -> Limits:
    """The server's request checks, with a data set's own media counts and no timeout."""
    from qwen2vl.serve.prepare import Limits

    max_len = engine.config.max_model_len
    return Limits(
        max_len, MAX_MEDIA, MAX_MEDIA, timeout_s=None, max_tokens_default=settings.max_tokens
    )


def run_batch(engine: Engine, requests: Sequence[Any], settings: Settings) -> list[dict[str, Any]]:
    """One answer dict per request, in input order (see the module docstring for both)."""
    lines = lines_of((i + 1, r) for i, r in enumerate(requests))
    out: list[dict[str, Any] | None] = [None] * len(requests)
    for line, answer in answers(engine, lines, settings):
        out[line.index] = answer
    return out


# ---- the file ---------------------------------------------------------------------------------


@dataclass
class Progress:
    done: int  # answered in this run
    total: int  # to answer in this run
    tokens: int  # completion tokens in this run
    errors: int


def run_file(
    engine: Engine,
    data: str | Path,
    output: str | Path,
    settings: Settings,
    *,
    progress: Callable[[Progress], None] | None = None,
) -> Progress:
    """Answer every line of ``data`` not yet in ``output``, appending each answer when it is
    ready (a whole line, flushed)."""
    data, output = Path(data), Path(output)
    if not data.is_file():
        raise Qwen2VLError(f"{data}: no such data file", code="missing_file")
    done = answered(output)
    todo = (line for line in lines_of(read_jsonl(data)) if line.id not in done)
    with open(data, encoding="utf-8") as f:
        total = sum(1 for text in f if text.strip()) - len(done)
    state = Progress(0, max(total, 0), 0, 0)
    if progress is not None:
        progress(state)
    with open(output, "a", encoding="utf-8") as out:
        for _, answer in answers(engine, todo, settings):
            out.write(json.dumps(answer, ensure_ascii=False) + "\n")
            out.flush()
            state.done += 1
            state.errors += "error" in answer
            state.tokens += answer.get("usage", {}).get("completion_tokens", 0)
            if progress is not None:
                progress(state)
    return state


# ---- the command ------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n", 1)[0] + "\n\n" + _USAGE
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--data", required=True, help="the requests: JSONL, one request a line")
    p.add_argument("--output", required=True, help="the answers: JSONL, appended (resumable)")
    add_engine_arguments(p)
    p.add_argument("--max-tokens", type=_positive, default=256,
                   help="completion tokens of a line that sets no max_tokens")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of lines that set none")
    p.set_defaults(run=run)


_USAGE = """input line:  {"id": "q1", "messages": [...], "max_tokens": 64, ...}  (no id: line-N)
output line: {"id", "text", "finish_reason", "usage"} or {"id", "error": {"code", "message"}}
Rerun the same command to resume; ids already in --output are skipped."""


def add_engine_arguments(p: argparse.ArgumentParser, *, dtype: str = "auto") -> None:
    """The model and engine options (`qwen2vl eval` takes them too)."""
    from qwen2vl.devices import DEVICE_HELP, DTYPE_CHOICES, DTYPE_HELP

    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or Org/Name; default: the embedded tiny model",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default=dtype, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only LLM")
    p.add_argument("--max-num-seqs", type=_positive, default=8, help="sequences decoded together")
    p.add_argument("--max-model-len", type=_positive, default=None,
                   help=f"prompt + completion tokens (default: the model's, at most "
                   f"{DEFAULT_MAX_MODEL_LEN})")  # fmt: skip
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) media")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def settings_from(args: argparse.Namespace, base_dir: Path | None) -> Settings:
    sampling = {"temperature": args.temperature}
    sampling |= {"top_p": args.top_p} if args.top_p is not None else {}
    sampling |= {"top_k": args.top_k} if args.top_k is not None else {}
    from qwen2vl.generation.sampling import SamplingParams

    SamplingParams(max_new_tokens=args.max_tokens, **sampling)  # raises naming a bad value
    return Settings(args.max_tokens, sampling, base_dir, args.seed)


def engine_from(args: argparse.Namespace) -> Engine:
    """Check every value, then load the model (from --model, or the embedded default)."""
    import torch

    from qwen2vl.default_model import model_or_default
    from qwen2vl.devices import resolve_device, resolve_dtype
    from qwen2vl.generation.load import load_for_inference
    from qwen2vl.media import MediaAccess
    from qwen2vl.processor import load_processor
    from qwen2vl.serve.prepare import generation_config

    require_packages()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, cpu=torch.bfloat16)
    path = model_or_default(args.model)
    _, eos = generation_config(path)
    access = MediaAccess(
        allow_remote=args.allow_remote_media, how_to_allow_remote="pass --allow-remote-media"
    )
    processor = load_processor(path, access=access)
    model = load_for_inference(path, dtype, device, quantize=args.quantize)
    return make_engine(
        model,
        processor,
        stop_token_ids=eos,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
    )


def run(args: argparse.Namespace) -> int:
    data = Path(args.data)
    settings = settings_from(args, data.parent)
    if not data.is_file():
        raise Qwen2VLError(f"{data}: no such data file", code="missing_file")
    engine = engine_from(args)
    state = run_file(engine, data, args.output, settings, progress=progress_bar("run"))
    print(
        f"{state.done} answered ({state.errors} errors), {state.tokens} tokens; in {args.output}",
        file=sys.stderr,
    )
    return 0


def progress_bar(label: str) -> Callable[[Progress], None]:
    """A bar with requests done and completion tokens per second, on stderr (a terminal gets it
    redrawn as it goes; a log gets the last state)."""
    start = time.perf_counter()

    def show(p: Progress) -> None:
        finished = p.done >= p.total
        if not (sys.stderr.isatty() or finished):
            return
        rate = p.tokens / max(time.perf_counter() - start, 1e-9)
        filled = 30 * p.done // max(p.total, 1)
        errors = f", {p.errors} errors" if p.errors else ""
        print(
            f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {p.done}/{p.total} "
            f"{rate:.1f} tok/s{errors}",
            end="\n" if finished else "",
            file=sys.stderr,
            flush=True,
        )

    return show
