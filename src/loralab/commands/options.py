"""Number types for command-line options: ranges checked by click, so a bad
value is one usage line naming the option before anything is loaded.

click's own ``FloatRange`` lets ``nan`` through (every comparison with nan is
false) and ``inf`` through an open-ended range; :class:`Finite` refuses both.
Training options go through ``loralab.config`` instead (one value parser for
YAML, ``key=value`` and flags).
"""

from __future__ import annotations

import math

import click

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


class Finite(click.FloatRange):
    """A finite float, optionally within ``[min, max]`` (ends open if asked)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.types.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


POSITIVE_INT = click.IntRange(min=1)
COUNT = click.IntRange(min=0)
SEED = click.IntRange(0, SEED_MAX)
TEMPERATURE = Finite(min=0.0, max=100.0)
TOP_P = Finite(min=0.0, max=1.0, min_open=True)
PROBABILITY = Finite(min=0.0, max=1.0, max_open=True)
