"""The JSON API in-process (FastAPI's TestClient on SQLite): labelling, idempotency, arena, export."""

import json
import math
import time

import pytest
from sqlalchemy import select

from alignkit.app.db import Judgement, Response

PAIRWISE = [{"prompt": f"Question {i}?", "responses": [f"good answer {i}", f"bad answer {i}"],
             "models": ["good", "bad"]} for i in range(4)]


def create(admin, name, kind, items, overlap=1, annotators=("alice", "bob")):
    r = admin.post("/api/campaigns", json={"name": name, "kind": kind, "items": items, "overlap": overlap,
                                           "annotators": list(annotators), "guidelines": "Prefer *helpful* answers."})
    assert r.status_code == 201, r.text
    return r.json()


def next_item(client, campaign):
    r = client.get(f"/api/campaigns/{campaign}/next")
    assert r.status_code == 200, r.text
    return r.json()["item"]


def judge(client, campaign, item, key, **decision):
    return client.post(f"/api/campaigns/{campaign}/judgements", json={"item_id": item["item_id"], **decision},
                       headers={"Idempotency-Key": key})


@pytest.fixture
def app(make_app):
    handle = make_app()
    handle.admin = handle.client("admin")
    for name in ("alice", "bob", "carol"):
        handle.token(name)
    return handle


def test_pairwise_labelling_stores_the_side_and_replays_a_retry(app):
    create(app.admin, "p", "pairwise", PAIRWISE, overlap=2)
    alice = app.client("alice")
    item = next_item(alice, "p")
    assert item["kind"] == "pairwise" and sorted(item["responses"]) == sorted(PAIRWISE[0]["responses"])
    assert next_item(alice, "p") == item  # a reload shows the same item, same sides
    first = judge(alice, "p", item, "key-1", choice="A")
    assert first.status_code == 201
    again = judge(alice, "p", item, "key-1", choice="A")  # the client retried: same answer, nothing new stored
    assert again.status_code == 201 and again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert judge(alice, "p", item, "key-2", choice="B").status_code == 409  # one judgement per item
    with app.sessions() as s:
        rows = s.scalars(select(Judgement)).all()
        assert len(rows) == 1
        shown_left = s.get(Response, rows[0].shown[0]).text
    assert shown_left == item["responses"][0]  # A is what was on the left
    assert rows[0].ranking == rows[0].shown  # A won: [left, right]


def test_an_annotator_never_sees_an_item_twice_and_overlap_caps_annotators(app):
    create(app.admin, "o", "pairwise", PAIRWISE, overlap=2)
    seen = {}
    for name in ("alice", "bob", "admin"):
        client = app.client(name) if name != "admin" else app.admin
        seen[name] = []
        while (item := next_item(client, "o")) is not None:
            seen[name].append(item["item_id"])
            assert judge(client, "o", item, f"{name}-{item['item_id']}", choice="tie").status_code == 201
    assert all(len(v) == len(set(v)) for v in seen.values())
    assert len(seen["alice"]) == len(seen["bob"]) == 4 and seen["admin"] == []  # two annotators per item


def test_authorisation_of_campaigns(app):
    create(app.admin, "m", "thumbs", [{"prompt": "p", "responses": ["r"]}], annotators=["alice"])
    assert app.client("carol").get("/api/campaigns/m/next").status_code == 403
    assert app.client().get("/api/campaigns/m/next").status_code == 401
    assert app.client("alice").post("/api/campaigns", json={}).status_code == 403
    assert [c["name"] for c in app.client("carol").get("/api/campaigns").json()["campaigns"]] == []
    assert [c["name"] for c in app.client("alice").get("/api/campaigns").json()["campaigns"]] == ["m"]


def test_bad_requests_name_the_field(app):
    create(app.admin, "b", "rank", [{"prompt": "p", "responses": ["x", "y", "z"]}])
    alice = app.client("alice")
    item = next_item(alice, "b")
    r = judge(alice, "b", item, "k", ranking=[0, 0, 1])
    assert r.status_code == 422 and "ranking" in r.json()["detail"]
    r = alice.post("/api/campaigns/b/judgements", content=b"not json", headers={"Idempotency-Key": "k"})
    assert r.status_code == 422
    bad = app.admin.post("/api/campaigns", json={"name": "x", "kind": "pairwise", "items": [{"prompt": "p", "responses": ["a"]}]})
    assert bad.status_code == 422 and "2 responses" in bad.json()["detail"]


def _export(app, tmp_path, campaign, fmt):
    from alignkit.app.export import export

    out = tmp_path / f"{campaign}-{fmt}.jsonl"
    counts = export(app.url, campaign, fmt, str(out))
    return [json.loads(line) for line in out.read_text().splitlines()], counts


def test_export_formats(app, tmp_path):
    create(app.admin, "pw", "pairwise", PAIRWISE)
    create(app.admin, "rk", "rank", [{"prompt": "Rank these", "responses": ["first", "second", "third"]}])
    create(app.admin, "th", "thumbs", [{"prompt": "q1", "responses": ["nice"]}, {"prompt": "q2", "responses": ["rude"]}])
    alice = app.client("alice")
    choices = iter(["A", "B", "tie", "both_bad"])
    decisive = 0
    while (item := next_item(alice, "pw")) is not None:
        choice = next(choices)
        decisive += choice in "AB"
        assert judge(alice, "pw", item, f"pw{item['item_id']}", choice=choice).status_code == 201
    item = next_item(alice, "rk")
    order = [item["responses"].index(t) for t in ("first", "second", "third")]  # best first, by shown slot
    assert judge(alice, "rk", item, "rk", ranking=order).status_code == 201
    while (item := next_item(alice, "th")) is not None:
        assert judge(alice, "th", item, f"th{item['item_id']}", choice="up" if item["prompt"] == "q1" else "down").status_code == 201

    rows, counts = _export(app, tmp_path, "pw", "dpo")
    assert len(rows) == decisive == 2
    assert counts["tie: counted, not exported"] == 1 and counts["both_bad: counted, not exported"] == 1
    for row in rows:
        assert {"prompt", "chosen", "rejected", "campaign", "annotator", "item_id"} <= set(row)
        assert row["campaign"] == "pw"
    rows, _ = _export(app, tmp_path, "rk", "dpo")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("first", "second"), ("first", "third"), ("second", "third")]
    rows, _ = _export(app, tmp_path, "rk", "ranking")
    assert rows[0]["responses"] == ["first", "second", "third"]
    rows, _ = _export(app, tmp_path, "th", "kto")
    assert {r["completion"]: r["label"] for r in rows} == {"nice": True, "rude": False}
    rows, counts = _export(app, tmp_path, "th", "dpo")
    assert rows == [] and counts["skipped: thumbs judgements are not dpo data"] == 2


def test_exported_pairs_train_dpo_unchanged(app, tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.cli import main

    create(app.admin, "train", "pairwise", PAIRWISE)
    alice = app.client("alice")
    while (item := next_item(alice, "train")) is not None:
        good_side = "A" if item["responses"][0].startswith("good") else "B"
        assert judge(alice, "train", item, f"t{item['item_id']}", choice=good_side).status_code == 201
    out = tmp_path / "pairs.jsonl"
    assert main(["export", "--database", app.url, "--campaign", "train", "--format", "dpo", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["chosen"].startswith("good") for r in rows)
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(out), "--output_dir", str(tmp_path / "dpo"),
                 "--max_steps", "1", "--batch_size", "4", "--lr", "1e-2", "--eval_fraction", "0"]) == 0
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_arena_hides_names_until_the_vote_and_ranks_with_evals_code(make_app, tiny_model_dir):
    from alignkit.evaluate import arena

    app = make_app(arena=[f"one={tiny_model_dir}", f"two={tiny_model_dir}"], max_new_tokens=4)
    voter = app.client("voter")
    battle = voter.post("/api/arena/battles", json={"prompt": "What is 2+3?"})
    assert battle.status_code == 201
    body = battle.json()
    assert set(body) == {"battle_id", "prompt", "responses"} and "one" not in json.dumps(body)
    vote = voter.post(f"/api/arena/battles/{body['battle_id']}/vote", json={"vote": "A"}, headers={"Idempotency-Key": "v"})
    assert vote.status_code == 200 and {vote.json()["model_a"], vote.json()["model_b"]} == {"one", "two"}
    replay = voter.post(f"/api/arena/battles/{body['battle_id']}/vote", json={"vote": "A"}, headers={"Idempotency-Key": "v"})
    assert replay.status_code == 200 and replay.json() == vote.json()
    assert voter.post(f"/api/arena/battles/{body['battle_id']}/vote", json={"vote": "B"}).status_code == 409
    assert app.client("other").post(f"/api/arena/battles/{body['battle_id']}/vote", json={"vote": "B"}).status_code == 404

    # Four more battles, voted so that "one" wins 3 of 5 and ties 1.
    winner = vote.json()["model_a"]
    votes = []
    for v in ["tie", "A", "B", "A"]:
        b = voter.post("/api/arena/battles", json={"prompt": "What is 1+1?"}).json()
        r = voter.post(f"/api/arena/battles/{b['battle_id']}/vote", json={"vote": v}).json()
        votes.append((r["model_a"], r["model_b"], {"A": 1.0, "B": 0.0, "tie": 0.5}[v]))
    battles = [(vote.json()["model_a"], vote.json()["model_b"], 1.0), *votes]
    board = voter.get("/api/leaderboard").json()
    assert board["votes"] == 5
    assert board["rows"] == arena.leaderboard(battles, rounds=200, seed=0)
    # Hand check of the Bradley-Terry fit (prior: one tie between the two, half a win each):
    wins = {name: 0.5 + sum(s if a == name else 1 - s for a, b, s in battles) for name in ("one", "two")}
    expected_gap = 400 * math.log10(wins["one"] / wins["two"])  # p_one / p_two = W_one / W_two
    ratings = {r["model"]: r["bt"] for r in board["rows"]}
    assert abs((ratings["one"] - ratings["two"]) - expected_gap) < 1e-6
    assert winner in ratings


def test_the_server_refuses_a_missing_or_default_secret(tmp_path):
    from alignkit.app.auth import SecretError
    from alignkit.app.config import AppConfig
    from alignkit.app.server import prepare

    cfg = AppConfig(output_dir=str(tmp_path))
    for secret in ("", "changeme", "x" * 40, "short-but-random-7Gq"):
        with pytest.raises(SecretError):
            prepare(cfg, environ={"ALIGNKIT_APP_SECRET": secret, "ALIGNKIT_ADMIN_PASSWORD": "long-enough"})


def test_admin_agreement_equals_hand_computed_kappa_and_alpha(app):
    items = [{"prompt": f"q{i}", "responses": [f"first {i}", f"second {i}"]} for i in range(4)]
    create(app.admin, "agree", "pairwise", items, overlap=2, annotators=["alice", "bob"])
    wanted = {"alice": ["first", "first", "second", "tie"], "bob": ["first", "second", "second", "tie"]}
    for name, labels in wanted.items():
        client = app.client(name)
        while (item := next_item(client, "agree")) is not None:
            i = int(item["prompt"][1:])
            label = labels[i]
            choice = label if label == "tie" else "AB"[item["responses"].index(f"{label} {i}")]
            assert judge(client, "agree", item, f"{name}{i}", choice=choice).status_code == 201
    stats = app.admin.get("/api/admin/stats").json()["campaigns"][0]
    # Cohen: p_o = 3/4; marginals alice (first 2, second 1, tie 1), bob (1, 2, 1):
    # p_e = (2*1 + 1*2 + 1*1) / 16 = 5/16; kappa = (3/4 - 5/16) / (1 - 5/16) = 7/11.
    assert stats["kappas"] == [{"annotators": ["alice", "bob"], "items": 4, "kappa": pytest.approx(7 / 11)}]
    # Krippendorff (nominal): o_ff = 2, o_fs = o_sf = 1, o_ss = 2, o_tt = 2; n = (3, 3, 2), n = 8;
    # alpha = 1 - (n - 1) * (o_fs + o_sf) / (n^2 - sum n_c^2) = 1 - 7 * 2 / (64 - 22) = 2/3.
    assert stats["alpha"] == pytest.approx(2 / 3)
    assert [a["majority_agreement"] for a in stats["annotators"]] == [0.75, 0.75]
    assert app.client("alice").get("/api/admin/stats").status_code == 403


def test_an_abandoned_item_goes_back_to_the_pool_after_its_lease(make_app):
    app = make_app(lease_minutes=1e-6)  # every assignment expires at once
    admin = app.client("admin")
    alice, bob = app.client("alice"), app.client("bob")
    create(admin, "lease", "thumbs", [{"prompt": "only", "responses": ["r"]}])
    first = next_item(alice, "lease")
    time.sleep(0.01)
    taken = next_item(bob, "lease")  # alice's slot expired: bob gets the item
    assert taken is not None and taken["item_id"] == first["item_id"]
    assert judge(bob, "lease", taken, "b", choice="up").status_code == 201
    # alice's late submit finds her assignment gone, and the item's one slot taken
    assert judge(alice, "lease", first, "a", choice="down").status_code == 409
