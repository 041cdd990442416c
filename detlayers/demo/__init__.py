"""``python -m detlayers.demo``: detectron2's Mask R-CNN (R18-FPN, from :mod:`detlayers.models`)
trained from scratch on synthetic shapes with the models trainer's data-parallel step.

Modules (importing this package does not start JAX, so ``__main__`` can still choose the number
of CPU devices):

- :mod:`detlayers.demo.data` - synthetic shapes with boxes and masks, deterministic per example;
- :mod:`detlayers.demo.model` - the detector's detectron2 config (a small R18-FPN Mask R-CNN with
  ``SyncBN``) and the shapes batches as the model's inputs;
- :mod:`detlayers.demo.train` - the loop around :mod:`detlayers.models.engine.step`'s
  ``shard_map`` step, detectron2's solver, inference for the evaluation;
- :mod:`detlayers.demo.evaluate` - box and mask AP with pycocotools;
- :mod:`detlayers.demo.visualize` - the predictions PNG;
- :mod:`detlayers.demo.run` - all of it, as run by ``__main__``;
- :mod:`detlayers.demo.run_records`, :mod:`detlayers.demo.train_checkpoints`,
  :mod:`detlayers.demo.checkpoint_lock` - checkpoints (one run per directory), resume, records;
- :mod:`detlayers.demo.arg_types` - range-checked flag types.
"""
