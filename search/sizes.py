"""Sizes as people write them, read one way everywhere: GB, MB, ... decimal (as memory is sold),
GiB, MiB, ... binary (as torch and the kernel report it); a bare unit (12G) decimal; no unit, bytes."""

from __future__ import annotations

import re

from mmsa.errors import ConfigError

GIB = 2 ** 30
UNITS = "KMGT"


def split_size(text: str) -> tuple[float, int, bool] | None:
    """(number, power of the unit: 3 for G, binary or not) of a size, or None where it is not one."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])(I?)B?)?\s*", str(text).upper())
    if not m:
        return None
    return float(m.group(1)), UNITS.index(m.group(2)) + 1 if m.group(2) else 0, bool(m.group(3))


def parse_size(text: str, where: str) -> int:
    """Bytes of '12GB', '3.5GiB', '512MB', '1.5T'; a one-line ConfigError otherwise."""
    parts = split_size(text)
    if parts is None:
        raise ConfigError(f"{where}: {text!r} is not a size like 12GB (decimal) or 11.2GiB (binary)")
    number, power, binary = parts
    return int(number * (1024 if binary else 1000) ** power)
