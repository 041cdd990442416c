"""Orbax training checkpoints: rotation, resume, and clear errors for unusable checkpoints."""

import functools
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from detlayers.demo.train_checkpoints import CheckpointError, DamagedCheckpointError, TrainCheckpointer


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
    with TrainCheckpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, _state(1), {"step": 1}, force=True)
    # what a kill during orbax's write leaves behind: a temporary step directory
    (tmp_path / "2.orbax-checkpoint-tmp-1234567").mkdir()
    (tmp_path / "2.orbax-checkpoint-tmp-1234567" / "state").mkdir()
    with TrainCheckpointer(tmp_path, every=1) as fresh:
        assert fresh.latest_step() == 1
        _, meta = fresh.restore(_state(0))
    assert meta["step"] == 1


def _save(path, steps, state_of=_state, meta_of=lambda step: {"step": step}):
    with TrainCheckpointer(path, every=1, keep=10) as ckpt:
        for step in steps:
            ckpt.save(step, state_of(step), meta_of(step), force=True)


def _restore(path, template, step=None):
    with TrainCheckpointer(path, every=1) as ckpt:
        return ckpt.restore(template, step)


def test_corrupt_checkpoint_raises_naming_its_path(tmp_path):
    _save(tmp_path, [3])
    for root, _, files in os.walk(tmp_path / "3" / "state"):
        for name in files:
            pathlib.Path(root, name).write_bytes(b"\x00garbage")
    with pytest.raises(DamagedCheckpointError, match=rf"every checkpoint in {tmp_path} is damaged.*{tmp_path / '3'}"):
        _restore(tmp_path, _state(0))
    assert (tmp_path / "3").is_dir()  # nothing intact to fall back to: nothing is moved


def test_incompatible_checkpoint_raises_naming_its_path_and_array(tmp_path):
    _save(tmp_path, [5], state_of=lambda step: _state(step, width=4))
    with pytest.raises(CheckpointError, match=rf"{tmp_path / '5'} does not fit this model: opt_state/0/mu/dense/"
                                              r"bias is float32\[4\], the model expects float32\[6\]"):
        _restore(tmp_path, _state(0, width=6))
    int_kernel = _state(0)
    int_kernel["params"]["dense"]["kernel"] = jnp.zeros((3, 4), jnp.int32)
    with pytest.raises(CheckpointError, match=r"params/dense/kernel is float32\[3, 4\], the model expects int32"):
        _restore(tmp_path, int_kernel)  # refused before orbax would cast it
    extra = dict(_state(0), more=jnp.ones(2))
    with pytest.raises(CheckpointError, match=r"1 arrays the model needs are not in it \(more\)"):
        _restore(tmp_path, extra)
    assert (tmp_path / "5").is_dir()  # a checkpoint that does not fit is not damaged: never moved


def test_restore_without_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        _restore(tmp_path, _state(0))


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [pathlib.Path(root, name) for root, _, names in os.walk(step_dir / "state") for name in names]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_bytes_in_the_middle(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0x5A for b in data[middle : middle + 4])
    path.write_bytes(bytes(data))


def test_byte_flipped_array_data_fails_naming_the_checkpoint_and_leaf(tmp_path):
    state = _state(7, width=2048)  # a 3 x 2048 kernel: by far the largest data file
    _save(tmp_path, [4], state_of=lambda step: state)
    restored, meta = _restore(tmp_path, _state(0, width=2048))
    np.testing.assert_array_equal(restored["params"]["dense"]["kernel"], state["params"]["dense"]["kernel"])
    assert meta == {"step": 4}  # the digests are not handed back
    _flip_bytes_in_the_middle(_largest_array_file(tmp_path / "4"))
    with pytest.raises(DamagedCheckpointError,
                       match=rf"{tmp_path / '4'}: \['params'\]\['dense'\]\['kernel'\] differs from what was saved"):
        _restore(tmp_path, _state(0, width=2048), step=4)


def test_meta_step_must_match_its_step_directory(tmp_path):
    _save(tmp_path, [6], meta_of=lambda step: {"step": 5})
    with pytest.raises(DamagedCheckpointError, match=rf"{tmp_path / '6'}: meta says step 5"):
        _restore(tmp_path, _state(0), step=6)


def _edit_meta(step_dir: pathlib.Path, edit) -> None:
    (meta_file,) = [p for p in (step_dir / "meta").iterdir() if p.name != "commit_success.txt"]
    meta_file.write_text(json.dumps(edit(json.loads(meta_file.read_text()))))


def test_every_meta_field_is_covered_by_the_digest(tmp_path):
    meta_of = lambda step: {"step": step, "data_position": 16 * step, "config": {"lr": 0.003, "seed": 1}}  # noqa: E731
    _save(tmp_path, [2], meta_of=meta_of)
    assert _restore(tmp_path, _state(0))[1] == meta_of(2)
    edits = {
        "data_position": lambda m: dict(m, data_position=m["data_position"] + 1),
        "config": lambda m: dict(m, config=dict(m["config"], lr=0.03)),
        "an added field": lambda m: dict(m, extra=1),
        "a leaf digest": lambda m: dict(m, leaf_sha256={k: "0" * 64 for k in m["leaf_sha256"]}),
    }
    original = {p: p.read_bytes() for p in (tmp_path / "2" / "meta").iterdir()}
    for edit in edits.values():
        _edit_meta(tmp_path / "2", edit)
        with pytest.raises(DamagedCheckpointError, match=rf"{tmp_path / '2'}: its meta .* differs from what was saved"):
            _restore(tmp_path, _state(0), step=2)
        for path, data in original.items():
            path.write_bytes(data)
    _edit_meta(tmp_path / "2", lambda m: {k: v for k, v in m.items() if k != "meta_sha256"})
    with pytest.raises(CheckpointError, match=rf"{tmp_path / '2'} carries no integrity digests"):
        _restore(tmp_path, _state(0), step=2)


def test_damaged_newest_checkpoint_falls_back_with_one_warning_line(tmp_path, capfd):
    meta_of = lambda step: {"step": step, "data_position": 16 * step}  # noqa: E731
    state_of = functools.partial(_state, width=2048)  # the kernel's data file is the largest
    _save(tmp_path, [1, 2, 3], state_of=state_of, meta_of=meta_of)
    _edit_meta(tmp_path / "3", lambda m: dict(m, data_position=999))
    _flip_bytes_in_the_middle(_largest_array_file(tmp_path / "2"))
    capfd.readouterr()
    with TrainCheckpointer(tmp_path, every=1, keep=3) as ckpt:
        tree, meta = ckpt.restore(state_of(0))
        assert ckpt.restored_step == 1 and ckpt.latest_step() == 1
        # training goes on: steps 2 and 3 are written again, not skipped as "already there"
        assert ckpt.save(2, state_of(2), meta_of(2)) and ckpt.save(3, state_of(3), meta_of(3))
    assert meta == meta_of(1)
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(state_of(1))):
        np.testing.assert_array_equal(got, want)
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"warning: resuming from {tmp_path / '1'}, the newest intact checkpoint: set aside "
                               f"{tmp_path / '3.damaged'}, {tmp_path / '2.damaged'}: ")
    assert "data_position" in lines[0] and "['kernel'] differs from what was saved" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "1", "2", "2.damaged", "3", "3.damaged"]
    assert _restore(tmp_path, state_of(0))[1] == meta_of(3)


def test_orbax_leftovers_of_a_failed_read_are_silenced_and_nothing_else(tmp_path, monkeypatch, capsys):
    # After a failed read orbax abandons its other reads; TensorStore threads then report
    # "Event loop is closed" (from call_soon_threadsafe) and the abandoned coroutines raise when
    # finalized, through sys.unraisablehook: hundreds of lines. The checkpointer's hook drops
    # exactly those and passes anything else on.
    import asyncio
    import types

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(repr(u.exc_value)))
    _save(tmp_path, [1])
    for path in (tmp_path / "1" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    with pytest.raises(DamagedCheckpointError):
        _restore(tmp_path, _state(0))

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as err:
        closed = err

    def report(exc, obj=None):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                                                 exc_traceback=exc.__traceback__, err_msg=None, object=obj))

    orbax_coroutine = types.SimpleNamespace(cr_code=compile("", os.path.join("site-packages", "orbax", "x.py"), "exec"))
    report(closed)
    report(Exception("Encountered error while reading array index"), orbax_coroutine)
    assert seen == []
    report(RuntimeError("Event loop is closed"))  # not from call_soon_threadsafe: someone else's
    report(ValueError("yours"), types.SimpleNamespace(cr_code=compile("", "mine.py", "exec")))
    assert seen == ["RuntimeError('Event loop is closed')", "ValueError('yours')"]


def test_a_second_run_on_the_directory_is_refused_naming_the_holder(tmp_path):
    with TrainCheckpointer(tmp_path, every=1):
        with pytest.raises(CheckpointError, match=rf"{tmp_path} is in use by another run \(pid {os.getpid()} on "
                                                  rf"host {re.escape(socket.gethostname())}, started 20"):
            TrainCheckpointer(tmp_path, every=1)
        TrainCheckpointer(tmp_path, every=1, lock=False).close()  # the other processes of the same run
    TrainCheckpointer(tmp_path, every=1).close()  # released on close
    assert (tmp_path / ".detlayers-train.lock").read_bytes() == b""  # a clean end leaves no holder


def test_the_cli_refuses_a_second_run_on_the_directory_in_one_line(tmp_path, monkeypatch, capsys):
    from detlayers.demo import __main__ as cli
    from detlayers.demo import run, run_records

    first = run_records.open_checkpointer(cli.parse_args(["--checkpoint-dir", str(tmp_path)]))
    try:
        monkeypatch.setattr(run, "run_demo", run_records.open_checkpointer)  # the demo's first step
        assert cli.main(["--checkpoint-dir", str(tmp_path), "--no-progress"]) == 4
    finally:
        first.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: checkpoint directory {tmp_path} is in use by another run (pid {os.getpid()} ")


_HOLD_LOCK = """
import sys, time
from detlayers.demo.checkpoint_lock import DirectoryLock
DirectoryLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_lock_of_another_process_is_refused_then_taken_over_after_it_is_killed(tmp_path, capfd):
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1]))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE,
                              env=env, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {holder.pid} on host "):
            TrainCheckpointer(tmp_path, every=1)
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs, the kernel drops the flock
        holder.wait()
    capfd.readouterr()
    TrainCheckpointer(tmp_path, every=1).close()
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: checkpoint directory {tmp_path}: taking over the lock left by pid "
                               f"{holder.pid} on host {socket.gethostname()}, started 20")
    assert lines[0].endswith(f"did not release it (killed or crashed); pid {holder.pid} is no longer running")


def test_non_finite_state_is_never_saved_and_the_previous_checkpoint_stays(tmp_path):
    ckpt = TrainCheckpointer(tmp_path, every=1)
    ckpt.save(1, _state(1), {"step": 1}, force=True)
    bad = _state(2)
    bad["params"]["dense"]["bias"] = bad["params"]["dense"]["bias"].at[1].set(jnp.nan)
    with pytest.raises(CheckpointError, match=r"\['bias'\] holds NaN or inf"):
        ckpt.save(2, bad, {"step": 2}, force=True)
    ckpt.close()
    with TrainCheckpointer(tmp_path, every=1) as again:
        assert again.latest_step() == 1


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
            return params, batch_stats, opt_state, {"loss_cls": loss}
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
    with TrainCheckpointer(tmp_path, every=1) as again:
        assert again.latest_step() == 2
        tree, meta = again.restore(
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
