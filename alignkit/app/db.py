"""The app's tables (SQLAlchemy 2) and the engine: SQLite in WAL mode by default, PostgreSQL by URL.

The schema is created and upgraded by the Alembic migrations beside this module
(`migrations/`), never by `create_all`, so a database made by an older version is
upgraded in place. What a user would lose is guarded by the database itself:

    judgements    unique (item, annotator)          an annotator never judges an item twice
                  unique (annotator, idempotency)   a retried submit is stored once
    assignments   unique (item, annotator)          the sides an annotator was shown, fixed once
    battles       vote set once (UPDATE ... WHERE vote IS NULL)
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import (JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint,
                        create_engine, event)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    """An admin or an annotator; logs in with a password (argon2 hash) or an invite token (sha256 stored)."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))  # admin | annotator
    password_hash: Mapped[str | None] = mapped_column(String(200))
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Campaign(Base):
    __tablename__ = "campaigns"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(20))  # pairwise | rank | thumbs
    guidelines: Mapped[str] = mapped_column(Text, default="")
    overlap: Mapped[int] = mapped_column(Integer, default=1)  # annotators per item
    source: Mapped[dict] = mapped_column(JSON, default=dict)  # where the responses came from
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Member(Base):
    """An annotator allowed to label a campaign (admins may label any)."""

    __tablename__ = "members"
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)


class Item(Base):
    """One prompt with the responses to judge: 2 (pairwise), K (rank) or 1 (thumbs)."""

    __tablename__ = "items"
    # next_item's search: the first item by position among those with a free slot
    __table_args__ = (Index("ix_items_free", "campaign_id", "assigned", "position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    assigned: Mapped[int] = mapped_column(Integer, default=0)  # live assignments; at most the campaign's overlap


class Response(Base):
    __tablename__ = "responses"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(200))


class Assignment(Base):
    """An item handed to an annotator, with the order its responses were shown in (randomised once)."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),
                      Index("ix_assignments_open", "campaign_id", "done", "created_at"),  # expired leases
                      Index("ix_assignments_user_open", "user_id", "campaign_id", "done"))  # an annotator's open item
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    shown: Mapped[list] = mapped_column(JSON)  # response ids, left to right
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Judgement(Base):
    """One annotator's decision on one item.

    choice: pairwise A | B | tie | both_bad; thumbs up | down; rank: "rank".
    shown: the response ids in the order they were shown (A = shown[0]).
    ranking: response ids best first (pairwise: [winner, loser]; None for tie / both_bad;
    thumbs: None).
    """

    __tablename__ = "judgements"
    __table_args__ = (UniqueConstraint("item_id", "user_id"), UniqueConstraint("user_id", "idempotency_key"),
                      Index("ix_judgements_campaign", "campaign_id", "id"),
                      Index("ix_judgements_campaign_user", "campaign_id", "user_id"))  # done_by_you
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    choice: Mapped[str] = mapped_column(String(20))
    shown: Mapped[list] = mapped_column(JSON)
    ranking: Mapped[list | None] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    seconds: Mapped[float | None]  # time from the item being shown to the submit, as the browser measured it
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Battle(Base):
    """A blind arena battle: two contestants' answers to one prompt, names hidden until the vote."""

    __tablename__ = "battles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    model_a: Mapped[str] = mapped_column(String(200))
    model_b: Mapped[str] = mapped_column(String(200))
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    vote: Mapped[str | None] = mapped_column(String(20))  # A | B | tie | both_bad
    vote_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    voted_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and foreign keys on every connection."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection: every transaction takes the write lock (BEGIN IMMEDIATE below), so a second
        # connection could only wait, in SQLite's busy handler, which polls with sleeps of up to 100 ms.
        # Waiting for the pool's one connection instead wakes the next request the moment it is free.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=1,
                               max_overflow=0, pool_timeout=30)

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _):  # per connection: WAL persists in the file, the rest does not
            conn.isolation_level = None  # transactions are begun below, not by the sqlite3 module
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the response is sent, even if the machine loses power.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            # IMMEDIATE takes the write lock up front. A deferred transaction that reads, then
            # writes after another writer committed, fails at once with "database is locked"
            # (the busy timeout cannot help it); an immediate one waits its turn instead.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]  # psycopg 3, not psycopg2
    return create_engine(url, pool_size=20, max_overflow=40, pool_pre_ping=True)


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (creates it on an empty database)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def connect(url: str) -> sessionmaker:
    """Engine, migrations, and a session factory (objects stay readable after commit)."""
    engine = make_engine(url)
    upgrade(engine)
    return sessionmaker(engine, expire_on_commit=False)
