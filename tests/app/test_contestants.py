"""Arena contestants behind an OpenAI-compatible endpoint: `transformers serve` on a local checkpoint,
and a stub server that fails, on 127.0.0.1 only."""

import http.server
import threading

import pytest

from alignkit.app.contestants import Contestant, parse_contestants


def test_a_served_checkpoint_battles_a_local_one(make_app, served, tiny_model_dir):
    app = make_app(arena=[f"local={tiny_model_dir}", f"served=openai:{tiny_model_dir}@{served}"], max_new_tokens=6)
    voter = app.client("voter")
    battle = voter.post("/api/arena/battles", json={"prompt": "What is 2+3?"})
    assert battle.status_code == 201, battle.text
    assert all(isinstance(r, str) for r in battle.json()["responses"])
    vote = voter.post(f"/api/arena/battles/{battle.json()['battle_id']}/vote", json={"vote": "tie"}).json()
    assert {vote["model_a"], vote["model_b"]} == {"local", "served"}


class _Failing(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the http.server API
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": {"message": "overloaded"}}')

    def log_message(self, *args):
        pass


def test_a_failing_endpoint_is_a_clear_502_and_no_battle(make_app, tiny_model_dir, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        app = make_app(arena=[f"a=openai:m@{url}", f"b=openai:m@{url}"])
        r = app.client("voter").post("/api/arena/battles", json={"prompt": "hi"})
        assert r.status_code == 502, r.text
        assert "InternalServerError" in r.json()["detail"] and "overloaded" in r.json()["detail"]
        assert app.client("voter").get("/api/leaderboard").json()["votes"] == 0
    finally:
        server.shutdown()


def test_contestant_specs_are_checked_at_start(monkeypatch):
    with pytest.raises(ValueError, match="openai:MODEL@"):
        parse_contestants(["x=openai:no-url"])
    with pytest.raises(ValueError, match="own name"):
        parse_contestants(["a=p", "a=q"])
    monkeypatch.setenv("MY_KEY", "sk-test")
    c = Contestant("h", "openai-chat:gpt@https://api.example/v1", api_key_env="MY_KEY")
    assert c.is_endpoint and c._endpoint() == ("openai-chat", "gpt", "https://api.example/v1")
