"""Real services for the app's tests: a throwaway PostgreSQL server and Debian's Chromium.

Plain helpers, no fixtures (those live in `tests/app/conftest.py`). Nothing is downloaded:
PostgreSQL comes from Debian's `postgresql` package (/usr/lib/postgresql/N/bin), the browser is
Debian's `chromium` driven by Playwright (never `playwright install`). PostgreSQL refuses to run as
root, so when the tests run as root its commands go through `runuser -u postgres --`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# --no-sandbox: Chromium's sandbox refuses to start as root. The background-networking flags stop
# Chromium phoning home, which a closed network answers with refused connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
]
PG_USER = "postgres"


def services_required() -> bool:
    """CI sets ALIGNKIT_REQUIRE_SERVICES=1: a missing service is then a failure, not a skip."""
    return os.environ.get("ALIGNKIT_REQUIRE_SERVICES") == "1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_root() -> bool:
    return os.geteuid() == 0


def pg_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/N/bin holding initdb and pg_ctl, else pg_ctl's folder on PATH."""

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(os.path.join(d, "pg_ctl"), os.X_OK) and os.access(os.path.join(d, "initdb"), os.X_OK):
            return Path(d)
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb", path=os.path.dirname(on_path)):
        return Path(on_path).parent
    return None


def missing_postgres() -> str | None:
    """Why a PostgreSQL server can't be started here, or None when it can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[app]')"
    if pg_bin_dir() is None:
        return "PostgreSQL not found (no /usr/lib/postgresql/*/bin/pg_ctl; apt-get install postgresql)"
    if _is_root():
        if shutil.which("runuser") is None:
            return "running as root, and `runuser` (needed to run PostgreSQL as postgres) is missing"
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return "running as root, and there is no `postgres` user to run PostgreSQL as"
    return None


def missing_chromium() -> str | None:
    """Why Chromium can't be driven here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    return None


def launch_chromium(playwright, **kwargs):
    """A headless Chromium browser from a Playwright (sync or async) instance, e.g. `sync_playwright()`."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, **kwargs)


def _traversable_by_others(path: str) -> bool:
    """Whether a non-root user can reach into `path` (every ancestor has the others-execute bit)."""
    p = Path(path).resolve()
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in [p, *p.parents])


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1, data in a temporary folder, removed on exit.

        with PostgresServer() as pg:
            engine = sqlalchemy.create_engine(pg.url)
            other_url = pg.create_database("other")

    Trust authentication, superuser `postgres`, fsync off (test data only). The Unix socket lives
    in the temporary folder too, so it never clashes with a system server.
    """

    def __init__(self) -> None:
        self.bin = pg_bin_dir()
        self.dir: Path | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"
        self._started = False

    # -- running commands ---------------------------------------------------------------------
    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if _is_root():
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        # cwd: the postgres user may not be able to enter the caller's working directory.
        proc = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr.strip()}\n{proc.stdout.strip()}".strip()
            )
        return proc

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_file(self) -> Path:
        return self.dir / "server.log"

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "PostgresServer":
        if self.bin is None:
            raise RuntimeError(missing_postgres() or "PostgreSQL not found")
        base = None
        if _is_root() and not _traversable_by_others(tempfile.gettempdir()):
            base = "/tmp"  # $TMPDIR is private to root; the postgres user must reach its folder
        self.dir = Path(tempfile.mkdtemp(prefix="alignkit-pg-", dir=base))
        try:
            if _is_root():
                shutil.chown(self.dir, user=PG_USER)
            self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", PG_USER,
                      "-E", "UTF8", "--locale=C", "--no-sync")
            # A port can be taken between free_port() and the server binding it: retry a couple of times.
            for attempt in range(3):
                self.port = free_port()
                options = (f"-p {self.port} -k {self.dir} -c listen_addresses={self.host} "
                           "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
                try:
                    # -l: the server's output goes to a file; otherwise it would hold our pipes open.
                    self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file),
                              "-o", options, "-w", "-t", "30", "start")
                    break
                except RuntimeError as e:
                    log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
                    if attempt < 2 and "already in use" in log:
                        continue
                    raise RuntimeError(f"{e}\n--- server log ---\n{log.strip()[-4000:]}") from None
            self._started = True
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            if self._started:
                self._started = False
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------------------
    def url_for(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of a database on this server."""
        return f"postgresql+psycopg://{PG_USER}@{self.host}:{self.port}/{database}"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the default `postgres` database."""
        return self.url_for("postgres")

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name`; returns its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(host=self.host, port=self.port, user=PG_USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)


# ---------------------------------------------------------------- the app as a real server process

APP_SECRET = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz"
ADMIN_PASSWORD = "admin-password-1"


class AppServer:
    """`python -m alignkit app ARGS` in a subprocess on 127.0.0.1, for tests that need a real server
    (browsers, SIGKILL and restart). `.url` is its base URL; `.kill()` sends SIGKILL; `.start()`
    starts it again on the same port and database.
    """

    def __init__(self, *args: str, port: int | None = None, env: dict | None = None, log: Path | None = None):
        import sys

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "alignkit", "app", "--port", str(self.port), *args]
        self.env = {**os.environ, "ALIGNKIT_APP_SECRET": APP_SECRET, "ALIGNKIT_ADMIN_PASSWORD": ADMIN_PASSWORD,
                    "HF_HUB_OFFLINE": "1", **(env or {})}
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.output = ""

    def start(self, timeout: float = 120.0) -> AppServer:
        import time
        import urllib.request

        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = Path(self.log).read_text() if self.log else ""
                raise RuntimeError(f"{' '.join(self.cmd)} exited with {self.proc.returncode}\n{text}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{' '.join(self.cmd)} did not answer /healthz within {timeout} s")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as when a machine dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
