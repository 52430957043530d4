"""How `edgemoe serve` answers a failure: OpenAI's error body, never a traceback or a file path.

Every error answer is `{"error": {"message": str, "type": str, "param": str | None, "code": str | int | None}}`,
the shape OpenAI's API gives and its clients read: the `openai` package puts the message in the exception it
raises, and shows only "Error code: 401" for a body of another shape. A request the server cannot serve as
asked gets 400 (bad arguments, a prompt over the context, malformed JSON), 401 (no API key or another one),
404 (no such route), 405 (a method the route does not take) or 422 (a body that does not match the schema),
with a message saying what to change. A busy server answers 503 with Retry-After. Anything else is the
server's fault: 500 with a generic message, and the traceback goes to the server's log only.
"""
from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgemoe_llamacpp.errors import (
    APIKeyError,
    ArgumentError,
    ContextLengthError,
    EdgeMoEError,
    LlamaBusyError,
    LlamaClosedError,
)

log = logging.getLogger("edgemoe.server")


class ServerBusyError(Exception):
    """The model is serving a request and the queue of waiting ones is full."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def error_body(message: str, kind: str, code: str | int | None = None, param: str | None = None, **extra: Any) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}, **extra}


def _validation_body(exc: RequestValidationError) -> tuple[int, dict]:
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]         # no "input" (it echoes the request) and no "ctx"
    if any(e["type"] == "json_invalid" for e in errors):
        return 400, error_body("the request body is not valid JSON", "invalid_request_error", "invalid_json",
                               detail=errors)
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(x) for x in first["loc"][1:] or first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return 422, error_body(f"{where}: {first['msg']}{more}" if where else first["msg"] + more,
                           "invalid_request_error", "validation_error", where or None, detail=errors)


def _http_answer(exc: StarletteHTTPException, request: Request | None) -> tuple[int, dict, dict]:
    """An HTTP error the framework raises (no such route, a method the route does not take) in OpenAI's shape,
    its headers (Allow) kept. The framework's default message, the status's name, says less than the route."""
    status = HTTPStatus(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else status.phrase
    where = f"{request.method} {request.url.path}" if request is not None else "this request"
    if status == HTTPStatus.NOT_FOUND and message == status.phrase:
        message = f"{where}: no such route"
    elif status == HTTPStatus.METHOD_NOT_ALLOWED and message == status.phrase:
        message = f"{where}: the route takes {(exc.headers or {}).get('Allow', 'another method')}"
    kind = "invalid_request_error" if status < 500 else "internal_server_error"
    return status, error_body(message, kind, status.name.lower()), dict(exc.headers or {})


def error_answer(exc: Exception, request: Request | None = None) -> tuple[int, dict, dict]:
    """(status, body, headers) for an exception raised while serving `request`."""
    if isinstance(exc, StarletteHTTPException):
        return _http_answer(exc, request)
    if isinstance(exc, APIKeyError):
        return 401, error_body(str(exc), "invalid_request_error", "invalid_api_key"), {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, RequestValidationError):
        status, body = _validation_body(exc)
        return status, body, {}
    if isinstance(exc, ServerBusyError):
        return 503, error_body(str(exc), "server_busy", "server_busy"), {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, (LlamaBusyError, LlamaClosedError)):      # a model switch or close raced this request
        return 503, error_body("the model is not available right now; try again", "server_busy", "server_busy"), \
            {"Retry-After": "1"}
    if isinstance(exc, ContextLengthError):
        return 400, error_body(str(exc), "invalid_request_error", "context_length_exceeded", "prompt"), {}
    if isinstance(exc, ArgumentError):
        return 400, error_body(str(exc), "invalid_request_error", param=exc.param), {}
    log.error("request failed", exc_info=exc)
    return 500, error_body("internal server error; the server's log has the details", "internal_server_error"), {}


def error_response(exc: Exception, request: Request | None = None) -> JSONResponse:
    status, body, headers = error_answer(exc, request)
    return JSONResponse(body, status_code=status, headers=headers)


class EdgeMoERoute(APIRoute):
    """A route whose failures, its dependencies' (the API key) included, are answered by `error_answer`."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route_handler(request: Request):
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 -- every failure gets an answer; 500s are logged
                return error_response(exc, request)

        return route_handler


def install_error_handlers(app) -> None:
    """The same answers for what fails outside a route: an unknown route (404), a method a route does not
    take (405), a body that does not parse, middleware."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, request)

    for kind in (StarletteHTTPException, RequestValidationError, ServerBusyError, EdgeMoEError, Exception):
        app.add_exception_handler(kind, handler)
