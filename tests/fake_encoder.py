"""A stand-in sentence encoder for tests where MiniLM itself is not the point: a fixed vector per text."""

import numpy as np
import xxhash

from skillbank.policies import register_text_encoder

FAKE = "test-hash-encoder"


def fake_encoder(texts):
    out = []
    for t in texts:
        rng = np.random.default_rng(xxhash.xxh3_64_intdigest(t.encode()))
        v = rng.standard_normal(384)
        out.append(v / np.linalg.norm(v))
    return np.asarray(out, np.float32)


register_text_encoder(FAKE, 384, fake_encoder)
