"""The checked artifact format of ``detlayers.models.export`` on a tiny exported function.

The header (magic, version, length, SHA-256) is what ``export_predictor(...).serialize()`` writes
for the whole Mask R-CNN too (tests/test_mask_rcnn_export.py runs that in a fresh process); a
small function with baked-in weights keeps these damage cases fast. The expected header bytes
are derived here with ``struct`` and ``hashlib`` from the documented layout.
"""

from __future__ import annotations

import hashlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detlayers.models.export import ArtifactError, ExportedPredictor, load_exported

WEIGHTS = np.linspace(-3.0, 5.0, 4096, dtype=np.float32).reshape(64, 64)  # baked in as a constant


@pytest.fixture(scope="module")
def exported():
    def f(x):
        return jnp.tanh(x @ WEIGHTS) + 1.0

    raw = jax.export.export(jax.jit(f))(jax.ShapeDtypeStruct((2, 64), jnp.float32))
    return ExportedPredictor.from_exported(raw)


@pytest.fixture(scope="module")
def artifact(exported):
    return exported.serialize()


def _x():
    return np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)


def test_header_layout_and_round_trip_from_bytes_and_path(exported, artifact, tmp_path):
    payload = bytes(jax.export.Exported.serialize(exported))  # jax's own bytes
    assert artifact[:16] == b"detlayers-export"
    assert struct.unpack("<IQ", artifact[16:28]) == (1, len(payload))
    assert artifact[28:60] == hashlib.sha256(payload).digest()
    assert artifact[60:] == payload
    expected = np.tanh(_x().astype(np.float64) @ WEIGHTS.astype(np.float64)) + 1.0
    path = tmp_path / "tiny.bin"
    path.write_bytes(artifact)
    for source in (artifact, bytearray(artifact), path, str(path)):
        loaded = load_exported(source)
        assert isinstance(loaded, ExportedPredictor)
        np.testing.assert_allclose(loaded.call(_x()), expected, rtol=1e-5, atol=1e-5)
    assert load_exported(artifact).serialize() == artifact  # re-serializing keeps the header


def test_flipped_byte_in_the_middle_is_refused_naming_the_file(artifact, tmp_path):
    damaged = bytearray(artifact)
    damaged[len(damaged) // 2] ^= 0x01
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(damaged))
    with pytest.raises(ArtifactError, match=rf"^{path} was modified or damaged after export: the SHA-256"):
        load_exported(path)
    with pytest.raises(ArtifactError, match=r"^the artifact given as \d+ bytes was modified or damaged"):
        load_exported(bytes(damaged))


def test_flipped_digest_byte_in_the_header_is_refused(artifact):
    damaged = bytearray(artifact)
    damaged[40] ^= 0x80
    with pytest.raises(ArtifactError, match="modified or damaged after export"):
        load_exported(bytes(damaged))


@pytest.mark.parametrize("keep", [1000, 61, 30, 3])
def test_truncated_artifact_is_refused_naming_the_file(artifact, tmp_path, keep):
    path = tmp_path / "cut.bin"
    path.write_bytes(artifact[:keep])
    with pytest.raises(ArtifactError, match=rf"^{path} is truncated: "):
        load_exported(path)


def test_trailing_bytes_are_refused(artifact):
    with pytest.raises(ArtifactError, match="modified after export: 2 bytes more than the"):
        load_exported(artifact + b"\x00\x00")


@pytest.mark.parametrize("data", [b"detlayers-exporT" + bytes(100), b"\x89PNG\r\n\x1a\n" + bytes(100), b"", b"x"])
def test_not_an_artifact_is_refused(data, tmp_path):
    path = tmp_path / "other.bin"
    path.write_bytes(data)
    with pytest.raises(ArtifactError, match=rf"^{path} is not a detlayers export artifact"):
        load_exported(path)


def test_unknown_format_version_is_refused(artifact):
    damaged = artifact[:16] + struct.pack("<I", 7) + artifact[20:]
    with pytest.raises(ArtifactError, match="artifact format version 7, this detlayers reads version 1"):
        load_exported(damaged)


def test_raw_jax_export_bytes_say_how_to_load_or_re_export(exported, tmp_path):
    path = tmp_path / "raw.bin"
    path.write_bytes(bytes(jax.export.Exported.serialize(exported)))
    with pytest.raises(ArtifactError, match=rf"^{path} holds raw jax.export bytes without the detlayers header.*"
                                            r"re-export it with detlayers.models.export_predictor.*"
                                            r"jax.export.deserialize"):
        load_exported(path)
