"""One patched model sampled on two threads at once equals the same runs one after the other.

ComfyUI's multi-GPU machinery (v0.33: ``comfy/multigpu.py``) deep-copies a patched model per device
and runs the copies' model calls on a thread pool; the copies share CSA's patch object (it returns
itself from ``__deepcopy__``). So the patch must keep nothing of a call on itself: every call's
state lives in its own copy of ``transformer_options``. Here two samplers run through clones of one
patched model (the same patch object, the same diffusion model) on two threads, one story with a
different noise in each; each result must equal its run alone, bit for bit. The noise is drawn
before the threads start, as ComfyUI's multi-GPU pool gets it: ComfyUI seeds torch's global
generator to draw it (``comfy.sample.prepare_noise``), which two threads cannot share.
"""
from __future__ import annotations

import threading

import pytest
import torch

from test_story_attention import SIZE, STORY, patch, story_inputs

pytestmark = pytest.mark.integration


def test_one_patched_model_on_two_threads_equals_each_run_alone(comfy, loaded):
    model, clip = loaded("sd15_small")
    positive, negative, panels, story = story_inputs(comfy, clip, STORY)
    patched = patch(comfy, model, story, rate_fine=0.5, rate_coarse=0.5, panels_per_call=2, schedule="always")
    clones = [patched.clone(), patched.clone()]  # as ComfyUI's per-device copies: one patch, one diffusion model
    assert clones[0].model is clones[1].model

    import comfy.sample

    latent = torch.zeros(panels, 4, SIZE // 8, SIZE // 8)
    noises = [comfy.sample.prepare_noise(latent, 3 + slot) for slot in range(2)]

    def run(slot):
        with torch.inference_mode():
            return comfy.sample.sample(clones[slot], noises[slot], 2, 5.0, "euler", "normal", positive, negative,
                                       latent, disable_pbar=True, seed=3 + slot)

    alone = [run(slot) for slot in range(2)]
    together: list = [None, None]
    errors: list = []

    def worker(slot):
        try:
            together[slot] = run(slot)
        except BaseException as error:  # surfaced below, with the thread that raised it
            errors.append((slot, error))

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"a sampler thread failed: {errors}"
    for slot in range(2):
        assert torch.equal(together[slot], alone[slot]), f"sampler {slot} changed when the other ran beside it"
    assert not torch.equal(alone[0], alone[1]), "the two samplers must draw different pictures (other seeds)"
    with torch.inference_mode():
        vanilla = comfy.sample.sample(model, noises[0], 2, 5.0, "euler", "normal", positive, negative, latent,
                                      disable_pbar=True, seed=3)
    assert not torch.equal(alone[0], vanilla), "CSA must change the story"
