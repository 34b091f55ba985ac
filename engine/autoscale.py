"""The tier autoscaler: how many expert and attention workers one engine should have (pure).

    decision, state = decide(cfg, measurements, state)

Measurements in, desired tier sizes out; no clock, no Ray. The cluster engine's replica runs it
on its live figures and resizes through the membership epochs; the simulator runs the same
function on simulated figures, so both take the same decisions on the same measurements.

- Expert tier: routed tokens per step per expert worker (each token is routed once per MoE
  layer), against `target_tokens_per_expert_worker`.
- Attention tier: KV cache usage against `target_kv_usage`, and requests waiting for a slot.

A tier moves only when its figure has stayed outside the dead band (`tolerance` around the
target) for `upscale_delay_s` (up) or `downscale_delay_s` (down), not within `cooldown_s` of its
last resize, one worker at a time, and never outside its bounds: a constant load does not flap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class TierBounds:
    min_workers: int = 1
    max_workers: int = 1

    def __post_init__(self) -> None:
        if self.min_workers < 1 or self.max_workers < self.min_workers:
            raise ValueError(
                f"tier bounds need 1 <= min_workers <= max_workers, got {self.min_workers}"
                f"..{self.max_workers}"
            )

    def clamp(self, n: int) -> int:
        return max(self.min_workers, min(self.max_workers, n))


@dataclass(frozen=True)
class AutoscalerConfig:
    enabled: bool = False
    expert: TierBounds = field(default_factory=lambda: TierBounds(1, 8))
    attention: TierBounds = field(default_factory=lambda: TierBounds(1, 4))
    target_tokens_per_expert_worker: float = 64.0  # routed tokens per step, per worker
    target_kv_usage: float = 0.7
    max_waiting_per_attention_worker: float = 2.0
    tolerance: float = 0.25
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    cooldown_s: float = 15.0
    interval_s: float = 1.0  # how often the engine measures and decides

    def __post_init__(self) -> None:
        if self.target_tokens_per_expert_worker <= 0:
            raise ValueError("target_tokens_per_expert_worker must be > 0")
        if not 0 < self.target_kv_usage <= 1:
            raise ValueError(f"target_kv_usage must be in (0, 1], got {self.target_kv_usage}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        for name in (
            "upscale_delay_s",
            "downscale_delay_s",
            "cooldown_s",
            "max_waiting_per_attention_worker",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")


@dataclass(frozen=True)
class Measurements:
    """What the engine saw over the last interval."""

    time_s: float  # a monotonic clock (seconds)
    num_attention: int
    num_expert: int
    tokens_per_step: float  # routed tokens per step, summed over attention ranks (per MoE layer)
    kv_usage: float  # fraction of KV blocks in use, the busiest attention worker's
    num_waiting: int  # requests waiting for a running slot, over all attention workers


@dataclass(frozen=True)
class TierState:
    want: int = 0  # the direction held since `since_s`: +1, -1 or 0
    since_s: float = 0.0
    last_resize_s: float = -math.inf


@dataclass(frozen=True)
class State:
    expert: TierState = field(default_factory=TierState)
    attention: TierState = field(default_factory=TierState)


@dataclass(frozen=True)
class Decision:
    num_attention: int
    num_expert: int
    reason: str  # empty when nothing changes

    def changes(self, m: Measurements) -> bool:
        return (self.num_attention, self.num_expert) != (m.num_attention, m.num_expert)


class TierWindow:
    """The figures `decide` reads, summed over the steps since the last measurement: the one
    reduction the cluster engine (from its workers' step results) and the simulator (from its
    priced steps) both use."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._steps = 0
        self._routed = 0.0
        self._kv_usage = 0.0
        self._waiting = 0

    def add_step(self, routed_rows: float, num_moe_layers: int, kv_usage: float, num_waiting: int) -> None:
        """One step: rows routed over all MoE layers and attention ranks, the busiest rank's KV
        usage, requests waiting over all ranks."""
        self._steps += 1
        self._routed += routed_rows / max(num_moe_layers, 1)
        self._kv_usage = max(self._kv_usage, kv_usage)
        self._waiting = num_waiting

    def take(self, time_s: float, num_attention: int, num_expert: int) -> Measurements:
        """The measurements of the steps since the last call (an idle interval reads as zero load)."""
        m = Measurements(
            time_s,
            num_attention,
            num_expert,
            self._routed / self._steps if self._steps else 0.0,
            self._kv_usage,
            self._waiting,
        )
        self._reset()
        return m


def decide(cfg: AutoscalerConfig, m: Measurements, state: State) -> tuple[Decision, State]:
    """The tier sizes to have now, and the state to pass to the next call."""
    expert_dir, expert_why = _expert_direction(cfg, m)
    attention_dir, attention_why = _attention_direction(cfg, m)
    expert_n, expert_state = _tier(cfg, cfg.expert, m.num_expert, expert_dir, m.time_s, state.expert)
    attention_n, attention_state = _tier(
        cfg, cfg.attention, m.num_attention, attention_dir, m.time_s, state.attention
    )
    reasons = []
    if expert_n != m.num_expert:
        reasons.append(f"expert workers {m.num_expert} -> {expert_n} ({expert_why})")
    if attention_n != m.num_attention:
        reasons.append(f"attention workers {m.num_attention} -> {attention_n} ({attention_why})")
    decision = Decision(attention_n, expert_n, "; ".join(reasons))
    return decision, State(expert_state, attention_state)


def _expert_direction(cfg: AutoscalerConfig, m: Measurements) -> tuple[int, str]:
    per_worker = m.tokens_per_step / max(m.num_expert, 1)
    target = cfg.target_tokens_per_expert_worker
    why = f"{per_worker:.0f} routed tokens per step per worker, target {target:g}"
    if per_worker > target * (1 + cfg.tolerance):
        return 1, why
    # down only if one worker fewer would still be under the band's top
    fewer = m.tokens_per_step / max(m.num_expert - 1, 1)
    if per_worker < target * (1 - cfg.tolerance) and fewer <= target * (1 + cfg.tolerance):
        return -1, why
    return 0, why


def _attention_direction(cfg: AutoscalerConfig, m: Measurements) -> tuple[int, str]:
    waiting = m.num_waiting / max(m.num_attention, 1)
    target = cfg.target_kv_usage
    why = f"KV usage {m.kv_usage:.2f} (target {target:g}), {waiting:.1f} waiting per worker"
    if m.kv_usage > target * (1 + cfg.tolerance) or waiting > cfg.max_waiting_per_attention_worker:
        return 1, why
    fewer = m.kv_usage * m.num_attention / max(m.num_attention - 1, 1)
    if m.kv_usage < target * (1 - cfg.tolerance) and m.num_waiting == 0 and fewer <= target:
        return -1, why
    return 0, why


def _tier(
    cfg: AutoscalerConfig, bounds: TierBounds, current: int, direction: int, now: float, s: TierState
) -> tuple[int, TierState]:
    """One tier: hold a direction long enough, respect the cooldown and the bounds; one step."""
    if current != bounds.clamp(current):  # outside the bounds (they changed): move in at once
        return bounds.clamp(current), TierState(0, now, now)
    if direction == 0 or bounds.clamp(current + direction) == current:
        return current, replace(s, want=0, since_s=now)
    if s.want != direction:
        return current, replace(s, want=direction, since_s=now)
    delay = cfg.upscale_delay_s if direction > 0 else cfg.downscale_delay_s
    if now - s.since_s < delay or now - s.last_resize_s < cfg.cooldown_s:
        return current, s
    return current + direction, TierState(0, now, now)


@dataclass(frozen=True)
class Tick:
    """One interval of the autoscaler: what it saw and what it decided (None: it did not decide
    because a resize was in flight)."""

    measurements: Measurements
    decision: Decision | None


class TierAutoscaler:
    """The control loop around `decide`, the one both the cluster engine and the simulator run:
    steps go into the window, each interval's measurements into `decide`, and a decision that
    changes the sizes comes out. While a resize is in flight the interval is measured but not
    decided (the state is kept, so the cooldown starts at a resize that happened)."""

    def __init__(self, cfg: AutoscalerConfig, history: int = 1024) -> None:
        self.cfg = cfg
        self.state = State()
        self.window = TierWindow()
        self.history: list[Tick] = []
        self._history_len = history

    def tick(
        self, time_s: float, num_attention: int, num_expert: int, resizing: bool = False
    ) -> Decision | None:
        """The interval since the last tick; the new sizes when they change, else None."""
        m = self.window.take(time_s, num_attention, num_expert)
        decision = None
        if not resizing:
            decision, self.state = decide(self.cfg, m, self.state)
        self.history.append(Tick(m, decision))
        del self.history[: -self._history_len]
        return decision if decision is not None and decision.changes(m) else None
