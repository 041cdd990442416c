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
``nms_backend="xla"`` here; such an artifact deserializes with ``jax.export.deserialize`` alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["export_predictor", "load_exported", "register_custom_calls"]


def export_predictor(
    predictor: Any,
    batch_size: int,
    padded_hw: tuple[int, int],
    canvas_hw: tuple[int, int] | None,
    *,
    with_weights: bool = True,
    nms_backend: str | None = None,
    platforms: Sequence[str] | None = None,
) -> jax.export.Exported:
    """``jax.export`` of ``predictor.run`` for inputs of one static shape.

    Args:
      predictor: a :class:`detlayers.models.Predictor`.
      batch_size, padded_hw: the shape of ``images`` (``float32[batch, Hp, Wp, 3]``, Hp and Wp
        multiples of 32), as :meth:`detlayers.models.mask_rcnn.Predictor.inputs` makes them.
      canvas_hw: the static mask canvas (the largest original image size), or None for no masks.
      with_weights: bake the variables into the artifact (call it as ``exp.call(images,
        image_hw, output_hw)``); False exports ``exp.call(variables, images, image_hw, output_hw)``.
      nms_backend: ``"auto"`` or ``"xla"`` for this trace (default: :func:`detlayers.nms.get_backend`).
      platforms: lowering platforms (default: the current backend), e.g. ``("cpu", "cuda")``.

    Returns the :class:`jax.export.Exported`; ``.serialize()`` gives the bytes to ship. The
    outputs are :class:`detlayers.models.mask_rcnn.GeneralizedRCNN`'s dict (static shapes, ``num_instances``
    valid slots first).
    """
    import importlib

    nms = importlib.import_module("detlayers.nms")  # the module (the package attribute is the function)

    hp, wp = (int(v) for v in padded_hw)
    if hp % 32 or wp % 32:
        raise ValueError(f"export_predictor: padded_hw must be multiples of 32, got {padded_hw}")
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
        return jax.export.export(jax.jit(fn), **kwargs)(*args)
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


def load_exported(source: bytes | bytearray | str | os.PathLike) -> jax.export.Exported:
    """Deserializes an artifact (bytes or a file path) after registering detlayers' custom calls."""
    register_custom_calls()
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            source = f.read()
    return jax.export.deserialize(bytearray(source))
