"""Stagger tables against hand-written expectations (stage and block per tick and slot)."""

import numpy as np
import pytest

from bcjax.schedule.stagger import Stagger, make_stagger, stagger_table

# One string per tick, one character per slot: the stage (or block) there, '.' = idle.
EXPECTED = {
    # 3 steps (CausVid): stages 0..3, a block lives 4 ticks
    (3, "P1", 3): dict(
        stride=3, slots=2,
        stage=["0.", "1.", "2.", "30", ".1", ".2", "03", "1.", "2.", "3."],
        block=["0.", "0.", "0.", "01", ".1", ".1", "21", "2.", "2.", "2."]),
    (3, "P2", 3): dict(
        stride=2, slots=2,
        stage=["0.", "1.", "20", "31", "02", "13", "2.", "3."],
        block=["0.", "0.", "01", "01", "21", "21", "2.", "2."]),
    (3, "P4", 6): dict(
        stride=1, slots=4,
        stage=["0...", "10..", "210.", "3210", "0321", "1032", "21.3", "32..", ".3.."],
        block=["0...", "01..", "012.", "0123", "4123", "4523", "45.3", "45..", ".5.."]),
    # 4 steps (Self-Forcing, LongLive): stages 0..4, a block lives 5 ticks
    (4, "P1", 3): dict(
        stride=4, slots=2,
        stage=["0.", "1.", "2.", "3.", "40", ".1", ".2", ".3", "04", "1.", "2.", "3.", "4."],
        block=["0.", "0.", "0.", "0.", "01", ".1", ".1", ".1", "21", "2.", "2.", "2.", "2."]),
    (4, "P2", 4): dict(
        stride=2, slots=3,
        stage=["0..", "1..", "20.", "31.", "420", ".31", "042", "1.3", "2.4", "3..", "4.."],
        block=["0..", "0..", "01.", "01.", "012", ".12", "312", "3.2", "3.2", "3..", "3.."]),
    (4, "P4", 3): dict(
        stride=1, slots=5,
        stage=["0....", "10...", "210..", "321..", "432..", ".43..", "..4.."],
        block=["0....", "01...", "012..", "012..", "012..", ".12..", "..2.."]),
    # 4 steps with no clean stage: stages 0..3, a block lives 4 ticks; stage 3 emits its x0 and
    # writes its cache entry
    (4, "P1-no-clean", 3): dict(
        stride=4, slots=1,
        stage=["0", "1", "2", "3", "0", "1", "2", "3", "0", "1", "2", "3"],
        block=["0", "0", "0", "0", "1", "1", "1", "1", "2", "2", "2", "2"]),
    (4, "P2-no-clean", 4): dict(
        stride=2, slots=2,
        stage=["0.", "1.", "20", "31", "02", "13", "20", "31", ".2", ".3"],
        block=["0.", "0.", "01", "01", "21", "21", "23", "23", ".3", ".3"]),
    (4, "P4-no-clean", 6): dict(
        stride=1, slots=4,
        stage=["0...", "10..", "210.", "3210", "0321", "1032", "21.3", "32..", ".3.."],
        block=["0...", "01..", "012.", "0123", "4123", "4523", "45.3", "45..", ".5.."]),
    # 5 steps (Krea's server default): stages 0..5, a block lives 6 ticks
    (5, "P1", 2): dict(
        stride=5, slots=2,
        stage=["0.", "1.", "2.", "3.", "4.", "50", ".1", ".2", ".3", ".4", ".5"],
        block=["0.", "0.", "0.", "0.", "0.", "01", ".1", ".1", ".1", ".1", ".1"]),
    (5, "P2", 3): dict(
        stride=3, slots=2,
        stage=["0.", "1.", "2.", "30", "41", "52", "03", "14", "25", "3.", "4.", "5."],
        block=["0.", "0.", "0.", "01", "01", "01", "21", "21", "21", "2.", "2.", "2."]),
    (5, "P4", 2): dict(
        stride=1, slots=6,
        stage=["0.....", "10....", "21....", "32....", "43....", "54....", ".5...."],
        block=["0.....", "01....", "01....", "01....", "01....", "01....", ".1...."]),
}


def _render(table: np.ndarray) -> list[str]:
    return ["".join("." if v < 0 else str(v) for v in row) for row in table]


@pytest.mark.parametrize("steps,stagger,num_blocks", sorted(EXPECTED), ids=lambda v: str(v))
def test_stagger_table_matches_hand_written(steps, stagger, num_blocks):
    want = EXPECTED[(steps, stagger, num_blocks)]
    st = make_stagger(stagger, steps)
    assert (st.stride, st.num_slots) == (want["stride"], want["slots"])
    table = stagger_table(st, num_blocks)
    assert _render(table["stage"]) == want["stage"]
    assert _render(table["block"]) == want["block"]


@pytest.mark.parametrize("steps", [3, 4, 5])
@pytest.mark.parametrize("stagger", ["sequential", "P1", "P2", "P4", "P1-no-clean", "P2-no-clean", "P4-no-clean"])
def test_stagger_invariants(steps, stagger):
    st = make_stagger(stagger, steps)
    nb = 9
    table = stagger_table(st, nb)
    busy = table["busy"]
    for b in range(nb):  # every block passes through every stage exactly once, in order, in one slot
        where = np.argwhere(table["block"] == b)
        assert len(where) == st.num_stages
        assert len(set(where[:, 1])) == 1
        np.testing.assert_array_equal(table["stage"][table["block"] == b], np.arange(st.num_stages))
    for row_stage, row_busy in zip(table["stage"], busy, strict=True):  # at most one block per stage per tick
        stages = row_stage[row_busy]
        assert len(stages) == len(set(stages))
    if stagger == "sequential":
        assert busy.sum(axis=1).max() == 1


def test_one_slot_per_block_in_flight_and_errors():
    # slots are not devices (the `tokens` axis splits tokens): never a padded, idle slot
    for stagger, slots in (("P4", 5), ("P2", 3), ("P1", 2), ("sequential", 1)):
        st = make_stagger(stagger, 4)
        assert st.in_flight == st.num_slots == slots
    with pytest.raises(ValueError, match="stagger 'P0'"):
        make_stagger("P0", 4)
    with pytest.raises(ValueError, match="stagger 'fast'"):
        make_stagger("fast", 4)
    with pytest.raises(ValueError, match="cannot hold the 5 blocks in flight"):
        Stagger(4, 1, 4)


def test_no_clean_staggers_drop_the_clean_stage():
    from bcjax.cascade.tokens import token_split

    st = make_stagger("P4-no-clean", 4)
    assert (st.num_stages, st.in_flight, st.num_slots, st.write_stage, st.emit_stage) == (4, 4, 4, 3, 3)
    assert make_stagger("P4", 4, clean_pass=False) == st
    assert make_stagger("P4", 4).write_stage == 4  # with a clean stage, the clean pass writes
    # P1 of it is the sequential pipeline without the clean pass: one block at a time, n passes each
    assert make_stagger("P1-no-clean", 4) == make_stagger("sequential-no-clean", 4) == Stagger(4, 4, 1, False)
    assert (st.num_ticks(10), make_stagger("P4", 4).num_ticks(10)) == (13, 14)  # one stage less to drain
    # its 4 blocks in flight split over 4 and 8 `tokens` devices with no padding group (1560 tokens a
    # 480 x 832 frame; the tests' tiny 6-token frame in groups of 3 on 8)
    for p, devices, group in ((1560, 4, None), (1560, 8, None), (6, 4, None), (6, 8, 3)):
        sp = token_split(st.in_flight * 3, p, devices, group)
        assert sp.padded_tokens == sp.tokens, (p, devices)
    with pytest.raises(ValueError, match="stagger 'P0-no-clean'"):
        make_stagger("P0-no-clean", 4)
    with pytest.raises(ValueError, match=r"stride 5 must be in \[1, 4\] for 4 steps and no clean pass"):
        Stagger(4, 5, 1, False)
