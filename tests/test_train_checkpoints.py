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


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [pathlib.Path(root, name) for root, _, names in os.walk(step_dir / "state") for name in names]
    return max(files, key=lambda p: p.stat().st_size)


def test_byte_flipped_array_data_fails_naming_the_checkpoint_and_leaf(tmp_path):
    state = _state(7, width=2048)  # a 3 x 2048 kernel: by far the largest data file
    ckpt = TrainCheckpointer(tmp_path, every=1)
    ckpt.save(4, state, {"step": 4}, force=True)
    ckpt.close()
    restored, meta = TrainCheckpointer(tmp_path, every=1).restore(_state(0, width=2048))
    np.testing.assert_array_equal(restored["params"]["dense"]["kernel"], state["params"]["dense"]["kernel"])
    assert meta == {"step": 4}  # the digests are not handed back
    data_file = _largest_array_file(tmp_path / "4")
    data = bytearray(data_file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0x5A for b in data[middle : middle + 4])
    data_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{tmp_path / '4'}.*\['kernel'\].*differs from what was saved"):
        TrainCheckpointer(tmp_path, every=1).restore(_state(0, width=2048))


def test_meta_step_must_match_its_step_directory(tmp_path):
    ckpt = TrainCheckpointer(tmp_path, every=1)
    ckpt.save(6, _state(6), {"step": 5}, force=True)
    ckpt.close()
    with pytest.raises(CheckpointError, match=rf"{tmp_path / '6'}: meta says step 5"):
        TrainCheckpointer(tmp_path, every=1).restore(_state(0))


def test_non_finite_state_is_never_saved_and_the_previous_checkpoint_stays(tmp_path):
    ckpt = TrainCheckpointer(tmp_path, every=1)
    ckpt.save(1, _state(1), {"step": 1}, force=True)
    bad = _state(2)
    bad["params"]["dense"]["bias"] = bad["params"]["dense"]["bias"].at[1].set(jnp.nan)
    with pytest.raises(CheckpointError, match=r"\['bias'\] holds NaN or inf"):
        ckpt.save(2, bad, {"step": 2}, force=True)
    ckpt.close()
    assert TrainCheckpointer(tmp_path, every=1).latest_step() == 1


@pytest.mark.parametrize("keep", [0, -1])
def test_keeping_no_checkpoints_is_refused(tmp_path, keep):
    with pytest.raises(ValueError, match="checkpoints to keep must be an int >= 1"):
        TrainCheckpointer(tmp_path, every=1, keep=keep)
    from detlayers.demo.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--checkpoint-dir", str(tmp_path), "--keep-checkpoints", str(keep)])


def test_nan_loss_stops_training_and_leaves_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    # The real loop with a stand-in step (no model compile): params count the steps, the loss
    # turns NaN at step 3. Checkpoints every step; step 3 must not be saved.
    from jax.sharding import Mesh

    from detlayers.demo import data as shapes
    from detlayers.demo import run_records
    from detlayers.demo import train as train_module

    def fake_step_factory(model, optimizer, mesh):
        def step(params, batch_stats, opt_state, batch, rng):
            params = jax.tree.map(lambda p: p + 1.0, params)
            loss = jnp.where(params["w"][0] >= 3.0, jnp.nan, 1.0 / params["w"][0])
            return params, batch_stats, opt_state, {"total": loss}
        return step

    monkeypatch.setattr(train_module, "make_train_step", fake_step_factory)
    mesh = Mesh(np.asarray(jax.devices()[:1]), (train_module.AXIS,))
    start = train_module.TrainState({"w": jnp.zeros(2)}, {}, {}, jax.random.key(0))
    ckpt = TrainCheckpointer(tmp_path, every=1)
    on_step = run_records.make_on_step(ckpt, {"run": 1}, None, True)
    config = train_module.TrainConfig(steps=6, batch_per_device=1)
    with pytest.raises(train_module.NonFiniteLossError, match=r"step 3: the loss is not finite.*--resume"):
        train_module.train(None, shapes.ShapesConfig(), config, mesh, start,
                           progress=False, on_step=on_step)
    ckpt.close()
    assert TrainCheckpointer(tmp_path, every=1).latest_step() == 2
    tree, meta = TrainCheckpointer(tmp_path, every=1).restore(
        {"params": {"w": jnp.zeros(2)}, "batch_stats": {}, "opt_state": {},
         "rng": jax.random.key_data(jax.random.key(0))})
    np.testing.assert_array_equal(tree["params"]["w"], [2.0, 2.0])
    assert meta["step"] == 2

    # the CLI turns it into a message and a non-zero exit
    from detlayers.demo import __main__ as cli
    from detlayers.demo import run

    def diverge(args):
        raise train_module.NonFiniteLossError("training stopped at step 3: the loss is not finite")

    monkeypatch.setattr(run, "run_demo", diverge)
    assert cli.main(["--steps", "3", "--no-progress"]) != 0
    assert "error: training stopped at step 3" in capsys.readouterr().err
