"""Parameter groups: which part of a VLA policy each tensor belongs to.

RETAIN can merge with one alpha per group (vision / language / action), so
every tensor name of a checkpoint has to be assigned to a group. Names differ
per policy family, hence one *preset* (ordered regex rules) per family, picked
automatically from the key names or by name, or read from a user rules file.

Tensors no rule matches get ``None``; the merge decides what to do with them
(e.g. use the global alpha). A preset is plain data, so the exact rules used
for a merge can be stored with it (see ``describe``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from skillbank.errors import SkillbankError

GROUPS: tuple[str, ...] = ("vision", "language", "action")

# A specific family must explain at least this share of the names, otherwise
# the key names are not really that family's and the generic preset is safer.
MIN_COVERAGE = 0.5


class GroupsError(SkillbankError, ValueError):
    """A group preset or rules file the user named cannot be used."""


@dataclass(frozen=True)
class Preset:
    """Ordered ``(group, regex)`` rules; the first ``re.search`` hit wins.

    Rules are validated and compiled once here, so a bad preset fails when it
    is built, not halfway through a merge.
    """

    name: str
    rules: tuple[tuple[str, str], ...]
    _compiled: tuple[tuple[str, re.Pattern[str]], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        rules = tuple((str(group), str(pattern)) for group, pattern in self.rules)
        compiled = []
        for group, pattern in rules:
            if group not in GROUPS:
                raise GroupsError(
                    f"preset {self.name!r}: unknown group {group!r} (expected one of {', '.join(GROUPS)})"
                )
            compiled.append((group, _compile(pattern, where=f"preset {self.name!r}")))
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "_compiled", tuple(compiled))

    def group_of(self, name: str) -> str | None:
        for group, regex in self._compiled:
            if regex.search(name):
                return group
        return None

    def assign(self, names: Iterable[str]) -> dict[str, str | None]:
        return {name: self.group_of(name) for name in names}

    def coverage(self, names: Iterable[str]) -> int:
        """How many of ``names`` some rule matches (used to detect the family)."""
        return sum(self.group_of(name) is not None for name in names)


def _compile(pattern: str, *, where: str) -> re.Pattern[str]:
    if not pattern:
        raise GroupsError(f"{where}: empty regex")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise GroupsError(f"{where}: bad regex {pattern!r}: {exc}") from None


# --- building blocks ---------------------------------------------------------

# The small heads around the action expert, same names in openpi (JAX and
# PyTorch), LeRobot pi0/pi0.5 and SmolVLA. pi0 has state_proj and
# action_time_mlp_{in,out}; pi0.5 has time_mlp_{in,out} (adaRMS condition).
# They always go to "action" and come first, so no broader rule can claim them.
_HEADS = r"(?:action_in_proj|action_out_proj|state_proj|(?:action_)?time_mlp_[A-Za-z0-9]+)"

# openpi's gemma.py names the action expert's weights like the PaliGemma ones
# plus an "_<i>" suffix (expert i, i >= 1): q_einsum_1, mlp_1, final_norm_1 ...
_OPENPI_EXPERT_MODULES = (
    r"(?:qkv_einsum|q_einsum|kv_einsum|attn_vec_einsum|mlp|pre_attention_norm|pre_ffw_norm|final_norm)"
)

# openpi JAX params flattened with "/" or "." and maybe still under "params".
_JAX = r"^(?:params[/.])?"
_SEP = r"[/.]"
_EXPERT_SUFFIX = r"_[1-9][0-9]*(?:[/.]|$)"

# LeRobot keeps pi0/pi0.5 under PI0Policy.model, hence "model."; the same
# module tree without it is openpi's PyTorch port (PI0Pytorch), see below.
_LEROBOT_PI0 = r"^(?:model\.)?paligemma_with_expert\."
_OPENPI_TORCH = r"^paligemma_with_expert\."

# transformers >= 4.52 nests PaliGemma's towers under ".model."; older
# LeRobot checkpoints have paligemma.vision_tower / paligemma.language_model.model.
_PALIGEMMA = r"paligemma\.(?:model\.)?"


def _paligemma_rules(prefix: str) -> tuple[tuple[str, str], ...]:
    """Rules for the PaliGemma + Gemma-expert module tree shared by LeRobot and openpi-PyTorch."""
    return (
        ("action", prefix + r"gemma_expert\."),
        ("vision", prefix + _PALIGEMMA + r"(?:vision_tower|multi_modal_projector)\."),
        ("language", prefix + _PALIGEMMA + r"language_model\."),
        ("language", prefix + r"paligemma\.lm_head\."),
    )


SKILLBANK_REF = Preset(
    name="skillbank-ref",
    rules=(
        ("action", r"^action\.|(?:^|\.)" + _HEADS + r"\."),
        ("vision", r"^vision\."),
        ("language", r"^language\."),
    ),
)

OPENPI = Preset(
    name="openpi",
    rules=(
        ("action", _JAX + _HEADS + _SEP),
        ("action", _JAX + r"PaliGemma[/.]llm[/.](?:.*[/.])?" + _OPENPI_EXPERT_MODULES + _EXPERT_SUFFIX),
        ("vision", _JAX + r"PaliGemma[/.]img[/.]"),
        ("language", _JAX + r"PaliGemma[/.]llm[/.]"),
        *_paligemma_rules(_OPENPI_TORCH),
    ),
)

LEROBOT_PI0 = Preset(
    name="lerobot-pi0",
    rules=(
        ("action", r"^(?:model\.)?" + _HEADS + r"\."),
        *_paligemma_rules(_LEROBOT_PI0),
    ),
)

_SMOLVLA = r"^(?:model\.)?vlm_with_expert\."
_SMOLVLM = _SMOLVLA + r"vlm\.(?:model\.)?"

LEROBOT_SMOLVLA = Preset(
    name="lerobot-smolvla",
    rules=(
        ("action", r"^(?:model\.)?" + _HEADS + r"\."),
        ("action", _SMOLVLA + r"lm_expert\."),
        ("vision", _SMOLVLM + r"(?:vision_model|connector)\."),
        ("language", _SMOLVLM + r"text_model\."),
        ("language", _SMOLVLA + r"vlm\.lm_head\."),
    ),
)

# Loose fallback. A "*_expert" path segment is the action expert, but
# "paligemma_with_expert" / "vlm_with_expert" are wrappers around everything,
# so those segments must not count.
GENERIC = Preset(
    name="generic",
    rules=(
        ("action", r"(?:^|[/.])" + _HEADS + r"(?:[/.]|$)"),
        ("action", r"(?:^|[/.])(?![^/.]*with_expert)[^/.]*expert[^/.]*(?:[/.]|$)"),
        ("vision", r"vision_tower|vision_model|visual|image_encoder|multi_modal_projector"),
        ("vision", r"(?:^|[/._])img(?:[/._]|$)"),
        ("language", r"language_model|text_model|llm|lm_head|embed_tokens"),
        ("action", r"action|state_proj|time_mlp"),
    ),
)

# Detection order doubles as the tie-break: openpi's PyTorch names are also a
# valid (prefix-less) LeRobot pi0 state dict, and should be reported as openpi.
PRESETS: dict[str, Preset] = {
    p.name: p for p in (OPENPI, LEROBOT_PI0, LEROBOT_SMOLVLA, SKILLBANK_REF, GENERIC)
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise GroupsError(f"unknown group preset {name!r} (known: {known})") from None


def detect_preset(names: Iterable[str]) -> Preset:
    """The family whose rules explain the most names; generic if none explains enough.

    Generic is never a candidate: its loose patterns match something in almost
    any model and would win on keys a specific family mis-reads.
    """
    names = list(names)
    best, best_hits = GENERIC, 0
    for preset in PRESETS.values():
        if preset is GENERIC:
            continue
        hits = preset.coverage(names)
        if hits > best_hits:
            best, best_hits = preset, hits
    if not names or best_hits < MIN_COVERAGE * len(names):
        return GENERIC
    return best


def load_rules_file(path: str | Path) -> Preset:
    """Read ``GROUP: REGEX`` lines (``#`` comments, blank lines ignored).

    Only the first ``:`` separates, so regexes may contain ``(?:...)``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise GroupsError(f"cannot read rules file {path}: {reason}") from None

    rules: list[tuple[str, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        group, sep, pattern = line.partition(":")
        group, pattern = group.strip().lower(), pattern.strip()
        if not sep or not group:
            raise GroupsError(f"{where}: expected 'GROUP: REGEX', got {line!r}")
        if group not in GROUPS:
            raise GroupsError(f"{where}: unknown group {group!r} (expected one of {', '.join(GROUPS)})")
        _compile(pattern, where=where)
        rules.append((group, pattern))

    if not rules:
        raise GroupsError(f"{path}: no rules (expected lines like 'vision: vision_tower')")
    return Preset(name=f"file:{path.name}", rules=tuple(rules))


def describe(preset: Preset) -> dict:
    """JSON-able record of a preset, stored with a merge so it can be replayed exactly."""
    return {
        "name": preset.name,
        "rules": [{"group": group, "pattern": pattern} for group, pattern in preset.rules],
    }


def from_description(data: Mapping) -> Preset:
    """Inverse of ``describe``: rebuild the preset a recorded merge used."""
    try:
        rules = tuple((rule["group"], rule["pattern"]) for rule in data["rules"])
        return Preset(name=data["name"], rules=rules)
    except (KeyError, TypeError):
        expected = "{'name': ..., 'rules': [{'group': ..., 'pattern': ...}]}"
        raise GroupsError(f"malformed group preset record, expected {expected}") from None
