"""Orbax training checkpoints: rotation, resume, and clear errors for unusable checkpoints."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from detlayers.demo.train_checkpoints import CheckpointError, TrainCheckpointer


def _state(seed=0, width=4):
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(seed), (3, width)),
                        "bias": jnp.zeros((width,))}}
    return {"params": params, "opt_state": optax.adam(1e-3).init(params),
            "rng": jax.random.key_data(jax.random.key(seed + 1))}


def test_checkpointer_keeps_newest_and_restores_exact_values(tmp_path):
    ckpt = TrainCheckpointer(tmp_path / "ck", every=2, keep=2)
    states = {}
    for step in range(1, 8):
        states[step] = _state(step)
        ckpt.save(step, states[step], {"step": step, "data_position": step * 16})
    ckpt.save(7, states[7], {"step": 7, "data_position": 112}, force=True)
    ckpt.wait()
    assert ckpt.latest_step() == 7
    assert sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == [6, 7]
    restored, meta = ckpt.restore(_state(0))
    assert meta == {"step": 7, "data_position": 112}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[7])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()


def test_half_written_checkpoint_is_never_loaded(tmp_path):
    ckpt = TrainCheckpointer(tmp_path, every=1)
    ckpt.save(1, _state(1), {"step": 1}, force=True)
    ckpt.wait()
    # what a kill during orbax's write leaves behind: a temporary step directory
    (tmp_path / "2.orbax-checkpoint-tmp-1234567").mkdir()
    (tmp_path / "2.orbax-checkpoint-tmp-1234567" / "state").mkdir()
    fresh = TrainCheckpointer(tmp_path, every=1)
    assert fresh.latest_step() == 1
    _, meta = fresh.restore(_state(0))
    assert meta["step"] == 1


def test_corrupt_checkpoint_raises_naming_its_path(tmp_path):
    ckpt = TrainCheckpointer(tmp_path, every=1)
    ckpt.save(3, _state(3), {"step": 3}, force=True)
    ckpt.close()
    for root, _, files in os.walk(tmp_path / "3" / "state"):
        for name in files:
            pathlib.Path(root, name).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=str(tmp_path / "3")):
        TrainCheckpointer(tmp_path, every=1).restore(_state(0))


def test_incompatible_checkpoint_raises_naming_its_path(tmp_path):
    ckpt = TrainCheckpointer(tmp_path, every=1)
    ckpt.save(5, _state(5, width=4), {"step": 5}, force=True)
    ckpt.close()
    with pytest.raises(CheckpointError, match=str(tmp_path / "5")):
        TrainCheckpointer(tmp_path, every=1).restore(_state(0, width=6))


def test_restore_without_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        TrainCheckpointer(tmp_path, every=1).restore(_state(0))
