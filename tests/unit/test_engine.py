"""The torch-only CSA engine, without ComfyUI."""
import pytest
import torch

from harness.pack import load_pack

load_pack()
from consistent_story.attention import (  # noqa: E402
    ConsistentAttentionError,
    CSAConfig,
    Step,
    append_reference,
    downsample_factor,
    layer_active,
    locate_step,
    mix_seed,
    neighbour_table,
    parse_block_list,
    plan_gather,
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


def rows_of(plan):
    return plan.index.view(plan.rows, plan.tokens + plan.extra).tolist()


@pytest.mark.parametrize("chunks,panels,tokens,rate,window", [(2, 4, 16, 0.5, 0), (1, 3, 10, 0.3, 0), (3, 6, 8, 0.25, 2)])
def test_plan_keeps_own_tokens_and_samples_only_neighbours_of_the_same_chunk(chunks, panels, tokens, rate, window):
    plan = plan_gather(chunks, panels, tokens, rate, window, seed=7)
    count = sampled_count(tokens, rate)
    neighbours = neighbour_table(panels, window).tolist()
    assert plan.extra == count * len(neighbours[0])
    for row, index in enumerate(rows_of(plan)):
        chunk, panel = divmod(row, panels)
        base = chunk * panels * tokens
        assert index[:tokens] == list(range(base + panel * tokens, base + (panel + 1) * tokens))
        extra = index[tokens:]
        assert all(base <= i < base + panels * tokens for i in extra), "never crosses into another chunk"
        sources = [(i - base) // tokens for i in extra]
        assert sorted(set(sources)) == sorted(neighbours[panel])
        assert all(sources.count(other) == count for other in neighbours[panel])
        assert len(set(extra)) == len(extra), "no token twice"


def test_plan_is_seeded():
    a, b, c = (plan_gather(2, 4, 64, 0.5, 0, seed=s).index for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_nothing_to_add_for_one_panel_or_rate_zero():
    assert plan_gather(2, 1, 16, 0.5, 0, seed=0) is None
    assert plan_gather(2, 4, 16, 0.0, 0, seed=0) is None


def test_extend_gathers_the_planned_rows():
    plan = plan_gather(2, 3, 5, 0.4, 0, seed=3)
    x = torch.randn(6, 5, 7)
    flat = x.reshape(30, 7)
    expected = flat[plan.index].view(6, 5 + plan.extra, 7)
    assert torch.equal(plan.extend(x), expected)
    with pytest.raises(ValueError):
        plan.extend(torch.randn(6, 4, 7))


def test_rate_one_all_panels_equals_attention_over_the_whole_chunk_float64():
    torch.manual_seed(0)
    chunks, panels, tokens, dim = 2, 4, 6, 8
    q, k, v = (torch.randn(chunks * panels, tokens, dim, dtype=torch.float64) for _ in range(3))
    plan = plan_gather(chunks, panels, tokens, 1.0, 0, seed=0)
    ours = torch.nn.functional.scaled_dot_product_attention(q, plan.extend(k), plan.extend(v))
    for row in range(chunks * panels):
        chunk = row // panels
        keys = k[chunk * panels:(chunk + 1) * panels].reshape(-1, dim)
        values = v[chunk * panels:(chunk + 1) * panels].reshape(-1, dim)
        weights = torch.softmax(q[row] @ keys.T / dim ** 0.5, dim=-1)
        torch.testing.assert_close(ours[row], weights @ values, rtol=1e-10, atol=1e-12)


def test_append_reference_adds_the_same_tokens_to_every_row():
    x = torch.randn(3, 4, 5)
    ref = torch.randn(2, 5)
    out = append_reference(x, ref)
    assert out.shape == (3, 6, 5)
    assert torch.equal(out[:, :4], x) and all(torch.equal(out[r, 4:], ref) for r in range(3))
    assert append_reference(x, None) is x


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
    assert [layer_active(config, Step(12, 50), i) for i in layers] == [layer_active(config, Step(12, 50), i) for i in layers]


def test_always_schedule_and_ranges():
    config = CSAConfig(schedule="always", start=0.25, end=0.5)
    assert [step_in_range(config, Step(i, 8)) for i in range(8)] == [False, False, True, True, False, False, False, False]
    assert all(layer_active(config, Step(2, 8), layer) for layer in range(50))
    assert not CSAConfig(start=1.0).enabled and not CSAConfig(rate_fine=0, rate_coarse=0).enabled
    assert CSAConfig().enabled


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


def test_mix_seed_is_stable():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3) != mix_seed(1, 2, 4)
    assert 0 <= mix_seed(2**70, -5) < 2**63


def test_planner_shares_one_plan_per_resolution_and_respects_blocks():
    from consistent_story.attention import CallPlanner

    planner = CallPlanner(CSAConfig(schedule="always", seed=4), Step(3, 10))
    args = dict(rows=8, chunks=2, latent_hw=(16, 16), device="cpu")
    first = planner.plan(("output", 3), 0, tokens=64, **args)
    assert first is not None and first.rows == 8 and first.extra == 3 * 32
    assert planner.plan(("output", 4), 1, tokens=64, **args) is first, "one draw per step and resolution"
    assert planner.plan(("output", 0), 0, tokens=16, **args) is not first
    assert planner.plan(("middle", 0), 0, tokens=64, **args) is None, "output blocks only by default"
    assert planner.plan(("output", 3), 0, tokens=64, rows=2, chunks=2, latent_hw=(16, 16), device="cpu") is None
    again = CallPlanner(CSAConfig(schedule="always", seed=4), Step(3, 10)).plan(("output", 5), 0, tokens=64, **args)
    assert torch.equal(again.index, first.index), "seeded by (seed, step, resolution)"
    with pytest.raises(ConsistentAttentionError, match="conditioning chunks"):
        planner.plan(("output", 3), 0, tokens=64, rows=7, chunks=2, latent_hw=(16, 16), device="cpu")
