"""The app's test services work: PostgreSQL answers through SQLAlchemy + psycopg, Chromium clicks and screenshots."""

import uuid
from urllib.parse import quote

import sqlalchemy as sa


def test_postgres_answers_select_1(postgres):
    engine = sa.create_engine(postgres.url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_postgres_create_database(postgres):
    name = f"alignkit_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(postgres.create_database(name))
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text("select current_database()")).scalar_one() == name
            conn.execute(sa.text("create table t (x int)"))
            conn.execute(sa.text("insert into t values (1), (2)"))
            assert conn.execute(sa.text("select sum(x) from t")).scalar_one() == 3
    finally:
        engine.dispose()


PAGE = """<!doctype html><html><body style="font: 32px sans-serif; background: #eef">
<h1>alignkit</h1>
<button id="go" onclick="document.getElementById('out').textContent = 'clicked ' + (1 + 1)">Go</button>
<p id="out">waiting</p>
</body></html>"""


def test_browser_clicks_and_screenshots(page, tmp_path):
    page.goto("data:text/html," + quote(PAGE))
    assert page.viewport_size == {"width": 1280, "height": 900}
    assert page.locator("#out").text_content() == "waiting"
    page.get_by_role("button", name="Go").click()
    assert page.locator("#out").text_content() == "clicked 2"
    shot = tmp_path / "page.png"
    page.screenshot(path=shot)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024
