"""``python -m detlayers.demo``: a small Mask R-CNN-style detector trained from detlayers layers.

Modules (importing this package does not start JAX, so ``__main__`` can still choose the number
of CPU devices):

- :mod:`detlayers.demo.data` - synthetic shapes with boxes and masks, deterministic per example;
- :mod:`detlayers.demo.model` - the detector (``Conv2d``/``get_norm``/``NaiveSyncBatchNorm``
  backbone, ``batched_nms`` proposals, ``ROIAlign`` box and mask heads, ``ConvTranspose2d``,
  ``paste_masks_in_image``);
- :mod:`detlayers.demo.train` - the data-parallel ``shard_map`` train step and loop;
- :mod:`detlayers.demo.evaluate` - box and mask AP with pycocotools;
- :mod:`detlayers.demo.visualize` - the predictions PNG;
- :mod:`detlayers.demo.run` - all of it, as run by ``__main__``;
- :mod:`detlayers.demo.run_records`, :mod:`detlayers.demo.train_checkpoints`,
  :mod:`detlayers.demo.checkpoint_lock` - checkpoints (one run per directory), resume, records;
- :mod:`detlayers.demo.arg_types` - range-checked flag types.
"""
