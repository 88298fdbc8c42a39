"""Lines a peer can cause are logged at a bounded rate (``ps.throttle``)."""

from ps.throttle import Throttle


def test_first_of_a_kind_then_one_per_interval_counting_the_rest() -> None:
    t = Throttle(every_s=10.0)
    assert t.allow("a", now=0.0) == 0
    assert [t.allow("a", now=x) for x in (1.0, 2.0, 9.9)] == [None, None, None]
    assert t.allow("b", now=5.0) == 0  # another kind is not held back
    assert t.allow("a", now=10.5) == 3
    assert t.allow("a", now=11.0) is None
