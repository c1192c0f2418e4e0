"""Plain text-to-image graphs on every CPU test checkpoint: the host works before any patch.

Outputs of random-weight models are noise: these tests check structure (shape, range, saved
files) and equality between the in-process and the server path, never looks.
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from harness.checkpoints import CPU_KINDS
from harness.runner import ksampler_graph

pytestmark = pytest.mark.integration

SIZE, BATCH, STEPS = 64, 2, 2


def small_graph(ckpt_name: str, prefix: str):
    return ksampler_graph(ckpt_name, width=SIZE, height=SIZE, batch_size=BATCH, steps=STEPS, filename_prefix=prefix)


def png_pixels(data) -> np.ndarray:
    with Image.open(data) as image:
        assert image.format == "PNG"
        assert image.size == (SIZE, SIZE)
        return np.asarray(image.convert("RGB"))


def saved_pixels(images: torch.Tensor) -> np.ndarray:
    """What SaveImage writes for an IMAGE batch: 255 * value, clipped, as uint8."""
    return np.clip(255.0 * images.cpu().numpy(), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_ksampler_graph_decodes_and_saves_a_batch(kind, checkpoints, graph_runner, released_after):
    graph = small_graph(checkpoints[kind], prefix=f"ksampler_{kind}")
    result = graph_runner(graph.prompt())

    images = result.output(graph.decode.id)
    assert images.shape == (BATCH, SIZE, SIZE, 3)
    assert torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    assert not torch.equal(images[0], images[1]), "both batch items decoded to the same image"

    paths = result.image_paths(graph.save.id)
    assert len(paths) == BATCH
    expected = saved_pixels(images)
    for index, path in enumerate(paths):
        assert path.is_file()
        np.testing.assert_array_equal(png_pixels(path), expected[index])


@pytest.mark.server
def test_ksampler_graph_through_the_server_matches_in_process(checkpoints, graph_runner, comfy_server, released_after):
    import folder_paths

    ckpt_name = checkpoints["sd15_small"]
    server_name = comfy_server.add_checkpoint(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name))
    remote = small_graph(server_name, prefix="ksampler_server")
    refs = comfy_server.run(remote.prompt())["outputs"][remote.save.id]["images"]
    assert len(refs) == BATCH

    local = small_graph(ckpt_name, prefix="ksampler_local")
    expected = saved_pixels(graph_runner(local.prompt()).output(local.decode.id))
    for index, ref in enumerate(refs):
        pixels = png_pixels(io.BytesIO(comfy_server.view(ref)))
        # Same graph, seed and weights in two processes: equal up to one step of 8-bit rounding.
        assert np.abs(pixels.astype(int) - expected[index].astype(int)).max() <= 1
