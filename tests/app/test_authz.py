"""Who may do what in the app: the access matrix of every route, CSRF, static path traversal,
no stored IP addresses, and the login's cookie.

`MATRIX` is the access table of docs/app.md ("## Access"): one row per route (every route the
app registers must have one), one expected status per kind of caller. Each cell is sent by a
fresh client with a realistic body, so an allowed cell answers with its success status, not 422.
The matrix runs twice on fresh apps: once authenticated by bearer tokens (no CSRF token sent),
once by the session cookie of a browser (logged in through its invite link, CSRF token sent the
way the pages send it).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.app.services import ADMIN_PASSWORD, APP_SECRET, free_port

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("anonymous", "annotator", "admin", "outsider")
HEADERS = ("anonymous", "annotator", "admin", "annotator of another campaign")
PAIRWISE = [{"prompt": f"Question {i}?", "responses": [f"first {i}", f"second {i}"]} for i in range(6)]


def form(**fields):
    return ("form", fields)


def body(**fields):
    return ("json", fields)


# (method, route as registered, note, request target, body, anonymous, annotator, admin, outsider)
# The annotator is a member of campaign c1; the outsider an annotator who is a member of c2 only.
# Placeholders, filled per cell: {item} an item of c1 assigned to the caller, {battle} an unvoted
# battle of the caller, {invite} a valid invite token (of a fourth user), {csrf} the session's CSRF token.
# "303 /x" is a redirect to /x.
MATRIX = [
    ("GET", "/healthz", "", "/healthz", None, "200", "200", "200", "200"),
    ("GET", "/", "", "/", None, "303 /login", "200", "200", "200"),
    ("GET", "/login", "", "/login", None, "200", "200", "200", "200"),
    ("POST", "/login", "the admin's name and password", "/login",
     form(name="admin", password=ADMIN_PASSWORD, csrf_token="{csrf}"), "303 /", "303 /", "303 /", "303 /"),
    ("GET", "/invite/{token}", "a valid token", "/invite/{invite}", None, "303 /", "303 /", "303 /", "303 /"),
    ("GET", "/invite/{token}", "an unknown token", "/invite/not-a-token", None, "404", "404", "404", "404"),
    ("POST", "/logout", "", "/logout", form(), "303 /login", "303 /login", "303 /login", "303 /login"),
    ("GET", "/label/{campaign}", "", "/label/c1", None, "303 /login", "200", "200", "403"),
    ("GET", "/arena", "", "/arena", None, "303 /login", "200", "200", "200"),
    ("GET", "/leaderboard", "", "/leaderboard", None, "303 /login", "200", "200", "200"),
    ("GET", "/admin", "", "/admin", None, "303 /login", "403", "200", "403"),
    ("POST", "/admin/users", "", "/admin/users", form(name="new-by-form", role="annotator", campaign="c1"),
     "303 /login", "403", "303 /admin", "403"),
    ("POST", "/admin/members", "", "/admin/members", form(name="spare", campaign="c1"),
     "303 /login", "403", "303 /admin", "403"),
    ("GET", "/api/me", "", "/api/me", None, "401", "200", "200", "200"),
    ("GET", "/api/campaigns", "", "/api/campaigns", None, "401", "200", "200", "200"),
    ("POST", "/api/campaigns", "", "/api/campaigns",
     body(name="new-campaign", kind="thumbs", items=[{"prompt": "p", "responses": ["r"]}], annotators=["ann"]),
     "401", "403", "201", "403"),
    ("GET", "/api/campaigns/{campaign}/next", "", "/api/campaigns/c1/next", None, "401", "200", "200", "403"),
    ("POST", "/api/campaigns/{campaign}/judgements", "", "/api/campaigns/c1/judgements",
     body(item_id="{item}", choice="A"), "401", "201", "201", "403"),
    ("POST", "/api/arena/battles", "", "/api/arena/battles", body(prompt="Say hello."), "401", "201", "201", "201"),
    ("POST", "/api/arena/battles/{battle_id}/vote", "the caller's own battle", "/api/arena/battles/{battle}/vote",
     body(vote="A"), "401", "200", "200", "200"),
    ("GET", "/api/leaderboard", "", "/api/leaderboard", None, "401", "200", "200", "200"),
    ("GET", "/api/admin/stats", "", "/api/admin/stats", None, "401", "403", "200", "403"),
    ("POST", "/api/users", "", "/api/users", body(name="new-by-api", role="annotator", campaigns=["c1"]),
     "401", "403", "201", "403"),
]


def access_table_markdown() -> str:
    """MATRIX as the Markdown table of docs/app.md."""

    def cell(expected: str) -> str:
        status, _, target = expected.partition(" ")
        return f"{status} → `{target}`" if target else status

    lines = ["| route | " + " | ".join(HEADERS) + " |", "|" + "---|" * (len(HEADERS) + 1)]
    for method, route, note, _, _, *expected in MATRIX:
        name = f"`{method} {route}`" + (f" ({note})" if note else "")
        lines.append(f"| {name} | " + " | ".join(cell(e) for e in expected) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the world the matrix runs in


class _FakeContestant:
    def __init__(self, name):
        self.name = name

    def generate(self, prompts, seed=0):
        return [f"{self.name} answers: {p}" for p in prompts]


@pytest.fixture
def world(make_app, monkeypatch):
    """An app with campaigns c1 (member: ann) and c2 (member: out), users admin, ann, out, spare and
    invitee, and two arena contestants that answer instantly."""
    from alignkit.app import contestants, service

    monkeypatch.setattr(contestants, "parse_contestants",
                        lambda specs, **_: {s.split("=")[0]: _FakeContestant(s.split("=")[0]) for s in specs})
    app = make_app(arena=["one=x", "two=y"])
    app.tokens = {"admin": app.token("admin", "admin")}
    for name in ("ann", "out", "spare", "invitee"):
        app.tokens[name] = app.token(name)
    with app.sessions() as s:
        items = service.items_from_json(PAIRWISE)
        service.create_campaign(s, "c1", "pairwise", items, overlap=2, members=["ann"])
        service.create_campaign(s, "c2", "pairwise", items, overlap=2, members=["out"])
    return app


USER_OF = {"anonymous": None, "annotator": "ann", "admin": "admin", "outsider": "out"}
CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def csrf_of(page_html: str) -> str:
    match = CSRF_META.search(page_html)
    assert match, "the page carries no <meta name=csrf-token>"
    return match.group(1)


def browser(app, user: str | None = None):
    """A TestClient that keeps cookies, logged in through `user`'s invite link; returns (client, csrf)."""
    client = app.client()
    if user is not None:
        r = client.get(f"/invite/{app.tokens[user]}", follow_redirects=False)
        assert r.status_code == 303, r.text
    return client, csrf_of(client.get("/login").text)


def _fill(value, ctx):
    if isinstance(value, str):
        if value in ("{item}", "{battle}"):
            return ctx[value[1:-1]]
        return value.format(**ctx) if "{" in value else value
    if isinstance(value, dict):
        return {k: _fill(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ctx) for v in value]
    return value


def _context(app, role: str, csrf: str) -> dict:
    """Values of the placeholders for a cell sent by `role`."""
    from alignkit.app import service
    from alignkit.app.db import Campaign

    with app.sessions() as s:
        name = USER_OF[role] or "ann"
        user = service.user_named(s, name)
        c1 = s.query(Campaign).filter_by(name="c1").one()
        if role in ("annotator", "admin"):
            item = service.next_item(s, c1, user)["item_id"]
        else:  # not theirs to judge; refused before the item matters
            item = service.next_item(s, c1, service.user_named(s, "spare"))["item_id"]
        battle = service.create_battle(s, user, "Hi?", "one", "two", "a", "b")["battle_id"]
    return {"item": item, "battle": battle, "invite": app.tokens["invitee"], "csrf": csrf}


def send_cell(app, mechanism: str, row, role: str):
    """Send one cell of MATRIX from a fresh client; returns the response."""
    method, _, _, target, payload, *_ = row
    user = USER_OF[role]
    client, csrf = browser(app, user if mechanism == "cookie" else None)
    headers = {}
    if mechanism == "bearer" and user is not None:
        headers["Authorization"] = f"Bearer {app.tokens[user]}"
    ctx = _context(app, role, csrf)
    kwargs = {}
    if payload is not None:
        kind, fields = payload
        fields = _fill(fields, ctx)
        if kind == "form":
            if mechanism == "cookie":  # as the pages' forms do
                fields.setdefault("csrf_token", csrf)
            kwargs["data"] = fields
        else:
            kwargs["json"] = fields
    if mechanism == "cookie" and method == "POST" and (payload is None or payload[0] == "json"):
        headers["X-CSRF-Token"] = csrf  # as app.js does
    return client.request(method, _fill(target, ctx), headers=headers, follow_redirects=False, **kwargs)


def _outcome(response) -> str:
    if response.status_code in (301, 302, 303, 307, 308):
        return f"{response.status_code} {response.headers.get('location')}"
    return str(response.status_code)


def _registered_routes(fastapi_app) -> set[tuple[str, str]]:
    from fastapi.routing import APIRoute
    from starlette.routing import Mount

    routes = set()
    for route in fastapi_app.routes:
        if isinstance(route, Mount) and route.path == "/static":
            continue
        assert isinstance(route, APIRoute), f"unexpected route {route!r}"
        routes |= {(method, route.path) for method in route.methods if method != "HEAD"}
    return routes


# ---------------------------------------------------------------- 1. the matrix


def test_every_route_has_a_row(world):
    rows = {(method, route) for method, route, *_ in MATRIX}
    registered = _registered_routes(world.app)
    assert registered - rows == set(), "routes without a row in MATRIX (and in docs/app.md)"
    assert rows - registered == set(), "rows of MATRIX for routes the app does not have"


@pytest.mark.parametrize("mechanism", ["bearer", "cookie"])
def test_access_matrix(world, mechanism):
    wrong = []
    for row in MATRIX:
        for role, expected in zip(ROLES, row[5:]):
            r = send_cell(world, mechanism, row, role)
            if _outcome(r) != expected:
                wrong.append(f"{row[0]} {row[3]} as {role}: expected {expected}, got {_outcome(r)} {r.text[:200]!r}")
            if row[3].startswith("/api/") and r.status_code >= 400:
                assert "detail" in r.json()  # API errors are JSON, never the HTML error page
    assert not wrong, "\n".join(wrong)


def test_docs_hold_the_access_table():
    text = (ROOT / "docs" / "app.md").read_text()
    assert "## Access" in text
    section = text.split("## Access", 1)[1]
    expected = access_table_markdown()
    assert expected in section, "docs/app.md's access table differs from MATRIX; it should read:\n" + expected


# ---------------------------------------------------------------- 2. CSRF


def test_cookie_sessions_must_send_the_csrf_token(world):
    from alignkit.app import service

    admin, csrf = browser(world, "admin")
    wrong = "x" * len(csrf)

    def post(path, token, **kw):
        data = kw.pop("data", None)
        if data is not None and token is not None:
            data = {**data, "csrf_token": token}
        return admin.post(path, data=data, follow_redirects=False, **kw)

    def effects():
        with world.sessions() as s:
            return (service.user_named(s, "csrf-user", missing_ok=True) is not None,
                    [c["name"] for c in service.visible_campaigns(s, service.user_named(s, "spare"))])

    for path, data, before, after in [
            ("/admin/users", {"name": "csrf-user", "role": "annotator"}, (False, []), (True, [])),
            ("/admin/members", {"name": "spare", "campaign": "c2"}, (True, []), (True, ["c2"]))]:
        assert post(path, None, data=data).status_code == 403
        assert post(path, wrong, data=data).status_code == 403
        assert post(path, "", data=data).status_code == 403
        assert effects() == before  # the refused posts changed nothing
        r = post(path, csrf, data=data)
        assert (r.status_code, r.headers["location"]) == (303, "/admin"), r.text
        assert effects() == after

    # The pages' JSON calls: header X-CSRF-Token.
    item = admin.get("/api/campaigns/c1/next").json()["item"]  # a GET needs none
    for path, payload in [("/api/campaigns/c1/judgements", {"item_id": item["item_id"], "choice": "B"}),
                          ("/api/arena/battles", {"prompt": "Hello?"})]:
        assert admin.post(path, json=payload).status_code == 403
        assert admin.post(path, json=payload, headers={"X-CSRF-Token": wrong}).status_code == 403
        assert admin.post(path, json=payload, headers={"X-CSRF-Token": ""}).status_code == 403
        # a form field does not stand in for the header on a JSON body
        assert admin.post(path, content=json.dumps({**payload, "csrf_token": csrf}),
                          headers={"Content-Type": "application/json"}).status_code == 403
        r = admin.post(path, json=payload, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 201, r.text
    # Another session's token is no good either.
    _, other_csrf = browser(world, "admin")
    assert other_csrf != csrf
    r = admin.post("/api/arena/battles", json={"prompt": "x"}, headers={"X-CSRF-Token": other_csrf})
    assert r.status_code == 403

    # Logout too (a forged logout is a nuisance); the refused ones leave the session logged in.
    assert post("/logout", None, data={}).status_code == 403
    assert post("/logout", wrong, data={}).status_code == 403
    assert admin.get("/api/me").status_code == 200
    r = post("/logout", csrf, data={})
    assert (r.status_code, r.headers["location"]) == (303, "/login")
    assert admin.get("/api/me").status_code == 401


def test_the_login_form_needs_the_sessions_csrf_token(world):
    creds = {"name": "admin", "password": ADMIN_PASSWORD}
    fresh = world.client()  # never saw a page: its session has no token
    assert fresh.post("/login", data=creds, follow_redirects=False).status_code == 403
    assert fresh.post("/login", data={**creds, "csrf_token": "guess"}, follow_redirects=False).status_code == 403
    attacker, attacker_csrf = browser(world)
    victim, victim_csrf = browser(world)
    r = victim.post("/login", data={**creds, "csrf_token": attacker_csrf}, follow_redirects=False)
    assert r.status_code == 403
    assert victim.post("/login", data=creds, follow_redirects=False).status_code == 403
    assert victim.get("/api/me").status_code == 401
    r = victim.post("/login", data={**creds, "csrf_token": victim_csrf}, follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/")


def test_bearer_requests_need_no_csrf_token(world):
    admin = world.client("admin", "admin")
    assert admin.post("/api/arena/battles", json={"prompt": "Hi"}).status_code == 201
    r = admin.post("/admin/users", data={"name": "by-bearer"}, follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/admin")
    # a bad bearer token is refused outright, not treated as anonymous
    bad = world.client()
    bad.headers["Authorization"] = "Bearer nope"
    assert bad.get("/api/me").status_code == 401
    assert bad.get("/", follow_redirects=False).status_code == 401


# ---------------------------------------------------------------- a real server, for raw requests


@contextlib.contextmanager
def serve(asgi_app):
    """`asgi_app` under uvicorn (as `alignkit app` runs it) on a free port, in a thread; yields the port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(asgi_app, host="127.0.0.1", port=port, access_log=False,
                                           proxy_headers=False, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def raw_request(port: int, target: bytes, method: bytes = b"GET", headers: bytes = b"", payload: bytes = b""):
    """Send `target` byte for byte (no client library normalises it); returns (status, headers, body)."""
    request = (method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers
               + (b"Content-Length: %d\r\n" % len(payload) if payload else b"") + b"\r\n" + payload)
    assert request.split(b" ", 2)[1] == target  # what goes on the wire is exactly the target
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head.decode("latin-1"), rest


# ---------------------------------------------------------------- 3. static files


TRAVERSALS = [
    b"/static/../server.py",
    b"/static/../db.py",
    b"/static/%2e%2e/server.py",
    b"/static/%2E%2E/server.py",
    b"/static/%2e%2e%2fserver.py",
    b"/static/..%2fdb.py",
    b"/static/..%2Fdb.py",
    b"/static/%252e%252e/server.py",
    b"/static/%252e%252e%252fserver.py",
    b"/static/./../server.py",
    b"/static/../../app/server.py",
    b"/static/../../../alignkit/app/server.py",
    b"/static//etc/passwd",
    b"/static/%2fetc/passwd",
    b"/static/%2Fetc%2Fpasswd",
    b"/static/../../../../../../../../etc/passwd",
    b"/static/....//server.py",
    b"/static/....//....//server.py",
    b"/static/..\\server.py",
    b"/static/..%5cserver.py",
    b"/static/%2e%2e%5cserver.py",
    b"/static/\\..\\server.py",
    b"/static/%5c%2e%2e%5cserver.py",
    b"/static/..;/server.py",
    b"/static/%c0%ae%c0%ae/server.py",
    b"/static/style.css/../../server.py",
    b"/static/style.css%00../../server.py",
]
OUTSIDE = ["def create_app", "class Base(DeclarativeBase)", "root:x:0:0", "import ", "sqlalchemy"]


def test_static_files_stay_inside_their_folder(world):
    static = ROOT / "alignkit" / "app" / "static"
    assert (static / ".." / "server.py").is_file() and (static / ".." / "db.py").is_file()  # the targets exist
    received = []

    async def recorder(scope, receive, send):  # what the app was handed, before any routing
        if scope["type"] == "http":
            received.append((scope["raw_path"], scope["path"]))
        await world.app(scope, receive, send)

    with serve(recorder) as port:
        status, head, css = raw_request(port, b"/static/style.css")
        assert status == 200 and css.decode() == (static / "style.css").read_text()
        assert "nosniff" in head.lower()
        for target in TRAVERSALS:
            received.clear()
            status, _, content = raw_request(port, target)
            text = content.decode("utf-8", "replace")
            assert status == 404, (target, status, text[:300])
            assert not any(marker in text for marker in OUTSIDE), (target, text[:300])
            assert received and received[0][0] == target, (target, received)  # reached the app unnormalised
            if b".." in target or b"%2e" in target.lower():
                assert "def create_app" not in text


# ---------------------------------------------------------------- 4. no IP addresses stored


def _all_text(url: str) -> list[str]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    cells = []
    try:
        with engine.connect() as conn:
            for table in sa.inspect(engine).get_table_names():
                for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                    cells.extend(str(v) for v in row if v is not None)
    finally:
        engine.dispose()
    return cells


def test_the_server_stores_no_ip_address_or_user_agent(world):
    agent = b"authz-probe-agent/1.0"
    # In-process: the TestClient's address is "testclient", its User-Agent "testclient".
    ann = world.client("ann")
    item = ann.get("/api/campaigns/c1/next").json()["item"]
    r = ann.post("/api/campaigns/c1/judgements", json={"item_id": item["item_id"], "choice": "A"})
    assert r.status_code == 201
    battle = ann.post("/api/arena/battles", json={"prompt": "hi"}).json()
    assert ann.post(f"/api/arena/battles/{battle['battle_id']}/vote", json={"vote": "tie"}).status_code == 200
    admin, csrf = browser(world)
    assert admin.post("/login", data={"name": "admin", "password": ADMIN_PASSWORD, "csrf_token": csrf},
                      follow_redirects=False).status_code == 303
    # Over TCP from 127.0.0.1, with a User-Agent of our own and a forwarded-for header.
    with serve(world.app) as port:
        token = world.tokens["out"].encode()
        auth = b"Authorization: Bearer " + token + b"\r\nUser-Agent: " + agent + b"\r\nX-Forwarded-For: 10.9.8.7\r\n"
        status, _, raw = raw_request(port, b"/api/campaigns/c2/next", headers=auth)
        assert status == 200
        item = json.loads(raw)["item"]
        status, _, _ = raw_request(port, b"/api/campaigns/c2/judgements", b"POST",
                                   auth + b"Content-Type: application/json\r\nIdempotency-Key: k1\r\n",
                                   json.dumps({"item_id": item["item_id"], "choice": "B"}).encode())
        assert status == 201
        status, _, raw = raw_request(port, b"/api/arena/battles", b"POST",
                                     auth + b"Content-Type: application/json\r\n", b'{"prompt": "hello"}')
        assert status == 201
        status, _, _ = raw_request(port, f"/api/arena/battles/{json.loads(raw)['battle_id']}/vote".encode(), b"POST",
                                   auth + b"Content-Type: application/json\r\n", b'{"vote": "A"}')
        assert status == 200
        status, _, _ = raw_request(port, f"/invite/{world.tokens['spare']}".encode(), headers=auth)
        assert status == 303
    cells = _all_text(world.url)
    assert any("hello" in c for c in cells) and any("first 0" in c for c in cells)  # the scan sees the data
    for needle in ("127.0.0.1", "testclient", "10.9.8.7", agent.decode(), "authz-probe"):
        assert not [c for c in cells if needle in c], needle


# ---------------------------------------------------------------- 5. login


def _session_data(set_cookie: str) -> dict:
    """The JSON inside Starlette's signed session cookie (checked against the secret)."""
    from itsdangerous import TimestampSigner

    value = re.search(r"alignkit_session=([^;]+)", set_cookie).group(1)
    return json.loads(base64.b64decode(TimestampSigner(APP_SECRET).unsign(value)))


def test_login_wrong_password_and_the_session_cookie(world):
    client, csrf = browser(world)
    r = client.post("/login", data={"name": "admin", "password": "wrong-password", "csrf_token": csrf},
                    follow_redirects=False)
    assert r.status_code == 401 and "wrong name or password" in r.text
    if "set-cookie" in r.headers:
        assert "uid" not in _session_data(r.headers["set-cookie"])
    assert "uid" not in _session_data("alignkit_session=" + client.cookies["alignkit_session"])
    assert client.get("/api/me").status_code == 401
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"
    r = client.post("/login", data={"name": "nobody", "password": ADMIN_PASSWORD, "csrf_token": csrf},
                    follow_redirects=False)
    assert r.status_code == 401
    assert client.get("/api/me").status_code == 401

    r = client.post("/login", data={"name": "admin", "password": ADMIN_PASSWORD, "csrf_token": csrf},
                    follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/")
    cookie = r.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")[1:]}
    assert "httponly" in attributes, cookie
    assert attributes.get("samesite", "").lower() == "samesite=lax", cookie
    assert attributes.get("path") == "path=/", cookie
    assert "secure" not in attributes, cookie  # secure_cookies is off by default (plain http on localhost)
    data = _session_data(cookie)
    assert set(data) == {"uid"}, data  # a new session: the pre-login CSRF token is gone
    assert client.get("/api/me").json() == {"name": "admin", "role": "admin"}
    assert csrf_of(client.get("/").text) != csrf


def test_secure_cookies_sets_the_secure_flag(make_app, tmp_path):
    app = make_app(database=f"sqlite:///{tmp_path / 'secure.db'}", secure_cookies=True)
    client = app.client()
    r = client.get(f"/invite/{app.token('admin', 'admin')}", follow_redirects=False)
    attributes = [part.strip().lower() for part in r.headers["set-cookie"].split(";")]
    assert "secure" in attributes and "httponly" in attributes and "samesite=lax" in attributes
