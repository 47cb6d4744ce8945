"""The HTTP edge of the application: the FastAPI app with its guard (API key, body-size limit)
and JSON error replies. Ray-free; ``serve.app`` attaches the routes.

Every error is ``{"status": int, "error": "what was wrong", ...}`` with that HTTP status.
"""

import hashlib
import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ray.serve")
OPEN_PATHS = frozenset({"/healthz", "/docs", "/openapi.json"})  # answered without the API key
API_KEY_HEADER = "X-API-Key"


def error_body(status: int, message: str, **extra: Any) -> dict:
    return {"status": status, "error": message, **extra}


def reply(result: dict) -> Any:
    """A deployment's answer: an error body becomes a JSON response with its status."""
    if "status" in result:
        return JSONResponse(result, status_code=result["status"])
    return result


def key_digest(key: str) -> str:
    """What the app keeps of the API key: its sha256 (the key itself never enters a Serve config)."""
    return hashlib.sha256(key.encode()).hexdigest()


class Guard:
    """ASGI middleware: the API key and the body-size limit, checked before FastAPI parses
    anything. The body is read here up to the limit (a chunked body has no content-length),
    then replayed to the app."""

    def __init__(self, app: Any, *, key_sha256: str, max_body_bytes: int):
        self.app, self.key_sha256, self.max_body_bytes = app, key_sha256, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.key_sha256 and scope["path"] not in OPEN_PATHS:
            given = headers.get(API_KEY_HEADER.lower(), "")
            if not hmac.compare_digest(key_digest(given), self.key_sha256):
                return await _send(scope, receive, send, 401, f"missing or wrong {API_KEY_HEADER} header")
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _send(scope, receive, send, 413, f"request body of {declared} bytes exceeds the limit "
                               f"of {limit} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send(scope, receive, send, 413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send(scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
    await JSONResponse(error_body(status, message), status_code=status)(scope, receive, send)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse(error_body(400, "malformed JSON body"), status_code=400)
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
    details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
    return JSONResponse(error_body(422, f"invalid request: {problems}", details=details), status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # keep the exception's headers: a 405 carries the Allow header the standard requires
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                        headers=exc.headers)


ERRORS = {
    400: "malformed JSON body",
    401: f"missing or wrong {API_KEY_HEADER} header (when the server has an API key)",
    404: "unknown item id, or a user_id the store has no events for",
    409: "the item id exists, the item's content tuple has no free collision code left, or an event id is "
         "already recorded for another user or item",
    413: "request body over the server's max_body_bytes",
    422: "a field has the wrong type or value, an unknown field, an unknown item id in a history or in events, "
         "an event time before the user's last, or an application without a store asked to keep state",
    503: "no model replica (or the store's writer) could answer; retry later (events: with the same event ids)",
}


def error_responses(*codes: int) -> dict[int, dict]:
    """The OpenAPI ``responses`` of a route's error answers, all ``ErrorBody``."""
    from serve.schemas import ErrorBody

    return {code: {"model": ErrorBody, "description": ERRORS[code]} for code in codes}


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input: logged with its traceback; the client gets JSON, not an HTML page.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body(500, f"internal error ({type(exc).__name__}); see the server log"),
                        status_code=500)


def make_api(*, key_sha256: str, max_body_bytes: int) -> FastAPI:
    """A FastAPI app with the guard and the JSON error handlers, and no routes yet. Settings are
    bound here, at build time: a Serve replica gets them with the app, never from module state."""
    api = FastAPI(title="ray-genrec generative retriever",
                  description="Next-item recommendation by generating semantic IDs. Item ids are the dataset's "
                              f"ids. When the server has an API key, send it in the {API_KEY_HEADER} header.")
    api.add_middleware(Guard, key_sha256=key_sha256, max_body_bytes=max_body_bytes)
    api.add_exception_handler(RequestValidationError, invalid_request)
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(Exception, internal_error)
    return api
