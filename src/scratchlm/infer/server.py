"""An OpenAI-compatible HTTP server for a run dir, with a web chat page at `/`.

What it is for: `create_app(model, tokenizer, model_id=...)` builds a FastAPI app with
`GET /health`, `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions`
(plain JSON, or `stream: true` as server-sent events ending in `data: [DONE]`), the shapes the
official `openai` client expects, including `usage`, `finish_reason` and the error body
`{"error": {"message", "type", "param", "code"}}` with 400 / 401 / 404 / 429 statuses.
Requests are validated here field by field (each error names its `param`), encoded with the
tokenizer or the chat template, and handed to `scheduler.Scheduler`, which batches decoding
across all active requests. With an API key, every `/v1` route needs `Authorization: Bearer`.

Not for: generation itself (scheduler.py / generate.py), model loading beyond calling
`runs.load_run` in `serve`, TLS or multi-model routing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from scratchlm.errors import UserError
from scratchlm.infer import generate as gen
from scratchlm.infer.sampling import SamplingParams
from scratchlm.infer.scheduler import Event, GenerationRequest, QueueFull, RequestHandle, Scheduler

WEB_DIR = Path(__file__).with_name("web")
API_KEY_ENV = "SCRATCHLM_API_KEY"
MAX_BODY_BYTES = 1 << 20
MAX_N = 8
MAX_STOP = 4
PLAIN_STOP = ["\nUser:"]  # the no-chat-template fallback's turn marker (as `scratchlm chat`)


class APIError(Exception):
    """An error to send back in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServerConfig:
    model_id: str = "scratchlm"
    api_key: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    default_max_tokens: int = 512  # when a request gives no max_tokens (bounded by the context)
    max_body_bytes: int = MAX_BODY_BYTES


# ---------------------------------------------------------------------------------------------
# Request validation: each field by name, type and range


_MISSING = object()


def _field(body: dict, name: str, kind: str, default: Any = None, *, lo: float | None = None,
           hi: float | None = None, lo_open: bool = False) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    ok_type = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "object": isinstance(value, dict),
    }[kind]
    if not ok_type:
        article = "an" if kind[0] in "aeiou" else "a"
        raise APIError(400, f"'{name}' must be {article} {kind}, got {json.dumps(value)[:40]}", param=name,
                       code="invalid_type")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise APIError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {value}", param=name,
                       code="invalid_value")
    if hi is not None and value > hi:
        raise APIError(400, f"'{name}' must be <= {hi}, got {value}", param=name, code="invalid_value")
    return value


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' takes at most {MAX_STOP} strings", param="stop", code="invalid_value")
    return stop


def _sampling(body: dict) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=float(_field(body, "temperature", "number", 1.0, lo=0, hi=2)),
            top_p=float(_field(body, "top_p", "number", 1.0, lo=0, hi=1, lo_open=True)),
            top_k=_field(body, "top_k", "int", 0, lo=0),
            min_p=float(_field(body, "min_p", "number", 0.0, lo=0, hi=1)),
            repetition_penalty=float(_field(body, "repetition_penalty", "number", 1.0, lo=0, lo_open=True)),
            frequency_penalty=float(_field(body, "frequency_penalty", "number", 0.0, lo=-2, hi=2)),
            presence_penalty=float(_field(body, "presence_penalty", "number", 0.0, lo=-2, hi=2)),
            seed=_field(body, "seed", "int", None),
        )
    except UserError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def _unsupported(body: dict, *names: str) -> None:
    for name in names:
        if body.get(name) not in (None, False, 0):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def _message_text(message: dict, index: int) -> dict:
    """An OpenAI message (content as a string or a list of text parts) as {role, content}."""
    if not isinstance(message, dict):
        raise APIError(400, f"messages[{index}] must be an object", param="messages", code="invalid_type")
    role = message.get("role")
    role = "system" if role == "developer" else role
    if role not in ("system", "user", "assistant"):
        raise APIError(400, f"messages[{index}].role must be system, user or assistant, got {json.dumps(role)}",
                       param="messages", code="invalid_value")
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{index}].content: only text parts are supported",
                               param="messages", code="invalid_value")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise APIError(400, f"messages[{index}].content must be a string", param="messages", code="invalid_type")
    return {"role": role, "content": content}


# ---------------------------------------------------------------------------------------------
# The engine side: prompts to requests, events to responses


class Engine:
    """What the routes share: the model's tokenizer, the scheduler, and the prompt rendering."""

    def __init__(self, model, tokenizer, config: ServerConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.context_len = gen.context_length(model)
        self.scheduler = Scheduler(model, tokenizer, max_batch=config.max_batch, max_queue=config.max_queue)

    @property
    def has_chat_template(self) -> bool:
        from scratchlm.posttrain.chat_template import has_chat_tokens

        return has_chat_tokens(self.tokenizer)

    def chat_prompt(self, messages: list[dict]) -> tuple[list[int], list[str], list[int]]:
        """(prompt ids, extra stop strings, extra stop ids) for a conversation."""
        if self.has_chat_template:
            from scratchlm.posttrain.chat_template import chat_stop_ids, render_chat

            try:
                ids = render_chat(self.tokenizer, messages, add_generation_prompt=True).ids
            except UserError as e:
                raise APIError(400, str(e), param="messages") from None
            return ids, [], chat_stop_ids(self.tokenizer)
        # A base model has no chat tokens: a plain transcript it can continue, as `scratchlm chat` does.
        lines = []
        for m in messages:
            label = {"system": "", "user": "User: ", "assistant": "Assistant: "}[m["role"]]
            lines.append(label + m["content"])
        return self.tokenizer.encode("\n".join(lines) + "\nAssistant:"), PLAIN_STOP, []

    def max_tokens(self, body: dict, prompt_len: int, names: tuple[str, ...], default: int) -> int:
        """The request's token budget (the first of `names` given, else `default`), checked to fit."""
        requested, param = None, "prompt"
        for name in names:
            requested = _field(body, name, "int", None, lo=1)
            if requested is not None:
                param = name
                break
        room = self.context_len - prompt_len
        if room < 1 or (requested is not None and requested > room):
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_len} tokens, but {prompt_len} prompt "
                f"tokens + {requested or 1} completion tokens were requested. Shorten the prompt or "
                f"{names[0]}.",
                param=param if room >= 1 else "prompt",
                code="context_length_exceeded",
            )
        return min(requested or default, room)

    def submit(self, requests: list[GenerationRequest]) -> list[RequestHandle]:
        try:
            return self.scheduler.submit_many(requests, asyncio.get_running_loop())
        except QueueFull as e:
            raise APIError(429, f"{e}; retry shortly", type="rate_limit_error", code="queue_full") from None


async def _merged_events(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Event]]:
    """Events of several handles as they arrive, tagged with the handle's index."""
    if len(handles) == 1:
        async for event in handles[0].aevents():
            yield 0, event
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def forward(i: int, h: RequestHandle) -> None:
        async for event in h.aevents():
            await merged.put((i, event))

    tasks = [asyncio.create_task(forward(i, h)) for i, h in enumerate(handles)]
    try:
        for _ in range(len(handles)):
            while True:
                i, event = await merged.get()
                yield i, event
                if event.finish_reason is not None:
                    break
    finally:
        for t in tasks:
            t.cancel()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------------------------------------
# The app


def create_app(model, tokenizer, config: ServerConfig | None = None, **kwargs):
    """The FastAPI app serving `model` (e.g. `create_app(run.model, run.tokenizer, model_id="x")`)."""
    config = config or ServerConfig(**kwargs)
    engine = Engine(model, tokenizer, config)
    created = int(time.time())

    async def lifespan(app):
        engine.scheduler.start()
        try:
            yield
        finally:
            engine.scheduler.stop()

    app = FastAPI(title="scratchlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    def error(e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code))

    @app.exception_handler(Exception)
    async def _server_error(request, e):
        return error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
                message = "Incorrect API key provided." if header else "Missing API key: send 'Authorization: Bearer KEY'."
                return error(APIError(401, message, code="invalid_api_key"))
        return await call_next(request)

    async def read_body(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            raise APIError(400, f"request body too large (over {config.max_body_bytes} bytes)", code="body_too_large")
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise APIError(400, f"request body too large (over {config.max_body_bytes} bytes)", code="body_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        model_name = body.get("model")
        if model_name is not None and not isinstance(model_name, str):
            raise APIError(400, "'model' must be a string", param="model", code="invalid_type")
        if model_name not in (None, config.model_id):
            raise APIError(404, f"The model '{model_name}' does not exist; this server has '{config.model_id}'",
                           param="model", code="model_not_found")
        return body

    def model_card() -> dict:
        return {"id": config.model_id, "object": "model", "created": created, "owned_by": "scratchlm",
                "context_length": engine.context_len}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_id, "active": engine.scheduler.active,
                "waiting": engine.scheduler.queue_length}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_name:path}")
    async def one_model(model_name: str):
        if model_name != config.model_id:
            raise APIError(404, f"The model '{model_name}' does not exist", param="model", code="model_not_found")
        return model_card()

    def common(body: dict) -> tuple[SamplingParams, list[str], int, bool, bool]:
        sampling = _sampling(body)
        _field(body, "ignore_eos", "bool", False)  # checked here, read in requests_for
        stop = _stop_strings(body)
        n = _field(body, "n", "int", 1, lo=1, hi=MAX_N)
        stream = _field(body, "stream", "bool", False)
        options = _field(body, "stream_options", "object", {}) or {}
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise APIError(400, "'stream_options.include_usage' must be a bool", param="stream_options",
                           code="invalid_type")
        return sampling, stop, n, stream, include_usage

    def requests_for(body: dict, prompt: list[int], max_tokens: int, sampling: SamplingParams, stop: list[str],
                     stop_ids: list[int], n: int) -> list[GenerationRequest]:
        ignore_eos = bool(body.get("ignore_eos", False))  # vLLM's extension: fixed-length outputs
        out = []
        for i in range(n):
            # n choices from one seed must still differ from each other
            params = sampling if sampling.seed is None or i == 0 else SamplingParams(
                **{**sampling.to_dict(), "seed": sampling.seed + i})
            out.append(GenerationRequest(prompt, max_tokens, params, stop, stop_ids, ignore_eos))
        return out

    # -- /v1/completions --------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        _unsupported(body, "logprobs", "echo", "best_of", "suffix")
        sampling, stop, n, stream, include_usage = common(body)
        prompt = body.get("prompt")
        prompts = _completion_prompts(prompt, engine)
        all_requests, prompt_tokens = [], 0
        for ids in prompts:
            max_tokens = engine.max_tokens(body, len(ids), ("max_tokens",), 16)
            all_requests += requests_for(body, ids, max_tokens, sampling, stop, [], n)
            prompt_tokens += len(ids)
        handles = engine.submit(all_requests)
        rid, model_name = f"cmpl-{uuid.uuid4().hex[:24]}", config.model_id

        def chunk(index: int, text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]}

        if stream:
            return StreamingResponse(
                _sse(handles, chunk, None, prompt_tokens, include_usage, rid, model_name, "text_completion"),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _collect(request, handles)
        choices = [{"text": text, "index": i, "logprobs": None, "finish_reason": finish}
                   for i, (text, finish, _) in enumerate(results)]
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": _usage(prompt_tokens, sum(r[2] for r in results))}

    # -- /v1/chat/completions ---------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        _unsupported(body, "logprobs", "top_logprobs", "tools", "functions", "tool_choice")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages", code="invalid_type")
        messages = [_message_text(m, i) for i, m in enumerate(messages)]
        sampling, stop, n, stream, include_usage = common(body)
        ids, extra_stop, stop_ids = engine.chat_prompt(messages)
        max_tokens = engine.max_tokens(body, len(ids), ("max_completion_tokens", "max_tokens"),
                                       config.default_max_tokens)
        handles = engine.submit(requests_for(body, ids, max_tokens, sampling, stop + extra_stop, stop_ids, n))
        rid, model_name = f"chatcmpl-{uuid.uuid4().hex[:24]}", config.model_id

        def chunk(index: int, text: str, finish: str | None, first: bool = False) -> dict:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if stream:
            return StreamingResponse(
                _sse(handles, chunk, lambda i: chunk(i, "", None, first=True), len(ids), include_usage, rid,
                     model_name, "chat.completion.chunk"),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _collect(request, handles)
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish} for i, (text, finish, _) in enumerate(results)]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": _usage(len(ids), sum(r[2] for r in results))}

    # -- the web page -----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app


async def _collect(request, handles: list[RequestHandle]) -> list[tuple[str, str, int]]:
    """Run the handles to the end: (text, finish_reason, completion_tokens) each.

    While waiting, a client that disconnects cancels the requests so their slots free up.
    """
    texts: list[list[str]] = [[] for _ in handles]
    results: list[tuple[str, str, int] | None] = [None] * len(handles)

    async def collect() -> None:
        async for i, event in _merged_events(handles):
            texts[i].append(event.text)
            if event.finish_reason == "error":
                raise APIError(500, event.error or "generation failed", type="server_error")
            if event.finish_reason is not None:
                results[i] = ("".join(texts[i]), event.finish_reason, event.completion_tokens)

    task = asyncio.create_task(collect())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
        await task
        return results
    finally:
        for h in handles:
            h.cancel()


async def _sse(handles, chunk, first_chunk, prompt_tokens: int, include_usage: bool, rid: str, model_name: str,
               obj: str) -> AsyncIterator[str]:
    """Server-sent events for a streaming response; cancelling (a disconnect) frees the slots."""

    def data(payload: dict) -> str:
        if include_usage:
            payload.setdefault("usage", None)
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    completion_tokens = 0
    try:
        if first_chunk is not None:
            for i in range(len(handles)):
                yield data(first_chunk(i))
        async for i, event in _merged_events(handles):
            if event.finish_reason == "error":
                yield data(APIError(500, event.error or "generation failed", type="server_error").body())
                break
            if event.text:
                yield data(chunk(i, event.text, None))
            if event.finish_reason is not None:
                completion_tokens += event.completion_tokens
                yield data(chunk(i, "", event.finish_reason))
        if include_usage:
            yield data({"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                        "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        for h in handles:
            h.cancel()


def _completion_prompts(prompt: Any, engine: Engine) -> list[list[int]]:
    """`prompt` as a string, a list of strings, a list of token ids, or a list of those lists."""
    vocab = engine.scheduler.vocab_size

    def check_ids(ids: list, where: str) -> list[int]:
        if not ids:
            raise APIError(400, f"{where} is empty", param="prompt", code="invalid_value")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise APIError(400, f"{where}: token ids must be integers in [0, {vocab})", param="prompt",
                           code="invalid_value")
        return ids

    def encode(text: str, where: str) -> list[int]:
        ids = engine.tokenizer.encode(text)
        if not ids:  # an empty prompt starts a fresh document
            eot = getattr(engine.tokenizer, "eot_id", None)
            if eot is None:
                raise APIError(400, f"{where} is empty", param="prompt", code="invalid_value")
            ids = [eot]
        return ids

    if isinstance(prompt, str):
        return [encode(prompt, "prompt")]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [encode(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [check_ids(prompt, "prompt")]
        if all(isinstance(p, list) for p in prompt):
            return [check_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt",
                   code="invalid_type")


# ---------------------------------------------------------------------------------------------
# Running it


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          dtype: str | None = None, max_batch: int = 32, max_queue: int = 256, log_level: str = "info") -> None:
    """Load a run dir and serve it until interrupted (`scratchlm serve`)."""
    import uvicorn

    from scratchlm.infer.api import load

    lm = load(run_dir, dtype=dtype)
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    config = ServerConfig(model_id=Path(run_dir).resolve().name, api_key=api_key, max_batch=max_batch,
                          max_queue=max_queue)
    app = create_app(lm.model, lm.tokenizer, config)
    where = f"http://{host}:{port}"
    auth = "API key required" if api_key else "no API key"
    print(f"scratchlm: serving {config.model_id} at {where}/v1 (chat page at {where}/; {auth})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
