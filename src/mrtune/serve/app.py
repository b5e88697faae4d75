"""The HTTP API of `mrtune serve` (FastAPI): `/v1/parse`, OpenAI-compatible completions, health, metrics, a page.

Every refusal is a JSON body in OpenAI's error shape, `{"error": {"message", "type", "code"}}`, whose message is one
line naming the problem and the fix; `code` is the kind counted in `mrtune_errors_total`. No request field is used
as a path or reaches the filesystem: the model, its run directory and the page are fixed when the server starts.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from mrtune.errors import MrtuneError
from mrtune.serve.batcher import DynamicBatcher, Overloaded
from mrtune.serve.engine import Engine, ParsedSentence
from mrtune.serve.metrics import ServeMetrics
from mrtune.serve.schemas import ChatRequest, CompletionRequest, OpenAIRequest, ParseRequest

logger = logging.getLogger("mrtune.serve")


@dataclass(frozen=True)
class ServeSettings:
    api_key: str | None = None
    """Required as `Authorization: Bearer KEY` on /v1/* and /metrics when set (the page and /health stay open)."""
    timeout_s: float = 60.0
    """A request not answered within this many seconds gets 504 (its rows are dropped if not yet decoding)."""
    batch_window_s: float = 0.01
    """How long the first waiting row waits for others to share its batch."""
    max_body_bytes: int = 1 << 20
    max_rows: int = 256
    """Sentences (or prompts) per request."""
    max_queued_rows: int = 4096
    """Rows waiting at once; beyond this a request gets 503 at once instead of timing out in the queue."""


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    return "invalid_request_error" if status < 500 else "server_error"


class Service:
    """What the routes share: the engine, its batcher, the settings and the metrics."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.metrics = ServeMetrics()
        self.batcher = DynamicBatcher(
            engine.complete,
            max_batch=engine.max_batch,
            window_s=settings.batch_window_s,
            max_queued_rows=settings.max_queued_rows,
            on_batch=self.metrics.observe_batch,
        )
        self.metrics.queued_rows.set_function(lambda: self.batcher.queued_rows)
        self.examples = engine.example_sentences()

    def error(self, status: int, kind: str, message: str) -> JSONResponse:
        self.metrics.errors.labels(kind).inc()
        body = {"error": {"message": message, "type": _error_type(status), "code": kind}}
        return JSONResponse(body, status_code=status)

    def check_rows(self, field: str, texts: list[str], prompts: list[str]) -> None:
        """Refuse a request whose rows are too many, blank, or too long for the model (before any queueing)."""
        if len(texts) > self.settings.max_rows:
            raise ApiError(
                422,
                "too_many_rows",
                f"{field} has {len(texts)} items, over the limit of {self.settings.max_rows} per request: split it",
            )
        limit = self.engine.max_prompt_tokens
        for index, (text, tokens) in enumerate(zip(texts, self.engine.token_counts(prompts))):
            if not text.strip():
                raise ApiError(422, "empty_row", f"{field}[{index}] is empty: send the text to parse")
            if tokens > limit:
                config = self.engine.config
                raise ApiError(
                    422,
                    "row_too_long",
                    f"{field}[{index}] makes a prompt of {tokens} tokens, over this model's limit of {limit} "
                    f"(data.max_length {config.data.max_length} less eval.max_new_tokens "
                    f"{config.eval.max_new_tokens}): send shorter sentences",
                )

    def check_model(self, body: OpenAIRequest) -> None:
        if body.model != self.engine.name:
            raise ApiError(
                404,
                "model_not_found",
                f"model {body.model[:80]!r} is not served here: use {self.engine.name!r} (GET /v1/models)",
            )
        if body.n != 1:
            raise ApiError(422, "unsupported", "n must be 1: decoding is greedy, so every choice would be the same")
        if body.stream:
            raise ApiError(422, "unsupported", "stream=true is not supported: ask without streaming")

    async def decode(self, request: Request, prompts: list[str]) -> list[str]:
        """Completions of `prompts` through the batcher, within the timeout, given up if the client leaves."""
        job = asyncio.ensure_future(asyncio.wait_for(self.batcher.submit(prompts), self.settings.timeout_s))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            job.cancel()  # a no-op when it finished; otherwise its rows leave the queue
        if not job.done() or job.cancelled():
            raise ApiError(499, "client_disconnected", "the client closed the connection before the answer")
        try:
            return job.result()
        except asyncio.TimeoutError:
            raise ApiError(
                504,
                "timeout",
                f"no answer within the per-request timeout of {self.settings.timeout_s:g} s: send fewer sentences, "
                "or start the server with a larger --timeout",
            ) from None
        except Overloaded as error:
            raise ApiError(503, "overloaded", f"the server is overloaded ({error}): retry later") from None
        except MrtuneError as error:
            raise ApiError(503, "decode_failed", str(error)) from None

    def usage(self, prompts: list[str], completions: list[str]) -> dict:
        prompt_tokens = sum(self.engine.token_counts(prompts))
        completion_tokens = sum(self.engine.completion_tokens(completions))
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read, so only a disconnect comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _service(request: Request) -> Service:
    return request.app.state.service


def require_key(request: Request) -> None:
    key = _service(request).settings.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "").encode("utf-8")
    # Constant time: how many leading characters match must not show in the answer's timing.
    if not hmac.compare_digest(given, f"Bearer {key}".encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key: send the header 'Authorization: Bearer KEY'")


router = APIRouter()
protected = [Depends(require_key)]


@router.post("/v1/parse", dependencies=protected)
async def parse(body: ParseRequest, request: Request) -> dict:
    service = _service(request)
    prompts = [service.engine.prompt(sentence) for sentence in body.sentences]
    service.check_rows("sentences", body.sentences, prompts)
    outputs = await service.decode(request, prompts)
    return {"results": [asdict(ParsedSentence.of(s, o)) for s, o in zip(body.sentences, outputs)]}


@router.post("/v1/completions", dependencies=protected)
async def completions(body: CompletionRequest, request: Request) -> dict:
    service = _service(request)
    service.check_model(body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ApiError(422, "invalid_request", "prompt is an empty list: send at least one prompt")
    service.check_rows("prompt", prompts, prompts)
    outputs = await service.decode(request, prompts)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": service.engine.name,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": "stop"} for i, text in enumerate(outputs)
        ],
        "usage": service.usage(prompts, outputs),
    }


@router.post("/v1/chat/completions", dependencies=protected)
async def chat_completions(body: ChatRequest, request: Request) -> dict:
    service = _service(request)
    service.check_model(body)
    users = [message for message in body.messages if message.role == "user"]
    if not users:
        raise ApiError(422, "invalid_request", "messages has no user message: the last one is the sentence to parse")
    sentence = users[-1].text
    prompts = [service.engine.prompt(sentence)]
    service.check_rows("messages", [sentence], prompts)
    (output,) = await service.decode(request, prompts)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": service.engine.name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": output}, "finish_reason": "stop"}],
        "usage": service.usage(prompts, [output]),
    }


@router.get("/v1/models", dependencies=protected)
async def models(request: Request) -> dict:
    service = _service(request)
    created = int(service.engine.run.run_json.stat().st_mtime)
    return {
        "object": "list",
        "data": [{"id": service.engine.name, "object": "model", "created": created, "owned_by": "mrtune"}],
    }


@router.get("/health")
async def health(request: Request) -> dict:
    service = _service(request)
    return {
        "status": "ok",
        "model": service.engine.name,
        "device": service.engine.device,
        "constrained": service.engine.constraint is not None,
        "max_batch": service.engine.max_batch,
        "queued_rows": service.batcher.queued_rows,
    }


@router.get("/metrics", dependencies=protected)
async def metrics(request: Request) -> Response:
    service = _service(request)
    return Response(service.metrics.render(), media_type=service.metrics.content_type)


@router.get("/", response_class=HTMLResponse)
async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(
        request.app.state.page,
        # The page runs only its own inline script and talks only to this server.
        headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
        },
    )


def render_page(service: Service) -> str:
    settings = {
        "model": service.engine.name,
        "examples": service.examples,
        "needs_key": service.settings.api_key is not None,
        "max_rows": service.settings.max_rows,
    }
    # JSON inside <script>: "<" escaped so that no example text can close the script element.
    data = json.dumps(settings).replace("<", "\\u003c")
    template = resources.files("mrtune.serve").joinpath("page.html").read_text(encoding="utf-8")
    return template.replace("{{SETTINGS}}", data)


class RequestMetrics:
    """ASGI middleware: counts every answered request by endpoint and status, and times it."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = self.metrics.endpoint(scope["path"])
        started = time.perf_counter()
        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


class DeclaredBodyLimit:
    """ASGI wrapper around the whole app: a request whose Content-Length is over the body limit gets our JSON
    error. FastAPI's own limit (max_body_size) answers it first, in plain text, from a middleware that runs before
    any of ours; it still guards bodies sent without a Content-Length (chunked), whose 413 our handlers do see."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.service.settings.max_body_bytes:
                limit = self.service.settings.max_body_bytes
                response = self.service.error(413, "body_too_large", f"the body is over {limit} bytes: send fewer rows")
                self.service.metrics.requests.labels(self.service.metrics.endpoint(scope["path"]), "413").inc()
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class _App(FastAPI):
    def build_middleware_stack(self):
        return DeclaredBodyLimit(super().build_middleware_stack(), self.state.service)


def _validation_message(errors: list[dict]) -> tuple[str, str]:
    """One line for pydantic's list of problems: the first, named by its field path, and how many more."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return "invalid_json", (
            f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')} at character "
            f"{first['loc'][-1]}): send a JSON object"
        )
    field = ".".join(str(part) for part in first["loc"] if part != "body")
    if not field:
        if first["type"] == "missing":
            return "invalid_request", 'the request has no body: send a JSON object, e.g. {"sentences": ["..."]}'
        return "invalid_request", "the body must be a JSON object (sent with Content-Type: application/json)"
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    return "invalid_request", f"{field}: {first['msg']}{more}"


def _install_error_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return service.error(error.status, error.kind, error.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        kind, message = _validation_message(list(error.errors()))
        return service.error(400 if kind == "invalid_json" else 422, kind, message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        messages = {
            404: ("not_found", f"no endpoint {request.url.path[:80]!r}: see GET /v1/models, POST /v1/parse"),
            405: ("method_not_allowed", f"{request.method} is not allowed on {request.url.path[:80]!r}"),
            413: ("body_too_large", f"the body is over {service.settings.max_body_bytes} bytes: send fewer rows"),
        }
        kind, message = messages.get(error.status_code, ("http_error", str(error.detail)))
        return service.error(error.status_code, kind, message)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("error answering %s %s", request.method, request.url.path)
        return service.error(500, "internal_error", f"internal error ({type(error).__name__}): see the server's log")


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    """The app around a loaded engine; its batcher runs while the app's lifespan does."""
    service = Service(engine, settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        yield
        await service.batcher.stop()
        service.engine.save_masks()  # after the decoding thread stopped: nothing changes the masks any more

    app = _App(
        title="mrtune",
        summary=f"meaning representations from {engine.name}",
        lifespan=lifespan,
        docs_url=None,  # the interactive docs load their scripts from a CDN; /openapi.json stays
        redoc_url=None,
        max_body_size=service.settings.max_body_bytes,
    )
    app.state.service = service
    app.state.page = render_page(service)
    app.include_router(router)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    _install_error_handlers(app, service)
    return app
