"""safetensors streaming: validated reads by range, one-pass writes, the canonical digest."""

from skillbank.tensors.reader import Checkpoint, SafetensorsFile, TensorInfo, open_checkpoint
from skillbank.tensors.writer import CheckpointWriter, Digests, TensorSpec, WeightsDigest, header_bytes

__all__ = ["Checkpoint", "CheckpointWriter", "Digests", "SafetensorsFile", "TensorInfo", "TensorSpec",
           "WeightsDigest", "header_bytes", "open_checkpoint"]
