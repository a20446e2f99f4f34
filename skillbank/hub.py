"""Hugging Face Hub: the model card of an exported version, and the upload of an export directory.

An export is a directory that `from_pretrained` / `lerobot-train --policy.path=DIR` accepts:
config.json (the version's, when its base had one), model.safetensors (or HF-style shards with
model.safetensors.index.json) and a README.md model card whose YAML front matter names the real
parent in `base_model` and lists the skills, alphas and demos digests.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from skillbank.card import yaml_block as _yaml
from skillbank.errors import SkillbankError

HF_TARGET_RE = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)$")
OFFLINE_VALUES = {"1", "true", "yes", "on"}


class HubError(SkillbankError):
    """The Hugging Face Hub cannot be reached or refused an operation."""


def parse_target(target: str) -> str:
    m = HF_TARGET_RE.match(target)
    if not m or any(p in (".", "..") for p in m["repo"].split("/")):
        raise HubError(f"{target}: expected hf://ORG/NAME")
    return m["repo"]


def hf_repo_of(source: str | None) -> str | None:
    """`org/name` for a base imported from hf://org/name[@rev], else None."""
    if source and source.startswith("hf://"):
        return source[5:].split("@")[0]
    return None


def base_model_of(lineage: list[dict]) -> str | None:
    """What `base_model` names: the base's hub repo when it came from hf://, else the parent version."""
    repo = hf_repo_of(lineage[0].get("source"))
    if repo:
        return repo
    if len(lineage) >= 2:
        parent = lineage[-2]
        return f"skillbank:{parent['version']}@{parent['digest']}"
    return None


def export_card(fmt: str, version: str, digest: str, bank_id: str, lineage: list[dict],
                details: list[dict]) -> str:
    """README.md for an export: YAML front matter (hub metadata + the full skillbank lineage)."""
    base = lineage[0]
    parent = lineage[-2] if len(lineage) >= 2 else None
    skills = [{"version": d["version"], "name": d["skill"], "alpha": d["alpha"], "alphas": d["alphas"],
               "demos_digest": d["demos_digest"], "finetuned_digest": d["finetuned_digest"]}
              for d in details]
    front: dict = {}
    base_model = base_model_of(lineage)
    if base_model:
        front["base_model"] = base_model
    front["library_name"] = "lerobot" if fmt == "lerobot" else "skillbank"
    front["pipeline_tag"] = "robotics"
    front["tags"] = ["robotics", "skillbank", "retain", "model-merging"] + (["lerobot"] if fmt == "lerobot" else [])
    front["skillbank"] = {
        "bank": bank_id, "version": version, "digest": digest,
        "parent": {"version": parent["version"], "digest": parent["digest"]} if parent else None,
        "base": {"version": base["version"], "digest": base["digest"], "source": base.get("source")},
        "skills": skills,
        "alphas": {d["skill"]: d["alphas"] for d in details},
        "demos_digests": [d["demos_digest"] for d in details if d["demos_digest"]],
    }
    rows = "\n".join(f"| {s['version']} | {s['name']} | {s['alpha']} | {s['demos_digest'] or '-'} |"
                     for s in skills) or "| - | (base only) | - | - |"
    parent_line = (f"Parent: {parent['version']} (`{parent['digest']}`).\n" if parent else "")
    return (
        f"---\n{_yaml(front)}\n---\n\n"
        f"# skillbank {version}\n\n"
        f"Exported by skillbank ({fmt} layout) from bank `{bank_id}`; weights digest (xxh3-128 of the "
        f"canonical safetensors serialisation) `{digest}`.\n"
        f"Base: `{base.get('source')}` ({base['version']}, `{base['digest']}`).\n{parent_line}\n"
        "Each skill was merged with RETAIN: theta = (1 - alpha) * parent + alpha * finetuned.\n\n"
        "| version | skill | alpha | demos digest |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Check a copy with `skillbank audit DIR`; rebuild it with `skillbank checkout {version} --out DIR`.\n"
    )


def offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in OFFLINE_VALUES:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency
        return False


def check_online(target: str) -> None:
    if offline():
        raise HubError(f"cannot push to {target}: HF_HUB_OFFLINE is set (unset it to reach the Hugging Face Hub)")


def _hub_error(target: str, what: str, e: BaseException) -> HubError:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return HubError(f"cannot push to {target}: {what} failed ({first})")


def upload(folder: Path, repo_id: str, target: str, *, revision: str | None, commit_message: str,
           tag: str, tag_message: str) -> dict:
    """create_repo (exist_ok), the branch when one is named, upload_folder, then a tag on that commit."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True)
    except Exception as e:
        raise _hub_error(target, "create_repo", e) from None
    if revision and revision != "main":
        try:
            api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
        except Exception as e:
            raise _hub_error(target, f"create_branch {revision!r}", e) from None
    try:
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 revision=revision, commit_message=commit_message)
    except Exception as e:
        raise _hub_error(target, "upload_folder", e) from None
    commit = getattr(info, "oid", None)
    try:
        api.create_tag(repo_id=repo_id, tag=tag, tag_message=tag_message, revision=commit or revision,
                       repo_type="model", exist_ok=True)
    except Exception as e:
        raise _hub_error(target, f"create_tag {tag!r} (the files were uploaded as commit {commit})", e) from None
    return {"repo": repo_id, "revision": revision or "main", "commit": commit, "tag": tag,
            "url": getattr(info, "commit_url", None)}
