"""The real ComfyUI host, imported in-process for a quiet headless CPU run.

``import_comfyui()`` finds ComfyUI with ``scripts/comfy_host.py``, configures it (``--cpu``,
no previews, output/temp/input/user folders in a private session directory), loads ComfyUI's
built-in extra nodes but no other custom node, then loads this pack with ComfyUI's own
``nodes.load_custom_node`` so ``NODE_CLASS_MAPPINGS`` holds the pack's nodes exactly as in a
real install. Usable outside pytest (GPU benchmarks: ``import_comfyui(cpu=False)``).
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import comfy_host

REPO_ROOT = Path(__file__).resolve().parents[2]
SESSION_SUBDIRS = ("output", "temp", "input", "user")


class ComfyUIMissing(RuntimeError):
    """No ComfyUI checkout was found; the message says where to put one."""


class PackLoadError(RuntimeError):
    """ComfyUI could not load this pack as a custom node package."""


def import_comfyui(session_dir: Path | str | None = None, cpu: bool = True) -> SimpleNamespace:
    """Import and set up ComfyUI once per process; later calls return the same namespace.

    Returns ``SimpleNamespace(comfy_dir, nodes, NODE_CLASS_MAPPINGS, session_dir)``.
    """
    if _pack_module_name() in sys.modules:
        return _current_env()
    try:
        comfy_dir = comfy_host.find_comfyui()
    except SystemExit as bad_path:  # $COMFYUI_PATH names no checkout
        raise ComfyUIMissing(str(bad_path)) from None
    if comfy_dir is None:
        raise ComfyUIMissing(comfy_host.missing_message())
    session = Path(session_dir) if session_dir else Path(tempfile.mkdtemp(prefix="consistent_story_comfy_"))
    _put_on_path(comfy_dir)
    _configure_args(cpu)
    import torch

    import comfy.utils

    # Two cores in CI; OMP_NUM_THREADS=1 when several test processes share the cores (OpenMP
    # threads that wait on each other under oversubscription slow everything down many times).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    comfy.utils.set_progress_bar_enabled(False)  # no tqdm bars in test output; progress hooks still run
    _use_session_folders(session)
    _load_nodes()
    return _current_env()


def _pack_module_name() -> str:
    """The sys.modules name nodes.load_custom_node gives a package folder."""
    return str(REPO_ROOT).replace(".", "_x_")


def _current_env() -> SimpleNamespace:
    """Read back from ComfyUI's own state, so no module-level state is kept here."""
    import folder_paths
    import nodes

    return SimpleNamespace(
        comfy_dir=Path(nodes.__file__).resolve().parent,
        nodes=nodes,
        NODE_CLASS_MAPPINGS=nodes.NODE_CLASS_MAPPINGS,
        session_dir=Path(folder_paths.get_output_directory()).parent,
    )


def _put_on_path(comfy_dir: Path) -> None:
    # First on the path: ComfyUI's top-level modules (nodes, utils, app, server) must win.
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))


def _configure_args(cpu: bool) -> None:
    """Set ComfyUI's command-line options before comfy.model_management reads them."""
    from comfy.cli_args import LatentPreviewMethod, args  # parses no argv: args parsing stays off

    if "comfy.model_management" in sys.modules and args.cpu != cpu:
        raise RuntimeError("comfy.model_management was imported before import_comfyui(): its device is chosen.")
    args.cpu = cpu
    if not cpu:  # GPU test runs keep the CPU's fp32 numerics, so the tests' tolerances still hold
        import torch

        args.force_fp32 = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.preview_method = LatentPreviewMethod.NoPreviews
    args.disable_api_nodes = True
    args.disable_all_custom_nodes = True


def _use_session_folders(session: Path) -> None:
    import folder_paths

    for name in SESSION_SUBDIRS:
        (session / name).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(session / "output"))
    folder_paths.set_temp_directory(str(session / "temp"))
    folder_paths.set_input_directory(str(session / "input"))
    folder_paths.set_user_directory(str(session / "user"))


def _load_nodes():
    """ComfyUI's core and built-in extra nodes, then this pack, as main.py does (no other packs)."""
    import hook_breaker_ac10a0
    import utils.extra_config  # noqa: F401  as main.py does, before nodes.py puts comfy/ (its utils.py) first on sys.path
    import nodes

    hook_breaker_ac10a0.save_functions()
    try:
        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        if failed:
            logging.info("ComfyUI extra nodes that did not import (missing optional deps): %s", failed)
        _load_pack(nodes)
    finally:
        hook_breaker_ac10a0.restore_functions()


def _load_pack(nodes) -> None:
    """Load the repo with nodes.load_custom_node; turn its logged-and-swallowed errors into one raise."""
    records: list[logging.LogRecord] = []
    handler = _ListHandler(records)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        loaded = asyncio.run(nodes.load_custom_node(str(REPO_ROOT), module_parent="custom_nodes"))
    finally:
        root.removeHandler(handler)
    if loaded:
        return
    messages = "\n".join(record.getMessage() for record in records)
    error = PackLoadError(f"ComfyUI failed to load the pack at {REPO_ROOT}:\n{messages}")
    try:  # load_custom_node logs an entrypoint error without its traceback: re-raise it chained
        pack = sys.modules.get(_pack_module_name())
        if pack is not None and hasattr(pack, "comfy_entrypoint"):
            asyncio.run(_node_list(pack))
    except Exception as cause:
        raise error from cause
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == _pack_module_name()]:
            del sys.modules[name]  # a later call retries instead of seeing a half-loaded pack
    raise error


async def _node_list(pack) -> list:
    extension = await pack.comfy_entrypoint()
    return await extension.get_node_list()


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__(level=logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


try:
    import pytest
except ImportError:  # benchmarks import this module without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def comfy(tmp_path_factory) -> SimpleNamespace:
        """The in-process ComfyUI host with this pack loaded; fails (never skips) without ComfyUI."""
        try:
            # CONSISTENT_STORY_TEST_DEVICE=gpu runs the same tests on ComfyUI's GPU (device runs).
            on_cpu = os.environ.get("CONSISTENT_STORY_TEST_DEVICE", "cpu") == "cpu"
            return import_comfyui(tmp_path_factory.mktemp("comfy_session"), cpu=on_cpu)
        except ComfyUIMissing as missing:
            message = str(missing)
        pytest.fail(message, pytrace=False)
