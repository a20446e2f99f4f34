"""Where checkpoints come from: local paths, or `hf://repo[@revision]` through huggingface_hub."""

from __future__ import annotations

import re
from pathlib import Path

from skillbank.errors import CheckpointError
from skillbank.tensors.reader import Checkpoint, open_checkpoint

HF_RE = re.compile(r"^hf://(?P<repo>[\w.-]+(?:/[\w.-]+)?)(?:@(?P<rev>[\w./-]+))?$")
# Weights come as safetensors only; config and card travel with them. Never fetch pickles.
HF_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "*/config.json",
               "*/*.safetensors", "*/model.safetensors.index.json"]


def resolve_hf(uri: str) -> tuple[Path, str]:
    """Download (or find in the local cache under HF_HUB_OFFLINE) and pin to a commit."""
    m = HF_RE.match(uri)
    parts = (m["repo"].split("/") + (m["rev"] or "x").split("/")) if m else []
    if not m or any(p in ("", ".", "..") for p in parts):  # the cache turns both into paths
        raise CheckpointError(f"{uri}: expected hf://ORG/NAME[@REVISION]")
    repo, rev = m["repo"], m["rev"]
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(repo_id=repo, revision=rev, allow_patterns=HF_PATTERNS))
    except Exception as e:  # hub errors are many and all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{uri}: cannot fetch from the Hugging Face Hub ({first})") from None
    commit = local.name if re.fullmatch(r"[0-9a-f]{40}", local.name) else (rev or "main")
    return local, f"hf://{repo}@{commit}"


def open_source(spec: str) -> Checkpoint:
    """Open any checkpoint a user may name on the command line."""
    if spec.startswith("hf://"):
        local, source = resolve_hf(spec)
        return open_checkpoint(local, source=source)
    return open_checkpoint(Path(spec).expanduser())
