"""Throwaway database servers on loopback for the multi-worker storage tests and the workers soak:
PostgreSQL and MariaDB from the Debian packages that `.ci/run` installs, each in a temporary folder,
on a free port, removed on exit. ``Unavailable`` says why one cannot start (tests skip with it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PASSWORD = "s3cret-pw"  # in every URL, so tests can check that no output or file carries it


class Unavailable(Exception):
    """The server's binaries or driver are missing, or it did not start: the reason, one line."""


def _binary(name: str, *globs: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for pattern in globs:
        hits = sorted(glob.glob(pattern), reverse=True)
        if hits:
            return hits[0]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


@contextlib.contextmanager
def postgres():
    """A PostgreSQL server; yields ``postgresql://bench:<PASSWORD>@127.0.0.1:<port>/postgres``."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise Unavailable("psycopg is not installed (pip install -e '.[test]')") from None
    initdb = _binary("initdb", "/usr/lib/postgresql/*/bin/initdb")
    pg_ctl = _binary("pg_ctl", "/usr/lib/postgresql/*/bin/pg_ctl")
    if not (initdb and pg_ctl):
        raise Unavailable("no PostgreSQL server binaries (initdb, pg_ctl) on this machine; .ci/run installs them")
    root = Path(tempfile.mkdtemp(prefix="bench-pg-"))  # not under pytest's 0700 folder: the server user reads it
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            user = pwd.getpwnam("nobody")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", user.pw_name, "--"]
    port = _free_port()
    data = root / "data"
    run = lambda *cmd: subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    try:
        made = run(initdb, "-D", str(data), "-A", "trust", "-U", "bench", "--no-sync")
        if made.returncode != 0:
            raise Unavailable(f"initdb failed: {_last_line(made.stderr) if made.stderr.strip() else made.returncode}")
        started = run(pg_ctl, "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                      f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        if started.returncode != 0:
            raise Unavailable(f"PostgreSQL did not start: {started.stderr.strip() or started.stdout.strip()}")
        try:
            yield f"postgresql://bench:{PASSWORD}@127.0.0.1:{port}/postgres"
        finally:
            run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def mariadb_binaries() -> tuple[str | None, str | None]:
    """(server, data-directory initialiser), from PATH or the Debian package's places."""
    server = _binary("mariadbd", "/usr/sbin/mariadbd") or _binary("mysqld", "/usr/sbin/mysqld")
    install = _binary("mariadb-install-db", "/usr/bin/mariadb-install-db") or _binary("mysql_install_db", "/usr/bin/mysql_install_db")
    return server, install


@contextlib.contextmanager
def mariadb():
    """A MariaDB (MySQL) server run as the current user; yields ``mysql://bench:<PASSWORD>@127.0.0.1:<port>/bench``
    (plain ``mysql://``, as the README writes it: the harness picks PyMySQL when mysqlclient is absent)."""
    try:
        import pymysql
    except ImportError:
        raise Unavailable("pymysql is not installed (pip install -e '.[test]')") from None
    server, install = mariadb_binaries()
    if not (server and install):
        raise Unavailable("no MariaDB server binaries (mariadbd, mariadb-install-db) on this machine; .ci/run installs them "
                          "(apt-get install mariadb-server)")
    root = Path(tempfile.mkdtemp(prefix="bench-mdb-"))  # short: a unix socket path has at most 107 bytes
    user = pwd.getpwuid(os.geteuid()).pw_name
    data, sock, log = root / "data", root / "sock", root / "error.log"
    proc = None
    try:
        made = subprocess.run([install, "--no-defaults", f"--datadir={data}", f"--user={user}", "--auth-root-authentication-method=normal",
                               "--skip-test-db", "--skip-name-resolve"], capture_output=True, text=True, timeout=180)
        if made.returncode != 0:
            raise Unavailable(f"mariadb-install-db failed: {_last_line(made.stderr or made.stdout)}")
        port = _free_port()
        proc = subprocess.Popen([server, "--no-defaults", f"--datadir={data}", f"--socket={sock}", f"--port={port}",
                                 "--bind-address=127.0.0.1", f"--pid-file={root / 'pid'}", f"--log-error={log}", f"--user={user}",
                                 "--skip-name-resolve", "--skip-log-bin", "--innodb-flush-log-at-trx-commit=0",
                                 "--innodb-buffer-pool-size=64M", "--max-connections=200"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while True:
            try:
                conn = pymysql.connect(unix_socket=str(sock), user="root", connect_timeout=2)
                break
            except pymysql.err.OperationalError:
                if proc.poll() is not None or time.time() > deadline:
                    reason = _last_line(log.read_text(errors="replace") if log.exists() else "")
                    raise Unavailable(f"MariaDB did not start: {reason}") from None
                time.sleep(0.3)
        with conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE bench")
            cur.execute(f"CREATE USER 'bench'@'%' IDENTIFIED BY '{PASSWORD}'")
            cur.execute("GRANT ALL ON bench.* TO 'bench'@'%'")
            conn.commit()
        yield f"mysql://bench:{PASSWORD}@127.0.0.1:{port}/bench"
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
