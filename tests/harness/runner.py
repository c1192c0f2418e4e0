"""Run API-format prompts in-process, through ComfyUI's own validation and executor.

``run_prompt`` does what the server's prompt worker does with a queued prompt
(``execution.validate_prompt``, then ``PromptExecutor.execute``), minus the HTTP layer. Each
run gets a new executor, so no node output is cached from one run (or test) to the next.
``ksampler_graph`` builds the plain text-to-image graph that most tests start from.

ComfyUI modules are imported inside the functions: this file is loaded as a pytest plugin,
before the ``comfy`` fixture has put ComfyUI on ``sys.path``.
"""
from __future__ import annotations

import asyncio
import copy
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class GraphError(RuntimeError):
    """A prompt failed ComfyUI's validation or its execution; the message is ComfyUI's."""

    def __init__(self, stage: str, message: str, details: dict | None = None):
        super().__init__(f"{stage} failed: {message}")
        self.stage = stage
        self.details = details or {}


class ServerStub:
    """What ``PromptExecutor`` and its progress handler use of ``PromptServer``.

    Messages are recorded rather than sent; ``client_id`` stays None (no client), as for a
    prompt queued through the API without one.
    """

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


@dataclass
class GraphResult:
    """One executed prompt: its history ``outputs`` (``ui``) and every node's output values."""

    prompt_id: str
    ui: dict[str, dict]
    values: dict[str, list]
    messages: list[tuple[str, Any]] = field(repr=False)

    def output(self, node_id: str, slot: int = 0):
        """Output ``slot`` of node ``node_id`` (the first item when the node ran over a list)."""
        return self.output_list(node_id, slot)[0]

    def output_list(self, node_id: str, slot: int = 0) -> list:
        """Output ``slot`` of node ``node_id``, one item per execution of the node."""
        if node_id not in self.values:
            raise KeyError(f"node {node_id!r} produced no cached output; nodes with outputs: {sorted(self.values)}")
        return self.values[node_id][slot]

    def image_paths(self, node_id: str) -> list[Path]:
        """Files that an image-saving node (SaveImage, PreviewImage, ...) reported in its ui."""
        return [image_file(ref) for ref in self.ui.get(node_id, {}).get("images", [])]


def image_file(ref: dict) -> Path:
    """The file behind a ui image reference ``{"filename", "subfolder", "type"}``."""
    import folder_paths

    root = folder_paths.get_directory_by_type(ref.get("type", "output"))
    return Path(root, ref.get("subfolder", ""), ref["filename"])


def _validation_message(error: dict, node_errors: dict) -> str:
    lines = [f"{error['message']}: {error['details']}".rstrip(": ")]
    for node_id, entry in node_errors.items():
        for reason in entry["errors"]:
            lines.append(f"  node {node_id} ({entry['class_type']}): {reason['message']}: {reason['details']}")
    return "\n".join(lines)


def _execution_error(messages: list[tuple[str, Any]]) -> GraphError | None:
    for event, data in messages:
        if event == "execution_error":
            message = (
                f"node {data['node_id']} ({data['node_type']}) raised "
                f"{data['exception_type']}: {data['exception_message'].strip()}\n"
                + "".join(data["traceback"])
            )
            return GraphError("execution", message, data)
        if event == "execution_interrupted":
            return GraphError("execution", f"interrupted at node {data['node_id']}", data)
    return None


def graph_executor():
    """A new executor with its own ``ServerStub``, for ``run_prompt``."""
    import execution

    return new_executor(execution, ServerStub())


def new_executor(execution, server):
    """A classic-cache PromptExecutor across ComfyUI versions (``cache_args`` is required since v0.19;
    main.py gives a classic cache no RAM headroom, as here)."""
    import inspect

    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        cache_args = {"lru": 0, "ram": 0.0, "ram_inactive": 0.0}
        return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args=cache_args)
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)


def cached_outputs(cache, node_id: str):
    """A node's output values from the executor's output cache, across ComfyUI versions: newer
    caches have an async ``get`` and a sync ``get_local`` and store ``CacheEntry(ui, outputs)``."""
    value = cache.get_local(node_id) if hasattr(cache, "get_local") else cache.get(node_id)
    return getattr(value, "outputs", value)


def run_prompt(prompt: dict, extra_data: dict | None = None, executor=None) -> GraphResult:
    """Validate and execute ``prompt`` (API format); raise ``GraphError`` with ComfyUI's message.
    ``executor``: one from ``graph_executor`` to keep node outputs cached from an earlier run, as the
    server does between prompts (a loaded checkpoint is not loaded again)."""
    import execution

    prompt = copy.deepcopy(prompt)
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid or node_errors:
        error = error or {"message": "Some outputs failed validation", "details": ""}
        raise GraphError("validation", _validation_message(error, node_errors), node_errors)

    if executor is None:
        executor = graph_executor()
    server = executor.server
    server.messages = []  # this run's messages only
    executor.execute(prompt, prompt_id, dict(extra_data or {}), outputs)
    failure = _execution_error(executor.status_messages)
    if failure is not None:
        raise failure
    if not executor.success:
        raise GraphError("execution", "PromptExecutor reported failure without an error message")

    values = {node_id: cached_outputs(executor.caches.outputs, node_id) for node_id in executor.caches.outputs.all_node_ids()}
    return GraphResult(
        prompt_id=prompt_id,
        ui=executor.history_result["outputs"],
        values={node_id: value for node_id, value in values.items() if value is not None},
        messages=server.messages,
    )




@dataclass
class KSamplerGraph:
    """The nodes of a plain text-to-image graph; change any of them before ``prompt()``.

    To patch the model, add a node on ``checkpoint.out(0)`` and point the sampler at it:
    ``g.sampler.set_input("model", patch.out(0))``.
    """

    builder: Any
    checkpoint: Any
    positive: Any
    negative: Any
    latent: Any
    sampler: Any
    decode: Any
    save: Any

    def prompt(self) -> dict:
        return self.builder.finalize()


def ksampler_graph(
    ckpt_name: str,
    *,
    width: int = 64,
    height: int = 64,
    batch_size: int = 2,
    steps: int = 3,
    seed: int = 0,
    cfg: float = 5.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    positive: str = "a red fox in the snow",
    negative: str = "blurry",
    filename_prefix: str = "consistent_story_test",
) -> KSamplerGraph:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage."""
    from comfy_execution.graph_utils import GraphBuilder

    g = GraphBuilder(prefix="")  # plain ids "1", "2", ... and no shared prefix counter
    checkpoint = g.node("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    pos = g.node("CLIPTextEncode", clip=checkpoint.out(1), text=positive)
    neg = g.node("CLIPTextEncode", clip=checkpoint.out(1), text=negative)
    latent = g.node("EmptyLatentImage", width=width, height=height, batch_size=batch_size)
    sampler = g.node(
        "KSampler",
        model=checkpoint.out(0),
        positive=pos.out(0),
        negative=neg.out(0),
        latent_image=latent.out(0),
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        denoise=1.0,
    )
    decode = g.node("VAEDecode", samples=sampler.out(0), vae=checkpoint.out(2))
    save = g.node("SaveImage", images=decode.out(0), filename_prefix=filename_prefix)
    return KSamplerGraph(g, checkpoint, pos, neg, latent, sampler, decode, save)


try:
    import pytest
except ImportError:  # scripts/run_example.py uses run_prompt outside pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def graph_runner(comfy):
        """``run_prompt``, available once the real ComfyUI (and the pack) are loaded in-process."""
        return run_prompt

    @pytest.fixture()
    def released_after():
        """For tests that load whole checkpoints in a graph: their memory goes back when they end."""
        yield
        from harness.checkpoints import release_memory

        release_memory()
