"""Schedules as data: the built-in GPipe and 1F1B lists, their printed form, and the validator."""

from __future__ import annotations

import pytest

from worker.pipeline.schedule import Action, ScheduleError, build, format_actions, gpipe, one_f_one_b, parse, validate


def test_printed_form_of_gpipe_and_1f1b():
    assert str(gpipe(2, 3)) == ("stage 0: 0F0 0F1 0F2 0B0 0B1 0B2\n"
                                "stage 1: 1F0 1F1 1F2 1B0 1B1 1B2")
    assert str(one_f_one_b(3, 4)) == ("stage 0: 0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3\n"
                                      "stage 1: 1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3\n"
                                      "stage 2: 2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3")


def test_action_parse_round_trip():
    a = Action.parse("12B3")
    assert (a.stage, a.kind, a.micro) == (12, "B", 3) and str(a) == "12B3"
    for bad in ("1X0", "F0", "1F", "-1F0", "1F0x"):
        with pytest.raises(ScheduleError):
            Action.parse(bad)


@pytest.mark.parametrize("P", range(1, 7))
@pytest.mark.parametrize("M", range(1, 9))
def test_builtin_schedules_are_valid_with_the_documented_memory(P, M):
    assert validate(gpipe(P, M)) == [M] * P
    assert validate(one_f_one_b(P, M)) == [min(P - s, M) for s in range(P)]
    assert max(validate(one_f_one_b(P, M))) <= P
    assert str(parse(str(one_f_one_b(P, M)))) == str(one_f_one_b(P, M))


@pytest.mark.parametrize("P", [1, 2, 3, 5])
def test_one_microbatch_gpipe_and_1f1b_are_the_same(P):
    assert gpipe(P, 1).actions == one_f_one_b(P, 1).actions


def test_build_rejects_unknown_names_and_sizes():
    with pytest.raises(ScheduleError, match="unknown schedule"):
        build("interleaved", 2, 4)
    with pytest.raises(ScheduleError, match="at least one"):
        build("gpipe", 2, 0)


REJECTED = {
    "backward before forward": ("0F0 0B1 0F1 0B0\n1F0 1F1 1B0 1B1", "backward 0B1 before its forward"),
    "missing backward": ("0F0 0F1 0B0\n1F0 1F1 1B0 1B1", r"no B for microbatch\(es\) \[1\]"),
    "duplicate": ("0F0 0F0 0F1 0B0 0B1\n1F0 1F1 1B0 1B1", "0F0 appears twice"),
    "forwards out of order": ("0F1 0F0 0B0 0B1\n1F0 1F1 1B0 1B1", "must run in order"),
    "backwards out of order": ("0F0 0F1 0B1 0B0\n1F0 1F1 1B0 1B1", "must run in order"),
    "action of another stage": ("0F0 0F1 0B0 0B1\n1F0 0F1 1B0 1B1", "belongs to stage 0"),
    "microbatch out of range": ("0F0 0F1 0B0 0B1\n1F0 1F1 1B0 1B1 1F2 1B2", "outside"),
    # Stage 0 waits for 1B0 before sending 0F1; stage 1 needs 0F1 before it runs 1B0.
    "deadlock between neighbours": ("0F0 0B0 0F1 0B1\n1F0 1F1 1B0 1B1", "deadlock: 0B0 waits for 1B0; 1F1 waits for 0F1"),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_validator_rejects(case):
    text, message = REJECTED[case]
    sched = parse(text)
    if case == "microbatch out of range":  # the schedule claims 2 microbatches but stage 1 runs a third
        sched = type(sched)(sched.name, sched.stages, 2, sched.actions)
    with pytest.raises(ScheduleError, match=message):
        validate(sched)


def test_validator_rejects_a_three_stage_cycle():
    # Stage 2 insists on a backward of microbatch 0 only after its forward of microbatch 1, which
    # needs 1F1, which stage 1 runs only after 1B0, which needs 2B0: a cycle through two links.
    sched = parse("0F0 0F1 0B0 0B1\n1F0 1B0 1F1 1B1\n2F0 2F1 2B0 2B1")
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(sched)


def test_validator_accepts_a_hand_written_schedule():
    sched = parse("stage 0: 0F0 0F1 0F2 0B0 0B1 0B2\nstage 1: 1F0 1B0 1F1 1B1 1F2 1B2")
    assert validate(sched) == [3, 1]
    assert format_actions(sched.for_stage(1)) == "1F0 1B0 1F1 1B1 1F2 1B2"


def test_wrong_number_of_stage_lists_is_rejected():
    sched = gpipe(2, 2)
    with pytest.raises(ScheduleError, match="3 stages"):
        validate(type(sched)("x", 3, 2, sched.actions))
