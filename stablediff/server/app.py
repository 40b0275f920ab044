"""The server, assembled: services, the two routers, authentication, origin and size checks, JSON errors."""
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from stablediff import __version__
from stablediff.errors import UserError
from stablediff.server import routes_a1111, routes_v1, routes_web
from stablediff.server.auth import Users
from stablediff.server.deps import current_user
from stablediff.server.jobs import Changes, Limits, NotFound, Services, TooLarge, find_models
from stablediff.server.store import QueueFull, open_store
from stablediff.server.worker import Worker

log = logging.getLogger("stablediff.server")
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


@dataclass
class ServerConfig:
    model: Path
    outdir: Path
    db: str | None = None  # the queue: a SQLite file (default OUTDIR/queue.sqlite3) or a postgresql:// address
    render: bool = True  # False: only queue and answer (`stablediff worker` processes share a PostgreSQL queue)
    heartbeat_timeout: float = 60  # a shared queue: seconds without a worker's heartbeat before its jobs run again
    models_dir: Path | None = None
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    device: str = "auto"
    dtype: str | None = None
    users: Users = field(default_factory=lambda: Users({}))
    cors_origins: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    preview_every: int = 2
    safety_checker: Path | None = None  # every image of every job is screened with it
    watermark: str | None = None  # and watermarked with this text


def create_app(config: ServerConfig) -> FastAPI:
    store = open_store(config.db, config.outdir, config.heartbeat_timeout)
    models = find_models(config.model, config.models_dir)
    changes = Changes()
    worker = make_worker(store, models, config, changes.notify) if config.render else None
    svc = Services(store, worker, config.outdir, models, config.limits, config.lora_dir, config.embeddings_dir,
                   default_model=config.model.name, models_dir=config.models_dir, watermark=config.watermark,
                   settings={"CLIP_stop_at_last_layers": store.setting("CLIP_stop_at_last_layers", 1)}, changes=changes)

    @asynccontextmanager
    async def lifespan(app):
        requeued, failed = store.recover()
        if requeued or failed:
            log.warning("after the last stop: %d job(s) queued again, %d failed", requeued, failed)
        if store.shared:
            store.listen(changes.notify)  # the steps and ends of jobs that workers elsewhere render
        if worker is not None:
            worker.start()
        yield
        if worker is not None:
            worker.stop()
        store.close()

    app = FastAPI(title="stablediff", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description="Stable Diffusion over HTTP: a native job API under /v1 and AUTOMATIC1111's under /sdapi/v1")
    app.state.services, app.state.users = svc, config.users
    app.include_router(routes_v1.router)
    app.include_router(routes_a1111.router)
    app.include_router(docs_router(app))
    routes_web.mount(app)
    _guards(app, config)
    _errors(app)
    return app


def make_worker(store, models: dict[str, Path], config: ServerConfig, on_change=lambda ids: None) -> Worker:
    """The worker a server runs in its own process, or `stablediff worker` runs alone."""
    return Worker(store, models, device=config.device, dtype=config.dtype, lora_dir=config.lora_dir,
                  embeddings_dir=config.embeddings_dir, safety_checker=config.safety_checker,
                  watermark=config.watermark, max_batch=config.limits.max_batch, max_pixels=config.limits.max_pixels,
                  preview_every=config.preview_every, on_change=on_change, beat_every=config.heartbeat_timeout / 4)


def docs_router(app: FastAPI) -> APIRouter:
    """The OpenAPI schema and its page, behind the same sign-in as everything else."""
    router = APIRouter(dependencies=[Depends(current_user)], include_in_schema=False)

    @router.get("/openapi.json")
    def openapi():
        return app.openapi()

    @router.get("/docs")
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="stablediff API")
    return router


def _guards(app: FastAPI, config: ServerConfig) -> None:
    """Requests refused before any route: state changes from another origin (a page elsewhere must not queue work
    here), and bodies over the upload limit (413); the page's files sent under its security policy."""
    allowed = set(config.cors_origins)
    if allowed:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed), allow_methods=["*"], allow_headers=["*"],
                           allow_credentials=True)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        cross_site = request.headers.get("sec-fetch-site") == "cross-site"
        if request.method in UNSAFE and ((origin and origin != own and origin not in allowed) or
                                         (cross_site and origin not in allowed)):
            return JSONResponse({"error": f"refused: a {request.method} from the page at {origin or 'another site'}; "
                                          "this server takes changes only from its own origin (see --cors-allow-origins)"},
                                status_code=403)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > config.limits.max_upload):
            return JSONResponse({"error": f"the request is {size} bytes; this server takes at most "
                                          f"{config.limits.max_upload:,} (--max-upload)"}, status_code=413)
        if size is None and request.method in UNSAFE and request.headers.get("transfer-encoding"):
            return JSONResponse({"error": "send a Content-Length: bodies of unknown size are refused"}, status_code=411)
        response = await call_next(request)
        if request.url.path.startswith("/web/"):
            response.headers.update(routes_web.POLICY)
        return response


def _errors(app: FastAPI) -> None:
    """Every error is JSON with a message that says what was wrong and what to send instead."""
    @app.exception_handler(UserError)
    async def user_error(request, e: UserError):
        status = 404 if isinstance(e, NotFound) else 413 if isinstance(e, TooLarge) else 400
        return JSONResponse({"error": str(e), **({"field": e.field} if e.field else {})}, status_code=status)

    @app.exception_handler(QueueFull)
    async def queue_full(request, e: QueueFull):
        return JSONResponse({"error": str(e)}, status_code=429, headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
        detail = [{k: v for k, v in err.items() if k in ("loc", "msg", "type")} for err in e.errors()]
        return JSONResponse({"error": f"the request does not fit: {problems}", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse({"error": e.detail}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"the server failed on this request ({type(e).__name__}); it keeps serving"},
                            status_code=500)
