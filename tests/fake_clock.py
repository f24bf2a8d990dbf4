"""A clock for tests whose verdict must not depend on how fast or busy the machine is."""


class FakeClock:
    """Seconds that move only when told: by ``tick`` at every reading, and by ``advance``."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
