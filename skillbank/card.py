"""The model card written beside every checkout: YAML front matter a hub and a pipeline can read."""

from __future__ import annotations

import json
import re

PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _key(k) -> str:
    k = str(k)
    return k if PLAIN_KEY.match(k) else json.dumps(k)  # e.g. the "*" alpha key is a YAML alias unquoted


def yaml_block(value, indent: int = 0) -> str:
    """Block YAML for dicts and lists; scalars and odd keys as JSON, which YAML reads as the same values."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return pad + "{}"
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{_key(k)}:\n{yaml_block(v, indent + 2)}")
            else:
                lines.append(f"{pad}{_key(k)}: {json.dumps(v)}")
        return "\n".join(lines)
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}- {yaml_block(item, indent + 2).lstrip()}")
            else:
                lines.append(f"{pad}- {json.dumps(item)}")
        return "\n".join(lines)
    return pad + json.dumps(value)


def model_card(version: str, digest: str, bank_id: str, base: dict, skills: list[dict]) -> str:
    base_model = base.get("source") or "unknown"
    if base_model.startswith("hf://"):
        base_model = base_model[5:].split("@")[0]
    front = {
        "base_model": base_model,
        "library_name": "skillbank",
        "tags": ["robotics", "skillbank", "retain", "model-merging"],
        "skillbank": {"bank": bank_id, "version": version, "digest": digest,
                      "base": base, "skills": skills},
    }
    rows = "\n".join(
        f"| {s['version']} | {s['name']} | {s['alpha']} | {s.get('demos_digest') or '-'} |" for s in skills
    ) or "| - | (base only) | - | - |"
    return (
        f"---\n{yaml_block(front)}\n---\n\n"
        f"# skillbank {version}\n\n"
        f"Materialised by skillbank from bank `{bank_id}`; weights digest (xxh3-128, canonical) `{digest}`.\n"
        f"Base: `{base.get('source')}` ({base.get('version', 'v0')}).\n\n"
        "Each skill was merged with RETAIN: theta = (1 - alpha) * parent + alpha * finetuned.\n\n"
        "| version | skill | alpha | demos digest |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Rebuild and verify with `skillbank checkout {version} --out DIR`.\n"
    )
