"""How `edgemoe serve` answers a failure: OpenAI-style error bodies, never a traceback or a file path.

A request the server cannot serve as asked gets 400 (bad arguments, a prompt over the context, malformed
JSON) or 422 (a body that does not match the schema), with a message saying what to change. A busy server
answers 503 with Retry-After. Anything else is the server's fault: 500 with a generic message, and the
traceback goes to the server's log only.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ArgumentError, ContextLengthError, LlamaBusyError, LlamaClosedError

log = logging.getLogger("edgemoe.server")


class ServerBusyError(Exception):
    """The model is serving a request and the queue of waiting ones is full."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None, **extra: Any) -> dict:
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


def error_answer(exc: Exception) -> tuple[int, dict, dict]:
    """(status, body, headers) for an exception raised while serving a request."""
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
        return 400, error_body(str(exc), "invalid_request_error"), {}
    log.error("request failed", exc_info=exc)
    return 500, error_body("internal server error; the server's log has the details", "internal_server_error"), {}


def error_response(exc: Exception) -> JSONResponse:
    status, body, headers = error_answer(exc)
    return JSONResponse(body, status_code=status, headers=headers)


class EdgeMoERoute(APIRoute):
    """A route whose failures are answered by `error_answer` (HTTP errors, 401 included, pass through)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route_handler(request: Request):
            try:
                return await handler(request)
            except StarletteHTTPException:
                raise
            except Exception as exc:  # noqa: BLE001 -- every failure gets an answer; 500s are logged
                return error_response(exc)

        return route_handler


def install_error_handlers(app) -> None:
    """The same answers for what fails outside a route (dependencies, middleware, unknown routes' bodies)."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    app.add_exception_handler(RequestValidationError, handler)
    app.add_exception_handler(ServerBusyError, handler)
    app.add_exception_handler(ArgumentError, handler)
    app.add_exception_handler(Exception, handler)
