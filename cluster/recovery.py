"""Noticing lost workers during a step, and recovering: a new membership epoch over the survivors.

`await_step` waits for a step's results while watching every worker: an attention step that
reports its group broke, an expert loop that ended, an actor Ray reports dead, or (after
`stall_check_s`) a worker that does not answer a ping, which is then killed. Once something
failed it makes every survivor leave the epoch (LEAVE to the expert loops; the attention ranks
leave on their own when their collectives fail) and reports who is lost.

`Recovery.recover` then plans the survivors' world: the expert map over the live expert workers
(`router.recovery.shrink`: experts whose only replicas were lost are loaded into free or grown
slots on survivors, which keep everything else), the lost attention ranks' requests re-admitted
on the others from their prompt and streamed tokens (`engine.data_parallel.RequestBook`), a new
epoch joined by all. The interrupted step then runs again: attention ranks replay the schedule
they kept, so scheduler and KV state advance only once per step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ray
from ray.exceptions import RayActorError

from cluster.attention_worker import StepResult
from cluster.expert_worker import LoopEnd
from cluster.membership import Command
from engine.protocol import EngineUnavailable
from router.layout import RankLayout
from router.recovery import shrink, survivor_changes

if TYPE_CHECKING:
    from cluster.engine import ClusterEngine

log = logging.getLogger(__name__)
POLL_S = 0.2


class ClusterUnavailable(EngineUnavailable):
    """The engine cannot serve: no attention or no expert worker is left, or the survivors cannot
    hold every expert. Requests should be retried (elsewhere: the Serve replica is replaced)."""


@dataclass
class StepOutcome:
    results: list[StepResult]  # the attention ranks that answered (a failed one has `failed` set)
    lost_attention: set[int] = field(default_factory=set)
    lost_experts: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    loops_ended: set[int] = field(default_factory=set)

    @property
    def failed(self) -> bool:
        return bool(self.lost_attention or self.lost_experts or self.errors)


def await_step(engine: ClusterEngine, refs: list[ray.ObjectRef]) -> StepOutcome:
    """The step's results, or what failed in it once every survivor has left the epoch."""
    outcome = StepOutcome([])
    answered: dict[int, StepResult] = {}
    start, pinged, reported = time.monotonic(), False, set()
    while len(answered) + len(outcome.lost_attention) < len(refs):
        waiting = [ref for i, ref in enumerate(refs) if i not in answered and i not in outcome.lost_attention]
        ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=POLL_S)
        _take_attention(refs, ready, answered, outcome)
        _take_loop_ends(engine, outcome, block_s=0)
        outcome.errors += [r.failed for i, r in answered.items() if r.failed and i not in reported]
        reported |= set(answered)
        if outcome.failed:
            break
        if not pinged and time.monotonic() - start > engine.cluster.faults.stall_check_s:
            pinged = True
            _kill_hung(engine, outcome)
    if outcome.failed:
        _settle(engine, refs, answered, outcome)
    outcome.results = [answered[i] for i in sorted(answered)]
    return outcome


def _take_attention(refs: list, ready: list, answered: dict, outcome: StepOutcome) -> None:
    for ref in ready:
        i = refs.index(ref)
        try:
            answered[i] = ray.get(ref)
        except RayActorError:
            outcome.lost_attention.add(i)


def _take_loop_ends(engine: ClusterEngine, outcome: StepOutcome, block_s: float) -> list[int]:
    """Expert loops that ended (within `block_s`): a lost worker, or one whose group broke."""
    running = [ref for w, ref in enumerate(engine.loops) if w not in outcome.loops_ended]
    if not running:
        return []
    ended, _ = ray.wait(running, num_returns=len(running), timeout=block_s)
    done = []
    for ref in ended:
        w = engine.loops.index(ref)
        done.append(w)
        outcome.loops_ended.add(w)
        try:
            end: LoopEnd = ray.get(ref)
        except RayActorError:
            outcome.lost_experts.add(w)
            continue
        if end.reason == "broken":
            outcome.errors.append(f"expert worker {w}: {end.error}")
    return done


def _kill_hung(engine: ClusterEngine, outcome: StepOutcome) -> None:
    """Ping every worker on its control thread; one that does not answer is hung: kill it."""
    workers = [("attention", i, w) for i, w in enumerate(engine.attention)]
    workers += [("expert", i, w) for i, w in enumerate(engine.experts)]
    pings = [w.ping.remote() for _, _, w in workers]
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=engine.cluster.faults.ping_timeout_s)
    for (role, i, w), ping in zip(workers, pings, strict=True):
        alive = ping in ready
        if alive:
            try:
                ray.get(ping)
            except RayActorError:
                alive = False
        if not alive:
            log.warning("%s worker %d does not answer within %.1f s: killing it", role, i,
                        engine.cluster.faults.ping_timeout_s)  # fmt: skip
            engine.kill(w)
            (outcome.lost_attention if role == "attention" else outcome.lost_experts).add(i)


def _settle(engine: ClusterEngine, refs: list, answered: dict, outcome: StepOutcome) -> None:
    """Make every survivor leave the epoch: LEAVE wakes the expert loops waiting for a header;
    the rest leave as their collectives fail. One that has not left in time is killed."""
    engine.board.publish(-1, engine.placement.version, Command.LEAVE)
    faults = engine.cluster.faults
    deadline = time.monotonic() + faults.collective_timeout_s + faults.ping_timeout_s
    while time.monotonic() < deadline:
        waiting = [r for i, r in enumerate(refs) if i not in answered and i not in outcome.lost_attention]
        ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0) if waiting else ([], [])
        _take_attention(refs, ready, answered, outcome)
        _take_loop_ends(engine, outcome, block_s=POLL_S)
        loops_left = set(range(len(engine.loops))) - outcome.loops_ended
        if not loops_left and len(answered) + len(outcome.lost_attention) == len(refs):
            break
    loops_left = set(range(len(engine.loops))) - outcome.loops_ended
    for i in range(len(refs)):
        if i not in answered and i not in outcome.lost_attention:
            log.warning("attention worker %d did not leave its epoch in time: killing it", i)
            engine.kill(engine.attention[i])
            outcome.lost_attention.add(i)
    for w in loops_left:
        log.warning("expert worker %d did not leave its epoch in time: killing it", w)
        engine.kill(engine.experts[w])
        outcome.lost_experts.add(w)


class Recovery:
    """Membership of one engine: joining an epoch, and recovering from a failed step."""

    def __init__(self, engine: ClusterEngine) -> None:
        self.engine = engine

    def join(self, epoch: int) -> None:
        """Every current worker joins `epoch` with the engine's layout and map; the expert loops start."""
        e, timeout = self.engine, self.engine.cluster.faults.collective_timeout_s
        address, transport = e.board.address, e.cluster.transport
        refs = [
            a.join_epoch.remote(address, epoch, r, e.layout, e.placement, timeout, transport)
            for r, a in enumerate(e.attention)
        ]
        refs += [
            x.join_epoch.remote(address, epoch, w, e.layout, timeout, transport)
            for w, x in enumerate(e.experts)
        ]
        ray.get(refs)
        e.loops = [x.run_loop.remote() for x in e.experts]

    def recover(self, outcome: StepOutcome) -> None:
        """A new epoch over the survivors of a failed step; raises ClusterUnavailable when there
        are none to serve with."""
        e, t0 = self.engine, time.perf_counter()
        e.resizer.cancel("a worker was lost")  # its plan counted the members that were
        lost_a, lost_x = sorted(outcome.lost_attention), sorted(outcome.lost_experts)
        e.faults.worker_failures["attention"] += len(lost_a)
        e.faults.worker_failures["expert"] += len(lost_x)
        for i in lost_a:
            e.kill(e.attention[i])
        for w in lost_x:
            e.kill(e.experts[w])
        survivors_a = [i for i in range(len(e.attention)) if i not in outcome.lost_attention]
        if not survivors_a:
            raise ClusterUnavailable(f"all {len(e.attention)} attention workers are lost")
        reloaded = self._replan_experts(lost_x)
        e.attention = [e.attention[i] for i in survivors_a]
        e.layout = RankLayout(len(e.attention), len(e.experts), e.placement.slots_per_worker)
        moved = e.book.renumber(lost_a, survivors_a)
        epoch = e.board.new_epoch()
        self.join(epoch)
        if e.rebalancer is not None:
            e.rebalancer.reset(e.placement, e.experts, e.expert_nodes)
        seconds = time.perf_counter() - t0
        e.faults.recovery_seconds.append(seconds)
        e.faults.requests_replayed += len(moved)
        log.warning(
            "recovered in %.2f s from %s: epoch %d with %d attention + %d expert workers x %d slots; "
            "%d expert slots reloaded, %d requests re-admitted",
            seconds,
            _describe(lost_a, lost_x, outcome.errors),
            epoch,
            len(e.attention),
            len(e.experts),
            e.placement.slots_per_worker,
            reloaded,
            len(moved),
        )

    def _replan_experts(self, lost: list[int]) -> int:
        """The survivors' map (loading what only lost workers held); returns the slots reloaded."""
        e = self.engine
        survivors = [w for w in range(len(e.experts)) if w not in set(lost)]
        if not survivors:
            raise ClusterUnavailable(f"all {len(e.experts)} expert workers are lost")
        experts = [e.experts[w] for w in survivors]
        ray.get([x.discard_staged.remote() for x in experts])  # a rearrangement in flight is void
        if not lost:
            e.experts = experts
            return 0
        load = e.rebalancer.expert_load() if e.rebalancer is not None else None
        limit = e.cluster.faults.max_slots_per_worker
        try:
            placement, kept = shrink(e.placement, lost, load, limit, e.expert_nodes)
        except ValueError as err:
            raise ClusterUnavailable(str(err)) from None
        changes = survivor_changes(e.placement, placement, kept)
        ray.get([x.stage.remote(placement.version, c) for x, c in zip(experts, changes, strict=True)])
        e.experts, e.placement = experts, placement
        e.expert_nodes = [e.expert_nodes[w] for w in kept]
        return sum(len(slots) for c in changes for slots in c.values())


def _describe(lost_a: list[int], lost_x: list[int], errors: list[str]) -> str:
    parts = [f"the loss of attention worker(s) {lost_a}"] if lost_a else []
    parts += [f"the loss of expert worker(s) {lost_x}"] if lost_x else []
    return " and ".join(parts) or f"a failed step with every worker alive ({errors[0] if errors else '?'})"
