"""Task-vector codecs: each encodes finetuned-minus-parent block by block against the parent."""

from skillbank.codecs import lossless  # noqa: F401  (registers xor-zstd)
from skillbank.codecs import bitdelta, dare, int8, lowrank, sparse  # noqa: F401  (register the lossy codecs)
from skillbank.codecs.base import CODECS, Codec, get_codec, register
from skillbank.codecs.container import BLOCK_ELEMS, TaskVectorReader, TaskVectorWriter

DEFAULT_CODEC = "xor-zstd"

__all__ = ["BLOCK_ELEMS", "CODECS", "Codec", "DEFAULT_CODEC", "TaskVectorReader", "TaskVectorWriter",
           "get_codec", "register"]
