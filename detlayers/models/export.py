"""Serializing a model's jitted inference with ``jax.export``.

The artifact holds the whole inference after host preprocessing (backbone, RPN, ROI heads,
rescaling, mask pasting) for one static input signature, with the weights baked in as constants
(``with_weights=True``) or as its first argument.

NMS backend: what the artifact carries is decided when it is traced. With the default backend
(``"auto"``) and the compiled detlayers library present, NMS is the C++ custom call
``detlayers_batched_nms`` (plus the CUDA one when exported for ``"cuda"``): the process that runs
the artifact must register those targets first, which :func:`load_exported` does (it needs
detlayers and its compiled library, nothing else). To run the artifact where the library is
absent (TPU, a serving process with only jax), export with the pure-XLA NMS:
``detlayers.nms.set_backend("xla")`` (or ``DETLAYERS_NMS_BACKEND=xla``) before exporting, or pass
``nms_backend="xla"`` here; such an artifact deserializes with ``jax.export.deserialize`` alone
(its payload, after the header check below).

Artifact format. ``export_predictor(...).serialize()`` (an :class:`ExportedPredictor`) writes
``jax.export``'s bytes (the *payload*) behind a fixed 60-byte header, so that a damaged file is
refused instead of running with damaged baked-in weights (a flipped byte in a weight moves boxes
by hundreds of pixels and raises nothing)::

    offset  size  field
         0    16  magic b"detlayers-export"
        16     4  format version, uint32 little-endian (1)
        20     8  payload length in bytes, uint64 little-endian
        28    32  SHA-256 of the payload
        60     -  payload: jax.export.Exported.serialize() bytes

:func:`load_exported` checks all four and raises one :class:`ArtifactError` naming the file:
truncated, modified after export, not a detlayers artifact, or raw ``jax.export`` bytes without
the header (saying how to load or re-export those). A process with only jax reads the payload as
``jax.export.deserialize(bytearray(data[60:]))`` after comparing
``hashlib.sha256(data[60:]).digest()`` with ``data[28:60]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["ArtifactError", "ExportedPredictor", "export_predictor", "load_exported", "register_custom_calls"]

MAGIC = b"detlayers-export"
FORMAT_VERSION = 1
# magic, format version, payload length, SHA-256 of the payload
_HEADER = struct.Struct("<16sIQ32s")
HEADER_SIZE = _HEADER.size  # 60


class ArtifactError(ValueError):
    """An exported artifact that cannot be loaded (truncated, modified, or not one); the message names it."""


class ExportedPredictor(jax.export.Exported):
    """A :class:`jax.export.Exported` whose :meth:`serialize` writes the checked artifact format
    (header with magic, version, length and SHA-256, then jax's bytes; see the module docstring).

    Everything else (``call``, ``in_avals``, ``mlir_module()``, ...) is jax's.
    """

    @classmethod
    def from_exported(cls, exported: jax.export.Exported) -> ExportedPredictor:
        """``exported`` (any ``jax.export`` result) with the checked :meth:`serialize`."""
        return cls(**{f.name: getattr(exported, f.name) for f in dataclasses.fields(exported)})

    def serialize(self, vjp_order: int = 0) -> bytes:
        """The artifact: header + ``jax.export.Exported.serialize(self, vjp_order)``."""
        return _pack_artifact(bytes(super().serialize(vjp_order)))



def export_predictor(
    predictor: Any,
    batch_size: int,
    padded_hw: tuple[int, int],
    canvas_hw: tuple[int, int] | None,
    *,
    with_weights: bool = True,
    nms_backend: str | None = None,
    platforms: Sequence[str] | None = None,
) -> ExportedPredictor:
    """``jax.export`` of ``predictor.run`` for inputs of one static shape.

    Args:
      predictor: a :class:`detlayers.models.Predictor`.
      batch_size, padded_hw: the shape of ``images`` (``float32[batch, Hp, Wp, 3]``, Hp and Wp
        multiples of the predictor's ``size_divisibility``: 32 for an FPN), as
        :meth:`detlayers.models.predictor.Predictor.inputs` makes them.
      canvas_hw: the static mask canvas (the largest original image size), or None for no masks;
        for a ``PanopticFPN`` also the canvas of its semantic and panoptic maps (None: instances
        only); for a ``SemanticSegmentor`` the canvas of the logits at the original size (None: ``padded_hw``).
      with_weights: bake the variables into the artifact (call it as ``exp.call(images,
        image_hw, output_hw)``); False exports ``exp.call(variables, images, image_hw, output_hw)``.
      nms_backend: ``"auto"`` or ``"xla"`` for this trace (default: :func:`detlayers.nms.get_backend`).
      platforms: lowering platforms (default: the current backend), e.g. ``("cpu", "cuda")``.

    Returns an :class:`ExportedPredictor` (a :class:`jax.export.Exported`); ``.serialize()`` gives
    the bytes to ship, in the checked format of this module's docstring (read them with
    :func:`load_exported`). The outputs are the model's dict: for
    :class:`detlayers.models.meta_arch.rcnn.GeneralizedRCNN` static shapes with ``num_instances``
    valid slots first; a :class:`detlayers.models.meta_arch.panoptic_fpn.PanopticFPN` with a
    ``canvas_hw`` adds its semantic (``sem_seg [N, H, W, C]``) and panoptic outputs; for
    :class:`detlayers.models.meta_arch.semantic_seg.SemanticSegmentor` ``sem_seg [N, H, W, C]``.
    """
    import importlib

    nms = importlib.import_module("detlayers.nms")  # the module (the package attribute is the function)

    hp, wp = (int(v) for v in padded_hw)
    # the padding the predictor's backbone asks for (32 for an FPN; none for a plain ResNet)
    divisor = max(int(getattr(predictor, "size_divisibility", 32)), 1)
    if hp % divisor or wp % divisor:
        raise ValueError(f"export_predictor: padded_hw must be multiples of {divisor} (the backbone's "
                         f"size_divisibility), got {padded_hw}")
    images = jax.ShapeDtypeStruct((batch_size, hp, wp, 3), jnp.float32)
    sizes = jax.ShapeDtypeStruct((batch_size, 2), jnp.int32)
    canvas = None if canvas_hw is None else (int(canvas_hw[0]), int(canvas_hw[1]))
    model = predictor.model

    if with_weights:
        variables = predictor.variables

        def fn(images, image_hw, output_hw):
            return model.apply(variables, images, image_hw, output_hw, canvas_hw=canvas)

        args = (images, sizes, sizes)
    else:

        def fn(variables, images, image_hw, output_hw):
            return model.apply(variables, images, image_hw, output_hw, canvas_hw=canvas)

        args = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), predictor.variables),
                images, sizes, sizes)
    previous = nms._backend_override
    try:
        if nms_backend is not None:
            nms.set_backend(nms_backend)
        kwargs = {} if platforms is None else {"platforms": tuple(platforms)}
        # detlayers' own custom calls carry no JAX compatibility guarantee; the artifact is meant
        # for a process with the same detlayers library (load_exported).
        kwargs["disabled_checks"] = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _custom_call_targets()]
        return ExportedPredictor.from_exported(jax.export.export(jax.jit(fn), **kwargs)(*args))
    finally:
        nms._backend_override = previous


def _custom_call_targets() -> list[str]:
    from detlayers import _nms_library

    return sorted(set(_nms_library._CPU_TARGETS) | set(_nms_library._CUDA_TARGETS))


def register_custom_calls() -> None:
    """Registers detlayers' compiled custom calls (CPU, and CUDA where built) with XLA, so an
    artifact that carries them can run in this process."""
    from detlayers import _nms_library

    _nms_library.available_targets("cpu")
    _nms_library.available_targets("cuda")


def _pack_artifact(payload: bytes) -> bytes:
    """``payload`` (``jax.export`` bytes) behind the 60-byte header of the module docstring."""
    payload = bytes(payload)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


_REEXPORT = ("re-export it with detlayers.models.export_predictor(...).serialize() (or wrap your own "
             "jax.export result with detlayers.models.export.ExportedPredictor.from_exported)")


def _unpack_artifact(data: bytes, source: str = "artifact") -> bytes:
    """The checked payload of an artifact; :class:`ArtifactError` naming ``source`` otherwise."""
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        if data and data[:len(MAGIC)] == MAGIC[:len(data)]:  # the header's first bytes
            raise ArtifactError(
                f"{source} is truncated: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header "
                f"of a detlayers export artifact; {_REEXPORT}")
        raise ArtifactError(f"{source} is not a detlayers export artifact ({len(data)} bytes, no "
                            f"{MAGIC.decode()!r} header); {_REEXPORT}")
    magic, version, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        if _is_raw_jax_export(data):
            raise ArtifactError(
                f"{source} holds raw jax.export bytes without the detlayers header, so nothing shows "
                "whether they are intact; " + _REEXPORT + ". If you trust the file, load it with "
                "detlayers.models.export.register_custom_calls() and jax.export.deserialize")
        raise ArtifactError(f"{source} is not a detlayers export artifact: it starts with {data[:16]!r}, "
                            f"not {MAGIC!r}; {_REEXPORT}")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{source}: artifact format version {version}, this detlayers reads version {FORMAT_VERSION} "
            "(written by another detlayers, or the header is damaged)")
    payload = data[HEADER_SIZE:]
    if len(payload) < length:
        raise ArtifactError(f"{source} is truncated: the header announces {length} payload bytes, "
                            f"{len(payload)} follow it")
    if len(payload) > length:
        raise ArtifactError(f"{source} was modified after export: {len(payload) - length} bytes more "
                            f"than the {length} payload bytes the header announces")
    if hashlib.sha256(payload).digest() != digest:
        raise ArtifactError(f"{source} was modified or damaged after export: the SHA-256 of its "
                            f"{length} payload bytes differs from the one in its header; {_REEXPORT}")
    return payload


def _is_raw_jax_export(data: bytes) -> bool:
    try:
        jax.export.deserialize(bytearray(data))
    except Exception:  # anything unreadable is simply "not jax.export bytes"
        return False
    return True


def load_exported(source: bytes | bytearray | str | os.PathLike) -> ExportedPredictor:
    """Checks and deserializes an artifact (bytes, or a file path) after registering detlayers'
    custom calls.

    Raises :class:`ArtifactError` (a ``ValueError``) naming the file when it is truncated, was
    modified after export (SHA-256 mismatch), is not a detlayers artifact, or holds raw
    ``jax.export`` bytes without the header; the format is in the module docstring.
    """
    register_custom_calls()
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        with open(source, "rb") as f:
            data = f.read()
    else:
        name = f"the artifact given as {len(source)} bytes"
        data = source
    payload = _unpack_artifact(data, name)
    try:
        exported = jax.export.deserialize(bytearray(payload))
    except Exception as err:  # intact bytes this jax cannot read (e.g. a newer serialization)
        raise ArtifactError(f"{name}: intact, but this jax ({jax.__version__}) cannot deserialize it: "
                            f"{type(err).__name__}: {err}") from err
    return ExportedPredictor.from_exported(exported)
