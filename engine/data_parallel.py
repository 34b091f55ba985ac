"""The driver's book of requests over data-parallel (attention) ranks: which rank owns each one,
what goes to each rank at the next step, and what a request had streamed when its rank was lost.

Pure bookkeeping, no Ray: the cluster engine and the simulator share the rank choice, and the
cluster engine re-admits a lost rank's requests from this book (prompt + the tokens already
streamed), so their streams continue with no gap and no duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from engine.request import Request, SamplingParams
from engine.sampling import new_seed


class _Output(Protocol):  # engine.core.RequestOutput (not imported: the simulator uses this module)
    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool


O = TypeVar("O", bound=_Output)


def least_loaded_rank(unfinished_per_rank: Sequence[int]) -> int:
    """The rank with the fewest unfinished requests; ties go to the lowest rank."""
    if not unfinished_per_rank:
        raise ValueError("there is no data-parallel rank to choose from")
    return min(range(len(unfinished_per_rank)), key=lambda rank: (unfinished_per_rank[rank], rank))


@dataclass
class _Entry:
    prompt: list[int]
    params: SamplingParams
    rank: int
    output: list[int] = field(default_factory=list)
    images: tuple = ()  # pixels to encode, or ...
    image_features: Any = None  # ... their features (a Ray object ref, in the cluster)
    held: bool = False  # its images are being encoded: no rank has it yet


@dataclass(frozen=True)
class RankInputs:
    """What one rank takes at the next step."""

    new_requests: tuple[Request, ...]
    aborts: tuple[str, ...]


class RequestBook:
    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self._entries: dict[str, _Entry] = {}
        self._new: list[list[str]] = [[] for _ in range(num_ranks)]
        self._aborts: list[list[str]] = [[] for _ in range(num_ranks)]
        self._draining: set[int] = set()  # ranks that take no new requests (about to leave)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def has_work(self) -> bool:
        return bool(self._entries) or any(self._aborts)

    @property
    def has_aborts(self) -> bool:
        return any(self._aborts)

    def rank_of(self, request_id: str) -> int:
        return self._entries[request_id].rank

    def add(
        self,
        request_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        images: Sequence[Any] = (),
        hold: bool = False,
    ) -> int:
        """Give a new request to the least loaded rank; returns the rank. A request that samples
        gets a seed here if it has none, so a recompute anywhere draws the same tokens. `hold`:
        it goes to its rank only at `release` (its images are being encoded)."""
        if request_id in self._entries:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.seed is None and params.temperature > 0:
            params = replace(params, seed=new_seed())
        rank = least_loaded_rank(self._unfinished_per_rank())
        self._entries[request_id] = _Entry(list(prompt), params, rank, images=tuple(images), held=hold)
        if not hold:
            self._new[rank].append(request_id)
        return rank

    def request(self, request_id: str) -> Request:
        """The request as a rank takes it: prompt, what it streamed so far, its images."""
        return self._request(request_id)

    def release(self, request_id: str, image_features: Any) -> None:
        """A held request's features exist: it goes to its rank at the next step."""
        entry = self._entries.get(request_id)
        if entry is None or not entry.held:
            return
        entry.held, entry.images, entry.image_features = False, (), image_features
        self._new[entry.rank].append(request_id)

    @property
    def num_held(self) -> int:
        return sum(e.held for e in self._entries.values())

    def abort(self, request_id: str) -> None:
        """Forget a request; its rank frees its blocks at the next step (if it had it already)."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        if entry.held:
            return
        if request_id in self._new[entry.rank]:
            self._new[entry.rank].remove(request_id)
        else:
            self._aborts[entry.rank].append(request_id)

    def take_inputs(self) -> list[RankInputs]:
        """Per rank, the requests it takes and the aborts it applies at the next step."""
        inputs = [
            RankInputs(tuple(self._request(rid) for rid in new), tuple(aborts))
            for new, aborts in zip(self._new, self._aborts, strict=True)
        ]
        self._new = [[] for _ in range(self.num_ranks)]
        self._aborts = [[] for _ in range(self.num_ranks)]
        return inputs

    def record(self, outputs: Iterable[O]) -> list[O]:
        """Note what a step streamed; returns the outputs of requests still in the book (an
        abort meanwhile drops the rest) and forgets the finished ones."""
        kept = []
        for out in outputs:
            entry = self._entries.get(out.request_id)
            if entry is None:
                continue
            entry.output.extend(out.new_token_ids)
            kept.append(out)
            if out.finished:
                del self._entries[out.request_id]
        return kept

    def finish(self, request_id: str) -> None:
        """A rank refused the request: forget it."""
        self._entries.pop(request_id, None)

    def drain(self, ranks: Iterable[int]) -> None:
        """These ranks take no new requests from now on (they finish the ones they have)."""
        self._draining |= set(ranks)
        if self._draining and len(self._draining) >= self.num_ranks:
            raise ValueError("cannot drain every data-parallel rank")

    def undrain(self, ranks: Iterable[int]) -> None:
        self._draining -= set(ranks)

    def drained(self, ranks: Iterable[int]) -> bool:
        """True once no request is on any of these ranks."""
        ranks = set(ranks)
        return not any(e.rank in ranks for e in self._entries.values())

    def add_ranks(self, n: int) -> None:
        """n new ranks at the end, empty (new requests go to them first: they are the least loaded)."""
        self.num_ranks += n
        self._new += [[] for _ in range(n)]
        self._aborts += [[] for _ in range(n)]

    def renumber(self, lost: Iterable[int], survivors: Sequence[int]) -> list[str]:
        """The ranks in `lost` are gone and rank survivors[j] is now rank j. Every request of a lost
        rank goes to a surviving one as a new request carrying the tokens it streamed (its KV is
        recomputed there); returns their ids."""
        if not survivors:
            raise ValueError("no data-parallel rank survives")
        new_rank: Mapping[int, int] = {old: j for j, old in enumerate(survivors)}
        lost = set(lost)
        moved = [rid for rid, e in self._entries.items() if e.rank in lost and not e.held]
        self._new = [self._new[old] for old in survivors]
        self._aborts = [self._aborts[old] for old in survivors]
        self.num_ranks = len(survivors)
        self._draining = {new_rank[r] for r in self._draining if r in new_rank}
        for entry in self._entries.values():
            entry.rank = new_rank.get(entry.rank, -1)
        for rid in moved:
            rank = least_loaded_rank(self._unfinished_per_rank())
            self._entries[rid].rank = rank
            self._new[rank].append(rid)
        for entry in self._entries.values():  # held ones go to a survivor when released
            if entry.held and entry.rank < 0:
                entry.rank = least_loaded_rank(self._unfinished_per_rank())
        return moved

    def _request(self, request_id: str) -> Request:
        entry = self._entries[request_id]
        return Request(
            request_id,
            list(entry.prompt),
            entry.params,
            output_token_ids=list(entry.output),
            images=entry.images,
            image_features=entry.image_features,
        )

    def _unfinished_per_rank(self) -> list[int]:
        """Per rank, its unfinished requests (a draining rank counts as full)."""
        counts = [0] * self.num_ranks
        for entry in self._entries.values():
            if entry.rank >= 0:
                counts[entry.rank] += 1
        for rank in self._draining:
            counts[rank] = len(self._entries) + 1
        return counts
