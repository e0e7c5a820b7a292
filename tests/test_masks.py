"""Every mask of the tick against hand-written visibility for a small slot table."""

import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.cascade.masks import tick_frame_mask
from bcjax.names import MASKS

# A P4 tick (4 steps + the clean stage) in steady state, one frame per block (block_frames = 1),
# sink 1 frame, rolling 2 frames: window_frames = 1 + 2 + 1 = 4. Blocks 6..10 are in flight,
# block b in slot b mod 5; block 6 is in the clean stage, block 10 in stage 0. The cache holds
# the sink (frame 0) and the two frames before block 6, in ring order.
SLOT_BLOCKS = [10, 6, 7, 8, 9]
SLOT_STAGES = [0, 4, 3, 2, 1]
CACHE_IDS = [0, 5, 4]
# One string per query slot: "cache keys | in-flight keys" in the key order above ('1' = seen).
EXPECTED = {
    "causal": ["1..|1..11", "111|.1...", "11.|.11..", "1..|.111.", "1..|..111"],
    # newer blocks too, never cut by the window
    "bidirectional": ["1..|1..11", "111|11111", "11.|11111", "1..|11111", "1..|1.111"],
    # the clean stage's row (block 6) is the causal one: its cache entry sees only the old context
    "bidirectional-clean-causal": ["1..|1..11", "111|.1...", "11.|11111", "1..|11111", "1..|1.111"],
    # sink + 3 non-sink frames each, sliding forward to the newest block in reach: the oldest
    # non-sink frames go first (block 6 drops cached frames 4, 5 and sees 7, 8; block 7 sees
    # 8, 9), and block 6 cannot reach block 9 or 10, block 7 not block 10
    "bidirectional-windowed": ["1..|1..11", "1..|.111.", "1..|..111", "1..|1..11", "1..|1..11"],
}


def _render(mask, num_cache: int) -> list[str]:
    rows = ["".join("1" if v else "." for v in row) for row in np.asarray(mask)]
    return [f"{r[:num_cache]}|{r[num_cache:]}" for r in rows]


def _mask(mask, busy=None, clean=True, blocks=SLOT_BLOCKS, cache=CACHE_IDS, stages=SLOT_STAGES):
    m = len(blocks)
    busy = np.ones(m, bool) if busy is None else np.asarray(busy)
    return tick_frame_mask(jnp.arange(m), jnp.asarray(blocks), jnp.asarray(busy), jnp.asarray(cache), block_frames=1,
                           sink=1, rolling=2, mask=mask,
                           clean=(jnp.asarray(stages) == 4) & jnp.asarray(busy) if clean else None)


def test_every_mask_has_a_hand_written_table():
    assert set(EXPECTED) == set(MASKS)


@pytest.mark.parametrize("mask", MASKS)
def test_mask_visibility_matches_hand_written(mask):
    assert _render(_mask(mask), len(CACHE_IDS)) == EXPECTED[mask]


def test_windowed_rows_never_see_more_than_the_models_window():
    # window_frames = 4 frames (sink 1 + rolling 2 + the block's 1); bidirectional rows up to 8
    # (block 6: 1 + 2 + 1 + 4 newer)
    assert np.asarray(_mask("bidirectional-windowed")).sum(axis=1).max() == 4
    assert np.asarray(_mask("bidirectional")).sum(axis=1).max() == 8


def test_without_a_clean_stage_clean_causal_is_bidirectional():
    """A no-clean schedule has no clean row (`clean` all False, or not given)."""
    bi = np.asarray(_mask("bidirectional"))
    np.testing.assert_array_equal(np.asarray(_mask("bidirectional-clean-causal", clean=False)), bi)
    no_clean = _mask("bidirectional-clean-causal", stages=[0, 3, 2, 1, 0], busy=[1, 1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(no_clean), np.asarray(_mask("bidirectional", busy=[1, 1, 1, 1, 0])))


@pytest.mark.parametrize("mask", MASKS)
def test_filling_cascade_idle_slots_are_never_seen(mask):
    """Tick 1 of P4: blocks 0 (stage 1) and 1 (stage 0) in slots 0, 1; slots 2..4 idle, cache empty.
    Every mask agrees here (nothing to cut, no clean stage yet) except that causal hides block 1
    from block 0; an idle slot's key is seen by no row but its own."""
    blocks, stages, busy = [0, 1, 2, 3, 4], [1, 0, -1, -1, -1], [1, 1, 0, 0, 0]
    got = _render(_mask(mask, busy=busy, blocks=blocks, cache=[-1, -1, -1], stages=stages), 3)
    newer = "." if mask == "causal" else "1"
    assert got[:2] == [f"...|1{newer}...", "...|11..."]
    assert [row[4 + slot] for slot, row in enumerate(got)][2:] == ["1", "1", "1"]
    assert all(row[4 + idle] == "." for slot, row in enumerate(got) for idle in (2, 3, 4) if idle != slot)
