"""The web server: `alignkit app --config app.yaml`. Routes parse, authorise, call `service`, render.

Authentication: a signed session cookie (pages, and the pages' own API calls) or
`Authorization: Bearer <invite token>` (scripts). Cookie-authenticated requests that
change state must carry the session's CSRF token (`csrf_token` form field or
`X-CSRF-Token` header). Anonymous requests get 401 on /api/ and a redirect to
/login on pages; an annotator gets 403 on admin routes and on campaigns they are
not a member of. The access table is in docs/app.md.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import sys
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.middleware.sessions import SessionMiddleware

from alignkit.app import auth, service
from alignkit.app.config import AppConfig
from alignkit.app.contestants import Contestant
from alignkit.app.db import User
from alignkit.app.service import AppError

HERE = Path(__file__).parent
ACCOUNT_CACHE_SECONDS = 5.0
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


class LoginRequired(Exception):
    pass


SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"))


class FormCsrfAndHeaders:
    """Reads a form post's csrf_token before the route's dependencies run (they cannot await the body)
    into `request.state.form_csrf`, and adds SECURITY_HEADERS to every response that lacks them.

    A plain ASGI middleware: Starlette's `@app.middleware("http")` runs each request through an
    extra task and memory stream, a cost every API call paid."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        if scope["method"] in UNSAFE and content_type.startswith(b"application/x-www-form-urlencoded"):
            from urllib.parse import parse_qs

            chunks, more = [], True
            while more:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    return
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            body = b"".join(chunks)
            scope.setdefault("state", {})["form_csrf"] = (
                parse_qs(body.decode("utf-8", "replace")).get("csrf_token") or [None])[0]
            receive = _replay(body, receive)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", ())}
                message["headers"] = [*message.get("headers", ()),
                                      *((k, v) for k, v in SECURITY_HEADERS if k not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _replay(body: bytes, receive):
    """An ASGI `receive` that hands the app the already-read `body`, then defers to `receive`."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def render_markdown(text: str) -> str:
    """Campaign guidelines as HTML; raw HTML in the source is escaped, never passed through."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).render(text or "")


def create_app(cfg: AppConfig, secret: str, sessions: sessionmaker, contestants: dict[str, Contestant],
               arena_prompts: list[str]) -> FastAPI:
    app = FastAPI(title="alignkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie="alignkit_session",
                       same_site="lax", https_only=cfg.secure_cookies, max_age=14 * 24 * 3600)
    # StaticFiles serves only files under its own folder: `..` and encoded variants resolve outside it and 404.
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    lease = dt.timedelta(minutes=cfg.lease_minutes)

    # A session lives inside one synchronous stretch of code: a sync route's body (one worker thread)
    # or an `in_db` call. It never stays open across an await or between the threadpool and the event
    # loop: on SQLite every transaction holds the write lock and the pool's one connection, and a
    # session left open for the loop to close could wait for a loop that waits for its connection.
    # SQLite runs one transaction at a time (one pooled connection, BEGIN IMMEDIATE), and a short one
    # costs less than the hop to a worker thread and back, plus the two threads' contention for the
    # GIL: on SQLite the hot routes run their transaction on the event loop, without awaiting inside
    # it. PostgreSQL runs transactions side by side, so there they go to worker threads.
    inline_db = sessions.kw["bind"].dialect.name == "sqlite"

    async def in_db(work):
        return work() if inline_db else await run_in_threadpool(work)

    async def json_body(request: Request) -> dict:
        return await _json(request)

    def csrf_token(request: Request) -> str:
        if "csrf" not in request.session:
            request.session["csrf"] = secrets.token_urlsafe(32)
        return request.session["csrf"]

    # Who sent a request, remembered for a few seconds: most requests then reach their route with no
    # database round trip and no extra hop to a worker thread. A replaced invite token (or a deleted
    # account) stops working within ACCOUNT_CACHE_SECONDS.
    accounts: dict[tuple, tuple[float, object]] = {}

    def lookup_account(key: tuple):
        with sessions() as session:
            if key[0] == "token":
                return auth.user_by_digest(session, key[1])
            return session.execute(select(User.id, User.name, User.role).where(User.id == key[1])).first()

    async def account(key: tuple):
        now = time.monotonic()
        hit = accounts.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        user = await in_db(lambda: lookup_account(key))
        if len(accounts) > 10_000:
            accounts.clear()
        accounts[key] = (now + ACCOUNT_CACHE_SECONDS, user)
        return user

    async def optional_user(request: Request):
        """The caller as a row (id, name, role), or None when anonymous; checks the CSRF token of
        cookie-authenticated requests that change state."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            token = header[7:].strip()
            user = await account(("token", auth.token_digest(token))) if token else None
            if user is None:
                raise AppError(401, "invalid bearer token")
            return user
        uid = request.session.get("uid")
        user = await account(("uid", uid)) if uid is not None else None
        if user is not None and request.method in UNSAFE:
            given = request.headers.get("x-csrf-token")
            if given is None and request.headers.get("content-type", "").startswith(
                    ("application/x-www-form-urlencoded", "multipart/form-data")):
                given = request.state.form_csrf if hasattr(request.state, "form_csrf") else None
            if not auth.csrf_matches(request.session.get("csrf"), given):
                raise AppError(403, "missing or wrong CSRF token")
        return user

    # The checks below touch no database: async, so FastAPI runs them on the event loop instead of
    # sending each to a worker thread and back.
    async def api_user(user: User | None = Depends(optional_user)) -> User:
        if user is None:
            raise AppError(401, "log in, or send Authorization: Bearer <invite token>")
        return user

    async def api_admin(user: User = Depends(api_user)) -> User:
        if user.role != "admin":
            raise AppError(403, "admins only")
        return user

    async def page_user(request: Request, user: User | None = Depends(optional_user)) -> User:
        if user is None:
            raise LoginRequired()
        return user

    async def page_admin(user: User = Depends(page_user)) -> User:
        if user.role != "admin":
            raise AppError(403, "admins only")
        return user

    app.add_middleware(FormCsrfAndHeaders)

    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.message}, status_code=exc.status)
        return templates.TemplateResponse(request, "error.html", {"status": exc.status, "message": exc.message,
                                                                  "user": None}, status_code=exc.status)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired):
        return RedirectResponse("/login", status_code=303)

    def page(request: Request, name: str, user: User | None, **context):
        return templates.TemplateResponse(request, name, {"user": user, "csrf": csrf_token(request), **context})

    # ------------------------------------------------------------ pages

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, user: User = Depends(page_user)):
        with sessions() as session:
            return page(request, "index.html", user, campaigns=service.visible_campaigns(session, user),
                        arena=len(contestants) >= 2)

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request):
        return page(request, "login.html", None, error=None)

    @app.post("/login")
    def login(request: Request, name: str = Form(...), password: str = Form(...),
              csrf_token_: str = Form("", alias="csrf_token")):
        with sessions() as session:
            if not auth.csrf_matches(request.session.get("csrf"), csrf_token_):
                raise AppError(403, "missing or wrong CSRF token")
            user = auth.user_by_password(session, name, password)
            if user is None:
                return templates.TemplateResponse(request, "login.html", {"user": None, "csrf": csrf_token(request),
                                                  "error": "wrong name or password"}, status_code=401)
            request.session.clear()  # a new session on login: no fixation
            request.session["uid"] = user.id
            return RedirectResponse("/", status_code=303)

    @app.get("/invite/{token}")
    def invite(request: Request, token: str):
        with sessions() as session:
            user = auth.user_by_token(session, token)
            if user is None:
                raise AppError(404, "this invite link is not valid (ask for a new one)")
            request.session.clear()
            request.session["uid"] = user.id
            return RedirectResponse("/", status_code=303)

    @app.post("/logout")
    def logout(request: Request, user: User = Depends(page_user)):
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @app.get("/label/{campaign}", response_class=HTMLResponse)
    def label_page(request: Request, campaign: str, user: User = Depends(page_user)):
        with sessions() as session:
            c = service.campaign_for(session, campaign, user)
            return page(request, "label.html", user, campaign=c, guidelines=render_markdown(c.guidelines))

    @app.get("/arena", response_class=HTMLResponse)
    def arena_page(request: Request, user: User = Depends(page_user)):
        return page(request, "arena.html", user, contestants=len(contestants), has_prompts=bool(arena_prompts))

    def leaderboard() -> tuple[int, list[dict]]:
        """(votes, rows); the fit runs after the session closes: it is CPU, not database work."""
        with sessions() as session:
            battles = service.arena_battles(session)
        return len(battles), service.leaderboard_of(battles, cfg.bootstrap_rounds, cfg.seed)

    @app.get("/leaderboard", response_class=HTMLResponse)
    def leaderboard_page(request: Request, user: User = Depends(page_user)):
        votes, rows = leaderboard()
        return page(request, "leaderboard.html", user, rows=rows, votes=votes)

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request, user: User = Depends(page_admin)):
        with sessions() as session:
            invite_url = request.session.pop("new_invite", None)
            return page(request, "admin.html", user, stats=service.admin_stats(session), invite_url=invite_url,
                        users=service.users(session))

    @app.post("/admin/users")
    def admin_create_user(request: Request, name: str = Form(...), role: str = Form("annotator"),
                          password: str = Form(""), campaign: str = Form(""),
                          user: User = Depends(page_admin)):
        with sessions() as session:
            try:
                new, token = auth.create_user(session, name, role, password or None)
            except ValueError as e:
                raise AppError(422, str(e)) from None
            if campaign:
                service.add_member(session, service.campaign_for(session, campaign, user), new)
            request.session["new_invite"] = f"{request.base_url}invite/{token}"
            return RedirectResponse("/admin", status_code=303)

    @app.post("/admin/members")
    def admin_add_member(name: str = Form(...), campaign: str = Form(...), user: User = Depends(page_admin)):
        with sessions() as session:
            member = service.user_named(session, name)
            service.add_member(session, service.campaign_for(session, campaign, user), member)
            return RedirectResponse("/admin", status_code=303)

    # ------------------------------------------------------------ JSON API

    @app.get("/api/me")
    def api_me(user: User = Depends(api_user)):
        return {"name": user.name, "role": user.role}

    @app.get("/api/campaigns")
    def api_campaigns(user: User = Depends(api_user)):
        with sessions() as session:
            return {"campaigns": service.visible_campaigns(session, user)}

    @app.post("/api/campaigns", status_code=201)
    def api_create_campaign(user: User = Depends(api_admin),
                            body: dict = Depends(json_body)):
        with sessions() as session:
            items = service.items_from_json(body.get("items"))
            c = service.create_campaign(session, str(body.get("name", "")), str(body.get("kind", "")), items,
                                        guidelines=str(body.get("guidelines", "")), overlap=_int(body, "overlap", 1),
                                        source={"uploaded_by": user.name}, members=list(body.get("annotators", [])))
            return {"name": c.name, "kind": c.kind, "items": len(items), "overlap": c.overlap}

    # The two labelling routes every vote takes run their database work through `in_db`.
    @app.get("/api/campaigns/{campaign}/next")
    async def api_next(campaign: str, user: User = Depends(api_user)):
        def work():
            with sessions() as session:
                c = service.campaign_for(session, campaign, user)
                return {"item": service.next_item(session, c, user, lease)}
        return JSONResponse(await in_db(work))

    @app.post("/api/campaigns/{campaign}/judgements", status_code=201)
    async def api_submit(request: Request, campaign: str, user: User = Depends(api_user),
                         body: dict = Depends(json_body)):
        key, item_id, seconds = request.headers.get("idempotency-key"), _int(body, "item_id"), _float(body, "seconds")

        def work():
            with sessions() as session:
                c = service.campaign_for(session, campaign, user)
                return service.submit(session, c, user, item_id, choice=body.get("choice"),
                                      ranking=body.get("ranking"), idempotency_key=key, seconds=seconds)
        result, replayed = await in_db(work)
        return JSONResponse(result, status_code=201, headers={"Idempotent-Replayed": "true"} if replayed else None)

    @app.post("/api/arena/battles", status_code=201)
    async def api_battle(request: Request, user: User = Depends(api_user)):
        body = await _json(request, allow_empty=True)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str) or len(prompt) > 4000:
            raise AppError(422, "'prompt' must be a string of at most 4000 characters")
        if not prompt:
            if not arena_prompts:
                raise AppError(422, "type a prompt: this arena has no prompt set")
            prompt = service.random_choice(arena_prompts)
        a, b = service.pick_pair(list(contestants))
        seed = service.random_seed()  # a fresh draw per battle: the same prompt need not get the same answers
        try:  # generation runs off the event loop, and outside any transaction: other requests go on meanwhile
            response_a = (await run_in_threadpool(contestants[a].generate, [prompt], seed))[0]
            response_b = (await run_in_threadpool(contestants[b].generate, [prompt], seed))[0]
        except Exception as e:  # noqa: BLE001 - an endpoint can fail in many ways; the voter sees which way
            raise AppError(502, f"a contestant failed to answer: {type(e).__name__}: {e}") from None

        def store():
            with sessions() as session:
                return service.create_battle(session, user, prompt, a, b, response_a, response_b)
        return await in_db(store)

    @app.post("/api/arena/battles/{battle_id}/vote")
    def api_vote(request: Request, battle_id: int, user: User = Depends(api_user),
                 body: dict = Depends(json_body)):
        with sessions() as session:
            result, replayed = service.vote(session, user, battle_id, body.get("vote"),
                                            request.headers.get("idempotency-key"))
            return JSONResponse(result, headers={"Idempotent-Replayed": "true"} if replayed else None)

    @app.get("/api/leaderboard")
    def api_leaderboard(user: User = Depends(api_user)):
        votes, rows = leaderboard()
        return {"votes": votes, "rows": rows}

    @app.get("/api/admin/stats")
    def api_stats(user: User = Depends(api_admin)):
        with sessions() as session:
            return service.admin_stats(session)

    @app.post("/api/users", status_code=201)
    def api_create_user(request: Request, user: User = Depends(api_admin),
                        body: dict = Depends(json_body)):
        with sessions() as session:
            try:
                new, token = auth.create_user(session, str(body.get("name", "")), str(body.get("role", "annotator")),
                                              body.get("password") or None)
            except ValueError as e:
                raise AppError(422, str(e)) from None
            for name in body.get("campaigns", []):
                service.add_member(session, service.campaign_for(session, name, user), new)
            return {"name": new.name, "role": new.role, "token": token, "invite_url": f"{request.base_url}invite/{token}"}

    return app


async def _json(request: Request, allow_empty: bool = False) -> dict:
    import json

    raw = await request.body()
    if not raw and allow_empty:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise AppError(422, "the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise AppError(422, "the request body must be a JSON object")
    return body


def _int(body: dict, key: str, default: int | None = None) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AppError(422, f"'{key}' must be an integer, got {value!r}")
    return value


def _float(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AppError(422, f"'{key}' must be a number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------- start-up


def prepare(cfg: AppConfig, environ=os.environ, preload: bool = False) -> tuple[FastAPI, list[str]]:
    """Check the secret, migrate the database, create accounts and campaigns, and with `preload` load
    the arena's checkpoints; returns (app, messages)."""
    from alignkit.app import campaigns as campaign_files
    from alignkit.app.config import CampaignConfig
    from alignkit.app.contestants import parse_contestants
    from alignkit.app.db import connect
    from alignkit.config import parse_config
    from alignkit.data import load_records

    secret = auth.check_secret(environ.get(cfg.secret_env), f"${cfg.secret_env}")
    url = cfg.database or f"sqlite:///{Path(cfg.output_dir) / 'app.db'}"
    sessions = connect(url)
    messages = [f"database: {url.split('@')[-1] if '@' in url else url}"]
    contestants = parse_contestants(cfg.arena, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    api_key_env=cfg.api_key_env)
    arena_prompts = [r["prompt"] for r in load_records(cfg.arena_prompts, "prompts")] if cfg.arena_prompts else []
    with sessions() as session:
        if service.user_named(session, cfg.admin, missing_ok=True) is None:
            password = environ.get("ALIGNKIT_ADMIN_PASSWORD", "")
            if len(password) < 8:
                raise auth.SecretError(f"first start: set $ALIGNKIT_ADMIN_PASSWORD (8+ characters) for the admin "
                                       f"account {cfg.admin!r}")
            _, token = auth.create_user(session, cfg.admin, "admin", password)
            messages.append(f"created admin {cfg.admin!r} (password from $ALIGNKIT_ADMIN_PASSWORD)")
        for name in cfg.annotators:
            if service.user_named(session, name, missing_ok=True) is None:
                _, token = auth.create_user(session, name, "annotator")
                messages.append(f"invite link for {name}: http://{cfg.host}:{cfg.port}/invite/{token}")
        for path in cfg.campaigns:
            spec = parse_config(CampaignConfig, ["--config", path], prog="campaign")
            if service.campaign_named(session, spec.name) is not None:
                continue
            items, source, guidelines = campaign_files.build_items(spec)
            service.create_campaign(session, spec.name, spec.kind, items, guidelines=guidelines,
                                    overlap=spec.overlap, source=source, members=spec.annotators)
            messages.append(f"created campaign {spec.name!r}: {len(items)} {spec.kind} items, overlap {spec.overlap}")
    if contestants:
        if preload:
            for c in contestants.values():
                c.load()
        messages.append(f"arena: {', '.join(contestants)}")
    return create_app(cfg, secret, sessions, contestants, arena_prompts), messages


def main(argv: list[str] | None = None) -> None:
    from alignkit.app.config import AppConfig as Config
    from alignkit.config import ConfigError, parse_config

    cfg = parse_config(Config, sys.argv[1:] if argv is None else argv, prog="alignkit app")
    try:
        app, messages = prepare(cfg, preload=True)
    except (auth.SecretError, AppError, ValueError) as e:
        raise ConfigError(str(getattr(e, "message", e))) from None
    for m in messages:
        print(m, flush=True)
    print(f"alignkit app on http://{cfg.host}:{cfg.port}/  (Ctrl-C stops it)", flush=True)
    import uvicorn

    # No access log: it would write every client's IP address, and the app stores none.
    uvicorn.run(app, host=cfg.host, port=cfg.port, access_log=False, proxy_headers=False, log_level="warning")
