"""Two real ComfyUI servers on loopback joined by ComfyUI-Distributed (a master and one worker).

The engine's source is found as ComfyUI's is: ``$COMFYUI_DISTRIBUTED_PATH``, else
``~/comfy/ComfyUI-Distributed`` (a checkout of github.com/robertvoy/ComfyUI-Distributed); without
it the test fails and says where to put it. Each server gets its own copy in its throwaway base
directory's custom_nodes, because the engine keeps its settings (``gpu_config.json``: the master's
list of workers) inside its own folder; the source folder is never written to.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from harness.server import ComfyServer, ServerError

ENGINE_ENV = "COMFYUI_DISTRIBUTED_PATH"
DEFAULT_ENGINE = Path("~/comfy/ComfyUI-Distributed").expanduser()
ENGINE_FOLDER = "ComfyUI-Distributed"
ENGINE_FILES = ("distributed.py", "nodes/collector.py", "api/orchestration/prompt_transform.py")
WORKER_ID = "1"
TESTED_COMMIT = "a91f9fb081eb5fc27db429a7c3f35d2ef7ce4a50"  # 2026-04-08, v1.4.4; as scripts/setup.sh


def find_engine() -> Path:
    """The engine's checkout; a clear error when there is none (integration tests never skip)."""
    configured = os.environ.get(ENGINE_ENV)
    path = Path(configured).expanduser() if configured else DEFAULT_ENGINE
    missing = [name for name in ENGINE_FILES if not (path / name).is_file()]
    if missing:
        raise ServerError(
            f"ComfyUI-Distributed was not found at {path} (from {'$' + ENGINE_ENV if configured else 'the default place'}"
            f"; {', '.join(missing)} missing). Put a checkout there (tested at commit {TESTED_COMMIT}): "
            f"git clone https://github.com/robertvoy/ComfyUI-Distributed {path}, or set {ENGINE_ENV} to one "
            "(bash scripts/setup.sh fetches it to ~/comfy/ComfyUI-Distributed)."
        )
    return path


def install_engine(server: ComfyServer, engine: Path, workers: list[ComfyServer]) -> None:
    """A copy of the engine in ``server``'s custom_nodes; ``workers`` are its workers (none for a worker)."""
    target = server.base / "custom_nodes" / ENGINE_FOLDER
    shutil.copytree(engine, target, ignore=shutil.ignore_patterns(".git", "tests", "__pycache__", "gpu_config.json"))
    config = {
        "master": {"host": ""},
        "workers": [{"id": str(i + 1), "name": f"worker {i + 1}", "host": "127.0.0.1", "port": worker.port,
                     "type": "local", "enabled": True} for i, worker in enumerate(workers)],
        "settings": {"auto_launch_workers": False, "stop_workers_on_master_exit": False},
    }
    (target / "gpu_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")


def start_pair(comfy_dir: Path, base: Path) -> tuple[ComfyServer, ComfyServer]:
    """(master, worker), both answering HTTP with the pack and the engine loaded; stop both when done."""
    engine = find_engine()
    one_core = {"OMP_NUM_THREADS": "1"}  # two servers sampling at once on two cores, neither oversubscribed
    # COMFYUI_IS_WORKER: what the engine's own worker launcher sets (no master shutdown handlers).
    worker = ComfyServer(comfy_dir, base / "worker", env={**one_core, "COMFYUI_IS_WORKER": "1"})
    master = ComfyServer(comfy_dir, base / "master", env=one_core)
    for server, its_workers in ((worker, []), (master, [worker])):
        (server.base / "custom_nodes").mkdir(parents=True)
        install_engine(server, engine, its_workers)
    try:
        for server in (worker, master):  # from this thread: a server dies with the thread that started it
            server.start()
            if "DistributedCollector" not in server.object_info():
                raise ServerError(f"ComfyUI did not load ComfyUI-Distributed from {engine}." + server.log_tail())
    except BaseException:
        master.stop()
        worker.stop()
        raise
    return master, worker


def queue_distributed(master: ComfyServer, prompt: dict, worker_ids=(WORKER_ID,)) -> str:
    """POST /distributed/queue (the engine's own entry point, as its sidebar's Queue button):
    the master runs ``prompt`` and sends it to the workers; returns the master's prompt_id."""
    reply = json.loads(master.request("/distributed/queue", {
        "prompt": prompt, "client_id": "consistent-story-test", "enabled_worker_ids": list(worker_ids),
    }))
    if reply.get("node_errors"):
        raise ServerError(f"/distributed/queue reported node errors: {json.dumps(reply['node_errors'], indent=1)}")
    if reply.get("worker_count") != len(worker_ids):
        raise ServerError(f"/distributed/queue reached {reply.get('worker_count')} of {len(worker_ids)} workers."
                          + master.log_tail())
    return reply["prompt_id"]
