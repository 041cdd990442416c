"""``detlayers.models.solver`` against detectron2's solver: the learning rate at every iteration
of small schedules (warmup, the STEPS boundaries, cosine) and the parameters after three SGD
steps of ``build_optimizer`` on a small module (weight decay groups, bias factors, momentum,
Nesterov, per-tensor gradient clipping, a frozen layer).

Fixtures: ``tests/fixtures/solver_schedules.json`` and ``solver_sgd.npz``, written by
``tools/fixtures/make_solver.py`` with detectron2.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from detlayers.models.config import get_cfg
from detlayers.models.solver import build_lr_schedule, build_optimizer, lr_multipliers, norm_param_mask

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SPEC = json.loads((FIXTURES / "solver_schedules.json").read_text())
# torch module name -> Flax module name, and torch leaf -> Flax leaf per module kind
_MODULES = {"conv": "conv", "gn": "gn", "bn": "bn", "fc": "fc", "frozen": "frozen"}
_LEAVES = {"conv": {"weight": "kernel"}, "fc": {"weight": "kernel"}, "frozen": {"weight": "kernel"},
           "gn": {"weight": "scale"}, "bn": {"weight": "scale"}}


def _cfg(solver_keys: dict):
    cfg = get_cfg()
    for key, value in solver_keys.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                cfg.SOLVER[key][sub] = float(v) if v == "inf" else v
        else:
            cfg.SOLVER[key] = tuple(value) if isinstance(value, list) else value
    return cfg


@pytest.mark.parametrize("case", sorted(SPEC["schedules"]))
def test_lr_at_every_iteration_equals_detectron2(case):
    spec = SPEC["schedules"][case]
    cfg = _cfg(spec["solver"])
    schedule = build_lr_schedule(cfg)
    iters = np.asarray(spec["iters"])
    expected = np.asarray(spec["lr"])
    got = np.asarray(jax.vmap(schedule)(jnp.asarray(iters)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    # the float64 table is detectron2's arithmetic itself
    np.testing.assert_allclose(cfg.SOLVER.BASE_LR * lr_multipliers(cfg)[iters], expected, rtol=1e-12)


def test_schedule_holds_the_last_value_past_max_iter_and_refuses_bad_configs():
    cfg = _cfg(SPEC["schedules"]["cosine"]["solver"])
    schedule = build_lr_schedule(cfg)
    np.testing.assert_allclose(float(schedule(cfg.SOLVER.MAX_ITER + 5)), SPEC["schedules"]["cosine"]["lr"][-1],
                               rtol=1e-6)
    for key, value, match in [("LR_SCHEDULER_NAME", "WarmupPolyLR", "LR_SCHEDULER_NAME"),
                              ("WARMUP_METHOD", "exp", "WARMUP_METHOD"), ("MAX_ITER", 0, "MAX_ITER")]:
        bad = get_cfg()
        bad.SOLVER[key] = value
        with pytest.raises(ValueError, match=match):
            build_lr_schedule(bad)


def _flax_params(arrays: dict, prefix: str) -> dict:
    """The torch module's parameters as a Flax-style tree (layouts are irrelevant to SGD)."""
    params: dict = {}
    for key, value in arrays.items():
        if not key.startswith(prefix + "."):
            continue
        module, leaf = key[len(prefix) + 1:].split(".")
        params.setdefault(_MODULES[module], {})[_LEAVES[module].get(leaf, leaf)] = jnp.asarray(value)
    return params


@pytest.fixture(scope="module")
def sgd_arrays():
    with np.load(FIXTURES / "solver_sgd.npz") as f:
        return {k: f[k] for k in f.files}


def test_norm_mask_marks_norm_layers_only(sgd_arrays):
    mask = norm_param_mask(_flax_params(sgd_arrays, "init"))
    assert mask == {"conv": {"kernel": False, "bias": False}, "gn": {"scale": True, "bias": True},
                    "bn": {"scale": True, "bias": True}, "fc": {"kernel": False, "bias": False},
                    "frozen": {"kernel": False, "bias": False}}


@pytest.mark.parametrize("case", sorted(SPEC["sgd_cases"]))
def test_three_sgd_steps_equal_detectron2_build_optimizer(case, sgd_arrays):
    cfg = _cfg({**SPEC["sgd_schedule"], **SPEC["sgd_cases"][case]})
    params = _flax_params(sgd_arrays, "init")
    trainable = jax.tree.map(lambda _: True, params)
    trainable["frozen"] = {"kernel": False, "bias": False}
    tx = build_optimizer(cfg, params, trainable=trainable)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(SPEC["sgd_iters"]):
        params, state = step(params, state, _flax_params(sgd_arrays, f"grad{t}"))
    expected = _flax_params(sgd_arrays, case)
    for module, leaves in expected.items():
        for leaf, want in leaves.items():
            got = np.asarray(params[module][leaf])
            scale = np.max(np.abs(np.asarray(want)))
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale, err_msg=f"{case}: {module}/{leaf}")
    # the frozen layer did not move at all
    np.testing.assert_array_equal(params["frozen"]["kernel"], sgd_arrays["init.frozen.weight"])


def test_build_optimizer_refuses_bad_solver_keys():
    params = {"fc": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}
    cfg = get_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    with pytest.raises(ValueError, match="CLIP_TYPE 'full_model'"):
        build_optimizer(cfg, params)
    cfg = get_cfg()
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.NESTEROV = True
    with pytest.raises(ValueError, match="NESTEROV"):
        build_optimizer(cfg, params)
