"""HTTP layer of the feature service (FastAPI): routes, upload limits, JSON errors.

Routes:
  GET  /            the search page (one static HTML file, no external resources)
  GET  /health      model, index size, batching counters
  POST /embed       multipart field ``file`` (an image) -> ``{"dim", "feature"}``
  POST /search      fields ``file`` and optional ``k`` -> ``{"k", "images", "results": [{"path", "score", "url"}]}``
  POST /attention   field ``file`` -> PNG: the query and its last-block CLS attention (ViTs)
  GET  /images/P    an indexed image (only paths in the index, resolved inside the folder, are served)
  /docs, /redoc, /openapi.json only with ``docs=True`` (fdino serve --docs)

Every error is JSON ``{"error": message, "status": code}``: 400 empty or malformed upload or a Host
header that does not name this server, 401 missing token (when one is set), 404 unknown image, 408/504
request timeout, 409 feature unavailable (no folder, not a ViT), 413 upload or image too large (bytes,
pixels, aspect ratio, decoding memory), 415 not an accepted image, 422 missing/invalid field, 503 queue
full (with Retry-After). Bodies over the limit are refused from their Content-Length, or while
streaming when there is none, before they are stored anywhere. A 500 says only "internal error" and a
request id; the exception is logged with that id (logger ``fdino.serve``).

Result paths are text (names that are not UTF-8 show U+FFFD); their ``url`` percent-encodes the exact
file name (`fdino.serve.paths`). Guards (host, token, queue, timeouts) are in `fdino.serve.guard`.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at run time and
# they name classes imported inside `create_app` (FastAPI is optional).
import json
import logging
import uuid
from collections.abc import Sequence
from importlib import resources
from typing import Any

from .guard import LOOPBACK_NAMES, Admission, BodyLimit, HostCheck, TokenCheck, error_body
from .paths import name_from_raw_path
from .service import FeatureService, UploadError

MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the small form fields around the file
UPLOAD_PATHS = ("/embed", "/search", "/attention")
log = logging.getLogger("fdino.serve")


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


def create_app(
    service: FeatureService,
    *,
    allowed_hosts: Sequence[str] | None = LOOPBACK_NAMES,
    token: str | None = None,
    docs: bool = False,
):
    """The FastAPI application around ``service`` (which must already be refreshed to serve /search).

    Args:
        allowed_hosts: accepted ``Host`` headers: ``name:port`` exactly or ``name`` on any port (default:
            the loopback names on any port); None accepts any host (`fdino.serve.guard.allowed_hosts`).
        token: if set, every request must carry it (``Authorization: Bearer`` or ``?token=``).
        docs: serve /docs, /redoc and /openapi.json.
    """
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

    app = FastAPI(
        title="fdino feature service",
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    config = service.config
    # add_middleware: the last added runs first (host, then token, then body size, then the queue).
    app.add_middleware(
        Admission, paths=UPLOAD_PATHS, max_queue=config.max_queue, timeout=config.request_timeout, retry_after=1
    )
    app.add_middleware(BodyLimit, max_bytes=limit + MULTIPART_OVERHEAD, upload_limit=limit)
    if token:
        app.add_middleware(TokenCheck, token=token)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)
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
        # The exception's text may hold paths or data: it goes to the server log, the client gets an id.
        request_id = uuid.uuid4().hex[:16]
        log.error("request %s %s %s failed", request_id, request.method, request.url.path, exc_info=exc)
        message = f"internal error (request id {request_id}; the server log has the details)"
        return JSONResponse(error_body(500, message, request_id=request_id), status_code=500)

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
    async def image(request: Request, path: str):
        # The raw path keeps bytes that are not UTF-8 (the decoded ``path`` replaced them).
        name = name_from_raw_path(request.scope.get("raw_path") or b"", request.scope.get("root_path", ""))
        name = path if name is None else name
        full = service.index.file(name) if service.index is not None else None
        if full is None:
            raise UploadError(404, f"no indexed image {path!r}")
        return FileResponse(full)

    return app


__all__ = ["create_app", "BodyLimit", "UPLOAD_PATHS", "page_html", "error_body"]
