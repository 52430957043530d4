"""The routes of `edgemoe serve`: llama-cpp-python's, rebuilt on edgemoe's route class, plus GET /edgemoe/stats.

llama-cpp-python's generation routes take a lock that a waiting request breaks (interrupt_requests), and start
a stream before they know whether it can run. Here every route that uses the model waits its turn at a
`ModelGate` (a bounded queue: 503 with Retry-After beyond it), and a streamed completion is opened, its
arguments and prompt checked, before the response starts, so a bad request gets 400 rather than a 200 with an
empty stream. /v1/models, /edgemoe/stats, /health and /metrics read without waiting for anyone.
"""
from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import math
import time

import anyio
import llama_cpp
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from llama_cpp.server import app as lcp_app
from llama_cpp.server.types import (
    CreateChatCompletionRequest,
    CreateCompletionRequest,
    CreateEmbeddingRequest,
    DetokenizeInputRequest,
    DetokenizeInputResponse,
    ModelList,
    TokenizeInputCountResponse,
    TokenizeInputRequest,
    TokenizeInputResponse,
)
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette_context.middleware import RawContextMiddleware
from starlette_context.plugins import RequestIdPlugin

from edgemoe_llamacpp.engine.arguments import check_text
from edgemoe_llamacpp.engine.llama import Llama
from edgemoe_llamacpp.errors import APIKeyError, ArgumentError, LlamaClosedError
from edgemoe_llamacpp.server import metrics as server_metrics
from edgemoe_llamacpp.server.errors import (
    EdgeMoERoute,
    ServerBusyError,
    error_answer,
    error_body,
    install_error_handlers,
)
from edgemoe_llamacpp.server.metrics import RequestCounter, RequestCounts, Snapshot

log = logging.getLogger("edgemoe.server")

COPILOT_PATH = "/v1/engines/copilot-codex/completions"
SEND_TIMEOUT_S = 120
SHUTDOWN_GRACE_S = 10       # how long a stream has, once the server is told to stop, to end with [DONE]
# request fields llama-cpp-python does not hand to the Llama (same as its routes)
COMPLETION_EXCLUDE = {"n", "best_of", "logit_bias_type", "user", "min_tokens"}
CHAT_EXCLUDE = {"n", "logit_bias_type", "user", "min_tokens"}
# the chat body with llama-cpp-python's OpenAPI examples
CHAT_BODY = inspect.signature(lcp_app.create_chat_completion).parameters["body"].default


class ModelGate:
    """One request uses the model at a time; up to `queue_size` more wait for it in arrival order, and
    more than that are refused (ServerBusyError: 503 with Retry-After) instead of piling up."""

    def __init__(self, queue_size: int):
        self.queue_size, self.waiting = queue_size, 0
        self._lock = asyncio.Lock()          # fair: waiters are served in order
        self._since = 0.0
        self._mean_s = 1.0                   # how long a request holds the model (decayed mean)

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def retry_after(self) -> int:
        return max(1, min(600, math.ceil(self._mean_s * (self.waiting + 1))))

    async def acquire(self) -> None:
        if self._lock.locked() and self.waiting >= self.queue_size:
            raise ServerBusyError(f"the model is serving a request and {self.waiting} more are waiting (the "
                                  f"queue is full); try again later", self.retry_after())
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        self._since = time.monotonic()

    def release(self) -> None:
        self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - self._since)
        self._lock.release()


class Server:
    """The served models (llama-cpp-python's proxy, edgemoe Llamas inside) behind one gate."""

    def __init__(self, settings, proxy):
        self.settings, self.proxy = settings, proxy
        self.gate = ModelGate(settings.queue_size)
        self.requests = RequestCounts()

    def model_stats(self) -> tuple[str | None, dict | None]:
        """(alias, edgemoe_stats()) of the loaded model, never waiting; stats None while a model loads (or is
        closed to load another)."""
        model = self.proxy._current_model
        try:
            stats = model.edgemoe_stats() if isinstance(model, Llama) else None
        except LlamaClosedError:
            stats = None
        return self.proxy._current_model_alias, stats

    def snapshot(self) -> Snapshot:
        alias, stats = self.model_stats()
        return Snapshot(model=alias if stats is not None else None, stats=stats, running=self.gate.busy,
                        waiting=self.gate.waiting, queue_size=self.gate.queue_size,
                        requests=dict(self.requests.answered), in_flight=self.requests.in_flight)

    async def run(self, model: str | None, call):
        """call(llama, alias) in a worker thread, the model held for the duration."""
        await self.gate.acquire()
        try:
            alias = self.proxy.alias(model)
            llama = await run_in_threadpool(self.proxy, alias)     # may load another model: off the event loop
            return await run_in_threadpool(call, llama, alias)
        finally:
            self.gate.release()

    async def generate(self, body, model: str | None, method: str, kwargs: dict):
        """A completion or chat completion; a stream keeps the model until the response ends."""
        await self.gate.acquire()
        try:
            alias = self.proxy.alias(model)
            llama = await run_in_threadpool(self.proxy, alias)

            def start():
                prepare(body, llama, kwargs)
                return getattr(llama, method)(**{**kwargs, "model": alias})

            result = await run_in_threadpool(start)
        except BaseException:
            self.gate.release()
            raise
        if not kwargs.get("stream"):
            self.gate.release()
            return result
        return EventStream(result, self.gate.release, ping=0 if self.settings.disable_ping_events else None)


def prepare(body, llama: llama_cpp.Llama, kwargs: dict) -> None:
    """llama-cpp-python's request preparation (logit bias by token text, grammar, min_tokens)."""
    if body.logit_bias is not None and body.logit_bias_type == "tokens":
        bias = {}
        for text, score in body.logit_bias.items():
            check_text("logit_bias", text)
            for token in llama.tokenize(text.encode("utf-8"), add_bos=False, special=True):
                bias[str(token)] = score
        kwargs["logit_bias"] = bias
    if body.grammar is not None:
        kwargs["grammar"] = llama_cpp.LlamaGrammar.from_string(body.grammar)
    if body.min_tokens > 0:
        kwargs["logits_processor"] = llama_cpp.LogitsProcessorList(
            [llama_cpp.MinTokensLogitsProcessor(body.min_tokens, llama.token_eos())])


def finished(chunk: dict) -> bool:
    """Whether a completion or chat completion chunk ends its choice (has a finish_reason)."""
    return any(choice.get("finish_reason") for choice in chunk.get("choices", ()))


def cut_short(chunk: dict) -> dict:
    """The chunk that ends a stream the server stops before the model has: `chunk`'s id, object, created and
    model, no text, and finish_reason "length". OpenAI's finish reasons are "stop", "length" and
    "content_filter" (and, in a chat, the tool calls'), and the openai client's types take no other; "stop"
    would say the model ended the text, "length" says it was cut before that, as at max_tokens."""
    choice = {"index": 0, "logprobs": None, "finish_reason": "length"}
    choice.update({"delta": {}} if chunk.get("object") == "chat.completion.chunk" else {"text": ""})
    return {**{key: chunk.get(key) for key in ("id", "object", "created", "model")}, "choices": [choice]}


class EventStream(EventSourceResponse):
    """Server-sent events of a Llama stream opened under the gate. However the response ends (the stream
    done, the client gone, an error, the server stopping), the stream is closed and the gate released.

    When the server is told to stop (SIGTERM, Ctrl-C), sse_starlette sets `_stopping` and gives the stream
    SHUTDOWN_GRACE_S to end: at its next chunk it ends with a `cut_short` chunk and `[DONE]`, as a stream
    does, so that a client sees a finished answer rather than a connection that just closes."""

    def __init__(self, stream, release, ping):
        self._stream, self._release = stream, release
        self._stopping = anyio.Event()
        # a client that stops reading (its socket full) for SEND_TIMEOUT_S loses its stream, and the model
        super().__init__(self._events(), sep="\n", ping=ping, send_timeout=SEND_TIMEOUT_S,
                         shutdown_event=self._stopping, shutdown_grace_period=SHUTDOWN_GRACE_S)

    async def _events(self):
        try:
            async for chunk in iterate_in_threadpool(self._stream):
                yield {"data": json.dumps(chunk)}
                if self._stopping.is_set() and not finished(chunk):
                    log.info("the server is stopping: a stream ends before its model did")
                    yield {"data": json.dumps(cut_short(chunk))}
                    break
        except Exception as exc:  # noqa: BLE001 -- mid-stream the status is sent: report it in the stream
            yield {"data": json.dumps(error_answer(exc)[1])}
            return
        yield {"data": "[DONE]"}

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await run_in_threadpool(self._stream.close)
                finally:
                    release, self._release = self._release, None
                    if release is not None:
                        release()


def get_server(request: Request) -> Server:
    return request.app.state.edgemoe


# ---------------------------------------------------------------------- routes that use the model
def one_choice(body) -> None:
    """llama-cpp-python answers one choice whatever `n` (or a completion's `best_of`) asks for: refuse any
    other count rather than answer with fewer choices than the client reads."""
    for name in ("n", "best_of"):
        value = getattr(body, name, None)
        if value is not None and value != 1:
            raise ArgumentError(f"{name} is {value}: this server answers one choice per request; leave {name} "
                                f"at 1 and send the request again for another", param=name)


async def create_completion(request: Request, body: CreateCompletionRequest,
                            server: Server = Depends(get_server)) -> llama_cpp.Completion:  # noqa: B008
    one_choice(body)
    if isinstance(body.prompt, list):
        if len(body.prompt) > 1:
            raise ArgumentError("one prompt per request: this server does not batch prompts", param="prompt")
        body.prompt = body.prompt[0] if body.prompt else ""
    model = "copilot-codex" if request.url.path.endswith(COPILOT_PATH) else body.model
    return await server.generate(body, model, "create_completion", body.model_dump(exclude=COMPLETION_EXCLUDE))


async def create_chat_completion(body: CreateChatCompletionRequest = CHAT_BODY,
                                 server: Server = Depends(get_server)) -> llama_cpp.ChatCompletion:  # noqa: B008
    one_choice(body)
    if not body.messages:               # the model would answer a bare chat template
        raise ArgumentError("messages is empty: a chat completion needs at least one message", param="messages")
    return await server.generate(body, body.model, "create_chat_completion", body.model_dump(exclude=CHAT_EXCLUDE))


async def create_embedding(body: CreateEmbeddingRequest, server: Server = Depends(get_server)):  # noqa: B008
    return await server.run(body.model, lambda llama, alias: llama.create_embedding(body.input, model=alias))


async def tokenize(body: TokenizeInputRequest,
                   server: Server = Depends(get_server)) -> TokenizeInputResponse:  # noqa: B008
    return TokenizeInputResponse(tokens=await server.run(body.model, lambda llama, _: _tokens(llama, body.input)))


async def count_query_tokens(body: TokenizeInputRequest,
                             server: Server = Depends(get_server)) -> TokenizeInputCountResponse:  # noqa: B008
    return TokenizeInputCountResponse(
        count=len(await server.run(body.model, lambda llama, _: _tokens(llama, body.input))))


async def detokenize(body: DetokenizeInputRequest,
                     server: Server = Depends(get_server)) -> DetokenizeInputResponse:  # noqa: B008
    # a token list may end inside a UTF-8 sequence: show the partial character as U+FFFD
    text = await server.run(body.model, lambda llama, _: llama.detokenize(body.tokens).decode("utf-8", "replace"))
    return DetokenizeInputResponse(text=text)


def _tokens(llama: llama_cpp.Llama, text: str) -> list[int]:
    check_text("input", text)
    return llama.tokenize(text.encode("utf-8"), special=True)


# ---------------------------------------------------------------------- routes that wait for no one
async def get_models(server: Server = Depends(get_server)) -> ModelList:  # noqa: B008
    return {"object": "list",
            "data": [{"id": alias, "object": "model", "owned_by": "me", "permissions": []} for alias in server.proxy]}


async def edgemoe_stats(server: Server = Depends(get_server)) -> dict:  # noqa: B008
    """Residency statistics of the loaded model (hits, misses, bytes fetched/evicted, resident bytes), as of
    its last evaluation, and the request queue. Never waits for a running request."""
    alias, stats = server.model_stats()
    return {"model": alias, "stats": stats,
            "queue": {"running": server.gate.busy, "waiting": server.gate.waiting,
                      "queue_size": server.gate.queue_size}}


async def health(server: Server = Depends(get_server)) -> JSONResponse:  # noqa: B008
    """llama-server's readiness answer: 200 {"status": "ok"} with a model loaded, 503 while one loads. Public,
    as llama-server's is: it says nothing but whether the server can serve."""
    if server.model_stats()[1] is None:
        return JSONResponse(error_body("Loading model", "unavailable_error", 503), status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    """Prometheus metrics: the loaded model's expert-cache counters, request counts, the queue, the process.
    Never waits for a running request."""
    reg = request.app.state.edgemoe_metrics
    if reg is None:
        return JSONResponse(error_body("GET /metrics needs prometheus_client: pip install 'edgemoe-llamacpp[server]'",
                                       "not_implemented", "not_implemented"), status_code=501)
    return Response(server_metrics.exposition(reg), media_type=server_metrics.CONTENT_TYPE)


OURS = {"/v1/completions": create_completion, COPILOT_PATH: create_completion,
        "/v1/chat/completions": create_chat_completion, "/v1/embeddings": create_embedding,
        "/v1/models": get_models, "/extras/tokenize": tokenize, "/extras/tokenize/count": count_query_tokens,
        "/extras/detokenize": detokenize}


def build_router() -> APIRouter:
    """llama-cpp-python's routes (paths, documentation, key check), each with edgemoe's endpoint where it has
    one, on the error-answering route class; then /edgemoe/stats, /metrics and (no key) /health; HEAD beside
    each GET."""
    router = APIRouter(route_class=EdgeMoERoute)
    for route in lcp_app.router.routes:
        if not isinstance(route, APIRoute):
            continue
        router.add_api_route(route.path, OURS.get(route.path, route.endpoint), methods=sorted(route.methods),
                             dependencies=route.dependencies, response_model=route.response_model,
                             summary=route.summary, description=route.description, tags=route.tags,
                             responses=route.responses, include_in_schema=route.include_in_schema, name=route.name)
    router.add_api_route("/edgemoe/stats", edgemoe_stats, methods=["GET"], tags=["edgemoe"],
                         dependencies=[Depends(lcp_app.authenticate)])
    router.add_api_route("/metrics", metrics, methods=["GET"], tags=["edgemoe"], response_class=Response,
                         dependencies=[Depends(lcp_app.authenticate)],
                         responses={200: {"content": {server_metrics.CONTENT_TYPE: {"schema": {"type": "string"}}},
                                          "description": "Prometheus text format"}})
    router.add_api_route("/health", health, methods=["GET"], tags=["edgemoe"],
                         responses={503: {"description": "A model is loading"}})
    add_head_routes(router)
    return router


def add_head_routes(router: APIRouter) -> None:
    """HEAD beside every GET route of `router` itself (FastAPI adds none, where Starlette would; an included
    router's routes are its own): monitors and load balancers probe with HEAD, and the server sends no body
    for it. Kept out of the schema, which would show each operation twice, under one operation id."""
    for route in list(router.routes):
        if isinstance(route, APIRoute) and "GET" in route.methods:
            router.add_api_route(route.path, route.endpoint, methods=["HEAD"], dependencies=route.dependencies,
                                 response_class=route.response_class, include_in_schema=False, name=route.name)


def key_check(api_key: str | None):
    """llama-cpp-python's `authenticate`, comparing the key in constant time; APIKeyError (401) says whether
    the key was missing or wrong."""
    expected = None if api_key is None else api_key.encode("utf-8")

    async def authenticate(authorization: HTTPAuthorizationCredentials | None = Depends(lcp_app.bearer_scheme)):  # noqa: B008
        if expected is None:
            return True
        if authorization is None:
            raise APIKeyError("no API key: this server needs one, sent as `Authorization: Bearer KEY`")
        if hmac.compare_digest(authorization.credentials.encode("utf-8"), expected):
            return authorization.credentials
        raise APIKeyError("invalid API key: it is not this server's key")

    return authenticate


def build_app(settings, proxy) -> FastAPI:
    bad_request_id = JSONResponse(error_body("the X-Request-ID header is not a UUID", "invalid_request_error",
                                             "invalid_request_id", "X-Request-ID"), status_code=400)
    app = FastAPI(title="🦙 llama.cpp Python API (edgemoe)", version=llama_cpp.__version__,
                  root_path=settings.root_path, docs_url=None, redoc_url=None, openapi_url=None,
                  middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(error_response=bad_request_id),),
                                         default_error_response=bad_request_id)])
    app.router.route_class = EdgeMoERoute
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])
    app.state.edgemoe = server = Server(settings, proxy)
    app.add_middleware(RequestCounter, counts=server.requests)
    try:
        app.state.edgemoe_metrics = server_metrics.registry(server.snapshot)
    except ImportError:
        app.state.edgemoe_metrics = None
        log.warning("GET /metrics is off: prometheus_client is not installed (pip install "
                    "'edgemoe-llamacpp[server]')")
    app.dependency_overrides[lcp_app.authenticate] = key_check(settings.api_key)
    app.include_router(build_router())
    install_error_handlers(app)

    # the schema and its pages want the key too, when there is one
    guarded = [Depends(lcp_app.authenticate)]
    schema_url = settings.root_path + "/openapi.json"

    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    async def swagger():
        return get_swagger_ui_html(openapi_url=schema_url, title=app.title + " - Swagger UI")

    async def redoc():
        return get_redoc_html(openapi_url=schema_url, title=app.title + " - ReDoc")

    for path, endpoint in (("/openapi.json", openapi), ("/docs", swagger), ("/redoc", redoc)):
        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False, dependencies=guarded)
    add_head_routes(app.router)
    return app
