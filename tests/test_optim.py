"""The learning-rate schedule and the optimiser against closed forms (PyTorch's CosineAnnealingLR, Adam)."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fcn_jax.config import TrainConfig
from fcn_jax.training.optim import make_optimizer, make_schedule


def _cfg(**kw):
    return dataclasses.replace(TrainConfig(), **kw)


def _lr(schedule, steps):
    return np.asarray([float(schedule(s)) for s in steps])


def test_cosine_per_step_from_lr_to_zero():
    cfg = _cfg(lr=5e-4, steps=100, schedule="cosine", warmup_steps=0, steps_per_epoch=0)
    steps = np.arange(0, 101)
    ref = 5e-4 * 0.5 * (1 + np.cos(np.pi * steps / 100))
    # float32: 1 + cos(pi t) cancels near the end, so absolute to 1e-7 of lr there
    np.testing.assert_allclose(_lr(make_schedule(cfg), steps), ref, rtol=1e-6, atol=1e-7 * 5e-4)
    assert float(make_schedule(cfg)(250)) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0


def test_cosine_per_epoch_is_the_originals_staircase():
    """The original stepped CosineAnnealingLR(T_max=epochs, eta_min=0) once per epoch: lr_e = lr (1 + cos(pi e / T)) / 2."""
    spe, epochs, lr = 7, 5, 1e-4
    cfg = _cfg(lr=lr, steps=spe * epochs, schedule="cosine", warmup_steps=0, steps_per_epoch=spe)
    steps = np.arange(spe * epochs)
    ref = np.asarray([lr * (1 + math.cos(math.pi * (s // spe) / epochs)) / 2 for s in steps])
    got = _lr(make_schedule(cfg), steps)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert len(np.unique(np.round(got / lr, 6))) == epochs  # constant within an epoch


def test_linear_warmup_then_cosine_and_constant():
    cfg = _cfg(lr=2e-3, steps=110, schedule="cosine", warmup_steps=10, steps_per_epoch=0)
    s = make_schedule(cfg)
    np.testing.assert_allclose(_lr(s, [0, 5, 10]), [0.0, 1e-3, 2e-3], rtol=1e-6, atol=1e-12)
    assert float(s(60)) == pytest.approx(1e-3, rel=1e-5)  # halfway through the 100 cosine steps
    c = make_schedule(_cfg(lr=3e-4, steps=50, schedule="constant", warmup_steps=4))
    np.testing.assert_allclose(_lr(c, [0, 2, 4, 30, 49]), [0.0, 1.5e-4, 3e-4, 3e-4, 3e-4], rtol=1e-6, atol=1e-12)


def _optax_schedule(lr, steps, schedule, warmup_steps, steps_per_epoch):
    """The same learning rate built from optax's own schedules: linear warm-up from 0, then a cosine to 0 over the
    rest of the run -- per step, or per epoch (a cosine over the whole epochs, evaluated at the epoch index)."""
    if schedule == "constant":
        main = optax.constant_schedule(lr)
    elif steps_per_epoch:
        per_epoch = optax.cosine_decay_schedule(lr, decay_steps=(steps - warmup_steps) // steps_per_epoch, alpha=0.0)

        def main(n):
            return per_epoch(n // steps_per_epoch)
    elif warmup_steps:
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, decay_steps=steps, end_value=0.0)
    else:
        main = optax.cosine_decay_schedule(lr, decay_steps=steps, alpha=0.0)
    if not warmup_steps:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


@pytest.mark.parametrize("lr, steps, schedule, warmup_steps, steps_per_epoch", [
    (5e-4, 100, "cosine", 0, 0),
    (2e-3, 110, "cosine", 10, 0),
    (1e-4, 35, "cosine", 0, 7),  # the original: 5 epochs of 7 steps
    (1e-4, 40, "cosine", 3, 7),  # warm-up, then 5 whole epochs and 2 steps of a sixth
    (3e-4, 50, "constant", 4, 0),
    (3e-4, 50, "constant", 0, 0),
])
def test_schedule_equals_optax_at_every_step(lr, steps, schedule, warmup_steps, steps_per_epoch):
    cfg = _cfg(lr=lr, steps=steps, schedule=schedule, warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch)
    every = np.arange(steps + 10)  # and past the end
    ref = _lr(_optax_schedule(lr, steps, schedule, warmup_steps, steps_per_epoch), every)
    got = _lr(make_schedule(cfg), every)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7 * lr)
    assert got.max() == pytest.approx(lr, rel=1e-6)  # peaks at lr, whatever the shape


def test_adam_step_matches_the_closed_form():
    """One Adam step as PyTorch's (bias-corrected, eps outside the sqrt) at the schedule's first rate."""
    cfg = _cfg(lr=1e-2, steps=10, schedule="constant", warmup_steps=0, grad_clip=0.0, optimizer="adam")
    tx, _ = make_optimizer(cfg)
    p = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    g = {"w": jnp.asarray([0.3, -0.1, 0.0])}
    upd, _ = tx.update(g, tx.init(p), p)
    gw = np.asarray(g["w"], np.float64)
    m, v = 0.1 * gw / (1 - 0.9), 0.001 * gw**2 / (1 - 0.999)
    np.testing.assert_allclose(np.asarray(optax.apply_updates(p, upd)["w"]),
                               np.asarray(p["w"]) - 1e-2 * m / (np.sqrt(v) + cfg.eps), rtol=1e-6)
