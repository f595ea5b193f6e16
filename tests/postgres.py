"""A real PostgreSQL server for the test session, on loopback, in a directory of its own.

The server binaries come from ``$PATH``, then Debian's ``/usr/lib/postgresql/*/bin`` (the
newest), then the ``pgserver`` wheel if it is installed. PostgreSQL refuses to run as root, so
under root the server runs as the ``postgres`` user (``nobody`` if there is none) through
``setpriv``, in a directory that user owns. The server gets ``PR_SET_PDEATHSIG``: a test run
killed with ``kill -9`` leaves no server behind.

There is no skip: a machine without the binaries fails the tests that need them, with the
reason (``./scripts/test`` installs them on a fresh Debian machine).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

__all__ = ["PASSWORD", "PostgresServer", "find_binaries", "postgres_server"]

# Over TCP the server asks for it (SCRAM), as a production one would: the daemon's handling of
# a URL with a password (never logged) is tested for real.
PASSWORD = "pg-test-9d2f7c41e8"
# Durability is not what the tests check, and fsyncs are most of a commit's cost.
_FAST = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


def find_binaries() -> Path:
    """The directory holding ``initdb`` and ``postgres``.

    Raises:
        RuntimeError: none was found, saying where it looked.
    """
    candidates: list[Path] = []
    on_path = shutil.which("postgres") or shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    # The numerically newest version first (sorted as strings, "9" would beat "15").
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    candidates += [Path(path) for path in debian]
    with contextlib.suppress(ImportError):
        import pgserver  # type: ignore[import-not-found, unused-ignore]

        candidates.append(Path(pgserver.__file__).parent / "pginstall" / "bin")
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    raise RuntimeError(
        "no PostgreSQL server binaries (initdb, postgres) on $PATH, in "
        "/usr/lib/postgresql/*/bin or from the pgserver package: install Debian's "
        "'postgresql' (./scripts/test does so when run as root)"
    )


def _version(path: str) -> int:
    part = Path(path).parent.name
    return int(part) if part.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    """A running server: connect as ``postgres`` over TCP on loopback, with the password."""

    port: int
    process: subprocess.Popen[bytes]
    directory: Path
    # How to start it again (see halt() and resume()).
    command: list[str]

    def url(self, database: str = "postgres") -> str:
        """A URL for ``database``, with the password."""
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, template: str = "template0") -> str:
        """Create ``name`` as a copy of ``template``; return its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def halt(self) -> None:
        """Stop the server as an operator would (SIGINT: fast shutdown: sessions are ended,
        and what was committed is written, ``synchronous_commit=off`` or not), keeping its
        files: :meth:`resume` starts it again."""
        self._end(signal.SIGINT)

    def _end(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def resume(self, timeout: float = 30.0) -> None:
        """Start the halted server again, on the same port and data directory, and wait
        until it answers. Call it from the main thread: the server gets its
        ``PR_SET_PDEATHSIG`` when the thread that started it ends, not only the process.

        Raises:
            RuntimeError: it did not start (with its log).
        """
        assert self.process.poll() is not None, "the server is running"
        self.process = _launch(self.command, self.directory / "server.log")
        self.wait_until_up(timeout)

    def ensure_running(self) -> None:
        """Resume the server if a test halted it and failed before resuming it: tests share
        it, and one failure must not turn into errors in every test after it."""
        if self.process.poll() is not None:
            self.resume()

    def wait_until_up(self, timeout: float) -> None:
        """Wait until the server answers.

        Raises:
            RuntimeError: it ended, or did not answer within ``timeout`` seconds (with its
                log).
        """
        log = self.directory / "server.log"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    self.process.wait()
                    raise RuntimeError(
                        f"PostgreSQL did not start: {log.read_text(errors='replace')[-2000:]}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server at once (SIGQUIT: immediate shutdown) and remove its files."""
        self._end(signal.SIGQUIT)
        shutil.rmtree(self.directory, ignore_errors=True)


def _as_server_user() -> tuple[list[str], int | None]:
    """The command prefix that runs a server binary, and the uid that must own its files."""
    prefix = ["setpriv", "--pdeathsig", "QUIT"] if shutil.which("setpriv") else []
    if os.geteuid() != 0:
        return prefix, None
    if not prefix:
        raise RuntimeError("running as root, PostgreSQL needs setpriv (util-linux) to drop it")
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        ids = [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        return [*prefix, *ids], user.pw_uid
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user exists")


def _run(command: list[str], log: Path) -> None:
    with log.open("ab") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise RuntimeError(f"{command[-1]!r} failed: {log.read_text(errors='replace')[-2000:]}")


@contextlib.contextmanager
def postgres_server(timeout: float = 30.0) -> Iterator[PostgresServer]:
    """Initialise and start a server; stop it and remove its files on exit.

    Raises:
        RuntimeError: no binaries, or the server did not start (with its log).
    """
    binaries = find_binaries()
    prefix, owner = _as_server_user()
    # Not under pytest's tmp_path: its parents are private to root, closed to the server.
    directory = Path(tempfile.mkdtemp(prefix="sippet-pg-"))
    data, sockets, log = directory / "data", directory / "run", directory / "server.log"
    password = directory / "password"
    sockets.mkdir()
    log.touch()
    password.write_text(PASSWORD)
    if owner is not None:
        for path in (directory, sockets, log, password):
            os.chown(path, owner, -1)
    try:
        _run(
            [
                *prefix,
                str(binaries / "initdb"),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={password}",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
                f"--pgdata={data}",
            ],
            log,
        )
        server = _start(binaries, prefix, data, sockets, log, directory, timeout)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    try:
        yield server
    finally:
        server.stop()


def _start(
    binaries: Path,
    prefix: list[str],
    data: Path,
    sockets: Path,
    log: Path,
    directory: Path,
    timeout: float,
) -> PostgresServer:
    port = _free_port()
    settings = ["listen_addresses=127.0.0.1", f"port={port}", f"unix_socket_directories={sockets}"]
    settings += ["max_connections=200", *_FAST]
    options = [part for setting in settings for part in ("-c", setting)]
    command = [*prefix, str(binaries / "postgres"), "-D", str(data), *options]
    server = PostgresServer(port, _launch(command, log), directory, command)
    server.wait_until_up(timeout)
    return server


def _launch(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
