"""Step-time breakdowns: phases add up per step, and misuse is caught instead of mis-timed."""

import pytest

from ear_dist.telemetry.timer import (
    OPTIMIZER,
    PHASES,
    STUDENT_FWD_BWD,
    TEACHER_ROLLOUT,
    PhaseTimers,
    StepTiming,
    mean_timing,
)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_phases_accumulate_within_a_step():
    clock = FakeClock()
    timers = PhaseTimers("cpu", clock=clock)
    timers.start_step()
    clock.t += 0.5  # untimed work
    with timers.phase(TEACHER_ROLLOUT):
        clock.t += 2.0
    for _ in range(3):  # one forward/backward per window
        with timers.phase(STUDENT_FWD_BWD):
            clock.t += 0.25
    with timers.phase(OPTIMIZER):
        clock.t += 0.1
    timing = timers.end_step()
    assert timing.step_s == pytest.approx(3.35)
    assert timing.phases == pytest.approx({TEACHER_ROLLOUT: 2.0, STUDENT_FWD_BWD: 0.75, OPTIMIZER: 0.1})
    assert timing.calls == {TEACHER_ROLLOUT: 1, STUDENT_FWD_BWD: 3, OPTIMIZER: 1}
    assert timing.other_s == pytest.approx(0.5)
    metrics = timing.as_metrics()
    assert metrics["time/teacher_rollout_ms"] == pytest.approx(2000.0)
    assert metrics["time/step_ms"] == pytest.approx(3350.0)

    # the next step starts empty
    timers.start_step()
    clock.t += 1.0
    assert timers.end_step().phases == {}


def test_phase_exception_still_records_and_closes():
    clock = FakeClock()
    timers = PhaseTimers(clock=clock)
    timers.start_step()
    with pytest.raises(ValueError):
        with timers.phase(TEACHER_ROLLOUT):
            clock.t += 1.0
            raise ValueError("rollout failed")
    timing = timers.end_step()
    assert timing.phases[TEACHER_ROLLOUT] == pytest.approx(1.0)


def test_misuse_is_an_error():
    timers = PhaseTimers()
    with pytest.raises(RuntimeError, match="outside a step"):
        with timers.phase(TEACHER_ROLLOUT):
            pass
    with pytest.raises(RuntimeError, match="without start_step"):
        timers.end_step()
    timers.start_step()
    with pytest.raises(RuntimeError, match="twice"):
        timers.start_step()
    with timers.phase(TEACHER_ROLLOUT):
        with pytest.raises(RuntimeError, match="cannot nest"):
            with timers.phase(TEACHER_ROLLOUT):
                pass
        with pytest.raises(RuntimeError, match="still running"):
            timers.end_step()
    timers.end_step()


def test_real_clock_on_cpu_measures_nonnegative_time():
    timers = PhaseTimers("cpu")
    assert not timers.use_cuda
    timers.start_step()
    with timers.phase(STUDENT_FWD_BWD):
        sum(range(1000))
    timing = timers.end_step()
    assert 0.0 <= timing.phases[STUDENT_FWD_BWD] <= timing.step_s


def test_mean_over_steps_counts_missing_phases_as_zero():
    steps = [
        StepTiming(step_s=2.0, phases={TEACHER_ROLLOUT: 1.0}, calls={TEACHER_ROLLOUT: 1}),
        StepTiming(step_s=4.0, phases={TEACHER_ROLLOUT: 3.0, OPTIMIZER: 0.5}, calls={TEACHER_ROLLOUT: 1, OPTIMIZER: 1}),
    ]
    mean = mean_timing(steps)
    assert mean.step_s == pytest.approx(3.0)
    assert mean.phases == pytest.approx({TEACHER_ROLLOUT: 2.0, OPTIMIZER: 0.25})
    assert mean.calls == {TEACHER_ROLLOUT: 2, OPTIMIZER: 1}
    with pytest.raises(ValueError):
        mean_timing([])
    assert PHASES[0] == "data_wait" and len(set(PHASES)) == 6
