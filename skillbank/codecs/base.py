"""What a task-vector codec is, and the registry that names them."""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from skillbank.errors import ValidationError, show


class Codec(Protocol):
    """Encodes one block of a tensor's task vector against the parent's block.

    `decode(encode(p, f), p)` gives the finetuned block back (exactly when `lossless`). A merge is
    defined by what decode returns, so a lossy codec still rebuilds the same bytes every time.
    """

    name: str
    lossless: bool

    def params(self) -> dict: ...

    def encode(self, parent: torch.Tensor, finetuned: torch.Tensor) -> bytes: ...

    def decode(self, data: bytes, parent: torch.Tensor) -> torch.Tensor: ...


CODECS: dict[str, Callable[..., Codec]] = {}


def register(name: str):
    def wrap(factory):
        CODECS[name] = factory
        return factory

    return wrap


def get_codec(name: str, **params) -> Codec:
    try:
        factory = CODECS[name]
    except KeyError:
        raise ValidationError(f"unknown codec {show(name)} (known: {', '.join(sorted(CODECS))})") from None
    return factory(**params)
