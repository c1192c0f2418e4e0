"""One engine, two hosts: the diffusers processor and the ComfyUI patch give the same UNet outputs.

Route: one random-weight ``UNet2DConditionModel`` per family (SD1.5: context 768, conv
projections; SDXL: context 2048, linear projections, ``text_time`` embedding, transformer depths
in the SDXL pattern), small widths. Its state dict is converted to ComfyUI's layout with
ComfyUI's own map (``comfy.utils.unet_to_diffusers``, as ``comfy.sd.load_diffusion_model_state_dict``
does); ``comfy.model_detection.detect_unet_config`` must read the hand-written ComfyUI layout back
from the converted weights, and the weights load strictly into ComfyUI's ``SD15`` / ``SDXL`` model.
(ComfyUI's diffusers-format detection only knows full-size UNets, so it cannot be used directly.)

The ComfyUI side is ComfyUI's real sampling path: a ``ModelPatcher`` clone with the pack's
``ConsistentAttentionPatch`` installed, ``CFGGuider`` with cfg 5 (so the call batches
``[uncond; cond]``, 2 chunks of 4 panels), euler, 2 steps (ComfyUI finds the step from the
sigmas). A post-CFG function records each step's input latent, sigma and the cond/uncond
predictions. The diffusers side replays every recorded
step on the very same input: ``c_in`` scaling and timestep from ComfyUI's ``model_sampling``, the
same per-panel text embeddings, ``state.step = Step(i, 2)``. Both hosts' raw UNet outputs (eps,
recovered exactly on the ComfyUI side as ``(x - denoised) / sigma``) are compared in fp32 with
``max|a - b| / max|b|``, ComfyUI as ``b``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import pytest
import torch

from harness.pack import load_pack

pytestmark = pytest.mark.integration

PANELS = 4
LATENT = 16  # latent side: 128 px
STEPS = 2
CFG = 5.0
TOLERANCE = 1e-3  # max relative error between hosts
CLEAR_EFFECT = 5 * TOLERANCE  # CSA must move the output at least this much
# Two steps of a longer schedule, both at high noise where the random UNet's panels still differ
# (at the clean end its outputs are alike and CSA barely changes them): indices into model_sampling.sigmas.
SIGMA_INDICES = [999, 949, 849]

_COMMON = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "use_temporal_resblock": False, "use_temporal_attention": False,
}


@dataclass(frozen=True)
class Family:
    diffusers: dict  # UNet2DConditionModel config
    comfy_class: str  # comfy.supported_models class
    comfy_unet: dict  # the same layout in ComfyUI's terms
    pooled: int  # pooled text embedding width (0: none)


FAMILIES = {
    # SD1.5 layout at small widths: attention at 256 and 64 tokens, none on the deepest level.
    "sd15": Family(
        diffusers=dict(
            block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        ),
        comfy_class="SD15",
        comfy_unet={
            **_COMMON, "model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": [1, 1, 1],
            "transformer_depth": [1, 1, 0], "transformer_depth_output": [1, 1, 1, 1, 0, 0],
            "transformer_depth_middle": 1, "context_dim": 768, "use_linear_in_transformer": False,
            "adm_in_channels": None,
        },
        pooled=0,
    ),
    # SDXL pattern (no attention on the finest level, deeper transformers lower down), 64-channel heads.
    "sdxl": Family(
        diffusers=dict(
            block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=2048,
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 1, 1), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        comfy_class="SDXL",
        comfy_unet={
            **_COMMON, "model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": [2, 2, 2],
            "transformer_depth": [0, 0, 1, 1, 2, 2], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
            "transformer_depth_middle": 2, "context_dim": 2048, "use_linear_in_transformer": True,
            "adm_in_channels": 2816, "num_classes": "sequential",
        },
        pooled=1280,
    ),
}


def csa(**options):
    from consistent_story.attention import CSAConfig

    return CSAConfig(**{"rate_fine": 0.5, "rate_coarse": 0.5, "schedule": "always", "seed": 7, **options})


CASES = {
    "on": dict(),  # output blocks, rates 0.5, every step
    "rate1_window0": dict(rate_fine=1.0, rate_coarse=1.0, window=0),
    # every block (input and middle numbering too), a window, the official schedule's draws
    "all_window1_official": dict(blocks="all", window=1, rate_coarse=0.25, schedule="official"),
    "off": dict(start=0.9),  # installed on both hosts, never active in 2 steps (progress 0 and 0.5)
}
# Rate 1 samples no tokens (no seeds involved) and chooses the blocks "on" does: SD1.5 is enough.
RUNS = [(family, case) for family in FAMILIES for case in CASES if (family, case) != ("sdxl", "rate1_window0")]


@dataclass
class Hosts:
    family: Family
    unet: torch.nn.Module  # diffusers
    patcher: object  # ComfyUI ModelPatcher
    positive: torch.Tensor  # [panels, 77, context]
    negative: torch.Tensor
    pooled_positive: torch.Tensor | None
    pooled_negative: torch.Tensor | None
    noise: torch.Tensor

    @cached_property
    def comfy_vanilla(self) -> list:
        return comfy_sample(self)

    @cached_property
    def diffusers_vanilla(self) -> list:
        """The diffusers UNet, no CSA, on ComfyUI's vanilla steps."""
        return [diffusers_eps(self, x, sigma) for x, sigma, _ in self.comfy_vanilla]


class StepRecorder:
    """Post-CFG function: each step's input, sigma and cond/uncond eps. Shared by clones."""

    def __init__(self):
        self.steps = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args):
        x, sigma = args["input"], args["sigma"]
        to_eps = lambda denoised: (x - denoised) / sigma.view(-1, 1, 1, 1)  # noqa: E731
        eps = torch.cat([to_eps(args["uncond_denoised"]), to_eps(args["cond_denoised"])])  # CFG batch order
        self.steps.append((x.clone(), sigma.clone(), eps))
        return args["denoised"]


def build_hosts(name: str) -> Hosts:
    from diffusers import UNet2DConditionModel

    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    family = FAMILIES[name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=LATENT, **family.diffusers).eval()
    model_config = getattr(comfy.supported_models, family.comfy_class)(family.comfy_unet)
    key_map = comfy.utils.unet_to_diffusers(model_config.unet_config)  # diffusers key -> ComfyUI key
    comfy_sd = {key_map[key]: value for key, value in unet.state_dict().items()}
    detected = comfy.model_detection.detect_unet_config(comfy_sd, "")
    assert {k: v for k, v in detected.items() if k in family.comfy_unet} == family.comfy_unet
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device="cpu")
    model.diffusion_model.load_state_dict(comfy_sd, strict=True)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)

    g = torch.Generator().manual_seed(1)
    context = family.diffusers["cross_attention_dim"]
    text = lambda: torch.randn(PANELS, 77, context, generator=g)  # noqa: E731  one prompt per panel
    pooled = lambda: torch.randn(PANELS, family.pooled, generator=g) if family.pooled else None  # noqa: E731
    noise = torch.randn(PANELS, 4, LATENT, LATENT, generator=g)
    return Hosts(family, unet, patcher, text(), text(), pooled(), pooled(), noise)


@pytest.fixture(scope="module")
def hosts(comfy):
    load_pack()
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_hosts(name)
        return cache[name]

    return get


SIZE_CONDS = {"width": 8 * LATENT, "height": 8 * LATENT, "crop_w": 0, "crop_h": 0,
              "target_width": 8 * LATENT, "target_height": 8 * LATENT}


def comfy_sample(hosts: Hosts, config=None, cast=None) -> list:
    """ComfyUI's CFGGuider, euler, STEPS steps; CSA installed on a clone when ``config`` is given
    (story mode with ``cast``)."""
    import comfy.samplers
    from consistent_story.nodes.host.csa_patch import ConsistentAttentionPatch

    model = hosts.patcher.clone()
    if config is not None:
        ConsistentAttentionPatch(config, cast).install(model)
    recorder = StepRecorder()
    model.set_model_sampler_post_cfg_function(recorder)

    def conditioning(text, pooled):
        extra = {} if pooled is None else {"pooled_output": pooled, **SIZE_CONDS}
        return [[text, extra]]

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(conditioning(hosts.positive, hosts.pooled_positive),
                     conditioning(hosts.negative, hosts.pooled_negative))
    guider.set_cfg(CFG)
    sigmas = model.get_model_object("model_sampling").sigmas[SIGMA_INDICES]
    with torch.inference_mode():
        guider.sample(hosts.noise, torch.zeros_like(hosts.noise), comfy.samplers.sampler_object("euler"), sigmas,
                      disable_pbar=True, seed=0)
    assert len(recorder.steps) == STEPS
    return recorder.steps


def diffusers_eps(hosts: Hosts, x: torch.Tensor, sigma: torch.Tensor, state=None, step: int = 0) -> torch.Tensor:
    """The diffusers UNet on ComfyUI's step input, CFG batch ``[uncond; cond]``."""
    from consistent_story.attention import Step

    sampling = hosts.patcher.get_model_object("model_sampling")
    if state is not None:
        state.step = Step(step, STEPS)
    sample = sampling.calculate_input(sigma, x).repeat(2, 1, 1, 1)
    timestep = sampling.timestep(sigma).float().repeat(2)
    extra = {}
    if hosts.pooled_positive is not None:
        order = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")  # as SDXL.encode_adm
        time_ids = torch.tensor([[SIZE_CONDS[k] for k in order]])
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.cat([hosts.pooled_negative, hosts.pooled_positive]),
            "time_ids": time_ids.float().repeat(2 * PANELS, 1),
        }
    with torch.inference_mode():
        context = torch.cat([hosts.negative, hosts.positive])
        return hosts.unet(sample, timestep, encoder_hidden_states=context, **extra).sample


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_identity_matches_comfyui_key_conversion(hosts, family):
    """Every attn1 is named (kind, number, block_index) exactly where ComfyUI's key map puts its weights."""
    import comfy.utils
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from consistent_story.attention.diffusers_host.processor import comfy_self_attention_layers

    h = hosts(family)
    key_map = comfy.utils.unet_to_diffusers(h.patcher.model.model_config.unet_config)
    module_names = {module: name for name, module in h.unet.named_modules()}
    layers = comfy_self_attention_layers(h.unet)
    for layer, attn in layers:
        prefix = "middle_block" if layer.kind == "middle" else f"{layer.kind}_blocks.{layer.number}"
        expected = f"{prefix}.1.transformer_blocks.{layer.block_index}.attn1.to_q.weight"
        assert key_map[module_names[attn] + ".to_q.weight"] == expected
    comfy_layers = sum(isinstance(m, BasicTransformerBlock) for m in h.patcher.model.diffusion_model.modules())
    assert len({layer for layer, _ in layers}) == len(layers) == comfy_layers
    assert {layer.kind for layer, _ in layers} == {"input", "middle", "output"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_vanilla_forward_agrees_across_hosts(hosts, family, record_property):
    h = hosts(family)
    errors = [relative_error(ours, eps) for ours, (_, _, eps) in zip(h.diffusers_vanilla, h.comfy_vanilla)]
    print(f"\n[{family}] vanilla diffusers vs vanilla ComfyUI: max relative error per step {errors}")
    record_property("vanilla_relative_errors", errors)
    assert max(errors) < TOLERANCE


def sampled_on_both_hosts(h, config, label: str, record_property, cast=None):
    """ComfyUI samples with CSA; diffusers replays each step's input with the same CSA; their
    predictions must agree. Returns (ComfyUI's steps, diffusers' predictions, diffusers' state)."""
    from consistent_story.attention.diffusers_host.processor import install_consistent_attention

    comfy_steps = comfy_sample(h, config, cast)
    state = install_consistent_attention(h.unet, config, cast=cast)
    try:
        ours = [diffusers_eps(h, x, sigma, state, step) for step, (x, sigma, _) in enumerate(comfy_steps)]
    finally:
        state.remove()
    across = [relative_error(a, eps) for a, (_, _, eps) in zip(ours, comfy_steps)]
    print(f"\n[{label}] diffusers vs ComfyUI, max relative error per step: {across}")
    record_property("cross_host_relative_errors", across)
    assert max(across) < TOLERANCE
    return comfy_steps, ours, state


@pytest.mark.parametrize("family,case", RUNS)
def test_csa_agrees_across_hosts(hosts, family, case, record_property):
    from consistent_story.attention import Step, layer_active, layer_seed

    h = hosts(family)
    config = csa(**CASES[case])
    comfy_csa, ours, state = sampled_on_both_hosts(h, config, f"{family}/{case}", record_property)

    # Against each host's vanilla forward, on the steps whose input is still the vanilla run's.
    checked = 0
    for step in range(STEPS):
        if not torch.equal(comfy_csa[step][0], h.comfy_vanilla[step][0]):
            break
        active = any(layer_active(config, Step(step, STEPS), layer_seed(layer.block, layer.block_index))
                     for layer in state.layers if config.patches_block(layer.kind, layer.number))
        comfy_change = relative_error(comfy_csa[step][2], h.comfy_vanilla[step][2])
        our_change = relative_error(ours[step], h.diffusers_vanilla[step])
        print(f"  step {step}: CSA {'on' if active else 'idle'}, change vs vanilla: ComfyUI {comfy_change:.3g}, "
              f"diffusers {our_change:.3g}")
        if active:
            assert comfy_change > CLEAR_EFFECT and our_change > CLEAR_EFFECT, "CSA must change the output clearly"
        else:
            assert comfy_change == our_change == 0.0, "idle layers must run the exact default attention"
        checked += 1
    assert checked == (STEPS if case == "off" else 1 + (config.schedule == "official"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_story_rules_agree_across_hosts(hosts, family, record_property):
    """Two characters, a two-character panel and an [NC] panel, in one UNet call on both hosts."""
    from consistent_story.attention import StoryCast

    h = hosts(family)
    cast = StoryCast.from_panels(("Bob", "Alice"), ((0,), (1,), (0, 1), ()), 2)
    config = csa()
    comfy_story, _, _ = sampled_on_both_hosts(h, config, f"{family}/story", record_property, cast)
    first_step_change = relative_error(comfy_story[0][2], h.comfy_vanilla[0][2])
    batch_mode = comfy_sample(h, config)
    assert first_step_change > CLEAR_EFFECT, "the story changes the output"
    assert relative_error(comfy_story[0][2], batch_mode[0][2]) > CLEAR_EFFECT, "and not as batch mode does"


def test_state_follows_the_unet_calls_and_chunks(hosts):
    """The latent size and the step come from each UNet call (a real diffusers scheduler's
    timesteps); with chunks=1 the cond rows alone give the cond half of the CFG batch."""
    from diffusers import DDIMScheduler

    from consistent_story.attention import Step
    from consistent_story.attention.diffusers_host.processor import install_consistent_attention

    h = hosts("sd15")
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(STEPS)
    x = h.noise
    config = csa()
    state = install_consistent_attention(h.unet, config, scheduler=scheduler)
    try:
        with torch.inference_mode():
            context = torch.cat([h.negative, h.positive])
            cfg_batch = h.unet(x.repeat(2, 1, 1, 1), scheduler.timesteps[1], encoder_hidden_states=context).sample
            assert state.step == Step(1, STEPS) and state.latent_hw == (LATENT, LATENT)
            state.chunks = 1
            cond_only = h.unet(x, scheduler.timesteps[1], encoder_hidden_states=h.positive).sample
    finally:
        state.remove()
    torch.testing.assert_close(cond_only, cfg_batch[PANELS:], rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        vanilla = h.unet(x, scheduler.timesteps[1], encoder_hidden_states=h.positive).sample
    assert relative_error(cond_only, vanilla) > CLEAR_EFFECT
