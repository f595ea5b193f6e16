"""The real-systemd tier: Debian 12 booted under ``systemd-nspawn``, the package and the unit
installed as README.md says. ``scripts/test-systemd`` prepares the root and the wheels and runs
this directory; the ordinary suite does not collect it."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = os.environ.get("SIPPET_SYSTEMD_ROOT", "")
WHEELS = os.environ.get("SIPPET_SYSTEMD_WHEELS", "")
REPO = Path(__file__).resolve().parents[2]

collect_ignore_glob = [] if ROOT else ["test_*.py"]


class Container:
    """One booted container; commands run inside it through ``nsenter`` into its PID 1 (the
    host has no systemd or D-Bus, so no ``machinectl``)."""

    def __init__(self, root: Path, wheels: Path, log: Path) -> None:
        self.root = root
        self.wheels = wheels
        self.log = log
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 60.0) -> None:
        with self.log.open("wb") as log:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--quiet",
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    # The tree stays pristine: every change lives in a tmpfs for this run.
                    "--volatile=overlay",
                    "--machine=sippet-tier",
                    f"--directory={self.root}",
                    f"--bind-ro={self.wheels}:/wheels",
                    f"--bind-ro={REPO}:/src",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                # The machine cannot boot containers at all: not a failure of the unit.
                pytest.exit(
                    f"systemd-nspawn could not boot: {self.log.read_text()[-2000:]}", returncode=77
                )
            children = subprocess.run(
                ["ps", "--ppid", str(self.nspawn.pid), "-o", "pid="],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split()
            if children:
                self.leader = int(children[0])
                state = self.sh("systemctl is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the container did not boot: {self.log.read_text()[-3000:]}")

    def sh(
        self, script: str, *, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with ``sh -c`` inside the container."""
        done = subprocess.run(
            ["nsenter", f"--target={self.leader}", "--all", "--", "/bin/sh", "-c", script],
            capture_output=True,
            text=True,
            input=stdin,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{script!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        quoted = shlex.quote(path)
        self.sh(f"install -D -m {mode} /dev/null {quoted} && cat > {quoted}", stdin=text)

    def show(self, unit: str, prop: str) -> str:
        return self.sh(f"systemctl show -p {prop} --value {shlex.quote(unit)}").stdout.strip()

    def shutdown(self) -> None:
        if self.nspawn is None:
            return
        # nspawn turns SIGTERM into an orderly shutdown of the container.
        self.nspawn.terminate()
        try:
            self.nspawn.wait(30)
        except subprocess.TimeoutExpired:
            self.nspawn.kill()
            self.nspawn.wait()


@pytest.fixture(scope="session")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    box = Container(Path(ROOT), Path(WHEELS), tmp_path_factory.mktemp("systemd") / "nspawn.log")
    box.boot()
    try:
        # The install steps of README.md, with the wheels built from this checkout.
        box.sh(
            "python3 -m venv /opt/sippet-listener && "
            "/opt/sippet-listener/bin/pip install --quiet --no-index --find-links /wheels "
            "sippet-listener && "
            "install -d -m 0755 /etc/sippet-listener && "
            "install -m 0644 /src/systemd/sippet-listener.service /etc/systemd/system/ && "
            "install -m 0644 /src/systemd/sippet-listener@.service /etc/systemd/system/ && "
            "systemctl daemon-reload"
        )
        yield box
    finally:
        box.shutdown()
