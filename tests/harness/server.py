"""A real ComfyUI server process with the pack installed, in a throwaway base directory.

``python main.py --cpu --listen 127.0.0.1`` runs from the ComfyUI found by
scripts/comfy_host.py with ``--base-directory`` (and ``--database-url``) pointing into a temp
folder, so models, custom_nodes, input, output, temp, user data and the database all live
there: ``custom_nodes/consistent-story`` links to this repository and
``models/checkpoints`` receives links to test checkpoints. Nothing is written to the user's
ComfyUI folders (bytecode included). All traffic is loopback HTTP with bounded timeouts.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import comfy_host

PACK_LINK_NAME = "consistent-story"
START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 30
RUN_TIMEOUT_S = 300
LOG_TAIL_LINES = 60

# Loopback only: never route these requests through a proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """The server died, did not start in time, failed to import the pack, or a prompt failed."""


def _die_with_parent() -> None:
    """Runs in the server's child process before exec: the kernel kills it when the test
    process dies, even by SIGKILL or the OOM killer, so no server outlives a killed run
    (Linux prctl PR_SET_PDEATHSIG; elsewhere only the normal ``stop()`` applies)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_base(base: Path, pack_dir: Path) -> None:
    """The folders ComfyUI expects under ``--base-directory``, with the pack linked in."""
    for sub in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_LINK_NAME).symlink_to(pack_dir, target_is_directory=True)


class ComfyServer:
    """One ``main.py`` process; ``start()`` returns once it answers HTTP with the pack loaded."""

    def __init__(self, comfy_dir: Path, base: Path, pack_dir: Path = comfy_host.PACK_ROOT, env: dict | None = None):
        self.comfy_dir = Path(comfy_dir)
        self.env = dict(env or {})  # added to this process's environment for the server
        self.base = Path(base)
        self.pack_dir = Path(pack_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "comfyui.log"
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    # -- process ---------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [
            sys.executable, "main.py", "--cpu",
            "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base),
            "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
        ]  # fmt: skip

    def start(self) -> "ComfyServer":
        prepare_base(self.base, self.pack_dir)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", **self.env)
        began = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.comfy_dir, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        try:
            self._wait_until_ready(began + START_TIMEOUT_S)
            self.start_seconds = time.monotonic() - began
            problem = self.pack_import_problem()
            if problem:
                raise ServerError(problem + self.log_tail())
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                self.request("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"ComfyUI did not answer on {self.url} within {START_TIMEOUT_S} s." + self.log_tail())
            time.sleep(0.25)

    def _check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise ServerError(f"ComfyUI exited with code {code}: {' '.join(self.command())}" + self.log_tail())

    def stop(self) -> None:
        """Terminate the server's process group; kill it if it does not exit in 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    # -- log -------------------------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        tail = "\n".join(self.log().splitlines()[-lines:])
        return f"\n--- last {lines} lines of {self.log_path} ---\n{tail}"

    def pack_log_lines(self) -> list[str]:
        """Log lines that name the pack's folder: its import-time line and any failure reasons."""
        pack_path = str(self.base / "custom_nodes" / PACK_LINK_NAME)
        return [line for line in self.log().splitlines() if pack_path in line]

    def pack_import_problem(self) -> str | None:
        """Why ComfyUI did not load the pack (its own log lines), or None if it did."""
        lines = self.pack_log_lines()
        timing = [line for line in lines if "seconds" in line]
        if not timing:
            return "ComfyUI never tried to load the pack (no import-time line for it)."
        if any("IMPORT FAILED" in line for line in timing):
            return "ComfyUI could not import the pack:\n" + "\n".join(lines)
        return None

    # -- HTTP ------------------------------------------------------------------------------
    def request(self, path: str, body: dict | None = None, timeout: float = REQUEST_TIMEOUT_S) -> bytes:
        """GET ``path``, or POST ``body`` as JSON; loopback only, always with a timeout."""
        data = None if body is None else json.dumps(body).encode()
        message = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with _HTTP.open(message, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str):
        return json.loads(self.request(path))

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt; return its prompt_id, or raise with ComfyUI's validation errors."""
        try:
            reply = json.loads(self.request("/prompt", {"prompt": prompt, "extra_data": extra_data or {}}))
        except urllib.error.HTTPError as error:
            raise ServerError(f"POST /prompt refused ({error.code}): {error.read().decode(errors='replace')}") from None
        if reply.get("node_errors"):
            raise ServerError(f"POST /prompt reported node errors: {json.dumps(reply['node_errors'], indent=1)}")
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        """Poll /history/<id> until the prompt is done; return its history entry."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if time.monotonic() > deadline:
                raise ServerError(f"prompt {prompt_id} not done after {timeout} s." + self.log_tail())
            time.sleep(0.2)

    def run(self, prompt: dict, timeout: float = RUN_TIMEOUT_S) -> dict:
        """Queue ``prompt``, wait for it, raise with ComfyUI's error if it failed."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
            detail = "\n".join(
                f"node {e['node_id']} ({e['node_type']}) raised {e['exception_type']}: {e['exception_message']}"
                for e in errors
            )
            raise ServerError(f"prompt failed on the server:\n{detail or entry['status']}")
        return entry

    def view(self, ref: dict) -> bytes:
        """The bytes of an output image reference ``{"filename", "subfolder", "type"}`` via /view."""
        return self.request("/view?" + urllib.parse.urlencode(ref))

    # -- models ----------------------------------------------------------------------------
    def add_checkpoint(self, path: Path) -> str:
        """Link a checkpoint file into the server's models/checkpoints; return its ckpt_name."""
        path = Path(path).resolve()
        link = self.base / "models" / "checkpoints" / path.name
        if not link.exists():
            link.symlink_to(path)
        return path.name


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A running ComfyUI server with the pack, shared by the session; stopped at the end."""
    comfy_dir = comfy_host.find_comfyui()
    if comfy_dir is None:
        pytest.fail(comfy_host.missing_message(), pytrace=False)
    server = ComfyServer(comfy_dir, tmp_path_factory.mktemp("comfy_server"))
    try:
        server.start()
    except ServerError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield server
    finally:
        server.stop()
