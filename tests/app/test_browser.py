"""The app in a real browser: headless Chromium drives `alignkit app` running as a subprocess.

One server per module (SQLite in a temporary folder, two tiny-model arena contestants). Each
test makes its own accounts and campaigns through the JSON API, acts in the browser with the
keyboard, then reads what was stored straight from the server's database.

Screenshots (full page) go to tmp_path, and also to $ALIGNKIT_SCREENSHOTS when it is set:

    ALIGNKIT_SCREENSHOTS=docs/app .venv/bin/python -m pytest -q tests/app/test_browser.py

The tiny test model writes noise; for docs/app, ALIGNKIT_SCREENSHOT_MODELS="runs/demo/sft runs/demo/dpo"
makes two demo checkpoints the arena's "one" and "two" (names and assertions unchanged).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from sqlalchemy import select

from alignkit.app.db import Battle, Campaign, Judgement, Response, User
from tests.app.services import ADMIN_PASSWORD, AppServer

GUIDELINES = """Pick the answer a careful expert would give.

- **Correct** beats fluent: check the arithmetic.
- Prefer the *shorter* answer when both are right.
- Press `3` (tie) when they are equally good, `4` when neither is usable."""

PASSWORD = "annotator-password-1"
NAMES = re.compile(r"\b(one|two)\b")  # the arena contestants' names, as words


class Site:
    """The running server, its database, and an admin API client."""

    def __init__(self, server: AppServer, url: str):
        import httpx

        from alignkit.app import auth, service
        from alignkit.app.db import connect

        self.url, self.db_url = server.url, url
        self.db = connect(url)  # the server's own database (SQLite in WAL mode: both may read and write)
        with self.db() as s:
            token = auth.new_invite(s, service.user_named(s, "admin"))
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def user(self, name: str, password: str | None = None, campaigns: tuple[str, ...] = ()) -> str:
        """Create an annotator through the API; returns their invite (and bearer) token."""
        r = self.admin.post("/api/users", json={"name": name, "password": password, "campaigns": list(campaigns)})
        assert r.status_code == 201, r.text
        return r.json()["token"]

    def campaign(self, name: str, kind: str, items: list[dict], overlap: int = 1, annotators=()) -> None:
        r = self.admin.post("/api/campaigns", json={"name": name, "kind": kind, "items": items, "overlap": overlap,
                                                    "annotators": list(annotators), "guidelines": GUIDELINES})
        assert r.status_code == 201, r.text

    def judgements(self, user: str, campaign: str) -> list[Judgement]:
        with self.db() as s:
            return list(s.scalars(select(Judgement).join(User, User.id == Judgement.user_id)
                                  .join(Campaign, Campaign.id == Judgement.campaign_id)
                                  .where(User.name == user, Campaign.name == campaign).order_by(Judgement.id)))

    def texts(self, ids: list[int]) -> list[str]:
        with self.db() as s:
            return [s.get(Response, i).text for i in ids]

    def login(self, page, name: str, password: str) -> None:
        """Log in through the /login form."""
        page.goto(self.url + "/login")
        page.fill("input[name=name]", name)
        page.fill("input[name=password]", password)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(self.url + "/")

    def invite(self, page, token: str) -> None:
        page.goto(f"{self.url}/invite/{token}")
        page.wait_for_url(self.url + "/")


@pytest.fixture(scope="module", autouse=True)
def patient_expect():
    """A busy 2-core CI machine answers slower than Playwright's 5 s default; wait up to 30 s."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    yield
    expect.set_options(timeout=5_000)


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("browser")
    url = f"sqlite:///{tmp / 'app.db'}"
    one, two = os.environ.get("ALIGNKIT_SCREENSHOT_MODELS", f"{tiny_model_dir} {tiny_model_dir}").split()
    server = AppServer("--output_dir", str(tmp), "--arena", f"one={one}", f"two={two}",
                       "--max_new_tokens", "8", "--bootstrap_rounds", "50", log=tmp / "server.log")
    with server:
        site = Site(server, url)
        try:
            yield site
        finally:
            site.admin.close()


def screenshot(page, tmp_path: Path, name: str) -> None:
    """A full-page PNG in tmp_path, and in $ALIGNKIT_SCREENSHOTS (docs/app) when that is set."""
    data = page.screenshot(path=tmp_path / name, full_page=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    if folder := os.environ.get("ALIGNKIT_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(data)


def expect_judged(page, n: int) -> None:
    """Wait until the page shows the next item (n judged so far)."""
    from playwright.sync_api import expect

    expect(page.locator("#progress")).to_have_text(f"You have judged {n} item(s) in this campaign.")


def shown_texts(page) -> list[str]:
    return page.locator("#responses .response pre").all_text_contents()


# ---------------------------------------------------------------- labelling


def test_password_login_then_pairwise_by_keyboard_stores_the_shown_side(site, page, tmp_path):
    from playwright.sync_api import expect

    items = [{"prompt": f"What is {a}+{b}?", "responses": [f"It is {a + b}.", f"Maybe {a + b + 1}, or so."]}
             for a, b in [(2, 3), (10, 7), (21, 21)]]
    site.campaign("pairs", "pairwise", items)
    site.user("ann", PASSWORD, campaigns=("pairs",))

    site.login(page, "ann", PASSWORD)
    expect(page.locator(".who")).to_have_text("ann (annotator)")
    expect(page.locator("tbody tr td").nth(2)).to_have_text("3")  # the campaign list counts its items
    page.get_by_role("link", name="Label").click()
    expect(page.locator(".guidelines strong")).to_have_text("Correct")  # the Markdown is rendered
    pressed, left = [], []
    for n, key in enumerate(["1", "2", "1"]):
        expect_judged(page, n)
        expect(page.locator("#prompt")).to_have_text(items[n]["prompt"])
        texts = shown_texts(page)
        assert sorted(texts) == sorted(items[n]["responses"])
        expect(page.locator("#submit")).to_be_disabled()
        page.keyboard.press(key)
        choice = {"1": "A", "2": "B"}[key]
        expect(page.locator(f"#controls button[data-choice={choice}]")).to_have_class(re.compile("selected"))
        if n == 0:
            screenshot(page, tmp_path, "label.png")
        page.keyboard.press("Enter")
        pressed.append(choice)
        left.append(texts[0])
    expect(page.locator("#finished")).to_be_visible()

    rows = site.judgements("ann", "pairs")
    assert [j.choice for j in rows] == pressed
    assert [site.texts(j.shown)[0] for j in rows] == left  # shown[0] is the answer that was on the left
    for j in rows:  # the winner is the side pressed
        assert j.ranking == (j.shown if j.choice == "A" else j.shown[::-1])
        assert j.seconds is not None and j.seconds >= 0


def test_tie_and_both_bad_are_stored_apart(site, page):
    items = [{"prompt": f"Name a colour ({i})", "responses": ["Red.", "Blue."]} for i in range(2)]
    site.campaign("ties", "pairwise", items)
    site.invite(page, site.user("tina", campaigns=("ties",)))
    page.goto(site.url + "/label/ties")
    for n, key in enumerate(["3", "4"]):
        expect_judged(page, n)
        page.keyboard.press(key)
        page.keyboard.press("Enter")
    page.wait_for_selector("#finished", state="visible")
    rows = site.judgements("tina", "ties")
    assert [j.choice for j in rows] == ["tie", "both_bad"]
    assert [j.ranking for j in rows] == [None, None]


def test_rank_three_by_keyboard(site, page):
    from playwright.sync_api import expect

    answers = ["Paris.", "Paris, on the Seine.", "Lyon."]
    site.campaign("ranks", "rank", [{"prompt": "Capital of France?", "responses": answers}])
    site.invite(page, site.user("rita", campaigns=("ranks",)))
    page.goto(site.url + "/label/ranks")
    expect_judged(page, 0)
    texts = shown_texts(page)
    badges = page.locator("#responses .rank-badge")

    page.keyboard.press("2")
    expect(badges).to_have_text(["", "#1", ""])
    page.keyboard.press("Backspace")  # clears
    expect(badges).to_have_text(["", "", ""])
    page.keyboard.press("3")
    expect(badges).to_have_text(["", "", "#1"])
    expect(page.locator("#submit")).to_be_disabled()
    page.keyboard.press("1")  # two of three pressed: the last slot is filled in
    expect(badges).to_have_text(["#2", "#3", "#1"])
    page.keyboard.press("Enter")
    page.wait_for_selector("#finished", state="visible")

    [j] = site.judgements("rita", "ranks")
    assert j.choice == "rank"
    assert j.ranking == [j.shown[2], j.shown[0], j.shown[1]]  # slots pressed, as response ids
    assert site.texts(j.ranking) == [texts[2], texts[0], texts[1]]


def test_thumbs_by_keyboard(site, page):
    items = [{"prompt": "Say hi politely.", "responses": ["Hello, nice to meet you!"]},
             {"prompt": "Say hi rudely.", "responses": ["Go away."]}]
    site.campaign("thumbs", "thumbs", items)
    site.invite(page, site.user("theo", campaigns=("thumbs",)))
    page.goto(site.url + "/label/thumbs")
    for n, key in enumerate(["1", "2"]):
        expect_judged(page, n)
        page.keyboard.press(key)
        page.keyboard.press("Enter")
    page.wait_for_selector("#finished", state="visible")
    rows = site.judgements("theo", "thumbs")
    assert [(site.texts(j.shown), j.choice) for j in rows] == [(["Hello, nice to meet you!"], "up"),
                                                               (["Go away."], "down")]


# ---------------------------------------------------------------- arena and leaderboard


def test_arena_reveals_names_only_after_the_vote_and_the_leaderboard_counts_it(site, page, tmp_path):
    from playwright.sync_api import expect

    site.invite(page, site.user("vera"))
    page.get_by_role("link", name="Arena", exact=True).first.click()
    page.fill("#arena-prompt", "What is 2+3?")
    page.get_by_role("button", name="New battle").click()
    for n, (key, vote) in enumerate([("1", "A"), ("2", "B"), ("3", "tie")]):
        if n:  # Enter after a vote starts the next battle
            page.keyboard.press("Enter")
        expect(page.locator("#name-a")).to_have_text("Model A")
        expect(page.locator("#battle")).to_be_visible()
        expect(page.locator("#vote-buttons button").first).to_be_enabled()
        text = page.locator("body").inner_text()
        assert "What is 2+3?" in text and not NAMES.search(text), text
        page.keyboard.press(key)
        expect(page.locator("#name-a")).to_have_text(re.compile(r"^Model A: (one|two)$"))
        names = {page.locator(f"#name-{s}").text_content().split(": ")[1] for s in "ab"}
        assert names == {"one", "two"}
        text = page.locator("body").inner_text()
        assert "one" in NAMES.findall(text) and "two" in NAMES.findall(text)
        expect(page.locator(f"#vote-buttons button[data-vote={vote}]")).to_have_class(re.compile("selected"))
    screenshot(page, tmp_path, "arena.png")
    with site.db() as s:
        votes = s.scalars(select(Battle.vote).join(User, User.id == Battle.user_id)
                          .where(User.name == "vera").order_by(Battle.id)).all()
    assert votes == ["A", "B", "tie"]

    page.get_by_role("link", name="Leaderboard").click()
    expect(page.locator("h1")).to_have_text("Leaderboard")
    total = site.admin.get("/api/leaderboard").json()["votes"]
    assert total >= 3
    expect(page.locator(".hint").first).to_contain_text(f"{total} votes.")
    assert sorted(page.locator("tbody tr td:nth-child(2)").all_text_contents()) == ["one", "two"]
    screenshot(page, tmp_path, "leaderboard.png")


# ---------------------------------------------------------------- admin and CSRF


def test_admin_page_shows_agreement(site, page, tmp_path):
    import httpx
    from playwright.sync_api import expect

    items = [{"prompt": f"Which is kinder? ({i})", "responses": [f"Good answer {i}.", f"Bad answer {i}."]}
             for i in range(4)]
    site.campaign("agree", "pairwise", items, overlap=2)
    for name, disagree_on in [("ada", None), ("bo", 3)]:
        token = site.user(name, campaigns=("agree",))
        with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {token}"}) as client:
            n = 0
            while (item := client.get("/api/campaigns/agree/next").json()["item"]) is not None:
                good = "A" if item["responses"][0].startswith("Good") else "B"
                choice = {"A": "B", "B": "A"}[good] if n == disagree_on else good
                r = client.post("/api/campaigns/agree/judgements", json={"item_id": item["item_id"], "choice": choice},
                                headers={"Idempotency-Key": f"{name}-{n}"})
                assert r.status_code == 201, r.text
                n += 1
        assert n == 4

    site.login(page, "admin", ADMIN_PASSWORD)
    page.get_by_role("link", name="Admin").click()
    card = page.locator("section.card", has=page.locator("h2", has_text="agree"))
    expect(card).to_contain_text("8 of 8 judgements (4 items)")  # not "<built-in method items ...>"
    expect(card).to_contain_text("Krippendorff's α =")
    expect(card.locator("table.small")).to_contain_text("ada · bo")
    kappa = card.locator("table.small tbody td").nth(2).text_content()
    assert re.fullmatch(r"-?\d\.\d{3}", kappa), kappa
    screenshot(page, tmp_path, "admin.png")


def test_form_posts_without_the_csrf_token_are_refused(site, page):
    from playwright.sync_api import expect

    site.login(page, "admin", ADMIN_PASSWORD)
    # page.request shares the page's cookies: a cross-site form post would arrive just like this
    assert page.request.post(site.url + "/admin/users", form={"name": "mallory", "role": "admin"}).status == 403
    assert page.request.post(site.url + "/admin/users",
                             form={"name": "mallory", "role": "admin", "csrf_token": "forged"}).status == 403
    assert page.request.post(site.url + "/logout", form={}).status == 403
    assert page.request.post(site.url + "/logout").status == 403
    with site.db() as s:
        assert s.scalar(select(User).where(User.name == "mallory")) is None

    page.goto(site.url + "/admin")  # still logged in; the page's own form (with its token) works
    page.fill("form[action='/admin/users'] input[name=name]", "newbie")
    page.get_by_role("button", name="Create and show invite link").click()
    expect(page.locator("#invite-url")).to_contain_text("/invite/")
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(site.url + "/login")
