"""`ParallelConfig`: how a run splits over several processes (GPUs, or gloo processes on a CPU).

Three degrees, their product the number of processes (the world size):

- ulysses: sequence parallelism by all-to-all over attention heads (DeepSpeed-Ulysses);
- ring: sequence parallelism by passing K/V around a ring with an online-softmax merge (ring attention);
- cfg: the two classifier-free-guidance branches on two ranks.

ulysses x ring together is USP (unified sequence parallelism): the token sequence is sharded over ulysses*ring
ranks. Imports no torch (the CLI parses it before loading anything).
"""

from __future__ import annotations

from dataclasses import dataclass

from ditserve.errors import ConfigError

DEGREES = ("ulysses", "ring", "cfg")


@dataclass(frozen=True)
class ParallelConfig:
    """The degrees of one run's parallelism; `ParallelConfig()` is one process."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    def __post_init__(self):
        for name in DEGREES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--parallel: {name} must be a positive integer, got {value!r}")
        if self.cfg not in (1, 2):
            raise ConfigError(f"--parallel: cfg must be 1 or 2 (the two guidance branches), got {self.cfg}")

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring * self.cfg

    @property
    def sp(self) -> int:
        """The sequence-parallel degree: ulysses * ring."""
        return self.ulysses * self.ring

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def parse(cls, text: str | None) -> ParallelConfig:
        """"ulysses=U,ring=R,cfg=C" (each part optional, default 1; "" or None: one process) -> ParallelConfig.
        Raises ConfigError naming the bad part."""
        if text is None or not text.strip():
            return cls()
        values: dict[str, int] = {}
        for part in text.split(","):
            name, eq, raw = part.strip().partition("=")
            name = name.strip()
            if not eq:
                raise ConfigError(f"--parallel: expected NAME=INT, got {part.strip()!r} "
                                  f"(e.g. ulysses=2,ring=1,cfg=2)")
            if name not in DEGREES:
                raise ConfigError(f"--parallel: unknown degree {name!r}; known: {', '.join(DEGREES)}")
            if name in values:
                raise ConfigError(f"--parallel: {name} given twice")
            try:
                values[name] = int(raw.strip())
            except ValueError:
                raise ConfigError(f"--parallel: {name} must be a positive integer, got {raw.strip()!r}") from None
        return cls(**values)

    def __str__(self) -> str:
        return f"ulysses={self.ulysses},ring={self.ring},cfg={self.cfg}"
