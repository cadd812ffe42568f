"""Votes per second of the labelling API: concurrent annotators against a real `alignkit app` process.

    .venv/bin/python benchmarks/app_votes.py                          # SQLite, 50 annotators offering 300 votes/s
    .venv/bin/python benchmarks/app_votes.py --rate 0                 # as fast as they are answered (capacity)
    .venv/bin/python benchmarks/app_votes.py --database postgres --seconds 10

The target (SQLite, this 2-core machine): 50 concurrent annotators sustain >= 300 votes/s with a
p99 submit latency <= 100 ms; PostgreSQL is reported alongside. `meets_target` checks it on the
run's own figures (so only a run at `--rate 300` or `--rate 0` says anything about it).

Set-up, outside the clock: a fresh database (SQLite in a temporary folder, or a database on a
throwaway PostgreSQL server from tests/app/services.py), one pairwise campaign with overlap 1 and
enough items for the whole run, and `--annotators` accounts with bearer tokens, all written
through `alignkit.app.service` / `auth` before the server starts. The server is `python -m
alignkit app --database URL` in its own process (uvicorn, one worker: what a user runs), started
from `--server-root` (this checkout by default; another folder holding an `alignkit` package
compares two versions of the app on the same machine).

Each simulated annotator loops GET /next -> POST /judgements (a fresh Idempotency-Key per item),
one request at a time on its own keep-alive connection; all annotators share one asyncio loop in
this process. With `--rate R` each annotator starts a vote every `annotators / R` seconds (random
phase; when it falls behind it starts the next at once, never two at a time), so R is the offered
load; with `--rate 0` it starts the next vote as soon as the last is answered (a closed loop: the
rate is the server's capacity, and the latency is mostly queueing, about annotators / (2 x rate)).
Only requests that start after `--warmup` and finish inside the `--seconds` window count:
votes/s = 201 answers to submits / window; latencies are client-side (send to full response
read); `schedule_lag` is how late votes started against their schedule (a server that cannot keep
up shows here, not in the latencies); `errors` counts every non-2xx answer of the whole run (warm-up and
after the window too), and `stuck_after_window` the annotators still waiting for an
answer 10 s after the window closed. The load generator shares the machine's 2 cores with the
server, so it is a minimal HTTP/1.1 client on asyncio streams (`Connection`); its CPU seconds are
reported beside the server's (user and system, from /proc).

Durability is not relaxed for speed: SQLite runs as the app configures it (WAL, synchronous=FULL,
BEGIN IMMEDIATE), and the PostgreSQL server, which the test helper starts with fsync off, is restarted
with fsync, synchronous_commit and full_page_writes on (its defaults) before the run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if "--server-root" in sys.argv[:-1]:  # set-up writes the database with the served version's own schema
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--server-root") + 1]).resolve()))

CAMPAIGN = "bench"
TARGET = {"votes_per_s": 300, "submit_p99_ms": 100}


def percentiles(values: list[float]) -> dict:
    """n, p50 / p90 / p99 / max / mean in milliseconds (nearest rank)."""
    if not values:
        return {"n": 0}
    v = sorted(values)

    def rank(p: float) -> float:
        return round(1000 * v[min(len(v) - 1, max(0, int(round(p / 100 * len(v))) - 1))], 2)

    return {"n": len(v), "p50_ms": rank(50), "p90_ms": rank(90), "p99_ms": rank(99), "max_ms": round(1000 * v[-1], 2),
            "mean_ms": round(1000 * statistics.fmean(v), 2)}


def prepare_database(url: str, annotators: int, items: int) -> dict[str, str]:
    """Schema, one pairwise campaign of `items` items (overlap 1), the annotator accounts; returns name -> token."""
    from alignkit.app import auth, service
    from alignkit.app.db import connect

    sessions = connect(url)
    tokens = {}
    with sessions() as session:
        for i in range(annotators):
            tokens[f"a{i:03d}"] = auth.create_user(session, f"a{i:03d}")[1]
        new = [service.NewItem(f"Question {i}: which answer is better?", [(f"answer one to {i}", "m1"),
                                                                          (f"answer two to {i}", "m2")])
               for i in range(items)]
        service.create_campaign(session, CAMPAIGN, "pairwise", new, overlap=1, members=list(tokens))
    sessions.kw["bind"].dispose()
    return tokens


class Connection:
    """One keep-alive HTTP/1.1 connection: a request, then its whole response (Content-Length bodies only,
    which is all uvicorn sends for JSON). Far cheaper per request than a general client, which matters
    when the load generator shares two cores with the server."""

    def __init__(self, host: str, port: int, token: str):
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {token}\r\nHost: {host}:{port}\r\n"
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: str = "") -> tuple[int, dict, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\n{self.auth}{headers}"
                + (f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if method == "POST" else "")
                + "\r\n")
        self.writer.write(head.encode() + body)
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            fields = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.strip()
            data = await self.reader.readexactly(int(fields.get("content-length", "0")))
        except BaseException:
            self.close()
            raise
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, fields, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _count(out: dict, what: str) -> None:
    out["errors"][what] = out["errors"].get(what, 0) + 1


async def annotator(name: str, token: str, port: int, start: float, stop: float, interval: float, phase: float,
                    out: dict) -> None:
    """next -> submit until `stop`, a vote every `interval` s (0: back to back); records requests that start
    at or after `start` and end by `stop`."""
    conn = Connection("127.0.0.1", port, token)
    path = f"/api/campaigns/{CAMPAIGN}"
    choices = ("A", "B", "tie", "both_bad")
    scheduled = time.perf_counter() + phase
    n = 0
    try:
        while True:
            if interval:
                if scheduled > time.perf_counter():
                    await asyncio.sleep(scheduled - time.perf_counter())
            t0 = time.perf_counter()
            if t0 >= stop:
                return
            if interval:
                if t0 >= start:
                    out["lag"].append(max(0.0, t0 - scheduled))
                scheduled += interval
            status, _, data = await conn.request("GET", f"{path}/next")
            t1 = time.perf_counter()
            if status != 200:
                _count(out, f"next {status}")  # errors count whenever they come: warm-up, window or after
                continue
            if t0 >= start and t1 <= stop:
                out["next"].append(t1 - t0)
            item = json.loads(data)["item"]
            if item is None:
                out["ran_out"] += 1
                return
            body = json.dumps({"item_id": item["item_id"], "choice": choices[n % 4]}).encode()
            n += 1
            t0 = time.perf_counter()
            status, _, _ = await conn.request("POST", f"{path}/judgements", body,
                                              f"Idempotency-Key: {name}-{item['item_id']}\r\n")
            t1 = time.perf_counter()
            if status != 201:
                _count(out, f"submit {status}")
            elif t0 >= start and t1 <= stop:
                out["submit"].append(t1 - t0)
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        _count(out, type(e).__name__)
    finally:
        conn.close()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def drive(tokens: dict[str, str], port: int, args, server_pid: int) -> dict:
    out = {"next": [], "submit": [], "lag": [], "errors": {}, "ran_out": 0}
    interval = len(tokens) / args.rate if args.rate else 0.0
    rng = random.Random(0)
    t = time.perf_counter()
    start, stop = t + args.warmup, t + args.warmup + args.seconds
    tasks = [asyncio.create_task(annotator(name, token, port, start, stop, interval, rng.uniform(0, interval), out))
             for name, token in tokens.items()]
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    client0, server0 = os.times(), cpu_seconds(server_pid)
    await asyncio.sleep(max(0.0, stop - time.perf_counter()))
    client1, server1 = os.times(), cpu_seconds(server_pid)
    # A request still unanswered 10 s after the window closed counts as stuck (a server that stopped answering).
    _, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    out["stuck_after_window"] = len(pending)
    out["server_cpu"] = (server1[0] - server0[0], server1[1] - server0[1])
    out["client_cpu"] = (client1.user - client0.user, client1.system - client0.system)
    return out


class Server:
    """`python -m alignkit app --database URL` run from `root` (whose `alignkit` package is the one served)."""

    def __init__(self, url: str, work: Path, root: Path):
        from tests.app.services import ADMIN_PASSWORD, APP_SECRET, free_port

        self.port = free_port()
        self.log = work / "server.log"
        env = {**os.environ, "ALIGNKIT_APP_SECRET": APP_SECRET, "ALIGNKIT_ADMIN_PASSWORD": ADMIN_PASSWORD,
               "HF_HUB_OFFLINE": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "alignkit", "app", "--port", str(self.port),
                                          "--database", url, "--output_dir", str(work)],
                                         cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the server did not answer /healthz within 120 s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


DURABLE_PG = ("fsync", "synchronous_commit", "full_page_writes")


def make_durable(pg) -> dict:
    """The test helper starts its server with fsync, synchronous_commit and full_page_writes off on the
    command line (which ALTER SYSTEM cannot override): restart it with the defaults, all on, so that a
    commit is on disk before the app answers, as SQLite's synchronous=FULL makes it."""
    import psycopg

    pg._run("pg_ctl", "-D", str(pg.data_dir), "-l", str(pg.log_file), "-o",
            f"-p {pg.port} -k {pg.dir} -c listen_addresses={pg.host}", "-w", "-t", "30", "restart")
    with psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname="postgres", autocommit=True) as conn:
        got = {s: conn.execute(f"SHOW {s}").fetchone()[0] for s in DURABLE_PG}
        version = conn.execute("SHOW server_version").fetchone()[0]
    if set(got.values()) != {"on"}:
        raise RuntimeError(f"PostgreSQL settings did not take: {got}")
    return {"server_version": version, **got}


def run(args) -> dict:
    from tests.app.services import PostgresServer

    # enough items that the campaign never runs out: the offered rate (or 1000 votes/s in a closed loop)
    items = args.items or int((args.rate or 1000) * (args.warmup + args.seconds + 15) * 1.2)
    database_settings = {}
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as work:
        pg = None
        try:
            if args.database == "postgres":
                pg = PostgresServer().start()
                database_settings = make_durable(pg)
                url = pg.create_database("bench")
            else:
                url = f"sqlite:///{Path(work) / 'app.db'}"
                database_settings = {"journal_mode": "WAL", "synchronous": "FULL", "begin": "IMMEDIATE"}
            t = time.perf_counter()
            tokens = prepare_database(url, args.annotators, items)
            setup_s = time.perf_counter() - t
            server = Server(url, Path(work), Path(args.server_root).resolve())
            try:
                out = asyncio.run(drive(tokens, server.port, args, server.proc.pid))
            finally:
                server.stop()
                log = server.log.read_text(errors="replace")
        finally:
            if pg is not None:
                pg.stop()
    votes = len(out["submit"])
    server_cpu = sum(out["server_cpu"])
    report = {
        "database": args.database,
        "database_settings": database_settings,
        "annotators": args.annotators,
        "offered_votes_per_s": args.rate or "closed loop",
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "items": items,
        "votes": votes,
        "votes_per_s": round(votes / args.seconds, 1),
        "submit_latency": percentiles(out["submit"]),
        "next_latency": percentiles(out["next"]),
        "schedule_lag": percentiles(out["lag"]) if args.rate else None,
        "errors": out["errors"],
        "ran_out_of_items": out["ran_out"],
        "stuck_after_window": out["stuck_after_window"],
        "server_cpu_s": {"user": round(out["server_cpu"][0], 2), "system": round(out["server_cpu"][1], 2)},
        "server_cpu_ms_per_vote": round(1000 * server_cpu / votes, 2) if votes else None,
        "client_cpu_s": {"user": round(out["client_cpu"][0], 2), "system": round(out["client_cpu"][1], 2)},
        "server": {"root": str(Path(args.server_root).resolve()),
                   "uvicorn_http": "httptools" if importlib.util.find_spec("httptools") else "h11",
                   "uvicorn_loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"},
        "setup_s": round(setup_s, 2),
        "target": TARGET,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
    }
    report["meets_target"] = bool(
        votes and report["votes_per_s"] >= TARGET["votes_per_s"]
        and report["submit_latency"]["p99_ms"] <= TARGET["submit_p99_ms"]
        and not out["errors"] and not out["stuck_after_window"])
    if "Traceback" in log:
        report["server_log_tail"] = log[-2000:]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the window opens")
    parser.add_argument("--annotators", type=int, default=50, help="concurrent simulated annotators")
    parser.add_argument("--rate", type=float, default=TARGET["votes_per_s"],
                        help="votes/s offered by all annotators together; 0: each votes again as soon as answered")
    parser.add_argument("--items", type=int, default=0, help="campaign size (0: enough for the run)")
    parser.add_argument("--server-root", default=str(ROOT),
                        help="folder the server runs from: its `alignkit` package is the one served (default: this checkout)")
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
