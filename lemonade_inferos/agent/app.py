"""The control agent's HTTP API (FastAPI): :func:`create_app` builds one.

Endpoints (under ``/v1``; mutating ones need header ``X-Inferos-Token``):

=========================  ====  ==========================================================
``GET  /health``                 liveness + policy version
``GET  /metrics``                sliding-window metrics (see :mod:`.metrics`)
``GET  /metrics/prometheus``     the same as Prometheus text exposition
``GET  /policy``                 policy in force, baseline flag, effective policy, version
``POST /policy``           auth  merge a partial policy document; 400 leaves it unchanged
``GET  /policy/schema``          JSON Schema of the policy document
``POST /baseline``         auth  ``{"enable": bool}``
``GET  /config``                 the agent's own config
``POST /config``           auth  merge a partial config; 400 leaves it unchanged
``GET  /history?limit=N``        newest N reports (1..10000, default 100), oldest first
``POST /stats``            auth  one PostRun report (committed before the 2xx answer)
``GET  /dashboard``              the dashboard page (also ``/v1/dashboard``)
``GET  /openapi.json``           the OpenAPI document
=========================  ====  ==========================================================

Every error is ``{"error": {"code", "message", "details"}}``. Every response carries
``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and a same-origin
Content-Security-Policy; there is no CORS (browsers on other origins cannot read or post).
Requests whose ``Host`` is not in ``allowed_hosts`` (loopback names by default) are refused,
which blocks DNS-rebinding pages; bodies over 1 MiB get 413, bodies not sent as
``application/json`` 415, JSON nested deeper than 64 levels 400 (see
:mod:`lemonade_inferos.http_guard`, shared with ``inferos serve``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

from fastapi import Body, Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyHeader
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..http_guard import LOOPBACK_HOSTS, MAX_BODY_BYTES, GuardMiddleware  # noqa: F401 (re-exported)
from ..policy import Policy, PolicyError, policy_json_schema
from . import TOKEN_HEADER
from .auth import fingerprint, load_or_create_token, token_matches
from .history import HistoryStore
from .prometheus import CONTENT_TYPE as PROM_CONTENT_TYPE
from .prometheus import PrometheusExporter
from .schemas import (
    BaselineRequest,
    ConfigView,
    ErrorBody,
    Health,
    HistoryView,
    PolicyView,
    StatsAccepted,
    StatsReport,
)
from .settings import AgentConfig, ConfigError, default_state_dir
from .state import AgentState, ResourceProvider, iso_utc

log = logging.getLogger("lemonade_inferos.agent")

STATIC_FILES = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}

ERR = {"model": ErrorBody}
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {**ERR, "description": "missing or wrong X-Inferos-Token"},
    400: {**ERR, "description": "the body could not be parsed (not UTF-8 JSON)"},
}


class HTTPError(Exception):
    """An error answered with the agent's error body."""

    def __init__(self, code: int, message: str, details: Any = None, headers: dict[str, str] | None = None):
        self.code, self.message, self.details, self.headers = code, message, details, headers


def error_body(code: int, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def _json_safe(v: Any, depth: int = 0) -> Any:
    """A JSON-serialisable, bounded rendering of a rejected input value."""
    if v is None or isinstance(v, (bool, int)):
        return v
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else repr(v)
    if isinstance(v, str):
        return v if len(v) <= 200 else v[:200] + "…"
    if depth < 2 and isinstance(v, dict) and len(v) <= 20:
        return {str(k)[:100]: _json_safe(x, depth + 1) for k, x in v.items()}
    if depth < 2 and isinstance(v, (list, tuple)) and len(v) <= 20:
        return [_json_safe(x, depth + 1) for x in v]
    r = repr(v)
    return r if len(r) <= 200 else r[:200] + "…"


def _validation_details(errors: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        if loc and loc[0] in ("body", "query", "header", "path"):
            where, loc = loc[0], loc[1:]
        else:
            where = "body"
        field = ".".join(loc) or f"({where})"
        msg = e.get("msg", "invalid")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append({"field": field, "in": where, "value": _json_safe(e.get("input")), "message": msg})
    return out


def _static_text(name: str) -> str:
    return (resources.files("lemonade_inferos.agent") / "static" / name).read_text(encoding="utf-8")


def create_app(
    config: AgentConfig | None = None,
    state_dir: str | Path | None = None,
    token: str | None = None,
    *,
    initial_policy: Policy | None = None,
    resource_provider: ResourceProvider | None = None,
    clock: Callable[[], float] = time.time,
    allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
) -> FastAPI:
    """Build the agent app.

    Args:
        config: agent config; None = the one persisted in ``state_dir``, else defaults.
        state_dir: where ``history.sqlite3`` lives; None = :func:`default_state_dir`.
        token: the token for mutating endpoints; None = :func:`load_or_create_token`.
        initial_policy: policy to put in force; None = the persisted one, else ``default``.
        resource_provider: optional callable for NPU/DML utilisation and the memory pool
            (contract in :mod:`lemonade_inferos.agent.state`).
        clock: UNIX-seconds clock, injectable for deterministic tests.
        allowed_hosts: accepted ``Host`` header names; None accepts any (remote mode).
    """
    if token is None:
        token, source = load_or_create_token()
        log.info("agent token from %s (%s)", source, fingerprint(token))
    store = HistoryStore(state_dir or default_state_dir(), (config or AgentConfig()).history_max_rows)
    state = AgentState(store, config, initial_policy=initial_policy, clock=clock, resource_provider=resource_provider)
    exporter = PrometheusExporter(state.metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        store.close()

    app = FastAPI(
        title="Infer-OS Control Agent",
        version="1.0.0",
        description="Holds the Infer-OS policy, collects PostRun reports from plugin instances, serves metrics, "
        "history and a dashboard. Mutating endpoints need the header X-Inferos-Token.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.agent = state
    app.add_middleware(GuardMiddleware, allowed_hosts=allowed_hosts, error_body=error_body, max_body=MAX_BODY_BYTES)

    api_key = APIKeyHeader(name=TOKEN_HEADER, auto_error=False, description="the agent token")

    def require_token(given: str | None = Security(api_key)) -> None:
        if not token_matches(given, token):
            raise HTTPError(
                401,
                "missing or invalid X-Inferos-Token header" if given else "missing X-Inferos-Token header",
                "mutating endpoints need the agent token (INFEROS_AGENT_TOKEN, or the token file in the "
                "user's config directory)",
            )

    # -- error shape -----------------------------------------------------------------------
    @app.exception_handler(HTTPError)
    async def _http_error(_: Request, exc: HTTPError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=exc.code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc.errors())
        return JSONResponse(error_body(422, "invalid request: " + "; ".join(
            f"{d['field']}: {d['message']}" for d in details[:5]), details), status_code=422)

    @app.exception_handler(PolicyError)
    async def _policy_error(_: Request, exc: PolicyError) -> JSONResponse:
        return JSONResponse(error_body(400, str(exc), _json_safe(exc.errors)), status_code=400)

    @app.exception_handler(ConfigError)
    async def _config_error(_: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse(error_body(400, str(exc), _json_safe(exc.errors)), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug
        log.exception("unexpected error")
        return JSONResponse(error_body(500, "internal error", type(exc).__name__), status_code=500)

    # -- routes ------------------------------------------------------------------------------
    @app.get("/v1/health", response_model=Health, tags=["status"])
    def health() -> dict[str, Any]:
        """Liveness: always 200 while the agent runs."""
        view = state.policy_view()
        now = clock()
        return {
            "status": "healthy",
            "timestamp": iso_utc(now),
            "version": __version__,
            "uptime_seconds": round(now - state.started_at, 3),
            "policy_version": view["version"],
            "baseline": view["baseline"],
        }

    @app.get("/v1/metrics", tags=["status"], response_model=dict[str, Any])
    def metrics() -> dict[str, Any]:
        """Sliding-window metrics (throughput tokens/s, latency ms, TTFT ms, ΔPPL, memory MB,
        KV level distribution, device utilisation, optimization status)."""
        return state.metrics()

    @app.get(
        "/v1/metrics/prometheus",
        tags=["status"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def metrics_prometheus() -> Response:
        """The metrics as Prometheus text exposition (seconds, bytes, ratios)."""
        return Response(exporter.render(), media_type=PROM_CONTENT_TYPE)

    @app.get("/v1/policy", response_model=PolicyView, tags=["policy"])
    def get_policy() -> dict[str, Any]:
        """The policy in force, the baseline flag, the effective policy and its version."""
        return state.policy_view()

    @app.post(
        "/v1/policy",
        response_model=PolicyView,
        tags=["policy"],
        dependencies=[Depends(require_token)],
        responses={**AUTH_ERRORS, 400: {**ERR, "description": "unparsable body, or an invalid policy (the policy "
                                                      "in force is unchanged)"},
                   422: {**ERR, "description": "body is not a JSON object"}},
    )
    def post_policy(
        partial: dict[str, Any] = Body(
            ...,
            description="a partial policy document (see GET /v1/policy/schema), merged over the policy in force; "
            "an `infer_os` root key is accepted",
            examples=[{"kv": {"recent_window": 128}}],
        ),
    ) -> dict[str, Any]:
        """Merge a partial policy over the policy in force; validated as a whole."""
        return state.update_policy(partial)

    @app.get("/v1/policy/schema", tags=["policy"], response_model=dict[str, Any])
    def get_policy_schema() -> dict[str, Any]:
        """JSON Schema of the policy document."""
        return policy_json_schema()

    @app.post(
        "/v1/baseline",
        response_model=PolicyView,
        tags=["policy"],
        dependencies=[Depends(require_token)],
        responses={**AUTH_ERRORS, 422: ERR},
    )
    def post_baseline(body: BaselineRequest) -> dict[str, Any]:
        """Baseline mode on/off: plugins then use the pass-through policy."""
        return state.set_baseline(body.enable)

    @app.get("/v1/config", response_model=ConfigView, tags=["config"])
    def get_config() -> dict[str, Any]:
        """The agent's own config (window, retention)."""
        return state.config_view()

    @app.post(
        "/v1/config",
        response_model=ConfigView,
        tags=["config"],
        dependencies=[Depends(require_token)],
        responses={**AUTH_ERRORS, 400: {**ERR, "description": "unparsable body, or an invalid config (unchanged)"},
                   422: ERR},
    )
    def post_config(partial: dict[str, Any] = Body(..., examples=[{"window_seconds": 30}])) -> dict[str, Any]:
        """Merge a partial config (``window_seconds``, ``history_max_rows``, ``baseline_reference_size``)."""
        return state.update_config(partial)

    @app.get("/v1/history", response_model=HistoryView, tags=["status"], responses={422: ERR})
    def get_history(
        limit: int = Query(100, ge=1, le=10_000, description="newest N reports (1..10000)"),
    ) -> dict[str, Any]:
        """The newest ``limit`` reports, oldest first."""
        return state.history(limit)

    @app.post(
        "/v1/stats",
        response_model=StatsAccepted,
        status_code=201,
        tags=["stats"],
        dependencies=[Depends(require_token)],
        responses={**AUTH_ERRORS, 422: {**ERR, "description": "invalid report (the field is named)"}},
    )
    def post_stats(report: StatsReport) -> dict[str, Any]:
        """One PostRun report; stored and committed before this answers 201. A retry of an
        already stored ``(instance, request_id)`` answers 201 with ``duplicate: true``."""
        row_id, duplicate = state.add_report(report.model_dump(mode="json"))
        return {"id": row_id, "accepted": True, "duplicate": duplicate}

    # -- dashboard -----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    @app.get("/dashboard", include_in_schema=False, response_class=HTMLResponse)
    @app.get("/v1/dashboard", include_in_schema=False, response_class=HTMLResponse)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(_static_text("dashboard.html"))

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    def dashboard_static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPError(404, "not found", f"no static file {name!r}")
        return Response(_static_text(name), media_type=STATIC_FILES[name])

    return app
