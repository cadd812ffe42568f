"""Real services for the app's tests: `postgres` (a throwaway PostgreSQL server), `browser`
(headless Debian Chromium through Playwright) and `page` (a fresh 1280x900 page per test).

Where a service is missing they skip, or fail when ALIGNKIT_REQUIRE_SERVICES=1 (as `.ci/run` sets).
"""

import pytest

from tests.app.services import (
    PostgresServer,
    launch_chromium,
    missing_chromium,
    missing_postgres,
    services_required,
)


def _require(reason: str | None) -> None:
    if reason is None:
        return
    if services_required():
        pytest.fail(f"{reason} (ALIGNKIT_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres():
    """A running `PostgresServer`, shared by the session: `.url`, `.create_database(name) -> url`."""
    _require(missing_postgres())
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium `playwright.sync_api.Browser`, shared by the session."""
    _require(missing_chromium())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    """A new page in its own context (fresh cookies and storage), viewport 1280x900."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()


class AppHandle:
    """An app built by `alignkit.app.server.prepare`, its database, and API clients per user."""

    def __init__(self, app, url: str):
        from alignkit.app.db import connect

        self.app, self.url = app, url
        self.sessions = connect(url)

    def token(self, name: str, role: str = "annotator") -> str:
        """A fresh bearer token of `name` (the account is created if it does not exist)."""
        from alignkit.app import auth, service

        with self.sessions() as session:
            user = service.user_named(session, name, missing_ok=True)
            if user is None:
                return auth.create_user(session, name, role)[1]
            return auth.new_invite(session, user)

    def client(self, name: str | None = None, role: str = "annotator"):
        from fastapi.testclient import TestClient

        client = TestClient(self.app)
        if name is not None:
            client.headers["Authorization"] = f"Bearer {self.token(name, role)}"
        return client


@pytest.fixture
def make_app(tmp_path):
    """make_app(database_url="", **AppConfig keys) -> AppHandle; default: SQLite in tmp_path."""
    from alignkit.app.config import AppConfig
    from alignkit.app.server import prepare
    from tests.app.services import ADMIN_PASSWORD, APP_SECRET

    def make(database: str = "", **keys) -> AppHandle:
        cfg = AppConfig(output_dir=str(tmp_path / "app"), database=database, **keys)
        app, _ = prepare(cfg, environ={"ALIGNKIT_APP_SECRET": APP_SECRET, "ALIGNKIT_ADMIN_PASSWORD": ADMIN_PASSWORD})
        return AppHandle(app, database or f"sqlite:///{tmp_path / 'app' / 'app.db'}")

    return make
