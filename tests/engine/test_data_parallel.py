"""The driver's request book: rank choice, aborts, what a lost rank's requests carry elsewhere."""

from __future__ import annotations

import pytest

from engine.core import RequestOutput
from engine.data_parallel import RequestBook, least_loaded_rank
from engine.request import SamplingParams

GREEDY = SamplingParams(max_tokens=4)


def out(rid: str, tokens: tuple[int, ...], finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, tokens, finished, None, 3, len(tokens))


def test_least_loaded_rank_breaks_ties_low():
    assert least_loaded_rank([2, 1, 1]) == 1
    with pytest.raises(ValueError, match="no data-parallel rank"):
        least_loaded_rank([])


def test_requests_spread_and_aborts_go_where_the_request_is():
    book = RequestBook(2)
    assert [book.add(f"r{i}", [1, 2, 3], GREEDY) for i in range(4)] == [0, 1, 0, 1]
    book.abort("r2")  # not sent yet: simply dropped
    first = book.take_inputs()
    assert [[r.request_id for r in x.new_requests] for x in first] == [["r0"], ["r1", "r3"]]
    book.abort("r1")  # already on rank 1: rank 1 applies the abort next step
    assert [x.aborts for x in book.take_inputs()] == [(), ("r1",)]
    assert book.record([out("r1", (9,)), out("r0", (5,))]) == [out("r0", (5,))]
    with pytest.raises(ValueError, match="already in use"):
        book.add("r0", [1], GREEDY)


def test_sampled_requests_get_a_seed_that_follows_them():
    book = RequestBook(1)
    book.add("s", [1], SamplingParams(max_tokens=4, temperature=0.7))
    book.add("g", [1], GREEDY)
    seeds = {r.request_id: r.params.seed for r in book.take_inputs()[0].new_requests}
    assert seeds["s"] is not None and seeds["g"] is None


def test_a_lost_rank_s_requests_move_with_the_tokens_they_streamed():
    book = RequestBook(3)
    for i in range(6):
        book.add(f"r{i}", [7, 8, 9], GREEDY)  # ranks 0 1 2 0 1 2
    book.take_inputs()
    book.record([out("r1", (4, 5)), out("r4", (6,)), out("r0", (1,))])
    moved = book.renumber(lost=[1], survivors=[0, 2])
    assert sorted(moved) == ["r1", "r4"]
    inputs = book.take_inputs()
    carried = {r.request_id: r.output_token_ids for x in inputs for r in x.new_requests}
    assert carried == {"r1": [4, 5], "r4": [6]}
    assert {book.rank_of(r) for r in ("r0", "r3")} == {0} and {book.rank_of(r) for r in ("r2", "r5")} == {1}
    assert sorted(book.rank_of(r) for r in moved) == [0, 1]  # spread over the survivors
