"""The training loop (detectron2's ``engine/``): :mod:`detlayers.models.engine.train_loop` holds
the state, the data-parallel step and the loop; ``python -m detlayers.models.train`` is the CLI."""
