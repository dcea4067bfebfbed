"""Parity: our text encoder equals the competitor's ContextTab sentence embedder (``make parity``).

The reference embeddings come from ``tests/parity/ref_text.py`` run in the parity environment, from the
same model files. In one batch (the reference pads every string to the longest, as we then do) they are
bit-equal. In small batches our float32 sums run over other shapes, so a value may round to a
neighbouring float16: agreement to one float16 step (relative 2**-10), with a 1e-5 floor for values
near zero where a step is far smaller than float32 noise.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tabtune_cli.data.text import TextEncoder

ROOT = Path(os.environ.get("TABTUNE_PARITY_DIR", "runs/parity"))
FILE = ROOT / "text" / "embeddings.safetensors"

pytestmark = pytest.mark.parity


@pytest.mark.skipif(not FILE.is_file(), reason=f"no reference text embeddings at {FILE} (run `make parity`)")
@pytest.mark.parametrize("batch_size", [4, 64], ids=["small-batches", "one-batch"])
def test_text_encoder_equals_reference_embedder(batch_size):
    torch.set_num_threads(1)
    with safe_open(FILE, framework="np") as f:
        reference = f.get_tensor("embeddings")
        meta = f.metadata()
    strings = json.loads(meta["strings"])
    ours = TextEncoder(meta["model_dir"], batch_size=batch_size).encode(strings)
    assert ours.dtype == np.float16 and ours.shape == reference.shape
    diff = np.abs(ours.astype(np.float32) - reference.astype(np.float32))
    worst = int(diff.max(axis=1).argmax())
    print(f"text, batch {batch_size}: max |ours - reference| = {diff.max():.2e} over {ours.shape} (worst: "
          f"string #{worst} {strings[worst][:30]!r}); {int((diff > 0).sum())} of {diff.size} values differ")
    np.testing.assert_allclose(ours.astype(np.float32), reference.astype(np.float32), rtol=2**-10, atol=1e-5)
