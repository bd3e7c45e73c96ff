"""Build-time validation of config values: one clear error naming the key and what is allowed."""
import inspect
import math
from numbers import Real
from typing import Optional, Sequence, Tuple


def check_int(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{key} must be an int >= {minimum}, got {value!r}.')
    return value


def check_number(key: str, value, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in the interval given by low/high (None = unbounded); inf, -inf
    and nan are refused even when unbounded (they turn every output into NaN)."""
    number = _finite_float(value)
    ok = number is not None
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        left = '(-inf' if low is None else f'{"(" if low_open else "["}{low}'
        right = 'inf)' if high is None else f'{high}{")" if high_open else "]"}'
        raise ValueError(f'{key} must be a number in {left}, {right}, got {value!r}.')
    return number


def _finite_float(value) -> Optional[float]:
    """float(value) for a finite real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        return None
    return number if math.isfinite(number) else None


def check_choice(key: str, value, choices: Sequence) -> str:
    if value not in choices:
        raise ValueError(f'{key} must be one of {list(choices)}, got {value!r}.')
    return value


def init_defaults(cls: type) -> dict:
    """Keyword -> default value of ``cls.__init__``: what a cfg dict for ``cls`` may hold."""
    return {name: parameter.default
            for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if name != 'self'}


def check_bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'{key} must be True or False, got {value!r}.')
    return value


def check_keys(cfg_key: str, cfg: dict, cls: type) -> None:
    """Reject keys of ``cfg`` that ``cls.__init__`` does not take, listing the allowed ones."""
    allowed = list(init_defaults(cls))
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f'{cfg_key}: unknown key(s) {unknown}; allowed: {allowed}.')


def build_checked(cfg_key: str, cfg: Optional[dict], cls: type, example: str = ''):
    """``cls(**cfg)`` once ``cfg`` is a dict (None: the defaults) of keys ``cls`` takes;
    ``cls`` checks the values. Callers build it whether or not the part is on, so a typo
    never passes. ``example`` (``', e.g. key=dict(...)'``) goes into the error."""
    if cfg is not None and not isinstance(cfg, dict):
        raise ValueError(f'{cfg_key} must be a dict{example} (docs/config_keys.md), '
                         f'got {cfg!r}.')
    check_keys(cfg_key, cfg or {}, cls)
    return cls(**(cfg or {}))


def check_bg_idx(bg_idx, num_classes: int, needed: bool) -> Optional[int]:
    if bg_idx is None and not needed:
        return None
    if isinstance(bg_idx, bool) or not isinstance(bg_idx, int) or not 0 <= bg_idx < num_classes:
        raise ValueError(f'bg_idx must be a class index in [0, {num_classes - 1}] (it receives '
                         f'the pixels dropped by prob_thd / area_thd), got {bg_idx!r}.')
    return bg_idx


def check_scales(scales) -> Tuple[float, ...]:
    values = tuple(scales) if isinstance(scales, (list, tuple)) else (scales, )
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float))
                         or not 0.05 <= v <= 8 for v in values):
        raise ValueError('test_scales must be a non-empty list of resize factors in '
                         f'[0.05, 8] (e.g. (0.75, 1.0, 1.25); (1.0, ) = single scale), got '
                         f'{scales!r}.')
    return tuple(float(v) for v in values)
