"""A throwaway PostgreSQL cluster for tests and benchmarks: Debian's PostgreSQL binaries, a data
folder in a temporary directory, a free loopback port, unix sockets beside the data; and real
`facelab serve` replica processes over a gallery.

The server refuses to run as root, so under root the cluster belongs to the `postgres` system
user (made by Debian's package) and every command runs through `runuser`. Tests that need the
cluster skip, saying why, when the binaries are missing or it cannot start; CI installs the
`postgresql` package (scripts/install.sh), so there they run.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run here; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """initdb + pg_ctl in a temporary folder; `address(db)` gives a postgresql:// address."""

    def __init__(self) -> None:
        bins = [d for d in BIN_DIRS if (d / "pg_ctl").is_file()]
        if not bins:
            raise ClusterUnavailable(
                "PostgreSQL binaries not found under /usr/lib/postgresql "
                "(apt-get install postgresql; scripts/install.sh does it as root)"
            )
        self.bin = bins[0]
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ClusterUnavailable("running as root and no `postgres` user") from exc
            self.user = "postgres"
        self.root = Path(tempfile.mkdtemp(prefix="facelab-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.log = self.root / "server.log"
        if self.user:
            shutil.chown(self.root, self.user)
        self._databases = 0
        init = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
            check=False,
        )
        if init.returncode != 0:
            raise ClusterUnavailable(f"initdb failed: {init.stderr.strip()[-400:]}")
        self.start()

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root)
        if check and done.returncode != 0:
            raise ClusterUnavailable(f"{tool} failed: {done.stderr.strip()[-400:]}")
        return done

    def _ctl(self, *action: str, check: bool = True) -> subprocess.CompletedProcess:
        """`pg_ctl` on this cluster with its log and server options, waiting up to 60 s."""
        sockets = f"-c unix_socket_directories={self.root}"
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} {sockets}"
        common = ["-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60"]
        return self._run("pg_ctl", *common, *action, check=check)

    def start(self) -> None:
        done = self._ctl("start", check=False)
        if done.returncode != 0:
            log = self.log.read_text()[-600:] if self.log.exists() else ""
            raise ClusterUnavailable(f"pg_ctl start failed: {done.stderr.strip()} {log}")

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every open connection is closed by the server."""
        self._ctl("-m", "fast", "restart")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def address(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement with psql; its unaligned output."""
        done = self._run(
            "psql",
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            statement,
        )
        return done.stdout.strip()

    def new_database(self) -> str:
        """A fresh empty database; its address."""
        self._databases += 1
        name = f"gallery_{self._databases}"
        self.sql(f"CREATE DATABASE {name}")
        return self.address(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """One cluster for the test session (skips, saying why, where PostgreSQL cannot run)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg not installed (pip install 'facelab[postgres]')")
    try:
        cluster = Cluster()
    except ClusterUnavailable as exc:
        pytest.skip(f"PostgreSQL cannot start here: {exc}")
    yield cluster
    cluster.close()


class Replica:
    """One real `facelab serve` process (no keys, loopback) over `gallery`, started and waited
    for; `kill()` is SIGKILL, `stop()` a normal shutdown."""

    def __init__(self, gallery: str, model: str, *extra: str, log: Path | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        src = Path(__file__).resolve().parents[1] / "src"
        env = {
            **os.environ,
            "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, "-m", "facelab", "serve", "--model", model, "--gallery", gallery]
        cmd += ["--insecure-local", "--port", str(self.port), *extra]
        self._log = open(log or os.devnull, "ab")  # noqa: SIM115 (closed in stop/kill)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.startup_seconds = self._wait_ready()

    def _wait_ready(self, timeout: float = 300.0) -> float:
        import httpx

        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"facelab serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"facelab serve did not answer within {timeout:.0f} s")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
