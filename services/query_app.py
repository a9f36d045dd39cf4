"""The query service: Ray Serve + FastAPI over the committed runs of one storage root. Read-only.

    serve run infra/serve.yaml                       # 127.0.0.1:8000, root from COUSINS_STORAGE_ROOT
    serve run services.query_app:build storage_root=s3://bucket/cousins

Every answer comes from `cousins.query.runs`, `.drift` and `.prompt` (the CLI's backend too); this
module only maps HTTP onto them: query parameters with bounds and allow-lists (FastAPI answers 422
before any storage is read), `QueryError`s to their status, anything unexpected to a JSON 500
without a traceback. When `COUSINS_API_TOKEN` is set in the replica's environment every endpoint but
/healthz and /readyz needs `Authorization: Bearer <token>`; the OpenAPI document and /docs stay open
(they hold no data, and Swagger's "Authorize" button then works).
"""

from __future__ import annotations

import hmac
import logging
import os
from enum import Enum
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.dependencies.utils import get_flat_dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve

from cousins.query.drift import DRIFT_FIELDS, METRICS, SORT_FIELDS, drift_page, get_summary, list_cousins
from cousins.query.inputs import DEFAULT_LIMIT, MAX_LIMIT, MAX_OFFSET, MAX_TEXT, NAME_PATTERN, BadInput, QueryError
from cousins.query.prompt import prompt_view
from cousins.query.runs import get_config, get_manifest, get_report, get_run, list_runs
from cousins.run.storage import Location, resolve

log = logging.getLogger("cousins.query.runs")

ROOT_ENV, TOKEN_ENV = "COUSINS_STORAGE_ROOT", "COUSINS_API_TOKEN"

SortField = Enum("SortField", {n: n for n in SORT_FIELDS}, type=str)
Metric = Enum("Metric", {n: n for n in METRICS}, type=str)
Field = Enum("Field", {n: n for n in DRIFT_FIELDS}, type=str)


class RunState(str, Enum):
    committed = "committed"
    all = "all"


class Order(str, Enum):
    asc = "asc"
    desc = "desc"


RunId = Path(pattern=NAME_PATTERN, max_length=200, description="a committed run's id")
NameQuery = dict(pattern=NAME_PATTERN, max_length=200)
_ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"detail": {}}, "required": ["detail"]}}}}
_RUN_ERRORS = {401: {"description": "missing or wrong bearer token", **_ERROR},
               404: {"description": "no such committed run (or cousin, prompt, file)", **_ERROR},
               422: {"description": "invalid parameters", **_ERROR}}


class Unauthorized(Exception):
    pass


def _known_query(request: Request) -> None:
    """Unknown query parameters are refused, not ignored: `limt=5` is a mistake to report."""
    route = request.scope.get("route")
    if not hasattr(route, "dependant"):
        return
    allowed = {p.alias for p in get_flat_dependant(route.dependant).query_params}
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise BadInput(f"unknown query parameters {[u[:40] for u in unknown[:5]]}; "
                       f"this endpoint takes {sorted(allowed)}")


_STORAGE_ERRORS = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                   "ClientConnectorError", "ServerDisconnectedError", "NoCredentialsError")


def _storage_error(exc: BaseException) -> bool:
    """botocore/aiohttp connection failures that are not OSError subclasses: storage unreachable."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _STORAGE_ERRORS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")


def _needs_token(request: Request) -> bool:
    path, prefix = request.scope["path"], request.scope.get("root_path", "")
    if prefix and path.startswith(prefix):
        path = path[len(prefix):] or "/"
    return path not in OPEN_PATHS


def _has_token(header: str | None, token: str) -> bool:
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def create_api(root: str, *, storage_options: dict | None = None, token: str | None = None) -> FastAPI:
    """The FastAPI app over the runs under `root` (any URL `cousins.run.storage.resolve` takes).
    `token`: when set, the bearer token every data endpoint requires."""
    loc: Location = resolve(root, **(storage_options or {}))
    api = FastAPI(title="cousins query", version="1", dependencies=[Depends(_known_query)],
                  redirect_slashes=False,  # a redirect would be built from the request's Host header
                  description="Read-only access to the committed runs of one storage root: runs, "
                              "manifests and configs, drift summaries, drift rows, prompts side by "
                              "side, reports.")
    bearer = HTTPBearer(auto_error=False, description="COUSINS_API_TOKEN, when the service has one")

    def authorized(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        # also checked first in the middleware; kept here so the OpenAPI document shows the scheme
        if token and (creds is None or not _has_token(f"Bearer {creds.credentials}", token)):
            raise Unauthorized("missing or wrong bearer token: send Authorization: Bearer <COUSINS_API_TOKEN>")

    @api.exception_handler(Unauthorized)
    async def _unauthorized(request: Request, exc: Unauthorized):
        return JSONResponse({"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @api.exception_handler(QueryError)
    async def _query_error(request: Request, exc: QueryError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # The errors without the offending input echoed back (it can be large or binary).
        errors = [{"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @api.middleware("http")
    async def _no_tracebacks(request: Request, call_next):
        """Whatever escapes the handlers above is logged here and answered as JSON, never a trace.
        Before anything: a trailing slash is dropped (served, not redirected) and the token is
        checked, so a request without it learns nothing about parameters or runs. After: headers
        that stop browsers sniffing types or framing the answers."""
        path = request.scope["path"]
        if len(path) > 1 and path.endswith("/"):
            request.scope["path"] = path.rstrip("/") or "/"
        try:
            if token and _needs_token(request) and not _has_token(request.headers.get("authorization"), token):
                response = await _unauthorized(request, Unauthorized(
                    "missing or wrong bearer token: send Authorization: Bearer <COUSINS_API_TOKEN>"))
            else:
                response = await call_next(request)
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
            response.headers.setdefault("X-Frame-Options", "DENY")
            return response
        except Exception as exc:  # noqa: BLE001
            log.exception("query failed: %s %s", request.method, request.url.path)
            if isinstance(exc, (OSError, TimeoutError)) or _storage_error(exc):  # storage unreachable
                return JSONResponse({"detail": "storage unavailable; try again"}, status_code=503)
            return JSONResponse({"detail": "internal error (logged by the service)"}, status_code=500)

    @api.get("/healthz", tags=["health"], summary="liveness: the process answers")
    def healthz() -> dict:
        return {"status": "ok"}

    @api.get("/readyz", tags=["health"], summary="readiness: the storage root can be listed",
             responses={503: {"description": "storage unreachable", **_ERROR}})
    def readyz():
        try:
            loc.fs.invalidate_cache(loc.path)
            if not loc.fs.exists(loc.path):
                return JSONResponse({"status": "unavailable", "detail": f"storage root {loc.url} does not exist"},
                                    status_code=503)
        except Exception as e:  # noqa: BLE001 - any storage failure means not ready
            return JSONResponse({"status": "unavailable", "detail": type(e).__name__}, status_code=503)
        return {"status": "ready"}

    r = APIRouter(dependencies=[Depends(authorized)], responses=_RUN_ERRORS)

    @r.get("/runs", tags=["runs"], summary="committed runs, newest first (state=all: in progress and failed too)")
    def runs(state: RunState = Query(RunState.committed,
                                     description="committed, or all: runs in progress and failed runs too")) -> dict:
        return {"runs": list_runs(loc, state.value)}

    @r.get("/runs/{run_id}", tags=["runs"], summary="one run: listing entry and manifest")
    def run(run_id: str = RunId) -> dict:
        return get_run(loc, run_id)

    @r.get("/runs/{run_id}/manifest", tags=["runs"], summary="the run's manifest.json")
    def manifest(run_id: str = RunId) -> dict:
        return get_manifest(loc, run_id)

    @r.get("/runs/{run_id}/config", tags=["runs"], summary="the run's resolved config (config.yaml)")
    def config(run_id: str = RunId) -> dict:
        return get_config(loc, run_id)

    @r.get("/runs/{run_id}/summary", tags=["drift"], summary="drift summary: every cousin with CIs, noise floor")
    def summary(run_id: str = RunId) -> dict:
        return get_summary(loc, run_id)

    @r.get("/runs/{run_id}/summary/{cousin}", tags=["drift"], summary="one cousin's drift summary and the noise floor")
    def cousin_summary(run_id: str = RunId, cousin: str = Path(**NameQuery)) -> dict:
        return get_summary(loc, run_id, cousin)

    @r.get("/runs/{run_id}/cousins", tags=["drift"], summary="cousins with drift rows (noise floor included)")
    def cousins(run_id: str = RunId) -> dict:
        return {"run_id": run_id, "cousins": list_cousins(loc, run_id)}

    @r.get("/runs/{run_id}/drift", tags=["drift"], summary="a page of drift rows, filtered and sorted")
    def drift(
        run_id: str = RunId,
        cousin: str | None = Query(None, **NameQuery),
        category: str | None = Query(None, min_length=1, max_length=MAX_TEXT),
        metric: Metric = Query(Metric.kld_mean, description="the numeric column min and max apply to"),
        min: float | None = Query(None, description="keep rows with metric >= min"),  # noqa: A002
        max: float | None = Query(None, description="keep rows with metric <= max"),  # noqa: A002
        flips_only: bool = Query(False, description="only rows whose correctness flipped"),
        errors: bool | None = Query(None, description="true: only error rows; false: only rows without"),
        sort: SortField = Query(SortField.kld_mean),
        order: Order = Query(Order.desc),
        limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
        fields: list[Field] | None = Query(None, description="columns (default: all but the per-token lists)"),
    ) -> dict:
        return drift_page(
            loc, run_id, cousin=cousin, category=category, metric=metric.value,
            min_value=min, max_value=max, flips_only=flips_only, errors=errors,
            sort=sort.value, descending=order is Order.desc, limit=limit, offset=offset,
            fields=[f.value for f in fields] if fields else None)

    @r.get("/runs/{run_id}/prompts/{prompt_id:path}", tags=["drift"],
           summary="one prompt's generations by every model, side by side, with the first divergence")
    def prompt(run_id: str = RunId,
               prompt_id: str = Path(min_length=1, max_length=MAX_TEXT),
               sample_index: int | None = Query(None, ge=0, lt=2**31)) -> dict:
        return prompt_view(loc, run_id, prompt_id, sample_index=sample_index)

    @r.get("/runs/{run_id}/report.html", tags=["drift"], summary="the run's self-contained HTML report",
           response_class=Response, responses={200: {"content": {"text/html": {}}}})
    def report(run_id: str = RunId) -> Response:
        # The report embeds its plots and needs no script: forbid everything else it might load.
        csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"
        return Response(get_report(loc, run_id), media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})

    api.include_router(r)
    return api


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
@serve.ingress()
class QueryService:
    """One replica holds one app over one storage root; scale with num_replicas. The token is read
    from the replica's environment (runtime_env env_vars), never passed as an argument, so it
    does not show in Serve's config or dashboard."""

    def __init__(self, storage_root: str | None = None, storage_options: dict | None = None):
        root = storage_root or os.environ.get(ROOT_ENV)
        if not root:
            raise ValueError(f"no storage root: pass storage_root or set {ROOT_ENV} (e.g. s3://bucket/cousins)")
        self._api = create_api(root, storage_options=storage_options, token=os.environ.get(TOKEN_ENV) or None)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._api


def build(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application (an application builder: `serve run services.query_app:build
    storage_root=…`, or `import_path` + `args` in infra/serve.yaml)."""
    args = dict(args or {})
    unknown = set(args) - {"storage_root", "storage_options"}
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; expected storage_root, storage_options")
    root = args.get("storage_root") or os.environ.get(ROOT_ENV)
    if not root:
        raise ValueError(f"no storage root: set {ROOT_ENV} (e.g. s3://bucket/cousins or ./outputs) "
                         f"or pass storage_root=…")
    if "://" not in root:  # a local path means the caller's directory, not the replica's
        root = os.path.abspath(os.path.expanduser(root))
    return QueryService.bind(storage_root=root, storage_options=args.get("storage_options"))
