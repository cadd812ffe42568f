"""What the app does, as plain functions on a SQLAlchemy session: no HTTP here.

Routes (server.py) parse, authorise and call these; tests call them directly. Each
function that writes commits before it returns, so a route answers only after its
write is durable. Errors a client can fix raise `AppError(status, message)`.

Labelling: `next_item` hands an annotator the first item that still has room (fewer
than `overlap` live assignments) and that they have not seen, with its responses in
an order drawn once and stored (the side each response was shown on). `submit`
stores one judgement per (item, annotator); with an idempotency key, a retried submit
returns the stored result instead of a second row.
"""

from __future__ import annotations

import datetime as dt
import math
import time
import secrets
from dataclasses import dataclass

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from alignkit.app.db import Assignment, Battle, Campaign, Item, Judgement, Member, Response, User, utcnow

KINDS = ("pairwise", "rank", "thumbs")
CHOICES = {"pairwise": ("A", "B", "tie", "both_bad"), "thumbs": ("up", "down"), "rank": ("rank",)}
VOTES = ("A", "B", "tie", "both_bad")
_random = secrets.SystemRandom()  # sides and battle pairs: not predictable by an annotator


class AppError(Exception):
    """A request the client can fix: `status` is the HTTP status the route answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------- campaigns


@dataclass
class NewItem:
    """A prompt and its responses (text, model name or None) for a new campaign."""

    prompt: str
    responses: list[tuple[str, str | None]]


def create_campaign(session: Session, name: str, kind: str, items: list[NewItem], *, guidelines: str = "",
                    overlap: int = 1, source: dict | None = None, members: list[str] = ()) -> Campaign:
    """Store a campaign with its items; responses per item: 2 (pairwise), K >= 2 (rank), 1 (thumbs)."""
    if kind not in KINDS:
        raise AppError(422, f"campaign kind {kind!r} is not one of {', '.join(KINDS)}")
    if not name or len(name) > 100 or not all(c.isalnum() or c in "-_." for c in name):
        raise AppError(422, f"campaign name {name!r}: use 1-100 letters, digits, '-', '_' or '.'")
    if overlap < 1:
        raise AppError(422, f"overlap must be at least 1, got {overlap}")
    if not items:
        raise AppError(422, f"campaign {name!r} has no items")
    sizes = {len(it.responses) for it in items}
    want = {"pairwise": {2}, "thumbs": {1}}.get(kind)
    if (want and sizes != want) or (kind == "rank" and (len(sizes) != 1 or min(sizes) < 2)):
        expected = {"pairwise": "2", "thumbs": "1", "rank": "the same K >= 2"}[kind]
        raise AppError(422, f"a {kind} campaign needs {expected} responses per item; got {sorted(sizes)}")
    if session.scalar(select(Campaign.id).where(Campaign.name == name)) is not None:
        raise AppError(409, f"a campaign named {name!r} exists")
    campaign = Campaign(name=name, kind=kind, guidelines=guidelines, overlap=overlap, source=source or {})
    session.add(campaign)
    session.flush()
    for position, it in enumerate(items):
        item = Item(campaign_id=campaign.id, position=position, prompt=it.prompt, assigned=0)
        session.add(item)
        session.flush()
        session.add_all(Response(item_id=item.id, position=j, text=text, model=model)
                        for j, (text, model) in enumerate(it.responses))
    for user_name in members:
        user = session.scalar(select(User).where(User.name == user_name))
        if user is None:
            raise AppError(422, f"campaign {name!r}: no user named {user_name!r}")
        session.add(Member(campaign_id=campaign.id, user_id=user.id))
    session.commit()
    return campaign


def add_member(session: Session, campaign: Campaign, user: User) -> None:
    if session.get(Member, (campaign.id, user.id)) is None:
        session.add(Member(campaign_id=campaign.id, user_id=user.id))
        session.commit()


def campaign_for(session: Session, name: str, user):
    """The campaign `name` (a row: id, name, kind, overlap, guidelines) if `user` may label it (admins:
    every campaign), else 404 / 403."""
    row = session.connection().execute(_CAMPAIGN_FOR, {"name": name, "uid": user.id}).first()
    if row is None:
        raise AppError(404, f"no campaign named {name!r}")
    if user.role != "admin" and row.member is None:
        raise AppError(403, f"{user.name} is not an annotator of campaign {name!r}")
    return row


def visible_campaigns(session: Session, user: User) -> list[dict]:
    """The campaigns `user` may label, with the number of items and of their own judgements."""
    query = select(Campaign).order_by(Campaign.id)
    if user.role != "admin":
        query = query.join(Member, Member.campaign_id == Campaign.id).where(Member.user_id == user.id)
    rows = []
    for c in session.scalars(query):
        items = session.scalar(select(func.count()).where(Item.campaign_id == c.id))
        mine = session.scalar(select(func.count()).where(Judgement.campaign_id == c.id, Judgement.user_id == user.id))
        total = session.scalar(select(func.count()).where(Judgement.campaign_id == c.id))
        rows.append({"name": c.name, "kind": c.kind, "overlap": c.overlap, "items": items, "judged_by_you": mine,
                     "judgements": total, "target": items * c.overlap})
    return rows


# ---------------------------------------------------------------- labelling


_last_sweep: dict[tuple[int, int], float] = {}  # (engine, campaign) -> when this process last swept it


def _release_expired(session: Session, campaign, lease: dt.timedelta) -> None:
    """Give back the slots of assignments shown but not judged within `lease` (an abandoned tab).

    Swept at most every lease / 10 (10 s at most) per campaign and process: a slot comes back a
    little after its lease ends, and the sweep's query stays off the hot path."""
    key, now = (id(session.get_bind()), campaign.id), time.monotonic()
    if now - _last_sweep.get(key, -math.inf) < min(10.0, lease.total_seconds() / 10):
        return
    _last_sweep[key] = now
    conn = session.connection()
    stale = conn.execute(_STALE, {"campaign": campaign.id, "before": utcnow() - lease}).all()
    for assignment_id, item_id in stale:
        # rowcount guards the decrement: of two requests releasing the same row, one frees its slot
        if conn.execute(_DROP_ASSIGNMENT, {"assignment": assignment_id}).rowcount == 1:
            conn.execute(_FREE_SLOT, {"item": item_id})


# The labelling hot path (campaign lookup, next item, submit) runs statements built once, here, on
# the session's Core connection: building the statements and ORM objects per request cost more
# CPU than running them, and the server's throughput is bound by that CPU.
_b = bindparam
_CAMPAIGN_FOR = (select(Campaign.id, Campaign.name, Campaign.kind, Campaign.overlap, Campaign.guidelines,
                        Member.user_id.label("member"))
                 .where(Campaign.name == _b("name"))
                 .outerjoin(Member, (Member.campaign_id == Campaign.id) & (Member.user_id == _b("uid"))))
_OPEN_ASSIGNMENT = (select(Assignment.item_id, Assignment.shown)
                    .where(Assignment.campaign_id == _b("campaign"), Assignment.user_id == _b("user"),
                           Assignment.done.is_(False)).order_by(Assignment.id).limit(1))
# `assigned IN (0 .. overlap-1)`, not `assigned < overlap`: with overlap 1 an equality, so the index
# (campaign_id, assigned, position) hands over the first free item without a scan. FOR UPDATE SKIP
# LOCKED (PostgreSQL; SQLite runs one writer at a time and ignores it): requests at the same moment
# take different items instead of queueing on the first one's row lock.
_FREE_ITEM = (select(Item.id)
              .where(Item.campaign_id == _b("campaign"), Item.assigned.in_(_b("slots", expanding=True)),
                     Item.id.not_in(select(Assignment.item_id).where(Assignment.user_id == _b("user"),
                                                                     Assignment.campaign_id == _b("campaign"))))
              .order_by(Item.position).limit(1).with_for_update(skip_locked=True, of=Item))
_STALE = select(Assignment.id, Assignment.item_id).where(
    Assignment.campaign_id == _b("campaign"), Assignment.done.is_(False), Assignment.created_at < _b("before"))
_DROP_ASSIGNMENT = delete(Assignment).where(Assignment.id == _b("assignment"), Assignment.done.is_(False))
_FREE_SLOT = update(Item).where(Item.id == _b("item")).values(assigned=Item.assigned - 1)
_TAKE_SLOT = (update(Item).where(Item.id == _b("item"), Item.assigned < _b("overlap"))
              .values(assigned=Item.assigned + 1))
_RESPONSE_IDS = select(Response.id).where(Response.item_id == _b("item")).order_by(Response.position)
_ITEM_VIEW = (select(Item.prompt, Response.id, Response.text).join(Response, Response.item_id == Item.id)
              .where(Item.id == _b("item")))
_DONE_BY = select(func.count()).where(Judgement.campaign_id == _b("campaign"), Judgement.user_id == _b("user"))
_BY_KEY = (select(Judgement.id, Judgement.item_id, Judgement.choice, Judgement.shown, Judgement.ranking)
           .where(Judgement.user_id == _b("user"), Judgement.idempotency_key == _b("key")))
_ASSIGNMENT_OF = (select(Assignment.id, Assignment.campaign_id, Assignment.shown, Assignment.done)
                  .where(Assignment.item_id == _b("item"), Assignment.user_id == _b("user")))
_INSERT_ASSIGNMENT = insert(Assignment)
_INSERT_JUDGEMENT = insert(Judgement).returning(Judgement.id)
_FINISH = update(Assignment).where(Assignment.id == _b("assignment"), Assignment.done.is_(False)).values(done=True)


def _item_view(conn, campaign, user_id: int, item_id: int, shown: list[int]) -> dict:
    rows = conn.execute(_ITEM_VIEW, {"item": item_id}).all()
    texts = {response_id: text for _, response_id, text in rows}
    done = conn.execute(_DONE_BY, {"campaign": campaign.id, "user": user_id}).scalar()
    return {"item_id": item_id, "kind": campaign.kind, "prompt": rows[0].prompt,
            "responses": [texts[i] for i in shown], "done_by_you": done}


def _acquire(conn, campaign, item_id: int, user) -> list[int] | None:
    """Take one of the item's `overlap` slots for `user`; returns the order its responses are shown in
    (drawn here, stored with the assignment), or None when the slots are gone."""
    if conn.execute(_TAKE_SLOT, {"item": item_id, "overlap": campaign.overlap}).rowcount != 1:
        return None
    shown = list(conn.execute(_RESPONSE_IDS, {"item": item_id}).scalars())
    _random.shuffle(shown)
    conn.execute(_INSERT_ASSIGNMENT, {"campaign_id": campaign.id, "item_id": item_id, "user_id": user.id,
                                      "shown": shown, "done": False})
    return shown


def next_item(session: Session, campaign, user, lease: dt.timedelta = dt.timedelta(hours=1)) -> dict | None:
    """The item `user` should judge next, or None when none is left for them.

    An open assignment is returned again (a reload shows the same item, same sides);
    otherwise the first item, by position, with a free slot that `user` never had.
    """
    conn = session.connection()
    open_ = conn.execute(_OPEN_ASSIGNMENT, {"campaign": campaign.id, "user": user.id}).first()
    if open_ is not None:
        view = _item_view(conn, campaign, user.id, open_.item_id, open_.shown)
        session.commit()  # end the transaction here, not when the request's session closes
        return view
    _release_expired(session, campaign, lease)
    params = {"campaign": campaign.id, "user": user.id, "slots": list(range(campaign.overlap))}
    for _ in range(20):  # another annotator may take the last slot between the select and the update
        item_id = conn.execute(_FREE_ITEM, params).scalar()
        if item_id is None:
            session.commit()
            return None
        try:
            shown = _acquire(conn, campaign, item_id, user)
        except IntegrityError:  # the same user, twice at once: the other request holds it
            session.rollback()
            return next_item(session, campaign, user, lease)
        if shown is not None:
            view = _item_view(conn, campaign, user.id, item_id, shown)
            session.commit()
            return view
    session.commit()
    return None


def _judgement_result(row) -> dict:
    return {"judgement_id": row.id, "item_id": row.item_id, "choice": row.choice, "shown": row.shown,
            "ranking": row.ranking}


def _decision(kind: str, shown: list[int], choice: str | None, ranking: list[int] | None) -> tuple[str, list | None]:
    """(choice, ranking as response ids best first) from what the annotator sent; positions are 0-based slots."""
    if kind == "rank":
        k = len(shown)
        if not isinstance(ranking, list) or sorted(ranking) != list(range(k)):
            raise AppError(422, f"'ranking' must order the {k} shown slots 0..{k - 1} best first, got {ranking!r}")
        return "rank", [shown[i] for i in ranking]
    if choice not in CHOICES[kind]:
        raise AppError(422, f"'choice' must be one of {', '.join(CHOICES[kind])} for a {kind} item, got {choice!r}")
    if kind == "pairwise" and choice in ("A", "B"):
        winner = 0 if choice == "A" else 1
        return choice, [shown[winner], shown[1 - winner]]
    return choice, None


def submit(session: Session, campaign, user, item_id: int, *, choice: str | None = None,
           ranking: list[int] | None = None, idempotency_key: str | None = None,
           seconds: float | None = None) -> tuple[dict, bool]:
    """Store `user`'s judgement of an item; returns (result, replayed).

    A key seen before for this user returns the stored result (replayed = True) and
    stores nothing. A second judgement of the same item under another key is a 409.
    """
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
        raise AppError(422, "Idempotency-Key must be 1 to 200 characters")

    def replay() -> tuple[dict, bool] | None:
        if idempotency_key is None:
            return None
        row = session.connection().execute(_BY_KEY, {"user": user.id, "key": idempotency_key}).first()
        if row is None:
            return None
        if row.item_id != item_id:
            raise AppError(422, f"Idempotency-Key {idempotency_key!r} was used for item {row.item_id}, not {item_id}")
        return _judgement_result(row), True

    if (stored := replay()) is not None:
        session.commit()
        return stored
    conn = session.connection()
    assignment = conn.execute(_ASSIGNMENT_OF, {"item": item_id, "user": user.id}).first()
    if assignment is None or assignment.campaign_id != campaign.id:
        session.rollback()
        raise AppError(409, f"item {item_id} is not assigned to {user.name} in campaign {campaign.name!r}"
                            " (ask for the next item first)")
    if assignment.done:
        session.rollback()
        raise AppError(409, f"{user.name} has already judged item {item_id}")
    try:
        decided, ranked = _decision(campaign.kind, assignment.shown, choice, ranking)
    except AppError:
        session.rollback()
        raise
    try:
        judgement_id = conn.execute(_INSERT_JUDGEMENT, {
            "campaign_id": campaign.id, "item_id": item_id, "user_id": user.id, "choice": decided,
            "shown": assignment.shown, "ranking": ranked, "idempotency_key": idempotency_key,
            "seconds": seconds}).scalar_one()
        # rowcount guards against a concurrent request (another key) judging the same assignment
        finished = conn.execute(_FINISH, {"assignment": assignment.id}).rowcount
        if finished != 1:
            session.rollback()
            raise AppError(409, f"{user.name} has already judged item {item_id}")
        session.commit()
    except IntegrityError:  # the same key, retried while the first attempt was still running
        session.rollback()
        if (stored := replay()) is not None:
            session.commit()
            return stored
        raise AppError(409, f"{user.name} has already judged item {item_id}") from None
    return {"judgement_id": judgement_id, "item_id": item_id, "choice": decided, "shown": assignment.shown,
            "ranking": ranked}, False


# ---------------------------------------------------------------- arena


def battle_outcome(vote: str) -> float:
    """The score of A in a battle: 1 (A), 0 (B), 1/2 (tie or both bad, as Chatbot Arena counts them)."""
    return {"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}[vote]


def pick_pair(names: list[str]) -> tuple[str, str]:
    """Two distinct contestants, uniformly at random, in random order."""
    if len(names) < 2:
        raise AppError(409, "the arena needs at least two contestants")
    a, b = _random.sample(names, 2)
    return a, b


def create_battle(session: Session, user: User, prompt: str, model_a: str, model_b: str, response_a: str,
                  response_b: str) -> dict:
    battle = Battle(user_id=user.id, prompt=prompt, model_a=model_a, model_b=model_b, response_a=response_a,
                    response_b=response_b)
    session.add(battle)
    session.commit()
    return {"battle_id": battle.id, "prompt": prompt, "responses": [response_a, response_b]}


def vote(session: Session, user: User, battle_id: int, choice: str, idempotency_key: str | None = None) -> tuple[dict, bool]:
    """Record the one vote of a battle and reveal both names; returns (result, replayed)."""
    if choice not in VOTES:
        raise AppError(422, f"'vote' must be one of {', '.join(VOTES)}, got {choice!r}")
    battle = session.get(Battle, battle_id)
    if battle is None or battle.user_id != user.id:
        raise AppError(404, f"no battle {battle_id} of {user.name}")
    changed = session.execute(update(Battle).where(Battle.id == battle_id, Battle.vote.is_(None))
                              .values(vote=choice, vote_key=idempotency_key, voted_at=utcnow())).rowcount
    session.commit()
    session.refresh(battle)
    if changed != 1 and not (idempotency_key is not None and battle.vote_key == idempotency_key):
        raise AppError(409, f"battle {battle_id} already has its vote")
    return {"battle_id": battle.id, "vote": battle.vote, "model_a": battle.model_a, "model_b": battle.model_b}, changed != 1


def arena_battles(session: Session) -> list[tuple[str, str, float]]:
    """Every voted battle as (a, b, score of a), in vote order: the input of `evaluate.arena`."""
    rows = session.execute(select(Battle.model_a, Battle.model_b, Battle.vote).where(Battle.vote.is_not(None))
                           .order_by(Battle.voted_at, Battle.id)).all()
    return [(a, b, battle_outcome(v)) for a, b, v in rows]


def leaderboard_of(battles: list[tuple[str, str, float]], rounds: int = 200, seed: int = 0) -> list[dict]:
    """`alignkit eval`'s leaderboard (Elo, Bradley-Terry with bootstrap intervals) on the votes."""
    from alignkit.evaluate import arena

    return arena.leaderboard(battles, rounds=rounds, seed=seed) if battles else []


def random_choice(values: list):
    return _random.choice(values)


def random_seed() -> int:
    return _random.randrange(2**31)


# ---------------------------------------------------------------- accounts and the admin page


def user_named(session: Session, name: str, missing_ok: bool = False) -> User | None:
    user = session.scalar(select(User).where(User.name == name))
    if user is None and not missing_ok:
        raise AppError(404, f"no user named {name!r}")
    return user


def campaign_named(session: Session, name: str) -> Campaign | None:
    return session.scalar(select(Campaign).where(Campaign.name == name))


def users(session: Session) -> list[dict]:
    return [{"id": u.id, "name": u.name, "role": u.role, "password": u.password_hash is not None}
            for u in session.scalars(select(User).order_by(User.id))]


def items_from_json(items) -> list[NewItem]:
    """Uploaded items: [{"prompt": str, "responses": [str, ...], "models": [str | null, ...]?}, ...]."""
    if not isinstance(items, list) or not items:
        raise AppError(422, "'items' must be a non-empty list of {prompt, responses[, models]}")
    out = []
    for i, it in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(it, dict) or not isinstance(it.get("prompt"), str):
            raise AppError(422, f"{where}: 'prompt' must be a string")
        responses = it.get("responses")
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            raise AppError(422, f"{where}: 'responses' must be a non-empty list of strings")
        models = it.get("models") or [None] * len(responses)
        if not isinstance(models, list) or len(models) != len(responses):
            raise AppError(422, f"{where}: 'models' must name each of the {len(responses)} responses")
        out.append(NewItem(it["prompt"], list(zip(responses, models))))
    return out


def agreement_label(kind: str, choice: str, ranking: list[int] | None, position: dict[int, int]) -> str:
    """What two annotators agree on, whatever sides they were shown: which of the item's responses won
    (by its stored position: "first" / "second"), tie / both_bad, the thumbs choice, or the whole
    ranking as positions ("2>0>1"), a nominal category. Positions, not response ids, so that the
    categories are shared across items and chance agreement is estimated over the whole campaign."""
    if kind == "pairwise":
        return ("first", "second")[position[ranking[0]]] if ranking else choice
    if kind == "rank":
        return ">".join(str(position[r]) for r in ranking)
    return choice


def campaign_stats(session: Session, campaign: Campaign) -> dict:
    """Progress per annotator and, on items judged by two or more, agreement: Cohen's kappa per pair
    of annotators, Krippendorff's alpha over all, and each annotator's agreement with the majority of
    the others (a careless annotator shows as an outlier)."""
    from alignkit.app import agreement

    rows = session.execute(select(Judgement.item_id, User.name, Judgement.choice, Judgement.ranking)
                           .join(User, User.id == Judgement.user_id)
                           .where(Judgement.campaign_id == campaign.id).order_by(Judgement.id)).all()
    items = session.scalar(select(func.count()).where(Item.campaign_id == campaign.id))
    position = dict(session.execute(select(Response.id, Response.position).join(Item, Item.id == Response.item_id)
                                    .where(Item.campaign_id == campaign.id)).all())
    labels = [(item, name, agreement_label(campaign.kind, choice, ranking, position))
              for item, name, choice, ranking in rows]
    per_item: dict[int, list[str]] = {}
    for item, _, label in labels:
        per_item.setdefault(item, []).append(label)
    overlapping = [v for v in per_item.values() if len(v) >= 2]
    alpha = None
    if overlapping:
        try:
            alpha = agreement.krippendorff_alpha(overlapping)
        except ValueError:
            alpha = None
    majority = agreement.majority_agreement(labels)
    annotators = {}
    for _, name, _ in labels:
        annotators.setdefault(name, 0)
        annotators[name] += 1
    choices: dict[str, int] = {}
    for _, _, choice, _ in rows:
        choices[choice] = choices.get(choice, 0) + 1
    kappas = [{"annotators": list(pair), **v} for pair, v in agreement.pairwise_kappas(labels).items()]
    return {
        "name": campaign.name, "kind": campaign.kind, "overlap": campaign.overlap, "items": items,
        "judgements": len(rows), "target": items * campaign.overlap, "choices": choices,
        "items_with_overlap": len(overlapping), "alpha": alpha, "kappas": kappas,
        "annotators": [{"name": n, "judgements": c, "majority_items": majority.get(n, {}).get("items", 0),
                        "majority_agreement": majority.get(n, {}).get("agreement")}
                       for n, c in sorted(annotators.items())],
    }


def admin_stats(session: Session) -> dict:
    return {"campaigns": [campaign_stats(session, c) for c in session.scalars(select(Campaign).order_by(Campaign.id))],
            "battles": session.scalar(select(func.count()).select_from(Battle)),
            "votes": session.scalar(select(func.count()).where(Battle.vote.is_not(None)))}
