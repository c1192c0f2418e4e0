"""The torch-only CSA engine, without ComfyUI."""
import random

import pytest
import torch

from harness.pack import load_pack

load_pack()
from consistent_story.attention import (  # noqa: E402
    ConsistentAttentionError,
    CSAConfig,
    SigmaMarks,
    BatchCast,
    CallPlanner,
    Step,
    StoryCall,
    downsample_factor,
    layer_active,
    locate_step,
    mix_seed,
    neighbour_table,
    parse_block_list,
    sampled_count,
    step_in_range,
)


@pytest.mark.parametrize("panels,window", [(1, 0), (2, 0), (4, 0), (5, 2), (8, 4), (9, 3), (3, 10)])
def test_neighbours_are_distinct_others_within_a_contiguous_window(panels, window):
    table = neighbour_table(panels, window)
    expected = panels - 1 if window == 0 else min(window, panels - 1)
    assert table.shape == (panels, expected)
    for panel, row in enumerate(table.tolist()):
        assert panel not in row and len(set(row)) == len(row)
        assert all(0 <= other < panels for other in row)
        if row:
            span = sorted(row + [panel])
            assert span[-1] - span[0] == len(row), "window is contiguous around the panel"


def batch_keys(chunks, panels, tokens, rate, window, seed=7, width=4):
    """Batch mode as a host runs it: the keys every row attends to, and the token ids they carry
    (keys hold their own flat token id in every channel, so each key names its source)."""
    ids = torch.arange(chunks * panels * tokens, dtype=torch.float32).view(chunks * panels, tokens, 1)
    k = ids.expand(-1, -1, width).contiguous()
    config = CSAConfig(rate_fine=rate, rate_coarse=rate, window=window, blocks="all", schedule="always", seed=seed)
    story = StoryCall(CallPlanner(config, Step(0, 1)), BatchCast.of(panels, window), chunks, keep_bank=False)
    seen = {}

    def attend(q, k_, v, names, mask):
        for row, name in enumerate(names):
            seen[name] = k_[row, :, 0].long().tolist()
        return q

    out = story.attention((("output", 0), 0), tuple(range(panels)), k, k, k, (4, 4), attend)
    return seen, out


@pytest.mark.parametrize("chunks,panels,tokens,rate,window", [(2, 4, 16, 0.5, 0), (1, 3, 10, 0.3, 0), (3, 6, 8, 0.25, 2)])
def test_batch_mode_keeps_own_tokens_and_samples_only_neighbours_of_the_same_chunk(chunks, panels, tokens, rate, window):
    seen, _ = batch_keys(chunks, panels, tokens, rate, window)
    count = sampled_count(tokens, rate)
    neighbours = neighbour_table(panels, window).tolist()
    assert len(seen) == chunks * panels
    for (chunk, panel), keys in seen.items():
        base = chunk * panels * tokens
        assert keys[:tokens] == list(range(base + panel * tokens, base + (panel + 1) * tokens))
        extra = keys[tokens:]
        assert len(extra) == count * len(neighbours[panel])
        assert all(base <= i < base + panels * tokens for i in extra), "never crosses into another chunk"
        sources = [(i - base) // tokens for i in extra]
        assert sources == [other for other in neighbours[panel] for _ in range(count)], "neighbours in order"
        assert len(set(extra)) == len(extra), "no token twice"


def test_batch_mode_is_seeded_and_shares_one_sample_per_panel():
    keys = []
    for global_seed, seed in ((0, 1), (1, 1), (0, 2)):  # the global generators differ where the seed does not
        torch.manual_seed(global_seed)
        random.seed(global_seed)
        keys.append(batch_keys(2, 4, 64, 0.5, 0, seed=seed)[0])
    a, b, c = keys
    assert a == b, "the tokens depend on the seed, not on torch's or Python's global generator"
    assert a != c
    # every reader of panel 0 takes the same sampled tokens of it (one draw per step and resolution)
    taken = {panel: [i for i in keys[64:] if i < 64] for (chunk, panel), keys in a.items() if chunk == 0 and panel}
    assert taken[1] == taken[2] == taken[3]


def test_nothing_to_add_for_one_panel_or_rate_zero():
    seen, out = batch_keys(2, 4, 16, 0.0, 0)
    assert out is None and not seen, "rate 0: plain attention, as vanilla"
    seen, _ = batch_keys(2, 1, 16, 0.5, 0)
    assert seen == {(0, 0): list(range(16)), (1, 0): list(range(16, 32))}, "one panel: its own keys only"


def test_rate_one_all_panels_equals_attention_over_the_whole_chunk_float64():
    torch.manual_seed(0)
    chunks, panels, tokens, dim = 2, 4, 6, 8
    q, k, v = (torch.randn(chunks * panels, tokens, dim, dtype=torch.float64) for _ in range(3))
    config = CSAConfig(rate_fine=1.0, rate_coarse=1.0, blocks="all", schedule="always")
    story = StoryCall(CallPlanner(config, Step(0, 1)), BatchCast.of(panels, 0), chunks, keep_bank=False)

    def attend(q_, k_, v_, names, mask):
        return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_)

    ours = story.attention((("output", 0), 0), tuple(range(panels)), q, k, v, (4, 4), attend)
    for row in range(chunks * panels):
        chunk = row // panels
        keys = k[chunk * panels:(chunk + 1) * panels].reshape(-1, dim)
        values = v[chunk * panels:(chunk + 1) * panels].reshape(-1, dim)
        weights = torch.softmax(q[row] @ keys.T / dim ** 0.5, dim=-1)
        torch.testing.assert_close(ours[row], weights @ values, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("latent,tokens,factor", [((128, 128), 4096, 2), ((128, 128), 1024, 4), ((64, 64), 4096, 1),
                                                 ((64, 64), 64, 8), ((96, 64), 1536, 2), ((96, 64), 384, 4),
                                                 ((13, 9), 35, 2), ((13, 9), 12, 4)])
def test_downsample_factor(latent, tokens, factor):
    assert downsample_factor(*latent, tokens) == factor


def test_rates_follow_resolution_class():
    config = CSAConfig(rate_fine=0.2, rate_coarse=0.7)
    assert [config.rate_for(f) for f in (1, 2, 4, 8)] == [0.2, 0.2, 0.7, 0.7]


def test_locate_step_by_nearest_sigma():
    schedule = [14.6, 8.0, 3.1, 1.0, 0.0]
    assert locate_step(14.6, schedule) == Step(0, 4)
    assert locate_step(3.0, schedule) == Step(2, 4)
    assert locate_step(0.9, schedule) == Step(3, 4), "the final 0 is not a step"


def test_official_schedule_warms_up_then_draws_per_layer():
    config = CSAConfig(schedule="official", seed=3)
    layers = range(400)
    assert not any(layer_active(config, Step(4, 50), layer) for layer in layers), "plain before step 5 of 50"
    early = sum(layer_active(config, Step(10, 50), layer) for layer in layers) / len(layers)
    late = sum(layer_active(config, Step(30, 50), layer) for layer in layers) / len(layers)
    assert 0.6 < early < 0.8 and 0.84 < late < 0.96
    random.seed(1)
    forward = [layer_active(config, Step(12, 50), i) for i in layers]
    random.seed(2)
    backward = [layer_active(config, Step(12, 50), i) for i in reversed(layers)][::-1]
    assert forward == backward, "each draw depends on (seed, step, layer) only: not on call order or the global generator"


def test_always_schedule_and_ranges():
    config = CSAConfig(schedule="always", start=0.25, end=0.5)
    assert [step_in_range(config, Step(i, 8)) for i in range(8)] == [False, False, True, True, False, False, False, False]
    assert all(layer_active(config, Step(2, 8), layer) for layer in range(50))
    assert not CSAConfig(start=1.0).enabled and not CSAConfig(rate_fine=0, rate_coarse=0).enabled
    assert CSAConfig().enabled


def test_sigma_percents_follow_the_sigma_not_the_step_count():
    """percent_of 'sigma': on while sigma(end) <= sigma <= sigma(start) (ControlNet's ends), the warm-up
    while the sigma is above sigma(10%), the switch at sigma(40%); draws keyed by the sigma, so the
    same sigma draws the same in any pass, whatever its index there."""
    marks = SigmaMarks(start=10.0, end=2.0, warmup=12.0, switch=5.0)
    config = CSAConfig(schedule="official", percent_of="sigma", seed=3)
    at = lambda sigma, index=0: Step(index, 4, sigma, marks)  # noqa: E731
    assert [step_in_range(config, at(s)) for s in (13.0, 10.0, 6.0, 2.0, 1.9)] == [False, True, True, True, False]
    wide = Step(0, 4, 12.5, SigmaMarks(start=13.0, end=2.0, warmup=12.0, switch=5.0))
    assert step_in_range(CSAConfig(schedule="always", percent_of="sigma"), wide) and not step_in_range(config, wide)
    layers = range(400)
    early = sum(layer_active(config, at(6.0), layer) for layer in layers) / len(layers)
    late = sum(layer_active(config, at(4.0), layer) for layer in layers) / len(layers)
    assert 0.6 < early < 0.8 and 0.84 < late < 0.96
    assert [layer_active(config, at(6.0, 0), i) for i in layers] == [layer_active(config, at(6.0, 3), i) for i in layers]
    assert CallPlanner(config, at(6.0, 0)).seed_for(64) == CallPlanner(config, at(6.0, 3)).seed_for(64)
    assert CallPlanner(config, at(6.0)).seed_for(64) != CallPlanner(config, at(5.5)).seed_for(64)
    with pytest.raises(ConsistentAttentionError, match="percent_of is 'sigma' but this host gave no sigma"):
        step_in_range(config, Step(1, 4))
    with pytest.raises(ConsistentAttentionError, match="percent_of must be one of"):
        CSAConfig(percent_of="sigmas")


def test_block_selection():
    assert CSAConfig().patches_block("output", 3) and not CSAConfig().patches_block("middle", 0)
    assert CSAConfig(blocks="all").patches_block("input", 4)
    custom = CSAConfig(blocks="custom", custom_blocks=parse_block_list("output 0-2, middle 0"))
    assert custom.patches_block("output", 2) and custom.patches_block("middle", 0)
    assert not custom.patches_block("output", 3)


@pytest.mark.parametrize("text", ["", "outputs 1", "output 3-1", "output x"])
def test_bad_block_lists_say_what_to_write(text):
    with pytest.raises(ConsistentAttentionError, match="custom_blocks"):
        parse_block_list(text)


@pytest.mark.parametrize("kwargs,word", [({"rate_fine": 1.5}, "rate_fine"), ({"window": -1}, "window"),
                                         ({"schedule": "x"}, "schedule"), ({"blocks": "custom"}, "custom_blocks"),
                                         ({"blocks": "mid"}, "blocks")])
def test_bad_config_is_refused(kwargs, word):
    with pytest.raises(ConsistentAttentionError, match=word):
        CSAConfig(**kwargs)


def test_mix_seed_is_splitmix64_and_so_the_same_in_every_process():
    """One part: SplitMix64's first output for the state that part leaves. SplitMix64's published test
    vector (Vigna's reference code; seed 1234567 gives 6457827717110365317 first) is independent of
    this code and of any process, so the seeds, and the images, are the same on every run and machine."""
    golden_gamma = 0x9E3779B97F4A7C15
    assert mix_seed(golden_gamma ^ 1234567) == 6457827717110365317
    assert mix_seed(1, 2, 3) != mix_seed(1, 2, 4) and mix_seed(1, 2) != mix_seed(2, 1), "every part, in order"
    assert 0 <= mix_seed(2**70, -5) < 2**63


def test_planner_rates_respect_blocks_and_resolutions_and_chunks_must_divide_the_rows():
    from consistent_story.attention import CallPlanner, panels_per_chunk

    planner = CallPlanner(CSAConfig(rate_fine=0.5, rate_coarse=0.25, schedule="always", seed=4), Step(3, 10))
    assert planner.rate(("output", 3), 0, 64, (16, 16)) == 0.5, "a quarter of the latent's tokens: fine"
    assert planner.rate(("output", 3), 0, 16, (16, 16)) == 0.25, "coarser"
    assert planner.rate(("middle", 0), 0, 64, (16, 16)) == 0.0, "output blocks only by default"
    assert planner.seed_for(64) == CallPlanner(CSAConfig(seed=4), Step(3, 10)).seed_for(64) != planner.seed_for(16)
    with pytest.raises(ConsistentAttentionError, match="conditioning chunks"):
        panels_per_chunk(7, 2)
