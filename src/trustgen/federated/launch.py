"""Starting a federation on this machine: a SuperLink and N SuperNodes as separate processes
on loopback, the Flower app submitted with `flwr run`, and the run's real outcome read back.

Flower's deployment engine is used as it runs across machines: every process talks over the
network API (TLS with a private CA unless `tls=False`), the SuperLink starts the ServerApp,
each SuperNode its ClientApp. Nothing is installed at run time
(`--disable-runtime-dependency-installation`) and telemetry is off (FLWR_TELEMETRY_ENABLED=0).
`flwr run` reports a run as started even when it later fails, so the run's status is polled
with `flwr ls` until it is finished, and anything but `finished:completed` is an error.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from trustgen import io
from trustgen.errors import TrustgenError
from trustgen.federated.tls import make_certificates

CONNECTION = "trustgen"
log = logging.getLogger("trustgen")

APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "trustgen-federated"
version = "1.0.0"
description = "trustgen's federated training app"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "trustgen"

[tool.flwr.app.components]
serverapp = "trustgen.federated.app:server_app"
clientapp = "trustgen.federated.app:client_app"

[tool.flwr.app.config]
run-dir = {run_dir}
"""


def flower_command(name: str) -> str:
    """The path of one of Flower's commands installed beside this Python."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise TrustgenError(f"federated training needs Flower ({name} was not found); "
                            "pip install 'trustgen[federated]'.")
    return found


def require_flower() -> None:
    """Fail with a sentence, before anything is written, where Flower is not installed."""
    for name in ("flower-superlink", "flower-supernode", "flwr"):
        flower_command(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def flower_env(home: Path, clients: int = 1) -> dict[str, str]:
    """The environment of every Flower process: its own home folder, no telemetry, this
    Python's commands first on the path (the SuperLink and SuperNodes start Flower's helper
    processes by name), the CPU cores shared among clients that train side by side, and the
    SuperExecs looking for work every 0.1 s rather than every second (each round's message
    waits for one)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // clients))
    return {**os.environ, "PATH": path, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads,
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def write_app(folder: Path, run_dir: Path) -> Path:
    """The Flower app's folder: only its pyproject.toml (the code is trustgen's own)."""
    folder.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(folder / "pyproject.toml", APP_PYPROJECT.format(run_dir=json.dumps(str(run_dir.resolve()))))
    return folder


class Federation:
    """A SuperLink and SuperNodes on loopback; a context manager that stops them on exit."""

    def __init__(self, folder: Path, data_dirs: list[Path], tls: bool = True) -> None:
        self.folder = Path(folder).resolve()
        self.data_dirs = [Path(d).resolve() for d in data_dirs]
        self.tls = tls
        self.logs = self.folder / "logs"
        self.home = self.folder / "flwr-home"
        self.env = flower_env(self.home, len(self.data_dirs))
        self.port = free_port()
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen | None] = []
        self.certs = make_certificates(self.folder / "certs") if tls else {}

    # -- processes --------------------------------------------------------------------------
    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 -- the child holds it
        try:
            return subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.folder,
                                    start_new_session=True)
        finally:
            out.close()

    def _security(self, server: bool) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        if server:
            return ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                    "--ssl-keyfile", str(self.certs["key"])]
        return ["--root-certificates", str(self.certs["ca"])]

    def start(self) -> Federation:
        self.home.mkdir(parents=True, exist_ok=True)
        self._write_connection()
        self.superlink = self._start("superlink", [
            flower_command("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation", *self._security(server=True)])
        self.supernodes = [self.start_supernode(i) for i in range(len(self.data_dirs))]
        return self

    def start_supernode(self, i: int) -> subprocess.Popen:
        """Start (or restart) client i's SuperNode."""
        node_config = f"data-dir={json.dumps(str(self.data_dirs[i]))} partition-id={i}"
        return self._start(f"supernode-{i}", [
            flower_command("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
            "--port", str(free_port()), "--node-config", node_config, *self._security(server=False)])

    def kill_supernode(self, i: int) -> None:
        """Kill client i's SuperNode at once (a crash, not a shutdown)."""
        node = self.supernodes[i]
        if node is not None and node.poll() is None:
            os.killpg(node.pid, 9)
            node.wait()

    def stop(self) -> None:
        for process in [*self.supernodes, self.superlink]:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, 15)
        for process in [*self.supernodes, self.superlink]:
            if process is not None:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, 9)
                    process.wait()

    def __enter__(self) -> Federation:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- the flwr CLI ------------------------------------------------------------------------
    def _write_connection(self) -> None:
        security = f'root-certificates = "{self.certs["ca"]}"' if self.tls else "insecure = true"
        io.atomic_write_text(self.home / "config.toml", f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                             f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n{security}\n')

    def flwr(self, *args: str, timeout: float = 120) -> dict:
        """Run a `flwr` command with JSON output; its parsed answer."""
        done = subprocess.run([flower_command("flwr"), *args, "--format", "json"], env=self.env, cwd=self.folder,
                              capture_output=True, text=True, timeout=timeout)
        text = done.stdout.strip()
        try:
            answer = json.loads(text[text.index("{"):]) if "{" in text else {}
        except json.JSONDecodeError:
            answer = {}
        if done.returncode != 0 or not answer.get("success"):
            detail = answer.get("error-message") or (done.stderr or text).strip().splitlines()[-1:] or ["no output"]
            raise TrustgenError(f"flwr {args[0]} failed: {detail if isinstance(detail, str) else detail[0]} "
                                f"(logs in {self.logs}).")
        return answer

    def run(self, app: Path, on_poll: Callable[[], bool] | None = None, poll_s: float = 1.0,
            ask_every_s: float = 10.0) -> dict:
        """Submit the app, wait for the run to finish, and return its `flwr ls` record; a run
        that did not complete is an error naming its status and the logs.

        Each `flwr ls` is a new Python process (about a CPU second), so the status is asked for
        every `ask_every_s`, and at once when `on_poll` (called every `poll_s`) says the run
        looks done."""
        run_id = self._submit(app)
        asked = time.monotonic()
        while True:
            time.sleep(poll_s)
            self._check_alive()
            looks_done = on_poll() if on_poll is not None else False
            if not looks_done and time.monotonic() - asked < ask_every_s:
                continue
            asked = time.monotonic()
            record = self.flwr("ls", CONNECTION, "--run-id", run_id)["runs"][0]
            if record["status"].startswith("finished"):
                break
        if record["status"] != "finished:completed":
            details = record.get("status-details") or "no details"
            raise TrustgenError(f"the federated run {run_id} ended {record['status']} ({details}); "
                                f"see {self.logs / 'superlink.log'}.")
        return record

    def _submit(self, app: Path) -> str:
        deadline = time.monotonic() + 60
        # the SuperLink takes a moment to listen; a failed `flwr run` costs a CPU second
        while time.monotonic() < deadline and not _listening(self.port):
            self._check_alive()
            time.sleep(0.1)
        while True:
            try:
                return str(self.flwr("run", str(Path(app).resolve()), CONNECTION)["run-id"])
            except TrustgenError:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def _check_alive(self) -> None:
        if self.superlink is not None and self.superlink.poll() is not None:
            raise TrustgenError(f"the SuperLink exited (code {self.superlink.returncode}); "
                                f"see {self.logs / 'superlink.log'}.")


__all__ = ["Federation", "flower_env", "require_flower", "write_app"]
