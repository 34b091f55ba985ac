"""The step-time histogram's buckets: cumulative, as Prometheus reads them."""

from engine.async_engine import StepTimes


def test_step_times_count_each_step_in_every_bucket_it_fits():
    h = StepTimes(bounds=(0.01, 0.1, 1.0))
    for s in (0.005, 0.05, 0.05, 3.0):
        h.add(s)
    snap = h.snapshot()
    assert snap["counts"] == [1, 3, 3] and snap["count"] == 4
    assert abs(snap["sum"] - 3.105) < 1e-9
