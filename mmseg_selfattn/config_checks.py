"""Build-time validation of config values: one clear error naming the key and what is allowed."""
import inspect
from typing import Optional, Sequence


def check_int(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{key} must be an int >= {minimum}, got {value!r}.')
    return value


def check_number(key: str, value, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A real number in the interval given by low/high (None = unbounded)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = '(-inf' if low is None else f'{"(" if low_open else "["}{low}'
        right = 'inf)' if high is None else f'{high}{")" if high_open else "]"}'
        raise ValueError(f'{key} must be a number in {left}, {right}, got {value!r}.')
    return float(value)


def check_choice(key: str, value, choices: Sequence) -> str:
    if value not in choices:
        raise ValueError(f'{key} must be one of {list(choices)}, got {value!r}.')
    return value


def check_keys(cfg_key: str, cfg: dict, cls: type) -> None:
    """Reject keys of ``cfg`` that ``cls.__init__`` does not take, listing the allowed ones."""
    allowed = [name for name in inspect.signature(cls.__init__).parameters if name != 'self']
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f'{cfg_key}: unknown key(s) {unknown}; allowed: {allowed}.')
