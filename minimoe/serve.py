"""`minimoe serve`: the generation engine behind an OpenAI-compatible HTTP API, with continuous batching.

    HTTP process (FastAPI on uvicorn's event loop)          engine process (scheduler.py)
      POST /v1/completions, /v1/chat/completions               the scheduler loop, the only code that
        check every parameter (400 in OpenAI's error shape)    touches the engine: between decode steps
        one Request per prompt and choice -> submit  ------>   it admits waiting requests into free
        (429 when the queue is full)                           slots, steps every running sequence by
        await the Requests' events (or stream them as SSE) <-- one token, and sends each request's
      GET /v1/models, /health, /metrics                        newly settled text

Requests of any length run together: between two decode steps the scheduler admits whatever waits into
the slots that finished sequences freed (continuous batching). A client that disconnects has its
sequence cancelled, and its slot freed, at the next step. SIGTERM ends the running requests with what
they have (finish_reason "length") and exits. The engine runs in a process of its own so that its host
work and the HTTP side's run at once (scheduler.py says why); a reader thread here takes its messages
and wakes the event loop once per step with all of them.

The models are byte-level and not trained for chat: /v1/chat/completions renders the messages with one
plain template (CHAT_TEMPLATE) and stops where the model would begin the next user turn (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from minimoe import backend
from minimoe.data import ByteTokenizer, DataError
from minimoe.engine import SamplingParams
from minimoe.model import GPT, GPTConfig
from minimoe.scheduler import run_scheduler

MAX_CHOICES = 16  # n at most
MAX_STOPS = 4  # stop strings per request at most, as OpenAI allows
CHAT_TEMPLATE = "{role}: {content}\n"  # each message in turn; then "assistant:" starts the reply
CHAT_STOP = "\nuser:"  # the model beginning the next user turn ends the reply
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_TEMPERATURE = 100.0
# OpenAI's parameters that minimoe does not implement, with the value that asks for nothing: any other
# value is refused (400) rather than silently ignored.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "logit_bias": (None, {}), "tools": (None, []), "response_format": (None, {"type": "text"})}
ENGINE_GONE = "error"  # the finish reason of requests whose engine process died


class RequestError(Exception):
    """A request the server refuses: the HTTP status, and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class EngineError(RuntimeError):
    """The engine process could not start (one line: what failed there)."""


@dataclass(eq=False)
class Request:
    """One prompt and one choice of an HTTP request, while the engine process runs it."""

    prompt: np.ndarray
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # the HTTP request's, shared by its choices: (index, text delta, finish reason or None)
    index: int = 0  # the choice's place in the response
    key: int = -1  # its id between the two processes
    generated: int = 0  # tokens made so far
    started: bool = False  # its prompt has been prefilled (it had news)


def _deliver(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    """On the event loop: put each event on its request's queue."""
    for events, event in batch:
        events.put_nowait(event)


class EngineProcess:
    """The engine process (scheduler.py) as the HTTP side sees it: submit and cancel Requests, and the
    engine's account for /metrics. A reader thread takes the engine's messages: each Request's events
    go to its event loop, one wake-up per loop and message."""

    def __init__(self, load_model: Callable[[], GPT], max_batch: int, max_queue: int):
        """load_model: a picklable function that sets the device and returns the model ready for
        inference (it runs in the engine process)."""
        context = multiprocessing.get_context("spawn")  # a CUDA context does not survive a fork
        self.connection, self.child_end = context.Pipe()
        self.process = context.Process(target=run_scheduler, args=(self.child_end, load_model, max_batch),
                                       name="minimoe-engine", daemon=True)
        self.max_queue = max_queue
        self.requests: dict[int, Request] = {}  # key -> request, until it finishes or is cancelled
        self.keys = itertools.count()
        self.send_lock = threading.Lock()
        self.config: GPTConfig | None = None
        self.device, self.device_name, self.parameters = "", "", 0  # "cpu" or "cuda"; the GPU's name; the model's size
        self.alive = False  # ready, and not gone
        self.stopping = False  # stop() was called
        self.stats: dict[str, Any] = {"counters": {}, "seconds": {}, "running": 0, "expert_tokens": []}
        self.reader = threading.Thread(target=self._read, name="minimoe-engine-reader", daemon=True)

    def start(self) -> None:
        """Start the engine process and wait until it is ready (the model loaded, the graphs captured)."""
        self.process.start()
        self.child_end.close()  # the engine's end is the engine's: its exit then ends our reads (EOFError)
        while not self.connection.poll(1.0):
            if not self.process.is_alive():
                raise EngineError(f"the engine process exited with code {self.process.exitcode} before it was ready")
        kind, payload = self.connection.recv()
        if kind == "error":
            self.process.join(timeout=10)
            raise EngineError(payload)
        self.config, self.device, self.device_name = payload["config"], payload["device"], payload["device_name"]
        self.parameters, self.alive = payload["parameters"], True
        self.reader.start()

    @property
    def queued(self) -> int:
        """Requests not yet started (waiting for a slot, or on their way to the engine)."""
        return sum(not request.started for request in list(self.requests.values()))  # (the reader thread edits it)

    def submit(self, requests: list[Request]) -> None:
        if self.stopping:
            raise RequestError(503, "the server is shutting down", code="shutting_down", kind="server_error")
        if not self.alive:
            raise _engine_gone(503)
        if self.queued + len(requests) > self.max_queue:
            raise RequestError(429, f"the queue is full ({self.queued} requests waiting, at most {self.max_queue}); "
                                    f"try again later", code="queue_full", kind="rate_limit_error")
        for request in requests:
            request.key = next(self.keys)
            self.requests[request.key] = request
        self._send("submit", [(request.key, request.prompt, request.params) for request in requests])

    def cancel(self, requests: list[Request]) -> None:
        """Their clients went away: the engine frees their slots at its next step."""
        unfinished = [request.key for request in requests if request.key in self.requests]
        for key in unfinished:
            self.requests.pop(key, None)  # no news of them will come
        if unfinished:
            self._send("cancel", unfinished)

    def stop(self) -> None:
        """End every request with what it has; the engine process exits."""
        self.stopping = True
        if self.alive:
            self._send("stop", None)

    def close(self, timeout: float = 5.0) -> None:
        self.stop()
        self.reader.join(timeout=timeout)
        self.process.join(timeout=timeout)
        if self.process.is_alive():
            self.process.terminate()

    def _send(self, kind: str, payload: Any) -> None:
        with self.send_lock:
            try:
                self.connection.send((kind, payload))
            except (BrokenPipeError, OSError):
                self.alive = False

    def _read(self) -> None:
        while True:
            try:
                kind, events, stats = self.connection.recv()
            except (EOFError, OSError):
                break
            self.stats = stats
            self._dispatch(events)
        self.alive = False
        self._dispatch([(key, 0, "", ENGINE_GONE) for key in list(self.requests)])

    def _dispatch(self, events: list[tuple[int, int, str, str | None]]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for key, new_tokens, delta, finish_reason in events:
            request = self.requests.get(key)
            if request is None:
                continue
            request.generated += new_tokens
            request.started = True
            if finish_reason is not None:
                self.requests.pop(key, None)
            if delta or finish_reason is not None:  # (tokens that settle no text yet only count)
                batches.setdefault(request.loop, []).append((request.events, (request.index, delta, finish_reason)))
        for loop, batch in batches.items():  # one wake-up of each event loop, with all of its events
            loop.call_soon_threadsafe(_deliver, batch)


# ----------------------------------------------------------------------------- requests' parameters


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
            (low < value if low_open else low <= value) and value <= high):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestError(400, f"{name} must be a number in {interval}, got {value!r}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, low: int, high: float = math.inf) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        bound = f" and at most {int(high)}" if high < math.inf else ""
        raise RequestError(400, f"{name} must be an integer of at least {low}{bound}, got {value!r}", param=name)
    return value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them, "
                                f"got {stop!r}", param="stop")
    return tuple(stops)


@dataclass
class Completion:
    """What the parameters of one /v1/completions or /v1/chat/completions request ask for."""

    prompts: list[np.ndarray]
    params: list[SamplingParams]  # one per choice, the choices of each prompt in a row
    choices: int
    stream: bool


def completion_request(body: Any, tokenizer: ByteTokenizer, context: int, prompts: list[str] | None = None,
                       extra_stop: tuple[str, ...] = ()) -> Completion:
    """Every parameter checked (RequestError naming it), prompts encoded and checked against the model."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if prompts is None:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, f"prompt must be a string or a non-empty list of strings, got {prompt!r}",
                               param="prompt")
    encoded = []
    for text in prompts:
        try:
            tokens = tokenizer.encode(text)
        except DataError as error:
            raise RequestError(400, f"prompt: {error}", param="prompt") from None
        if len(tokens) == 0:
            raise RequestError(400, "prompt is empty; give at least one character to start from", param="prompt")
        if len(tokens) > context:
            raise RequestError(400, f"prompt is {len(tokens)} tokens long, more than the model's context ({context})",
                               param="prompt")
        encoded.append(tokens)
    for name, harmless in UNSUPPORTED.items():
        value = body.get(name)
        if not any(value is h if h is None or isinstance(h, bool) else value == h for h in harmless):
            raise RequestError(400, f"{name} is not supported by minimoe serve (got {value!r})", param=name)
    # Chat clients now send max_completion_tokens, OpenAI's newer name for max_tokens there.
    length_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, length_name, DEFAULT_MAX_TOKENS, 1)
    temperature = _number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 0, 0)
    choices = _integer(body, "n", 1, 1, MAX_CHOICES)
    seed = _integer(body, "seed", None, 0, 2**63 - 1)
    stops = _stops(body) + extra_stop
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream must be true or false, got {stream!r}", param="stream")
    if seed is None:  # each choice its own fresh numbers
        seeds = [int.from_bytes(uuid.uuid4().bytes[:7], "little") for _ in range(len(encoded) * choices)]
    else:  # choice j of every prompt: seed + j, so that n samples differ and a request repeats
        seeds = [seed + j for _ in encoded for j in range(choices)]
    params = [SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=s, stop=stops) for s in seeds]
    return Completion(encoded, params, choices, stream)


def chat_prompt(body: Any) -> str:
    """The messages rendered with CHAT_TEMPLATE, then the assistant's turn to answer."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise RequestError(400, "messages must be a non-empty list of {role, content} objects with string values",
                           param="messages")
    return "".join(CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages) + "assistant:"


# ----------------------------------------------------------------------------- the HTTP app


def _choice_text(chat: bool, text: str, finish_reason: str | None, index: int, first: bool = False) -> dict[str, Any]:
    """One choice of a response (whole text) or of a streamed chunk (delta), in OpenAI's shape."""
    if not chat:
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def create_app(engine: EngineProcess, name: str) -> FastAPI:
    """The FastAPI app serving the model of `engine` (started: its config known) under the model id `name`;
    the app's shutdown ends the engine process."""
    config = engine.config
    tokenizer = ByteTokenizer(config.vocab_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="minimoe", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def request_error(_: HTTPRequest, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: HTTPRequest, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(RequestError(400, f"malformed request: {error.errors()[0]['msg']}").body(), status_code=400)

    async def read_body(request: HTTPRequest) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"the request body is not JSON: {error}", code="invalid_json") from None
        model_id = body.get("model") if isinstance(body, dict) else None
        if model_id is not None and model_id != name:
            raise RequestError(404, f"the model {model_id!r} does not exist here; this server serves {name!r}",
                               param="model", code="model_not_found")
        return body

    async def complete(request: HTTPRequest, chat: bool) -> Any:
        body = await read_body(request)
        extra_stop = (CHAT_STOP,) if chat else ()
        ask = completion_request(body, tokenizer, config.block_size, [chat_prompt(body)] if chat else None, extra_stop)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        prompts = [prompt for prompt in ask.prompts for _ in range(ask.choices)]  # each prompt's choices in a row
        runs = [Request(prompt, params, loop, events, index)
                for index, (prompt, params) in enumerate(zip(prompts, ask.params))]
        engine.submit(runs)
        identifier = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if ask.stream:
            return StreamingResponse(_stream(request, engine, runs, identifier, created, name, chat),
                                     media_type="text/event-stream")
        try:
            texts = await _collect(events, len(runs))
        except asyncio.CancelledError:
            engine.cancel(runs)
            raise
        usage = {"prompt_tokens": sum(len(p) for p in ask.prompts),
                 "completion_tokens": sum(run.generated for run in runs)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": identifier, "object": kind, "created": created, "model": name,
                "choices": [_choice_text(chat, text, reason, index) for index, (text, reason) in enumerate(texts)],
                "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "minimoe",
                                            "config": dict(vars(config))}]}

    @app.get("/health")
    async def health() -> Any:
        if not engine.alive:
            return JSONResponse({"status": "the engine process has stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Any:
        stats = engine.stats
        lines = [f"# TYPE minimoe_{key}_total counter\nminimoe_{key}_total {value}"
                 for key, value in stats["counters"].items()]
        lines += ["# TYPE minimoe_scheduler_seconds_total counter"]
        lines += [f'minimoe_scheduler_seconds_total{{phase="{phase}"}} {seconds:.6f}'
                  for phase, seconds in stats["seconds"].items()]
        lines += [f"# TYPE minimoe_queue_length gauge\nminimoe_queue_length {engine.queued}",
                  f"# TYPE minimoe_running_sequences gauge\nminimoe_running_sequences {stats['running']}",
                  "# TYPE minimoe_expert_tokens_total counter"]
        lines += [f'minimoe_expert_tokens_total{{layer="{layer}",expert="{expert}"}} {int(count)}'
                  for layer, counts in enumerate(stats["expert_tokens"]) for expert, count in enumerate(counts)]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app


def _engine_gone(status: int = 500) -> RequestError:
    return RequestError(status, "the engine process has stopped; the server cannot generate any more",
                        code="engine_gone", kind="server_error")


async def _collect(events: asyncio.Queue, choices: int) -> list[tuple[str, str]]:
    """Each choice's whole text and finish reason, once every choice has finished."""
    texts, reasons = [[] for _ in range(choices)], [None] * choices
    while None in reasons:
        index, delta, finish_reason = await events.get()
        if finish_reason == ENGINE_GONE:
            raise _engine_gone()
        texts[index].append(delta)
        reasons[index] = finish_reason
    return [("".join(text), reason) for text, reason in zip(texts, reasons)]


async def _stream(http: HTTPRequest, engine: EngineProcess, runs: list[Request], identifier: str, created: int,
                  name: str, chat: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a chunk per settled delta of a choice, then [DONE]. The
    deltas that piled up while the event loop was busy go out as one chunk per choice (a chunk's text
    may be several tokens long, as OpenAI's may): under load the loop sends fewer, larger chunks rather
    than falling behind. A client that goes away cancels its requests (their slots are freed at the next
    step)."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    events = runs[0].events
    running = set(range(len(runs)))

    def chunk(choice: dict[str, Any]) -> str:
        return _event({"id": identifier, "object": kind, "created": created, "model": name, "choices": [choice]})

    try:
        if chat:  # OpenAI's first chat chunk announces the role
            for index in range(len(runs)):
                yield chunk({"index": index, "delta": {"role": "assistant"}, "finish_reason": None})
        while running:
            try:
                waiting = [await asyncio.wait_for(events.get(), timeout=1.0)]
            except TimeoutError:
                if await http.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            while not events.empty():
                waiting.append(events.get_nowait())
            merged: dict[int, tuple[str, str | None]] = {}  # choice -> (its deltas joined, finish reason)
            for index, delta, finish_reason in waiting:
                if finish_reason == ENGINE_GONE:  # OpenAI's way: an error object in the stream, then the end
                    yield _event(_engine_gone().body())
                    return
                merged[index] = (merged.get(index, ("", None))[0] + delta, finish_reason)
            for index, (delta, finish_reason) in merged.items():
                choice = ({"index": index, "delta": {"content": delta} if delta else {}, "finish_reason": finish_reason}
                          if chat else _choice_text(False, delta, finish_reason, index))
                yield chunk(choice)
                if finish_reason is not None:
                    running.discard(index)
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(runs)  # those not finished: the client went away


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def checkpoint_model(path: str, device: str) -> GPT:
    """The model of a training checkpoint, ready for inference on `device` (auto, cpu or cuda): the engine
    process's load_model, through functools.partial."""
    from minimoe.generate import prepare
    from minimoe.train import load_model

    backend.set_device(device)
    return prepare(load_model(path)[0])


def serve(load_model: Callable[[], GPT], name: str, host: str, port: int, max_batch: int, max_queue: int) -> None:
    """Start the engine process on load_model's model (EngineError when it cannot start), then serve until
    SIGTERM or Ctrl-C: the running requests end at once with what they have (finish_reason "length"),
    then uvicorn closes the connections and the process exits."""
    import uvicorn

    engine = EngineProcess(load_model, max_batch, max_queue)
    engine.start()
    app = create_app(engine, name)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # The running requests end now, with what they have. From a thread of its own: this handler may
            # interrupt the event loop in the middle of a message to the engine, which holds the send lock.
            threading.Thread(target=engine.stop, name="minimoe-stop", daemon=True).start()
            super().handle_exit(sig, frame)

    print(f"minimoe serve: {name} on http://{host}:{port} ({engine.device}; up to {max_batch} sequences at once, "
          f"{max_queue} waiting)", flush=True)
    Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)).run()
