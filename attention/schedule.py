"""When CSA runs: the sampling step from sigmas, and the per-layer schedule draws."""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Sequence

from .config import OFFICIAL_PROBABILITIES, OFFICIAL_SWITCH, OFFICIAL_WARMUP, ConsistentAttentionError, CSAConfig

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (splitmix64 over the parts), independent of PYTHONHASHSEED."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (part & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


@dataclass(frozen=True)
class SigmaMarks:
    """Sigma percents as sigmas: the sigmas at a config's start, end, warm-up and switch percents,
    converted by the host's model (ComfyUI: ``model_sampling.percent_to_sigma``, as ControlNet)."""

    start: float
    end: float
    warmup: float
    switch: float


@dataclass(frozen=True)
class Step:
    """Which step of a sampling call the model is evaluating: ``index`` of ``total``.

    With sigma percents (``CSAConfig.percent_of == "sigma"``) the host also gives the step's
    ``sigma`` and the config's ``marks``: the schedule then follows the sigma, not the step count,
    so a second sampler pass (refiner, hires fix, KSamplerAdvanced from a later step) continues
    where the first stopped instead of starting over.
    """

    index: int
    total: int
    sigma: float | None = None
    marks: SigmaMarks | None = None

    @property
    def progress(self) -> float:
        return self.index / self.total if self.total else 0.0

    @property
    def key(self) -> int:
        """What seeds this step's draws: its index, or with sigma marks the bits of its sigma (the
        same in every sampler pass that evaluates that sigma)."""
        if self.marks is None:
            return self.index
        return struct.unpack("<q", struct.pack("<d", float(self.sigma)))[0] & ((1 << 63) - 1)


def locate_step(sigma: float, schedule: Sequence[float]) -> Step:
    """The step whose sigma is nearest to ``sigma`` in this call's schedule (last entry excluded).

    Keyed by sigma, not by a call counter, so extra evaluations (heun, dpm_2) and re-runs at the
    same sigma (PAG, SAG) land on a step instead of shifting every later one.
    """
    steps = list(schedule[:-1]) if len(schedule) > 1 else list(schedule)
    if not steps:
        return Step(0, 1)
    index = min(range(len(steps)), key=lambda i: abs(steps[i] - sigma))
    return Step(index, len(steps))


def step_in_range(config: CSAConfig, step: Step) -> bool:
    """Whether CSA may run at this step at all (start/end range and the official warm-up).

    Sigma percents: on while sigma(end) <= sigma <= sigma(start), both ends included as
    ComfyUI's ControlNet and conditioning timestep ranges; the warm-up lasts while the sigma is
    above sigma(10%)."""
    marks = sigma_marks(config, step)
    if marks is not None:
        if not marks.end <= step.sigma <= marks.start:
            return False
        return not (config.schedule == "official" and step.sigma > marks.warmup)
    progress = step.progress  # in [0, 1): end = 1 keeps the last step
    if not config.start <= progress < config.end:
        return False
    if config.schedule == "official" and progress < OFFICIAL_WARMUP:
        return False
    return True


def layer_active(config: CSAConfig, step: Step, layer_seed: int) -> bool:
    """The schedule's draw for one layer at one step: deterministic in (seed, step, layer)."""
    if not step_in_range(config, step):
        return False
    if config.schedule == "always":
        return True
    marks = sigma_marks(config, step)
    early = step.sigma > marks.switch if marks is not None else step.progress < OFFICIAL_SWITCH
    probability = OFFICIAL_PROBABILITIES[0] if early else OFFICIAL_PROBABILITIES[1]
    return random.Random(mix_seed(config.seed, step.key, layer_seed, 1)).random() < probability


def sigma_marks(config: CSAConfig, step: Step) -> SigmaMarks | None:
    """The step's sigma marks when the config counts in sigma percents (None: fractions of steps)."""
    if config.percent_of != "sigma":
        return None
    if step.marks is None or step.sigma is None:
        raise ConsistentAttentionError(
            "percent_of is 'sigma' but this host gave no sigma for the step: use percent_of 'steps' here."
        )
    return step.marks
