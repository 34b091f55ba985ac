"""Open-loop workloads: arrival times and prompt/output lengths, drawn ahead of the run.

Arrivals (requests per second, `rate(t)`):
- `constant:R`: one request every 1/R seconds, exactly;
- `poisson:R`: Poisson arrivals at rate R;
- `step:R0:R1:T`: Poisson at R0, then R1 from second T on;
- `ramp:R0:R1:T`: Poisson with the rate going linearly from R0 to R1 over T seconds, then R1;
- `bursty:R0:R1:ON:PERIOD`: Poisson at R0, except R1 during the first ON seconds of every PERIOD;
- `diurnal:LOW:HIGH:PERIOD`: Poisson with a sine-shaped rate, LOW at 0, HIGH at PERIOD / 2, LOW
  again at PERIOD (a day compressed to PERIOD seconds).

Lengths (tokens, each at least 1):
- `const:N`; `uniform:A:B` (inclusive); `lognormal:MEAN:SIGMA` (mean of the distribution, sigma
  of the underlying normal), clipped to `max` when one is given.
Time-varying Poisson arrivals are drawn by thinning, so every shape is exact, not binned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARRIVALS = {"constant": 1, "poisson": 1, "step": 3, "ramp": 3, "bursty": 4, "diurnal": 3}
LENGTHS = {"const": 1, "uniform": 2, "lognormal": 2}


@dataclass(frozen=True)
class ArrivalSpec:
    kind: str
    params: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.kind not in ARRIVALS:
            raise ValueError(f"unknown arrival kind {self.kind!r} (allowed: {', '.join(ARRIVALS)})")
        if len(self.params) != ARRIVALS[self.kind]:
            raise ValueError(f"arrival {self.kind!r} takes {ARRIVALS[self.kind]} numbers, got {self.params}")
        if any(not np.isfinite(p) or p < 0 for p in self.params):
            raise ValueError(f"arrival {self.kind!r} numbers must be finite and >= 0, got {self.params}")
        if self.peak_rate <= 0:
            raise ValueError(f"arrival {self.kind!r} never has a positive rate: {self.params}")
        if self.kind == "bursty" and not 0 < self.params[2] <= self.params[3]:
            raise ValueError(
                f"bursty needs 0 < ON <= PERIOD, got ON={self.params[2]}, PERIOD={self.params[3]}"
            )
        if self.kind == "diurnal" and not self.params[2] > 0:
            raise ValueError(f"diurnal needs PERIOD > 0, got {self.params[2]}")

    @classmethod
    def parse(cls, text: str) -> ArrivalSpec:
        kind, *nums = text.split(":")
        try:
            return cls(kind, tuple(float(x) for x in nums))
        except ValueError as e:
            raise ValueError(f"bad arrival spec {text!r}: {e} (e.g. poisson:20, step:10:40:30)") from e

    @property
    def peak_rate(self) -> float:
        p = self.params
        return p[0] if self.kind in ("constant", "poisson") else max(p[0], p[1])

    def rate(self, t: np.ndarray) -> np.ndarray:
        """Offered requests per second at times t."""
        p, t = self.params, np.asarray(t, dtype=np.float64)
        if self.kind in ("constant", "poisson"):
            return np.full_like(t, p[0])
        if self.kind == "step":
            return np.where(t < p[2], p[0], p[1])
        if self.kind == "ramp":
            frac = np.clip(t / p[2], 0.0, 1.0) if p[2] > 0 else np.ones_like(t)
            return p[0] + (p[1] - p[0]) * frac
        if self.kind == "diurnal":
            return p[0] + (p[1] - p[0]) * (1 - np.cos(2 * np.pi * t / p[2])) / 2
        return np.where(np.mod(t, p[3]) < p[2], p[1], p[0])  # bursty

    def times_within(self, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        """Every arrival time in [0, duration_s), ascending (live experiments run for a time)."""
        if self.kind == "constant":
            return np.arange(0.0, duration_s, 1.0 / self.params[0])
        out: list[np.ndarray] = []
        t0, peak = 0.0, self.peak_rate
        while t0 < duration_s:
            n = max(64, int(2 * peak * (duration_s - t0)))
            cand = t0 + np.cumsum(rng.exponential(1.0 / peak, n))
            keep = cand[(rng.random(n) * peak < self.rate(cand)) & (cand < duration_s)]
            out.append(keep)
            t0 = float(cand[-1])
        return np.concatenate(out)

    def times(self, num_requests: int, rng: np.random.Generator) -> np.ndarray:
        """The first `num_requests` arrival times (seconds from 0, ascending)."""
        if self.kind == "constant":
            return np.arange(num_requests) / self.params[0]
        out: list[np.ndarray] = []
        have, t0, peak = 0, 0.0, self.peak_rate
        while have < num_requests:
            n = max(64, 2 * (num_requests - have))
            cand = t0 + np.cumsum(rng.exponential(1.0 / peak, n))
            keep = cand[rng.random(n) * peak < self.rate(cand)]
            out.append(keep)
            have += keep.size
            t0 = float(cand[-1])
        return np.concatenate(out)[:num_requests]


@dataclass(frozen=True)
class LengthSpec:
    kind: str
    params: tuple[float, ...]
    max: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in LENGTHS:
            raise ValueError(f"unknown length kind {self.kind!r} (allowed: {', '.join(LENGTHS)})")
        if len(self.params) != LENGTHS[self.kind]:
            raise ValueError(f"length {self.kind!r} takes {LENGTHS[self.kind]} numbers, got {self.params}")
        if self.params[0] < 1 or any(p < 0 for p in self.params):
            raise ValueError(
                f"length {self.kind!r} needs a first number >= 1 and none < 0, got {self.params}"
            )
        if self.kind == "uniform" and self.params[1] < self.params[0]:
            raise ValueError(f"uniform lengths need A <= B, got {self.params}")
        if self.max is not None and self.max < 1:
            raise ValueError(f"max length must be >= 1, got {self.max}")

    @classmethod
    def parse(cls, text: str, max_len: int | None = None) -> LengthSpec:
        kind, *nums = text.split(":")
        try:
            return cls(kind, tuple(float(x) for x in nums), max_len)
        except ValueError as e:
            raise ValueError(f"bad length spec {text!r}: {e} (e.g. const:512, lognormal:1024:0.6)") from e

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        p = self.params
        if self.kind == "const":
            x = np.full(n, p[0])
        elif self.kind == "uniform":
            x = rng.integers(int(p[0]), int(p[1]) + 1, n)
        else:  # lognormal with the given mean: mu = log(mean) - sigma^2 / 2
            x = rng.lognormal(np.log(p[0]) - p[1] ** 2 / 2, p[1], n)
        x = np.maximum(1, np.rint(x)).astype(np.int64)
        return np.minimum(x, self.max) if self.max is not None else x


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order: arrival time (s), prompt and output lengths (tokens)."""

    arrival_s: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_len) != n or len(self.output_len) != n:
            raise ValueError("arrival_s, prompt_len and output_len must have the same length")
        if n and (np.diff(self.arrival_s) < 0).any():
            raise ValueError("arrival times must be ascending")

    def __len__(self) -> int:
        return len(self.arrival_s)


def make_workload(
    num_requests: int, arrival: ArrivalSpec, prompt: LengthSpec, output: LengthSpec, seed: int = 0
) -> Workload:
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    rng = np.random.default_rng(seed)
    times = arrival.times(num_requests, rng)
    return Workload(times, prompt.sample(num_requests, rng), output.sample(num_requests, rng))
