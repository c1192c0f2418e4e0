"""The story rules of the engine (who reads whom, call plans, the identity bank), without ComfyUI."""
import pytest
import torch

from harness.pack import load_pack

load_pack()
from consistent_story.attention import (  # noqa: E402
    CallPlanner,
    ConsistentAttentionError,
    CSAConfig,
    Step,
    StoryCall,
    StoryCast,
    take_rows,
)

BOB, ALICE = 0, 1
# 0 Bob, 1 Alice, 2 Bob, 3 NC, 4 Bob+Alice, 5 Alice, 6 Bob, 7 Alice+Bob, 8 Alice
PANELS = ((BOB,), (ALICE,), (BOB,), (), (BOB, ALICE), (ALICE,), (BOB,), (ALICE, BOB), (ALICE,))


def cast(identity_panels=2, panels=PANELS):
    return StoryCast.from_panels(("Bob", "Alice"), panels, identity_panels)


def test_identity_panels_are_each_characters_first_solo_panels():
    assert cast(2).identity == ((0, 2), (1, 5))
    assert cast(3).identity == ((0, 2, 6), (1, 5, 8))
    assert cast(8).identity == ((0, 2, 6), (1, 5, 8)), "fewer solo panels than asked: those there are"
    assert cast(1).identity_panels == (0, 1)


def test_sources_follow_the_characters():
    c = cast(2)  # slots: Bob 0 -> panel 0, 1 -> panel 2; Alice 2 -> panel 1, 3 -> panel 5
    assert c.sources(0) == (1,) and c.sources(2) == (0,), "identity panels read their own character's others"
    assert c.sources(1) == (3,) and c.sources(5) == (2,)
    assert c.sources(3) == (), "[NC] reads nothing"
    assert c.sources(6) == (0, 1) and c.sources(8) == (2, 3)
    assert c.sources(4) == (0, 1, 2, 3) and c.sources(7) == (2, 3, 0, 1), "two characters: both identities"
    assert cast(1).sources(0) == (), "a single identity panel reads nobody"


def test_a_character_never_alone_is_named():
    with pytest.raises(ConsistentAttentionError, match=r"\[Alice\] never appears alone"):
        StoryCast.from_panels(("Bob", "Alice"), ((BOB,), (BOB, ALICE)), 2)
    with pytest.raises(ConsistentAttentionError, match="identity_panels must lie between 1 and 8"):
        cast(0)


@pytest.mark.parametrize("per_call", [1, 2, 3, 4, 5, 9, 0])
def test_call_plan_runs_identity_groups_first_whole_and_every_panel_once(per_call):
    c = cast(2)
    plan = c.call_plan(per_call)
    assert sorted(p for call in plan for p in call) == list(range(len(PANELS)))
    if per_call in (0, 9):
        assert plan == (tuple(range(9)),), "everything fits: one call in ComfyUI's order"
        return
    identity = set(c.identity_panels)
    first_other = next(i for i, call in enumerate(plan) if not set(call) <= identity)
    assert set().union(*plan[:first_other]) == identity, "identity calls come first and hold only identity panels"
    for group in c.identity:
        assert any(set(group) <= set(call) for call in plan), "a character's identity panels share one call"
    assert all(len(call) <= max(per_call, 2) for call in plan)


def test_identity_calls_do_not_depend_on_the_other_panels():
    longer = PANELS + ((), (BOB, ALICE), (BOB,))
    shorter = tuple(p for i, p in enumerate(PANELS) if i not in (3, 7))
    plans = [cast(2, panels).call_plan(3) for panels in (PANELS, longer, shorter)]
    identity_calls = [[call for call in plan if set(call) <= set(cast(2, p).identity_panels)]
                      for plan, p in zip(plans, (PANELS, longer, shorter))]
    as_slots = [[[cast(2, p).slot_of(panel) for panel in call] for call in calls]
                for calls, p in zip(identity_calls, (PANELS, longer, shorter))]
    assert as_slots[0] == as_slots[1] == as_slots[2] == [[0, 1], [2, 3]]


def dense_reference(c: StoryCast, q, k, v, chunks: int, heads: int):
    """Every row attends to its own tokens and all tokens of its sources' panels (same chunk), float64."""
    panels = c.panels
    out = torch.empty_like(q, dtype=torch.float64)
    for chunk in range(chunks):
        for panel in range(panels):
            row = chunk * panels + panel
            source_rows = [chunk * panels + c.identity_panels[slot] for slot in c.sources(panel)]
            keys = torch.cat([k[row]] + [k[r] for r in source_rows]).double()
            values = torch.cat([v[row]] + [v[r] for r in source_rows]).double()
            qh, kh, vh = (t.double().unflatten(-1, (heads, -1)).transpose(0, 1) for t in (q[row], keys, values))
            weights = (qh @ kh.transpose(1, 2) / qh.shape[-1] ** 0.5).softmax(-1)
            out[row] = (weights @ vh).transpose(0, 1).flatten(1)
    return out


def sdpa(heads):
    def attend(q, k, v, rows, mask=None):
        qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).flatten(2)
    return attend


def run_story(c, q, k, v, chunks, per_call, rate, heads=2):
    """One call of the engine as a host runs it: the call plan's subsets in order, rows cut and put back."""
    config = CSAConfig(rate_fine=rate, rate_coarse=rate, blocks="all", schedule="always", seed=3)
    story = StoryCall(CallPlanner(config, Step(0, 1)), c, chunks)
    out = torch.empty_like(q)
    for panels in c.call_plan(per_call):
        rows = torch.tensor([chunk * c.panels + panel for chunk in range(chunks) for panel in panels])
        result = story.attention((("output", 0), 0), panels, q[rows], k[rows], v[rows], (4, 4), sdpa(heads))
        out[rows] = result
    return out, story


@pytest.mark.parametrize("per_call", [0, 2, 3])
def test_rate_one_equals_the_dense_reference_in_one_call_or_several(per_call):
    c, chunks, tokens, width = cast(2), 2, 16, 8
    q, k, v = (torch.randn(chunks * c.panels, tokens, width, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ours, story = run_story(c, q, k, v, chunks, per_call, rate=1.0)
    torch.testing.assert_close(ours.double(), dense_reference(c, q, k, v, chunks, heads=2), rtol=1e-5, atol=1e-5)
    assert story.bank_bytes() == 2 * chunks * 4 * tokens * width * 4, "one step's identity tokens, k and v"


def test_sampled_tokens_are_shared_by_every_reader_and_chunks_stay_apart():
    c, chunks, tokens, width = cast(2), 2, 16, 8
    q, k, v = (torch.randn(chunks * c.panels, tokens, width, generator=torch.Generator().manual_seed(i)) for i in range(3))
    seen = {}

    def record(q_, k_, v_, rows, mask=None):
        for i, name in enumerate(rows):
            seen[name] = k_[i]
        return sdpa(2)(q_, k_, v_, rows)

    config = CSAConfig(rate_fine=0.5, rate_coarse=0.5, blocks="all", schedule="always")
    story = StoryCall(CallPlanner(config, Step(0, 1)), c, chunks)
    story.attention((("output", 0), 0), tuple(range(c.panels)), q, k, v, (4, 4), record)
    count = 8
    assert seen[(0, 3)].shape[0] == tokens, "[NC]: own tokens only"
    for chunk in range(chunks):
        for panel in range(c.panels):
            keys = seen[(chunk, panel)]
            assert keys.shape[0] == tokens + count * len(c.sources(panel))
            assert torch.equal(keys[:tokens], k[chunk * c.panels + panel])
            for j, slot in enumerate(c.sources(panel)):
                segment = keys[tokens + j * count: tokens + (j + 1) * count]
                source = k[chunk * c.panels + c.identity_panels[slot]]
                matches = (segment[:, None] == source[None]).all(-1)
                assert matches.any(1).all(), "every shared token is a token of that identity panel, same chunk"
    # Bob's panel 6 and the two-character panel 4 read the very same sampled tokens of panel 0.
    assert torch.equal(seen[(1, 6)][tokens:tokens + count], seen[(1, 4)][tokens:tokens + count])


def test_take_rows_cuts_nested_inputs_and_names_what_it_cannot():
    index = torch.tensor([0, 2])
    x = torch.arange(4.0)[:, None]
    taken = take_rows({"a": [x, None, torch.ones(1, 3)], "b": (x, 2.0)}, index, 4, "control")
    assert torch.equal(taken["a"][0], x[[0, 2]]) and taken["a"][1] is None and taken["a"][2].shape == (1, 3)
    assert isinstance(taken["b"], tuple) and taken["b"][1] == 2.0
    with pytest.raises(ConsistentAttentionError, match=r"'control\.a\[1\]' has 3 rows for a batch of 4"):
        take_rows({"a": [x, torch.ones(3)]}, index, 4, "control")


def test_a_single_call_keeps_one_layer_of_identity_tokens_at_a_time():
    c, chunks, tokens, width = cast(2), 2, 16, 8
    q, k, v = (torch.randn(chunks * c.panels, tokens, width, generator=torch.Generator().manual_seed(i)) for i in range(3))
    config = CSAConfig(rate_fine=0.5, rate_coarse=0.5, blocks="all", schedule="always")
    kept, dropped = (StoryCall(CallPlanner(config, Step(0, 1)), c, chunks, keep_bank=keep) for keep in (True, False))
    panels = tuple(range(c.panels))
    for layer in range(3):
        outs = [story.attention((("output", layer), 0), panels, q, k, v, (4, 4), sdpa(2)) for story in (kept, dropped)]
        assert torch.equal(outs[0], outs[1]), "the same attention either way"
    one_layer = 2 * chunks * 4 * 8 * width * 4  # k and v, 4 identity slots, 8 sampled tokens, fp32
    assert kept.bank_bytes() == 3 * one_layer and dropped.bank_bytes() == 0 and dropped.bank_peak == one_layer


def test_dit_layout_shares_image_tokens_only_and_shifts_keys():
    """[rows, heads, tokens, dim] with 3 text tokens first: shared tokens come from the image part."""
    from consistent_story.attention import BatchCast, TokenLayout, rope_shift

    rows, heads, text, image, dim = 3, 2, 3, 8, 8
    q, k, v = (torch.randn(rows, heads, text + image, dim, generator=torch.Generator().manual_seed(i)) for i in range(3))
    shift = rope_shift((2, 2, 4), 10000.0, 2, 5)
    layout = TokenLayout(token_dim=2, image=image, key_shift=shift)
    config = CSAConfig(rate_fine=1.0, rate_coarse=1.0, blocks="all", schedule="always")
    story = StoryCall(CallPlanner(config, Step(0, 1)), BatchCast.of(rows, 0), 1, layout=layout)
    seen = {}

    def record(q_, k_, v_, names, mask=None):
        for i, name in enumerate(names):
            seen[name] = (k_[i], v_[i])
        return q_.transpose(1, 2).flatten(2)

    story.attention((("single", 0), 0), (0, 1, 2), q, k, v, None, record)
    keys, values = seen[(0, 0)]
    assert keys.shape == (heads, text + image + 2 * image, dim)
    torch.testing.assert_close(keys[:, text + image:], shift(torch.cat([k[1, :, text:], k[2, :, text:]], dim=1)))
    torch.testing.assert_close(values[:, text + image:], torch.cat([v[1, :, text:], v[2, :, text:]], dim=1))
    # a shift by 0 changes nothing; two shifts add up
    torch.testing.assert_close(rope_shift((2, 2, 4), 10000.0, 2, 0)(k), k)
    two = rope_shift((2, 2, 4), 10000.0, 2, 2)
    torch.testing.assert_close(two(rope_shift((2, 2, 4), 10000.0, 2, 3)(k)), shift(k), rtol=1e-5, atol=1e-5)


def test_text_length_comes_from_each_call_and_reference_tokens_are_never_shared():
    """A DiT layout knows the image and trailing (reference) tokens; the text is the rest of the
    call, so calls with longer or shorter prompts find their image tokens all the same."""
    from consistent_story.attention import TokenLayout, dit_layout

    layout = dit_layout((8, 8), 2, references=[(4, 4)])  # 16 image tokens, 4 reference tokens
    assert (layout.image, layout.trailing) == (16, 4)
    assert layout.shared_tokens(6 + 16 + 4) == (6, 16) and layout.shared_tokens(30 + 16 + 4) == (30, 16)
    with pytest.raises(ConsistentAttentionError, match="expected 16 image tokens per panel and 4 reference tokens"):
        layout.shared_tokens(19)
    assert TokenLayout(token_dim=None, image=4).for_rank(3).token_dim == 1
    assert TokenLayout(token_dim=None, image=4).for_rank(4).token_dim == 2


def test_a_mask_is_extended_with_the_readers_own_columns():
    from consistent_story.attention import extend_mask

    mask = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)  # 2 rows, 3 queries, 5 keys
    columns = torch.tensor([[1, 4], [0, 0]])
    extended = extend_mask(mask, columns)
    assert extended.shape == (2, 3, 7)
    assert torch.equal(extended[:, :, :5], mask)
    assert torch.equal(extended[0, :, 5:], mask[0][:, [1, 4]]) and torch.equal(extended[1, :, 5:], mask[1][:, [0, 0]])
    broadcast = extend_mask(mask[:1, None], columns)  # one mask for every row, a heads dimension
    assert broadcast.shape == (2, 1, 3, 7) and torch.equal(broadcast[1, 0, :, 5:], mask[0][:, [0, 0]])
