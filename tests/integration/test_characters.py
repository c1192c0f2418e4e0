"""Characters from the user's images, saved and loaded characters (real ComfyUI, random weights).

The reference rows are checked through a DIFFUSION_MODEL wrapper that records each UNet
(sub-)call: the reference call's input must be the reference latent plus the same fixed noise
times each step's sigma, and its output must equal a plain UNet run of the unpatched model on that
input with the character's description.
"""
from __future__ import annotations

import pytest
import torch

from test_consistent_attention import SharedAcrossClones
from test_story_attention import CSA_OPTIONS, sample, story_inputs

pytestmark = pytest.mark.integration

STATE_KEY = "consistent_story.csa"
STORY = """
[Bob] a man in a red coat
[Alice] a woman in a green dress
[Bob] walks in the park
[Alice] reads a book
[Bob] and [Alice] talk at a cafe
[NC] a quiet forest at dawn
[Bob] eats an apple
"""


class UNetCalls(SharedAcrossClones):
    """DIFFUSION_MODEL wrapper: (panels of the sub-call, input x, timesteps, context, output) per call."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        out = executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        state = transformer_options.get(STATE_KEY)
        self.calls.append((state.panels if state is not None else None, x.clone(), timesteps.clone(),
                           context.clone(), transformer_options["cond_or_uncond"], out.clone()))
        return out


@pytest.fixture(scope="module")
def characters_folder(comfy):
    """Saved characters go to the session's folder, never to the ComfyUI install's models/."""
    import folder_paths

    folder = comfy.session_dir / "consistent_story_characters"
    folder.mkdir(exist_ok=True)
    folder_paths.add_model_folder_path("consistent_story_characters", str(folder), is_default=True)
    return folder


@pytest.fixture(scope="module")
def sd15(comfy, loaded, checkpoints, characters_folder):
    import comfy.sd
    import folder_paths

    model, clip = loaded("sd15_small")
    path = folder_paths.get_full_path("checkpoints", checkpoints["sd15_small"])
    vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=False, output_model=False)[2]
    return model, clip, vae


def picture(seed: int, size: int = 64) -> torch.Tensor:
    """A random picture; seeds 1 and 2 are dark and bright, so their latents differ a lot."""
    base = {1: 0.1, 2: 0.9}.get(seed, 0.5)
    noise = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))
    return (base + 0.2 * (noise - 0.5)).clamp(0, 1)


def with_image_character(comfy, story, name, images, model, clip, vae, size=64):
    node = comfy.NODE_CLASS_MAPPINGS["ConsistentStoryCharacterFromImage"]
    with torch.inference_mode():
        return node.execute(story=story, character=name, images=images, vae=vae, clip=clip, model=model,
                            width=size, height=size).result[0]


def patch(comfy, model, story, **options):
    return comfy.NODE_CLASS_MAPPINGS["ConsistentStorySelfAttention"].execute(
        model=model, story=story, **{**CSA_OPTIONS, "rate_fine": 0.5, "rate_coarse": 0.5, **options}).result[0]


@pytest.mark.parametrize("panels_per_call", [0, 2])
def test_reference_rows_are_the_noised_reference_run_alone(comfy, sd15, panels_per_call):
    model, clip, vae = sd15
    positive, negative, panels, story = story_inputs(comfy, clip, STORY)
    story = with_image_character(comfy, story, "Bob", torch.cat([picture(1), picture(2)]), model, clip, vae)
    ref = story.references[0]
    assert ref.name == "Bob" and ref.latents.shape == (2, 4, 8, 8) and ref.latent_format == "SD15"
    calls = UNetCalls()
    patched = patch(comfy, model, story, panels_per_call=panels_per_call).clone()
    patched.add_wrapper_with_key("diffusion_model", "test.calls", calls)
    sample(comfy, patched, positive, negative, panels, steps=3)

    cast = story.cast(2)
    assert cast.identity[0] == cast.reference_panels == (panels, panels + 1), "Bob's identity: his two images"
    reference_calls = [c for c in calls.calls if c[0] == cast.reference_panels]
    assert len(reference_calls) == 3 * (1 if panels_per_call == 0 else 2), "every step, before the panels"
    base = model.model
    from comfy import model_management

    model_management.load_models_gpu([patched])  # the UNet runs below, where the sampler ran it
    noises = []
    for _, x, timesteps, context, kinds, out in reference_calls:
        clean = base.process_latent_in(ref.latents).to(x.device)  # the character keeps its latents on the CPU
        sigma = base.model_sampling.sigma(timesteps[:1])
        noisy = x.reshape(len(kinds), 2, *x.shape[1:])[0]  # ComfyUI's c_in scaling undone below
        noisy = noisy / base.model_sampling.calculate_input(sigma, torch.ones_like(noisy))
        noises.append((noisy - clean) / sigma)
        with torch.inference_mode():  # the unpatched UNet on the same input: the reference alone
            alone = base.diffusion_model(x, timesteps, context=context, transformer_options={})
        torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    for noise in noises[1:]:
        torch.testing.assert_close(noise, noises[0], rtol=1e-3, atol=1e-3)
    assert 0.8 < float(noises[0].std()) < 1.2, "the same unit noise at every step"


def test_panels_read_the_images_of_their_character(comfy, sd15):
    model, clip, vae = sd15
    positive, negative, panels, story = story_inputs(comfy, clip, STORY)
    generated = sample(comfy, patch(comfy, model, story), positive, negative, panels, steps=4)
    runs = {seed: sample(comfy, patch(comfy, model, with_image_character(comfy, story, "Bob", picture(seed), model,
                                                                         clip, vae)), positive, negative, panels, steps=4)
            for seed in (1, 2)}
    bob_panels, alice_only, nc = [0, 2, 4], 1, 3
    scale = generated.abs().max()
    # A random model hides the image under the noise of the first steps, so another image moves a
    # panel by about 1e-3 of its range: far above fp32 rounding (1e-7), and the same image repeats
    # the same panels exactly.
    again = sample(comfy, patch(comfy, model, with_image_character(comfy, story, "Bob", picture(1), model, clip, vae)),
                   positive, negative, panels, steps=4)
    assert torch.equal(again, runs[1])
    for index in bob_panels:
        assert (runs[1][index] - generated[index]).abs().max() > 1e-3 * scale, "reads the image, not panel 0"
        assert (runs[1][index] - runs[2][index]).abs().max() > 1e-4 * scale, "another image, another panel"
    assert torch.equal(runs[1][nc], runs[2][nc]), "[NC] reads no character"
    assert torch.equal(runs[1][alice_only], runs[2][alice_only]), "Alice reads only Alice"
    positive, negative, panels, lonely = story_inputs(comfy, clip, "[Kit] a cat\n[Bob] a man\n[Bob] walks\n[Bob] pets [Kit]")
    with pytest.raises(ValueError, match=r"\[Kit\] never appears alone"):
        patch(comfy, model, lonely)
    kit = with_image_character(comfy, lonely, "Kit", picture(3), model, clip, vae)  # an image gives Kit an identity
    assert torch.isfinite(sample(comfy, patch(comfy, model, kit), positive, negative, panels)).all()


def test_references_of_another_size_are_refused_before_the_first_step(comfy, sd15):
    """The OUTER_SAMPLE wrapper sees the noise: 32 px references for 64 px panels stop the run
    before the sampler starts (a SAMPLER_SAMPLE wrapper is never entered), not at the first model call."""
    model, clip, vae = sd15
    positive, negative, panels, story = story_inputs(comfy, clip, STORY)
    small = with_image_character(comfy, story, "Bob", picture(1, size=32), model, clip, vae, size=32)
    started = []
    recorded = model.clone()
    recorded.add_wrapper_with_key("sampler_sample", "test.started",
                                  lambda executor, *args, **kwargs: started.append(1) or executor(*args, **kwargs))
    with pytest.raises(ValueError, match=r"\[Bob\]'s reference images are 32x32 px but .* for 64x64 px panels"):
        sample(comfy, patch(comfy, recorded, small), positive, negative, panels)
    assert started == []


def test_save_and_load_round_trip_and_refuse_bad_files(comfy, sd15, loaded, characters_folder):
    import safetensors.torch

    model, clip, vae = sd15
    nodes = comfy.NODE_CLASS_MAPPINGS
    positive, negative, panels, story = story_inputs(comfy, clip, STORY)
    drawn = with_image_character(comfy, story, "Bob", torch.cat([picture(1), picture(2)]), model, clip, vae)
    with torch.inference_mode():
        first = nodes["ConsistentStorySaveCharacter"].execute(story=drawn, character="Bob", file_name="").result[0]
        again = nodes["ConsistentStorySaveCharacter"].execute(story=drawn, character="Bob", file_name="").result[0]
        assert (first, again) == ("Bob.safetensors", "Bob 2.safetensors"), "never overwritten"
        loaded_story = nodes["ConsistentStoryLoadCharacter"].execute(story=story, character_file=first, clip=clip).result[0]
    [ref] = loaded_story.references
    assert torch.equal(ref.latents, drawn.references[0].latents) and ref.latent_format == "SD15"
    assert torch.equal(sample(comfy, patch(comfy, model, loaded_story), positive, negative, panels),
                       sample(comfy, patch(comfy, model, drawn), positive, negative, panels))

    folder = characters_folder
    with torch.inference_mode():  # a generated character: its identity panels, from the decoded story
        images = torch.rand(panels, 64, 64, 3)
        saved = nodes["ConsistentStorySaveCharacter"].execute(story=story, character="Bob", file_name="../bob",
                                                              images=images, vae=vae, model=model).result[0]
        expected = vae.encode(images[[0, 4]])  # Bob's first two panels alone
    assert saved == "bob.safetensors" and (folder / saved).is_file(), "the name is sanitised into the folder"
    assert torch.equal(safetensors.torch.load_file(str(folder / saved))["latents"], expected.float())

    load = nodes["ConsistentStoryLoadCharacter"]
    with pytest.raises(ValueError, match="points outside"):
        load.execute(story=story, character_file="../checkpoints/x.safetensors", clip=clip)
    torch.save({"latents": torch.zeros(1)}, folder / "pickled.safetensors")  # a pickle in disguise: never unpickled
    with pytest.raises(ValueError, match="not a saved character"):
        load.execute(story=story, character_file="pickled.safetensors", clip=clip)
    safetensors.torch.save_file({"latents": torch.zeros(2, 4, 8, 8)}, str(folder / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a Consistent Story character"):
        load.execute(story=story, character_file="plain.safetensors", clip=clip)
    metadata = {"format": "consistent-story-character", "version": "1", "name": "Bob", "latent_size": "[16, 16]"}
    safetensors.torch.save_file({"latents": torch.zeros(2, 4, 8, 8)}, str(folder / "edited.safetensors"), metadata)
    with pytest.raises(ValueError, match="edited.safetensors is damaged"):
        load.execute(story=story, character_file="edited.safetensors", clip=clip)
    with pytest.raises(ValueError, match=r"the story defines no \[Carol\]"):
        load.execute(story=story, character_file=first, clip=clip, character="Carol")

    vega, vega_clip = loaded("vega_small")  # an SD1.5 character on an SDXL-family model
    vega_positive, vega_negative, _, vega_story = story_inputs(comfy, vega_clip, STORY)
    with torch.inference_mode():
        on_vega = load.execute(story=vega_story, character_file=first, clip=vega_clip).result[0]
    with pytest.raises(ValueError, match="made for SD15 models but this model is SDXL"):
        sample(comfy, patch(comfy, vega, on_vega), vega_positive, vega_negative, panels, steps=1)
