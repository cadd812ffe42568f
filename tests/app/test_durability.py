"""Acknowledged judgements survive a SIGKILL of the server: 0 lost, 0 duplicated (SQLite and PostgreSQL).

1,000 submissions from 50 concurrent simulated annotators (20 each) against a real `alignkit app`
process. Midway the server is killed with SIGKILL (no shutdown handler runs) and started again on
the same port and database: a watcher thread counts the stored judgements (every millisecond near the
mark) and kills the server the moment the 500th is committed, so that the last submits are usually
committed but not yet answered. Every client retries a request that got no answer (connection refused or reset, or a 5xx)
with the same Idempotency-Key until it gets one; a submit whose answer the kill lost must then be
answered from the database (201 with Idempotent-Replayed: true) instead of being stored twice.

Afterwards the database is read directly: every acknowledged key is stored exactly once, under the
judgement id its 201 named, and nothing else is stored. Run with `-s` to see the counts line.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import create_engine, func, select, text

from tests.app.services import AppServer

ANNOTATORS = 50
PER_ANNOTATOR = 20
TOTAL = ANNOTATORS * PER_ANNOTATOR  # 1,000
KILL_AT = 500
CAMPAIGN = "durability"


def _prepare(url: str) -> dict[str, str]:
    """Schema, one pairwise campaign of 1,000 items (overlap 1), 50 annotators; returns name -> bearer token."""
    from alignkit.app import auth, service
    from alignkit.app.db import connect

    sessions = connect(url)
    try:
        with sessions() as session:
            tokens = {f"ann{i:02d}": auth.create_user(session, f"ann{i:02d}")[1] for i in range(ANNOTATORS)}
            items = [service.NewItem(f"Question {i}?", [(f"answer {i} one", None), (f"answer {i} two", None)])
                     for i in range(TOTAL)]
            service.create_campaign(session, CAMPAIGN, "pairwise", items, overlap=1, members=list(tokens))
    finally:
        sessions.kw["bind"].dispose()
    return tokens


class Run:
    """The clients' shared record: acknowledged submits, retries, replays, and the kill."""

    def __init__(self, server: AppServer, url: str):
        self.server, self.url = server, url
        self.acks: dict[str, tuple[str, int, int]] = {}  # key -> (annotator, item_id, judgement_id)
        self.retries = 0
        self.replayed = 0
        self.killed_after: int | None = None  # acknowledged submits when the server was killed
        self.stored_at_kill: int | None = None
        self.finished = threading.Event()

    async def request(self, client: httpx.AsyncClient, method: str, path: str, **kwargs) -> httpx.Response:
        """Send until the server answers below 500; the same request each time (same Idempotency-Key)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        delay = 0.02
        while True:
            try:
                response = await client.request(method, self.server.url + path, **kwargs)
                if response.status_code < 500:
                    return response
                why = f"{response.status_code} {response.text[:200]}"
            except httpx.TransportError as e:  # refused while down, reset by the kill, ...
                why = f"{type(e).__name__}: {e}"
            if loop.time() > deadline:
                raise AssertionError(f"{method} {path}: no answer for 60 s; last: {why}")
            self.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def annotator(self, name: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(headers=headers, timeout=30) as client:
            for _ in range(PER_ANNOTATOR):
                r = await self.request(client, "GET", f"/api/campaigns/{CAMPAIGN}/next")
                assert r.status_code == 200, r.text
                item = r.json()["item"]
                assert item is not None, f"{name}: no item left after {len(self.acks)} acknowledged submits"
                key = f"{name}-{uuid.uuid4().hex}"  # one key per item, reused by every retry of this submit
                r = await self.request(client, "POST", f"/api/campaigns/{CAMPAIGN}/judgements",
                                       json={"item_id": item["item_id"], "choice": "A"},
                                       headers={"Idempotency-Key": key})
                assert r.status_code == 201, f"{name}, item {item['item_id']}: {r.status_code} {r.text}"
                body = r.json()
                assert body["item_id"] == item["item_id"], body
                self.replayed += r.headers.get("Idempotent-Replayed") == "true"
                self.acks[key] = (name, item["item_id"], body["judgement_id"])

    def kill_at_commit(self) -> None:
        """In a thread: SIGKILL the server as soon as the KILL_AT-th judgement is in the database, then
        start it again (same port, same database) while the clients retry."""
        engine = create_engine(self.url)  # plain reads: SQLite in WAL mode lets them run beside the server's writes
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                stored = 0
                while stored < KILL_AT:
                    if self.finished.is_set():
                        return
                    # poll fast only near the mark: the kill should land between a commit and its answer
                    time.sleep(0.001 if len(self.acks) >= KILL_AT - 50 else 0.02)
                    stored = conn.execute(text("SELECT count(*) FROM judgements")).scalar_one()
        finally:
            engine.dispose()
        self.server.kill()  # SIGKILL, with the other annotators' requests in flight
        self.stored_at_kill, self.killed_after = stored, len(self.acks)
        self.server.start()

    async def main(self, tokens: dict[str, str]) -> None:
        killer = asyncio.create_task(asyncio.to_thread(self.kill_at_commit))
        try:
            await asyncio.gather(*(self.annotator(name, token) for name, token in tokens.items()))
        finally:
            self.finished.set()
            await killer


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_acknowledged_judgements_survive_sigkill(database, tmp_path, request):
    from alignkit.app.db import Judgement, make_engine

    if database == "postgres":
        url = request.getfixturevalue("postgres").create_database(f"durability_{uuid.uuid4().hex[:8]}")
    else:
        url = f"sqlite:///{tmp_path / 'app.db'}"
    tokens = _prepare(url)
    server = AppServer("--database", url, "--output_dir", str(tmp_path), log=tmp_path / "server.log").start()
    run = Run(server, url)
    try:
        # in a thread of its own: the session's Playwright browser, when loaded, keeps an event loop running here
        with ThreadPoolExecutor(1) as pool:
            pool.submit(lambda: asyncio.run(run.main(tokens))).result()
    finally:
        server.stop()

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Judgement.idempotency_key, Judgement.id, Judgement.user_id,
                                       Judgement.item_id)).all()
            per_key = dict(conn.execute(select(Judgement.idempotency_key, func.count())
                                        .group_by(Judgement.idempotency_key)).all())
            per_item = conn.execute(select(func.count()).select_from(
                select(Judgement.user_id, Judgement.item_id).group_by(Judgement.user_id, Judgement.item_id)
                .having(func.count() > 1).subquery())).scalar_one()
    finally:
        engine.dispose()
    stored = {key: (judgement_id, item_id) for key, judgement_id, _, item_id in rows}
    lost = [key for key in run.acks if key not in stored]
    duplicated = sum(n - 1 for n in per_key.values() if n > 1) + per_item
    wrong = [key for key, (_, item_id, judgement_id) in run.acks.items()
             if key in stored and stored[key] != (judgement_id, item_id)]
    unacknowledged = [key for key in stored if key not in run.acks]
    counts = (f"durability {database}: {len(run.acks)} acknowledged, {len(rows)} stored, {len(lost)} lost, "
              f"{duplicated} duplicated, {run.retries} retries, {run.replayed} replayed, "
              f"server killed after {run.killed_after} acks ({run.stored_at_kill} stored)")
    print(counts)
    assert len(run.acks) == TOTAL, counts
    assert run.killed_after is not None and run.stored_at_kill >= KILL_AT, counts
    assert run.retries > 0, f"no request had to be retried: the kill went unnoticed; {counts}"
    assert not lost and not duplicated and len(rows) == TOTAL, counts
    assert not wrong, f"stored under another judgement id or item than acknowledged: {wrong[:5]}; {counts}"
    assert not unacknowledged, f"stored but never acknowledged: {unacknowledged[:5]}; {counts}"
