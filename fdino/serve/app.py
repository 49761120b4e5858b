"""HTTP layer of the feature service (FastAPI): routes, upload limits, JSON errors.

Routes:
  GET  /            the search page (one static HTML file, no external resources)
  GET  /health      model, index size, batching counters
  POST /embed       multipart field ``file`` (an image) -> ``{"dim", "feature"}``
  POST /search      fields ``file`` and optional ``k`` -> ``{"k", "images", "results": [{"path", "score", "url"}]}``
  POST /attention   field ``file`` -> PNG: the query and its last-block CLS attention (ViTs)
  GET  /images/P    an indexed image (only paths in the index are served)

Every error is JSON ``{"error": message, "status": code}``: 400 empty or malformed upload, 404 unknown
image, 409 feature unavailable (no folder, not a ViT), 413 upload or image too large, 415 not an
image, 422 missing/invalid field. Bodies over the limit are refused from their Content-Length, or
while streaming when there is none, before they are stored anywhere.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at run time and
# they name classes imported inside `create_app` (FastAPI is optional).
import json
from importlib import resources
from typing import Any

from .service import FeatureService, UploadError

MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the small form fields around the file


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": message, "status": status, **extra}


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app, max_bytes: int, upload_limit: int | None = None) -> None:
        self.app, self.max_bytes = app, int(max_bytes)
        self.upload_limit = int(upload_limit if upload_limit is not None else max_bytes)

    async def _reply_413(self, send, size: str) -> None:
        body = json.dumps(
            error_body(
                413,
                f"upload too large: a request body of {size}; uploads are limited to "
                f"{self.upload_limit} bytes ({self.upload_limit / 2**20:.1f} MiB)",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reply_413(send, f"{int(declared)} bytes")
            return
        state = {"received": 0, "over": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["over"] = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            if state["over"]:  # whatever the app answers after the overflow, the client gets the 413
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await self._reply_413(send, f"more than {state['received'] - 1} bytes")
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not state["started"]:
                await self._reply_413(send, f"more than {self.max_bytes} bytes")


class _TooLarge(Exception):
    """The request body passed the upload limit while streaming (answered with 413)."""


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "form")]
        field = ".".join(loc) or "request"
        if e.get("type") == "missing" and field == "file":
            parts.append("missing form field 'file': upload one image as multipart/form-data field named 'file'")
        elif e.get("type") == "missing":
            parts.append(f"missing field {field!r}")
        else:
            parts.append(f"field {field!r}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def page_html() -> str:
    """The single-file search page shipped inside the package."""
    return resources.files("fdino.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(service: FeatureService):
    """The FastAPI application around ``service`` (which must already be refreshed to serve /search)."""
    from contextlib import asynccontextmanager  # noqa: PLC0415

    from fastapi import FastAPI, File, Form, Request, UploadFile  # noqa: PLC0415
    from fastapi.exceptions import RequestValidationError  # noqa: PLC0415
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response  # noqa: PLC0415
    from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: PLC0415

    limit = service.config.max_upload_bytes

    @asynccontextmanager
    async def lifespan(app):
        yield
        await service.aclose()

    app = FastAPI(title="fdino feature service", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=limit + MULTIPART_OVERHEAD, upload_limit=limit)
    app.state.service = service

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError):
        return JSONResponse(error_body(exc.status, exc.message), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        detail = [{"loc": list(map(str, e.get("loc", ()))), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
        return JSONResponse(error_body(422, _validation_message(errors), detail=detail), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "malformed request body: expected multipart/form-data with an image in field 'file'"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug, not the client's fault; still JSON
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)

    async def read_upload(file: UploadFile) -> bytes:
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise UploadError(
                413,
                f"upload too large: the file has more than {limit} bytes; uploads are limited "
                f"to {limit} bytes ({limit / 2**20:.1f} MiB)",
            )
        return data

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page():
        return HTMLResponse(page_html())

    @app.get("/health")
    async def health():
        return service.health()

    @app.post("/embed")
    async def embed(file: UploadFile = File(..., description="an image file")):
        feature = await service.embed(await read_upload(file))
        return {"dim": int(feature.numel()), "feature": feature.tolist()}

    @app.post("/search")
    async def search(
        file: UploadFile = File(..., description="an image file"), k: int = Form(8, description="number of results")
    ):
        results = await service.search(await read_upload(file), k)
        return {"k": k, "images": len(service.index) if service.index is not None else 0, "results": results}

    @app.post("/attention", responses={200: {"content": {"image/png": {}}}})
    async def attention(file: UploadFile = File(..., description="an image file")):
        return Response(await service.attention(await read_upload(file)), media_type="image/png")

    @app.get("/images/{path:path}")
    async def image(path: str):
        full = service.index.file(path) if service.index is not None else None
        if full is None or not full.is_file():
            raise UploadError(404, f"no indexed image {path!r}")
        return FileResponse(full)

    return app


__all__ = ["create_app", "BodyLimit", "page_html", "error_body"]
