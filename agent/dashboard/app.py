"""The dashboard's web application (Starlette, Jinja2 templates, a little plain JavaScript).

Pages: ``/`` the worklist (filters, search, pagination; live through ``/events``, server-sent
events that say "changed", after which the page refetches ``/worklist`` with its own filters),
``/results/{result_id}`` the patient page, ``/it`` for IT (dead letters, consumer lag, the
roles' readiness), ``/export.csv`` the current filter as CSV, ``/login`` and ``/logout``.
``/healthz`` and ``/readyz`` answer without a login (they carry no patient data).

Every other route needs a user (:mod:`agent.dashboard.auth`): a browser without a session is
sent to the login page (303), anything else gets 401. State-changing requests (POST) need the
CSRF token and, when the browser sends one, an ``Origin`` that is the dashboard's own.
Responses carry a strict Content-Security-Policy (no inline script or style), ``no-store``
caching, and no framing. URLs carry no patient data: a result is named by its ``result_id``
(a UID derived from the series UID); search terms travel in the query string of GET requests,
which are not logged.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import secrets
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.dashboard.auth import (
    USER_NAME,
    LoginLimiter,
    Principal,
    TrustedProxies,
    UserDirectory,
    proxy_csrf,
    tokens_match,
)
from agent.dashboard.consumer import ConsumerStatus
from agent.dashboard.feed import ChangeFeed
from agent.dashboard.labs import lab_rows
from agent.dashboard.probes import embedded_group_lags, probe_roles
from agent.dashboard.settings import DashboardSettings
from agent.dashboard.store import (
    AVAILABILITY,
    FLAGS,
    UNDO_WINDOW_S,
    DeadLetterRow,
    Store,
    WorklistFilter,
    WorklistRow,
    study_date_of,
    utcnow,
)
from agent.ops.dlq import retry_command
from agent.triage.lis import LisClient
from schemas.errors import Hust19Error
from schemas.messages import TriageResult

logger = logging.getLogger(__name__)

HERE: Final = Path(__file__).resolve().parent
SESSION_COOKIE: Final = "hust19_session"
LOGIN_COOKIE: Final = "hust19_login"
CSRF_FIELD: Final = "csrf"
CSRF_HEADER: Final = "x-csrf-token"
PROXY_USER_HEADER: Final = "x-forwarded-user"
KEEPALIVE_S: Final = 15.0
MAX_SEARCH: Final = 64
DLQ_PAGE_SIZE: Final = 50
CSV_CHUNK_ROWS: Final = 500
"""Rows per chunk of the CSV export (each chunk is one hop to the worker thread)."""
CSV_INJECTION: Final = ("=", "+", "-", "@", "\t", "\r")
SECURITY_HEADERS: Final = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
     b"connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make POSTs say Origin: null
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
FLAG_LABELS: Final = {"type2": "Type II", "type1": "Type I", "control": "Control",
                      "skipped": "Skipped"}
FLAG_MEANING: Final = {"type2": "severe or critically ill", "type1": "mild or regular",
                       "control": "no COVID-19 pneumonia", "skipped": "not triaged"}
FUSION_LABELS: Final = {"rule": "stated rule: labs decide COVID-19, CT the severity",
                        "plr": "penalised logistic regression over CT and lab scores",
                        "ct_only": "CT only", "cf_only": "lab values only", "none": "none"}
AVAILABILITY_LABELS: Final = {"both": "CT + labs", "ct": "CT only", "labs": "Labs only",
                              "none": "None"}


@dataclass
class DashboardState:
    """What the routes need, made once by :func:`create_app`'s caller."""

    settings: DashboardSettings
    store: Store
    feed: ChangeFeed
    users: UserDirectory
    consumer_status: Callable[[], ConsumerStatus]
    bus_describe: str = ""
    bus: Any = None
    lis: LisClient | None = None
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    proxies: TrustedProxies = field(default_factory=lambda: TrustedProxies(["127.0.0.1"]))


class ResponseHeaders:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response, and ``Server-Timing`` with the
    time the application took until it started the response (pure ASGI: streams untouched;
    ``bench/dashboard.py`` reads the timing)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                took_ms = (time.perf_counter() - started) * 1000
                headers.append((b"server-timing", f"app;dur={took_ms:.1f}".encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- formatting ---------------------------------------------------------------------------------
def _retry_for(letter: DeadLetterRow) -> str | None:
    """The ``hust19 dlq retry`` command of a dead letter, ``None`` if it cannot be retried."""
    return retry_command(letter.dlq_partition, letter.dlq_offset, letter.source_topic,
                         letter.series_uid)


def local_time(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A stored (naive UTC) time in the server's local zone."""
    if value is None:
        return "—"
    return value.replace(tzinfo=UTC).astimezone().strftime(fmt)


def iso_time(value: datetime | None) -> str:
    return "" if value is None else value.replace(tzinfo=UTC).isoformat()


def prob(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def percent(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f} %"


def number(value: float | None, fmt: str = "%.0f", unit: str = "") -> str:
    """``value`` formatted (with ``unit``), or a dash when it is missing."""
    if value is None:
        return "—"
    return (fmt % value) + (f" {unit}" if unit else "")


def _wide(text: str) -> bool:
    return all(unicodedata.east_asian_width(ch) in ("W", "F") for ch in text)


def person_name(value: str | None) -> str:
    """A DICOM person name (PN) as people read it: the first group (alphabetic) as "FAMILY,
    Prefix Given Middle Suffix", the others (ideographic, phonetic) in parentheses with their
    parts in order, run together where they are CJK characters ("张伟"). Empty without a
    name."""
    if not value:
        return ""
    groups = []
    for n, group in enumerate(value.split("=")):
        family, given, middle, prefix, suffix = ([p.strip() for p in group.split("^")]
                                                 + [""] * 5)[:5]
        if n == 0:
            rest = " ".join(p for p in (prefix, given, middle, suffix) if p)
            text = ", ".join(p for p in (family, rest) if p)
        else:
            parts = [p for p in (prefix, family, given, middle, suffix) if p]
            text = ("" if _wide("".join(parts)) else " ").join(parts)
        groups.append(text)
    first, others = groups[0], [g for g in groups[1:] if g]
    if not first:
        return " / ".join(others)
    return first + (f" ({' / '.join(others)})" if others else "")


def day(value: date | None) -> str:
    """A date as YYYY-MM-DD, or a dash."""
    return "—" if value is None else value.isoformat()


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 0:
        seconds = 0.0
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _templates() -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(["html"]), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters.update(local_time=local_time, iso_time=iso_time, prob=prob, percent=percent,
                       duration=duration, number=number, person_name=person_name, day=day)
    env.globals.update(FLAG_LABELS=FLAG_LABELS, FLAG_MEANING=FLAG_MEANING,
                       AVAILABILITY_LABELS=AVAILABILITY_LABELS, FUSION_LABELS=FUSION_LABELS,
                       version=__version__)
    return Jinja2Templates(env=env)


# --- request helpers ----------------------------------------------------------------------------
def _client_host(request: Request) -> str:
    return request.client.host if request.client is not None else ""


def _local_path(target: str | None, default: str = "/") -> str:
    """``target`` if it is a path on this site (no scheme, host or ``//``), else ``default``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target


def _parse_date(text: str | None) -> date | None:
    try:
        return date.fromisoformat(text) if text else None
    except ValueError:
        return None


@dataclass(frozen=True)
class FilterForm:
    """The worklist filters as the query string carries them (validated, normalised)."""

    flag: str = ""
    avail: str = ""
    ack: str = ""
    date_from: str = ""
    date_to: str = ""
    q: str = ""
    page: int = 1

    @classmethod
    def from_query(cls, request: Request) -> FilterForm:
        qp = request.query_params
        flag = qp.get("flag", "")
        avail = qp.get("avail", "")
        ack = qp.get("ack", "")
        d_from, d_to = _parse_date(qp.get("from")), _parse_date(qp.get("to"))
        try:
            page = max(1, int(qp.get("page", "1")))
        except ValueError:
            page = 1
        return cls(flag=flag if flag in FLAGS else "",
                   avail=avail if avail in AVAILABILITY else "",
                   ack=ack if ack in ("yes", "no") else "",
                   date_from=d_from.isoformat() if d_from else "",
                   date_to=d_to.isoformat() if d_to else "",
                   q=qp.get("q", "").strip()[:MAX_SEARCH], page=page)

    def to_filter(self) -> WorklistFilter:
        return WorklistFilter(
            flag=self.flag or None, availability=self.avail or None,
            acknowledged=None if not self.ack else self.ack == "yes",
            date_from=_parse_date(self.date_from), date_to=_parse_date(self.date_to),
            search=self.q or None)

    def query(self, **changes: Any) -> str:
        """The query string of this filter with ``changes`` (empty values left out)."""
        values = {"flag": self.flag, "avail": self.avail, "ack": self.ack,
                  "from": self.date_from, "to": self.date_to, "q": self.q,
                  "page": self.page if self.page > 1 else ""}
        values.update(changes)
        return urlencode({k: v for k, v in values.items() if v not in ("", None, 1)})

    @property
    def active(self) -> bool:
        return any((self.flag, self.avail, self.ack, self.date_from, self.date_to, self.q))


# --- the application ----------------------------------------------------------------------------
def create_app(state: DashboardState) -> Starlette:
    """The ASGI application over ``state``."""
    templates = _templates()
    s = state.settings

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        state.feed.bind(asyncio.get_running_loop())
        yield
        state.feed.close()

    # --- authentication -----------------------------------------------------------------------
    def principal(request: Request) -> Principal | None:
        if s.auth == "proxy":
            name = request.headers.get(PROXY_USER_HEADER, "").strip()
            if not name or not state.proxies.trusts(_client_host(request)):
                return None
            if not USER_NAME.match(name):
                return None
            user = state.users.get(name)
            role = user.role if user is not None else s.proxy_default_role
            return Principal(name, role, proxy_csrf(state.store.secret(), name), "proxy")
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        session = state.store.session(token, timedelta(minutes=s.idle_minutes))
        if session is None:
            return None
        user = state.users.get(session.user_name)
        if user is None:  # removed from the users file: the session ends with it
            state.store.end_session(token)
            return None
        return Principal(user.name, user.role, session.csrf, "session")

    def refuse(request: Request, *, page: bool) -> Response:
        if s.auth == "password" and page and request.method == "GET":
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)
        if s.auth == "proxy":
            return PlainTextResponse("401 Unauthorized: the dashboard expects its reverse "
                                     "proxy to name the user (X-Forwarded-User).\n",
                                     status_code=401)
        return PlainTextResponse("401 Unauthorized: log in first.\n", status_code=401,
                                 headers={"WWW-Authenticate": 'FormLogin realm="hust19"'})

    def same_origin(request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:  # not sent (older browsers, scripts): the CSRF token decides
            return True
        host = request.headers.get("host", "")
        parts = urlsplit(origin)
        return bool(parts.netloc) and parts.netloc == host

    async def check_post(request: Request, who: Principal) -> dict[str, str] | Response:
        """The form of a POST whose origin and CSRF token are right, else a 403."""
        form = await request.form()
        fields = {k: str(v) for k, v in form.items() if isinstance(v, str)}
        given = fields.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
        if not same_origin(request) or not tokens_match(who.csrf, given):
            logger.warning("refused a %s %s by %s: CSRF token or origin wrong", request.method,
                           request.url.path, who.name)
            return PlainTextResponse("403 Forbidden: the form is stale or comes from another "
                                     "site; reload the page and try again.\n", status_code=403)
        return fields

    def render(request: Request, name: str, who: Principal | None, status: int = 200,
               headers: dict[str, str] | None = None, **context: Any) -> Response:
        base = {"user": who, "csrf": who.csrf if who else "", "auth": s.auth,
                "path": request.url.path}
        return templates.TemplateResponse(request, name, {**base, **context},
                                          status_code=status, headers=headers)

    # --- worklist ------------------------------------------------------------------------------
    def worklist_context(form: FilterForm) -> dict[str, Any]:
        page = state.store.worklist(form.to_filter(), form.page, s.page_size)
        return {"form": form, "page": page, "counts": state.store.counts(),
                "undo_window_s": UNDO_WINDOW_S, "now": utcnow(),
                "feed_version": state.feed.version}

    def index(request: Request) -> Response:
        who = principal(request)
        if who is None:
            return refuse(request, page=True)
        form = FilterForm.from_query(request)
        return render(request, "worklist.html", who, **worklist_context(form))

    def worklist_fragment(request: Request) -> Response:
        who = principal(request)
        if who is None:
            return refuse(request, page=False)
        form = FilterForm.from_query(request)
        return render(request, "_worklist.html", who, **worklist_context(form))

    def export_csv(request: Request) -> Response:
        who = principal(request)
        if who is None:
            return refuse(request, page=False)
        form = FilterForm.from_query(request)
        logger.info("worklist exported as CSV by %s", who.name)
        stamp = datetime.now().strftime("%Y%m%d-%H%M")
        return StreamingResponse(
            _csv_lines(state.store.export(form.to_filter())), media_type="text/csv",
            headers={"Content-Disposition":
                     f'attachment; filename="hust19-worklist-{stamp}.csv"'})

    async def events(request: Request) -> Response:
        who = await run_in_threadpool(principal, request)
        if who is None:
            return refuse(request, page=False)

        try:  # the version the page was rendered at: a change since then is sent at once
            since = int(request.query_params.get("since", ""))
        except ValueError:
            since = state.feed.version

        async def stream() -> AsyncIterator[str]:
            seen = state.feed.version
            yield f"retry: 2000\nevent: hello\ndata: {seen}\n\n"
            if seen != since:
                yield f"event: change\ndata: {seen}\n\n"
            while not state.feed.closed:
                version = await state.feed.wait(seen, KEEPALIVE_S)
                if state.feed.closed:
                    break
                if version != seen:
                    seen = version
                    yield f"event: change\ndata: {version}\n\n"
                    continue
                if await run_in_threadpool(principal, request) is None:
                    yield "event: logout\ndata: session ended\n\n"
                    break
                yield ": keepalive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no"})

    # --- patient page --------------------------------------------------------------------------
    def result_page(request: Request) -> Response:
        who = principal(request)
        if who is None:
            return refuse(request, page=True)
        rid = request.path_params["result_id"]
        detail = state.store.detail(rid)
        if detail is None:
            return render(request, "not_found.html", who, status=404)
        labs = lab_table(detail.result, detail.row.received_at)
        superseded = next((v for v in detail.revisions if v.sr_sop_instance_uid is not None
                           and v.sr_sop_instance_uid
                           == detail.result.supersedes_sr_sop_instance_uid), None)
        return render(request, "result.html", who, d=detail, r=detail.result, row=detail.row,
                      labs=labs, superseded=superseded, now=utcnow(),
                      undo_window_s=UNDO_WINDOW_S, back=_local_path(
                          request.query_params.get("back"), "/"))

    def lab_table(result: TriageResult, received: datetime) -> dict[str, Any]:
        """The lab values the result carries (the CF model's inputs); for a result that carries
        none (agents before ``lab_values``, or no labs used), a LIS lookup now, as the worker
        makes it: around the Study Date, else the day the series arrived."""
        if result.lab_values:
            return {"status": "ok", "source": "result", "rows": lab_rows(result.lab_values)}
        if state.lis is None:
            return {"status": "no_lis"}
        if not result.patient_id:
            return {"status": "no_patient_id"}
        around = study_date_of(result) or received.replace(tzinfo=UTC).astimezone()
        try:
            found = state.lis.lookup(result.patient_id, around)
        except Hust19Error as exc:
            logger.warning("dashboard: LIS lookup failed: %s", exc.message)
            return {"status": "error", "error": exc.message}
        if not found.patient_found:
            return {"status": "not_found"}
        return {"status": "ok", "source": "lis", "lookup": found,
                "rows": lab_rows(found.values.values())}

    def thumbnail(request: Request) -> Response:
        who = principal(request)
        if who is None:
            return refuse(request, page=False)
        png = state.store.thumbnail(request.path_params["result_id"],
                                    int(request.path_params["revision"]),
                                    int(request.path_params["position"]))
        if png is None:
            return PlainTextResponse("not found\n", status_code=404)
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    async def acknowledge(request: Request) -> Response:
        return await _ack(request, undo=False)

    async def undo(request: Request) -> Response:
        return await _ack(request, undo=True)

    async def _ack(request: Request, *, undo: bool) -> Response:
        who = await run_in_threadpool(principal, request)
        if who is None:
            return refuse(request, page=False)
        checked = await check_post(request, who)
        if isinstance(checked, Response):
            return checked
        if not who.can_acknowledge:
            return PlainTextResponse("403 Forbidden: viewers cannot acknowledge results.\n",
                                     status_code=403)
        rid = request.path_params["result_id"]
        if undo:
            outcome = await run_in_threadpool(state.store.undo, rid, who.name)
        else:
            try:
                revision = int(checked.get("revision", ""))
            except ValueError:
                return PlainTextResponse("400 Bad Request: revision missing\n", status_code=400)
            outcome = await run_in_threadpool(state.store.acknowledge, rid, who.name, revision)
        if outcome.ok:
            state.feed.publish()
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"ok": outcome.ok, "message": outcome.message},
                                status_code=200 if outcome.ok else 409)
        target = _local_path(checked.get("next"), "/")
        if not outcome.ok:
            sep = "&" if "?" in target else "?"
            target = f"{target}{sep}{urlencode({'notice': outcome.message})}"
        return RedirectResponse(target, status_code=303)

    # --- IT ------------------------------------------------------------------------------------
    def it_page(request: Request) -> Response:
        who = principal(request)
        if who is None:
            return refuse(request, page=True)
        try:
            page = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            page = 1
        letters, total = state.store.dead_letters(page, DLQ_PAGE_SIZE)
        return render(request, "it.html", who, letters=letters, total=total, page=page,
                      pages=max(1, -(-total // DLQ_PAGE_SIZE)), consumer=state.consumer_status(),
                      roles=probe_roles(s.role), groups=embedded_group_lags(state.bus),
                      bus=state.bus_describe, store_url=state.store.display_url,
                      settings=s, retry_for=_retry_for)

    # --- login ---------------------------------------------------------------------------------
    def login_form(request: Request) -> Response:
        if s.auth == "proxy":
            return PlainTextResponse("This dashboard is behind a reverse proxy that logs you "
                                     "in.\n", status_code=404)
        nonce = secrets.token_urlsafe(24)
        response = render(request, "login.html", None, nonce=nonce,
                          next=_local_path(request.query_params.get("next"), "/"),
                          error=request.query_params.get("error", "")[:200])
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict",
                            secure=s.tls, path="/login")
        return response

    async def login(request: Request) -> Response:
        if s.auth == "proxy":
            return PlainTextResponse("not found\n", status_code=404)
        form = await request.form()
        fields = {k: str(v) for k, v in form.items() if isinstance(v, str)}
        name = fields.get("username", "").strip()[:64]
        password = fields.get("password", "")
        target = _local_path(fields.get("next"), "/")
        nonce = request.cookies.get(LOGIN_COOKIE)
        if not same_origin(request) or not nonce or not tokens_match(nonce,
                                                                     fields.get(CSRF_FIELD)):
            return PlainTextResponse("403 Forbidden: the login form is stale; reload it.\n",
                                     status_code=403)
        keys = [f"user:{name.lower()}", f"addr:{_client_host(request)}"]
        wait = state.limiter.retry_after(keys)
        if wait > 0:
            logger.warning("login for %r from %s refused: too many failures", name,
                           _client_host(request))
            return render(request, "login.html", None, status=429, nonce=nonce, next=target,
                          error=f"Too many failed logins. Try again in {wait:.0f} s.",
                          headers={"Retry-After": str(int(wait) + 1)})
        user = await run_in_threadpool(state.users.verify, name, password)
        if user is None:
            state.limiter.failed(keys)
            logger.warning("login failed for %r from %s", name, _client_host(request))
            return render(request, "login.html", None, status=401, nonce=nonce, next=target,
                          error="Wrong user name or password.")
        state.limiter.succeeded(keys)
        token, _csrf = await run_in_threadpool(
            state.store.create_session, user.name, user.role,
            timedelta(hours=s.session_hours))
        logger.info("login: %s (%s) from %s", user.name, user.role, _client_host(request))
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax",
                            secure=s.tls, path="/", max_age=int(s.session_hours * 3600))
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(request: Request) -> Response:
        who = await run_in_threadpool(principal, request)
        if who is None:
            return RedirectResponse("/login" if s.auth == "password" else "/", status_code=303)
        checked = await check_post(request, who)
        if isinstance(checked, Response):
            return checked
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            await run_in_threadpool(state.store.end_session, token)
        logger.info("logout: %s", who.name)
        response = RedirectResponse("/login?" + urlencode({"error": "You are logged out."})
                                    if s.auth == "password" else "/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # --- health --------------------------------------------------------------------------------
    def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def readyz(_request: Request) -> Response:
        report: dict[str, str] = {}
        try:
            state.store.ping()
            report["database"] = "ok"
        except Hust19Error as exc:
            report["database"] = exc.message
        status = state.consumer_status()
        report["consumer"] = "ok" if status.running and not status.last_error else (
            status.last_error or "not running")
        ok = all(v == "ok" for v in report.values())
        return JSONResponse(report, status_code=200 if ok else 503)

    routes = [
        Route("/", index),
        Route("/worklist", worklist_fragment),
        Route("/events", events),
        Route("/export.csv", export_csv),
        Route("/results/{result_id:str}", result_page),
        Route("/results/{result_id:str}/evidence/{revision:int}/{position:int}.png", thumbnail),
        Route("/results/{result_id:str}/acknowledge", acknowledge, methods=["POST"]),
        Route("/results/{result_id:str}/undo", undo, methods=["POST"]),
        Route("/it", it_page),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(ResponseHeaders)])


CSV_COLUMNS: Final = ("result_id", "revision", "patient_id", "patient_name",
                      "accession_number", "study_date", "received", "result_ready", "status",
                      "flag", "threshold", "p_covid_fused", "p_covid_ct", "p_covid_labs",
                      "modalities", "lung_involvement_percent", "ct_severity",
                      "turnaround_s", "acknowledged_by", "acknowledged_at", "skip_reason")


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(CSV_INJECTION) else text


def _csv_lines(rows: Iterator[WorklistRow], chunk_rows: int = CSV_CHUNK_ROWS) -> Iterator[str]:
    """The CSV text in chunks of ``chunk_rows`` rows (cells that a spreadsheet would run as a
    formula get a leading apostrophe)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for n, r in enumerate(rows, 1):
        writer.writerow([_cell(v) for v in (
            r.result_id, r.revision, r.patient_id, r.patient_name, r.accession_number,
            r.study_date.isoformat() if r.study_date else None, iso_time(r.received_at),
            iso_time(r.result_ready), r.status, r.flag, r.threshold,
            None if r.p_fused is None else f"{r.p_fused:.4f}",
            None if r.p_ct is None else f"{r.p_ct:.4f}",
            None if r.p_labs is None else f"{r.p_labs:.4f}", r.availability,
            None if r.involvement is None else f"{r.involvement:.2f}", r.severity,
            None if r.turnaround_s is None else f"{r.turnaround_s:.1f}",
            r.ack_user if r.acked else None, iso_time(r.ack_at) if r.acked else None,
            r.skip_reason)])
        if n % chunk_rows == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()
