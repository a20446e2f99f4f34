"""Merge recipes: `--alpha 0.8` or `--alpha vision=1,language=0.7,action=1`, checked up front."""

from __future__ import annotations

import math

from skillbank.errors import ValidationError
from skillbank.groups import GROUPS, Preset

OTHER = "other"  # the alpha for tensors that no group rule matches


def parse_alpha(spec: str | float) -> dict[str, float]:
    """{"*": a} for one alpha, else {group: a}; alpha is the FINETUNED model's weight, in [0, 1]."""
    if isinstance(spec, (int, float)):
        return {"*": _check(float(spec), str(spec))}
    spec = spec.strip()
    if "=" not in spec:
        return {"*": _value(spec, spec)}
    alphas: dict[str, float] = {}
    for part in spec.split(","):
        group, eq, value = part.partition("=")
        group = group.strip().lower()
        if not eq or not group:
            raise ValidationError(f"bad --alpha part {part!r}: expected GROUP=VALUE")
        if group not in (*GROUPS, OTHER):
            raise ValidationError(f"unknown group {group!r} in --alpha (known: {', '.join((*GROUPS, OTHER))})")
        if group in alphas:
            raise ValidationError(f"group {group!r} appears twice in --alpha")
        alphas[group] = _value(value, part)
    return alphas


def _value(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValidationError(f"alpha {where!r} is not a number") from None
    return _check(v, where)


def _check(v: float, where: str) -> float:
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ValidationError(f"alpha {where!r} is outside [0, 1] (alpha is the finetuned model's weight)")
    return v


def assign_groups(names: list[str], alphas: dict[str, float], preset: Preset) -> dict[str, str | None]:
    """Each tensor's group; every tensor must end up with an alpha, or we say which do not."""
    groups = preset.assign(names)
    if "*" in alphas:
        return groups
    missing: dict[str, list[str]] = {}
    for name, group in groups.items():
        if (group or OTHER) not in alphas:
            missing.setdefault(group or OTHER, []).append(name)
    if missing:
        group, names_ = next(iter(missing.items()))
        if group == OTHER:
            raise ValidationError(
                f"{len(names_)} tensors match no group of preset {preset.name!r} (e.g. {names_[0]!r}); "
                "add other=A to --alpha or pass --groups FILE"
            )
        raise ValidationError(
            f"no alpha for group {group!r} ({len(names_)} tensors, e.g. {names_[0]!r}); add {group}=A to --alpha"
        )
    return groups


def format_alphas(alphas: dict[str, float]) -> str:
    if "*" in alphas:
        return f"{alphas['*']:g}"
    return ",".join(f"{k}={v:g}" for k, v in alphas.items())
