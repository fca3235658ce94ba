"""Batched DDIM step, DDIM grid and multistep unrolling, checked against diffusers' DDIMScheduler.step."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from torch import nn

from layout2image.core.ddim import (
    UNROLL_MODES,
    DiffusionSchedule,
    ddim_grid,
    ddim_step,
    sample_grid_index,
    unroll_ddim,
)
from layout2image.core.logging import reset_warn_once
from layout2image.core.losses import class_balance_weights, num_valid_pixels, weighted_cross_entropy_map

SD15 = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "timestep_spacing": "leading",
}
SD15_TAU = [40 * i + 1 for i in range(25)]  # aldm.md §7: τ_i = 40·i + 1
IGNORE = 255


def _scheduler(**overrides) -> DDIMScheduler:
    scheduler = DDIMScheduler(**{**SD15, **overrides})
    scheduler.set_timesteps(25)
    return scheduler


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- ddim_step


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("t", [961, 521, 41, 1])
def test_ddim_step_matches_scheduler_step(prediction_type, set_alpha_to_one, t):
    scheduler = _scheduler(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    sample, model_output = _randn(2, 4, 8, 8, seed=1), _randn(2, 4, 8, 8, seed=2)
    expected = scheduler.step(model_output, t, sample)
    out = ddim_step(scheduler, model_output, t, sample, t - 40)  # t - 40 < 0 at t = 1: final_alpha_cumprod
    torch.testing.assert_close(out.prev_sample, expected.prev_sample, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pred_original_sample, expected.pred_original_sample, atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [961, 1])
def test_ddim_step_with_eta_matches_scheduler_step(t):
    scheduler = _scheduler()
    sample, model_output, noise = _randn(2, 4, 8, 8, seed=1), _randn(2, 4, 8, 8, seed=2), _randn(2, 4, 8, 8, seed=3)
    expected = scheduler.step(model_output, t, sample, eta=0.7, variance_noise=noise).prev_sample
    out = ddim_step(scheduler, model_output, t, sample, t - 40, eta=0.7, variance_noise=noise).prev_sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    expected = scheduler.step(model_output, t, sample, eta=0.7, generator=torch.Generator().manual_seed(9))
    out = ddim_step(scheduler, model_output, t, sample, t - 40, eta=0.7, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out.prev_sample, expected.prev_sample, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_per_sample_timesteps_equal_scalar_calls(prediction_type):
    scheduler = _scheduler(prediction_type=prediction_type)
    ts = [961, 1, 401, 41]
    sample, model_output = _randn(4, 4, 8, 8, seed=4), _randn(4, 4, 8, 8, seed=5)
    out = ddim_step(scheduler, model_output, torch.tensor(ts), sample, torch.tensor(ts) - 40)
    for b, t in enumerate(ts):
        expected = scheduler.step(model_output[b : b + 1], t, sample[b : b + 1])
        torch.testing.assert_close(out.prev_sample[b : b + 1], expected.prev_sample, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            out.pred_original_sample[b : b + 1], expected.pred_original_sample, atol=1e-5, rtol=0
        )


def test_ddim_step_is_differentiable_with_the_analytic_gradient():
    scheduler = _scheduler()
    acp = scheduler.alphas_cumprod.double()
    eps = _randn(1, 4, 8, 8, seed=6).requires_grad_(True)
    ddim_step(scheduler, eps, 401, _randn(1, 4, 8, 8, seed=7), 361).prev_sample.sum().backward()
    # x_prev = sqrt(ᾱ_p)·(x - sqrt(1-ᾱ_t)·ε)/sqrt(ᾱ_t) + sqrt(1-ᾱ_p)·ε  =>  ∂x_prev/∂ε is this constant.
    slope = (1 - acp[361]).sqrt() - acp[361].sqrt() * (1 - acp[401]).sqrt() / acp[401].sqrt()
    torch.testing.assert_close(eps.grad, torch.full_like(eps, float(slope)), atol=1e-6, rtol=1e-5)


def test_ddim_step_argument_errors():
    scheduler, x = _scheduler(), torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="prev_timestep < timestep"):
        ddim_step(scheduler, x, 41, x, 41)
    with pytest.raises(ValueError, match=r"\(2,\) tensor"):
        ddim_step(scheduler, x, torch.tensor([1, 41, 81]), x, -1)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        ddim_step(scheduler, x, 1000, x, 960)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionSchedule(alphas_cumprod=torch.ones(10), final_alpha_cumprod=1.0, prediction_type="flow")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiffusionSchedule.from_scheduler(object())


def test_schedule_from_non_ddim_scheduler_matches_ddim():
    pndm = PNDMScheduler(**{k: v for k, v in SD15.items() if k not in ("clip_sample", "timestep_spacing")})
    ddim = _scheduler()
    sample, model_output = _randn(2, 4, 8, 8, seed=1), _randn(2, 4, 8, 8, seed=2)
    expected = ddim.step(model_output, 1, sample).prev_sample
    torch.testing.assert_close(ddim_step(pndm, model_output, 1, sample, -39).prev_sample, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- grid


def test_sd15_grid_with_25_steps_is_1_to_961():
    scheduler = _scheduler()
    before = dict(scheduler.config), scheduler.timesteps.clone()
    grid = ddim_grid(scheduler, 25)
    assert grid.timesteps.tolist() == SD15_TAU
    assert grid.prev_timesteps.tolist() == [-1] + SD15_TAU[:-1]
    assert dict(scheduler.config) == before[0] and torch.equal(scheduler.timesteps, before[1])
    step = grid.at(torch.tensor([0, 9, 24]))
    assert step.timestep.tolist() == [1, 361, 961] and step.prev_timestep.tolist() == [-1, 321, 921]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_grid_is_the_reversed_ddim_scheduler_timesteps(spacing):
    scheduler = DDIMScheduler(**{**SD15, "timestep_spacing": spacing, "steps_offset": 0})
    scheduler.set_timesteps(20)
    assert ddim_grid(scheduler.config, 20).timesteps.tolist() == scheduler.timesteps.tolist()[::-1]


def test_uneven_grid_warns(caplog):
    reset_warn_once()
    with caplog.at_level(logging.WARNING, logger="layout2image"):
        grid = ddim_grid({**SD15, "timestep_spacing": "linspace"}, 25)
    assert grid.timesteps.tolist()[:3] == [0, 42, 83]
    assert "DDIMScheduler.step would step to t - 40" in caplog.text


def test_sample_grid_index_range_and_reproducibility():
    draw = sample_grid_index(2000, 25, min_index=9, generator=torch.Generator().manual_seed(0))
    assert draw.dtype == torch.long and draw.shape == (2000,)
    assert set(draw.tolist()) == set(range(9, 25))
    again = sample_grid_index(2000, ddim_grid(SD15, 25), min_index=9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw, again)
    for bad in (-1, 25, 1.5):
        with pytest.raises(ValueError, match="min_index"):
            sample_grid_index(2, 25, min_index=bad)
    with pytest.raises(ValueError, match=r"\[0, 24\]"):
        ddim_grid(SD15, 25).at(torch.tensor([25]))


# ---------------------------------------------------------------- unrolling


class TinyModel(nn.Module):
    """A 1x1 conv plus a learned timestep term: linear in its parameters, counts its calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 1)
        self.t_scale = nn.Parameter(torch.tensor(0.3))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.conv(x) + self.t_scale * (t.float() / 1000).view(-1, 1, 1, 1)


def _setup(seed: int = 0):
    """Model, frozen 1x1 'discriminator' (4 -> 3 + fake), labels with an ignore pixel, weights, x_t."""
    model = TinyModel()
    disc = nn.Conv2d(4, 4, 1)
    disc.requires_grad_(False)
    labels = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(seed))
    labels[0, 0, 0] = IGNORE
    weights = class_balance_weights(labels, num_outputs=4)

    def loss_map(x0):
        return weighted_cross_entropy_map(disc(x0), labels, weights)

    return model, loss_map, labels, _randn(2, 4, 4, 4, seed=seed + 1)


def _reference_maps(model, loss_map, x, start, num_unroll_steps, with_grad, noises=None, eta=0.0):
    """Per-step ℓ maps by scalar DDIMScheduler.step calls per sample on τ_i = 40·i + 1 (no code under test)."""
    scheduler = _scheduler()
    xs = [x[b : b + 1] for b in range(x.shape[0])]
    maps = []
    for k in range(num_unroll_steps + 1):
        with torch.set_grad_enabled(with_grad(k)):
            x0s, nxt = [], []
            for b, i in enumerate(start):
                t = SD15_TAU[i - k]
                xb = xs[b] if with_grad(k) else xs[b].detach()
                eps = model(xb, torch.tensor([t]))
                noise = None if noises is None else noises[k][b : b + 1]
                out = scheduler.step(eps, t, xb, eta=eta, variance_noise=noise)
                x0s.append(out.pred_original_sample)
                nxt.append(out.prev_sample)
            maps.append(loss_map(torch.cat(x0s)))
        xs = nxt
    return maps


def _unroll(model, loss_map, x, start, num_unroll_steps, mode, labels, **kwargs):
    return unroll_ddim(
        model,
        loss_map,
        x,
        torch.tensor(start),
        num_unroll_steps,
        ddim_grid(SD15, 25),
        _scheduler(),
        mode=mode,
        num_valid=num_valid_pixels(labels),
        **kwargs,
    )


START, K = [3, 5], 3  # per-sample start indices τ = 121 and 201


def test_aldm_mode_value_is_mean_of_step_losses_and_gradient_is_rescaled_step_0():
    model, loss_map, labels, x = _setup()
    n_valid = float(num_valid_pixels(labels))
    out = _unroll(model, loss_map, x, START, K, "aldm", labels)
    out.loss.backward()
    assert model.calls == K + 1

    maps = _reference_maps(model, loss_map, x, START, K, with_grad=lambda k: k == 0)
    step_losses = torch.stack([m.detach().sum() / n_valid for m in maps])
    torch.testing.assert_close(out.step_losses, step_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), step_losses.mean(), rtol=1e-5, atol=1e-6)

    # ∇ = (1/N_valid) Σ_p (m(p)/ℓ_0(p)) ∇ℓ_0(p), summed pixel by pixel.
    ell_0 = maps[0]
    m = torch.stack([mp.detach() for mp in maps]).mean(0)
    params = list(model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    ratios = []
    for p in zip(*torch.nonzero(ell_0.detach()).T.tolist()):
        ratio = float(m[p] / ell_0[p].detach())
        ratios.append(ratio)
        for acc, g in zip(expected, torch.autograd.grad(ell_0[p], params, retain_graph=True)):
            acc += ratio * g / n_valid
    assert len(ratios) == 2 * 16 - 1  # every pixel but the ignore one
    assert max(abs(r - 1) for r in ratios) > 1e-2  # the rescaling is not trivially 1
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_full_mode_gradient_equals_plain_autograd_through_the_chain(eta):
    model, loss_map, labels, x = _setup(1)
    n_valid = float(num_valid_pixels(labels))
    out = _unroll(model, loss_map, x, START, K, "full", labels, eta=eta, generator=torch.Generator().manual_seed(3))
    assert model.calls == K + 1
    out.loss.backward()
    assert model.calls == 2 * (K + 1)  # each checkpointed step ran again in backward
    got = [p.grad.clone() for p in model.parameters()]

    gen = torch.Generator().manual_seed(3)
    noises = [torch.randn(x.shape, generator=gen) for _ in range(K + 1)] if eta > 0 else None
    maps = _reference_maps(model, loss_map, x, START, K, with_grad=lambda k: True, noises=noises, eta=eta)
    expected_loss = torch.stack([m.sum() / n_valid for m in maps]).mean()
    torch.testing.assert_close(out.loss.detach(), expected_loss.detach(), rtol=1e-5, atol=1e-6)
    expected = torch.autograd.grad(expected_loss, list(model.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_truncated_mode_value_is_mean_and_gradient_is_last_step_only():
    model, loss_map, labels, x = _setup(2)
    n_valid = float(num_valid_pixels(labels))
    out = _unroll(model, loss_map, x, START, K, "truncated", labels)
    out.loss.backward()
    assert out.pred_original_sample.grad_fn is None
    got = [p.grad.clone() for p in model.parameters()]

    maps = _reference_maps(model, loss_map, x, START, K, with_grad=lambda k: k == K)
    step_losses = torch.stack([m.detach().sum() / n_valid for m in maps])
    torch.testing.assert_close(out.loss.detach(), step_losses.mean(), rtol=1e-5, atol=1e-6)
    # Documented choice: the gradient is ∇L_K at unit scale (not divided by K + 1).
    expected = torch.autograd.grad(maps[-1].sum() / n_valid, list(model.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", UNROLL_MODES)
def test_given_model_output_equals_calling_predict(mode):
    model, loss_map, labels, x = _setup(3)
    base = _unroll(model, loss_map, x, START, K, mode, labels)
    base.loss.backward()
    base_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    t0 = torch.tensor([SD15_TAU[i] for i in START])
    given = _unroll(model, loss_map, x, START, K, mode, labels, model_output=model(x, t0))
    given.loss.backward()
    torch.testing.assert_close(given.loss, base.loss)
    for p, g in zip(model.parameters(), base_grads):
        torch.testing.assert_close(p.grad, g)


def test_zero_unroll_steps_is_the_plain_step_0_loss():
    model, loss_map, labels, x = _setup(4)
    out = _unroll(model, loss_map, x, [0, 7], 0, "aldm", labels)
    ell = _reference_maps(model, loss_map, x, [0, 7], 0, with_grad=lambda k: True)[0]
    torch.testing.assert_close(out.loss, ell.sum() / num_valid_pixels(labels).float(), rtol=1e-5, atol=1e-6)
    assert out.step_losses.shape == (1,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "bptt"}, "'aldm', 'full', 'truncated'"),
        ({"num_unroll_steps": -1}, "num_unroll_steps"),
        ({"num_unroll_steps": 25}, "num_unroll_steps"),
        ({"num_unroll_steps": 2.0}, "num_unroll_steps"),
        ({"num_unroll_steps": True}, "num_unroll_steps"),
        ({"start_index": torch.tensor([2, 5])}, r"start_index.*K=3"),
        ({"start_index": torch.tensor([3])}, "start_index"),
        ({"loss_map": lambda x0: x0.sum()}, r"\(B, H, W\)"),
    ],
)
def test_unroll_argument_errors(kwargs, match):
    model, loss_map, _, x = _setup()
    args = {
        "predict": model,
        "loss_map": loss_map,
        "sample": x,
        "start_index": torch.tensor(START),
        "num_unroll_steps": K,
        "grid": ddim_grid(SD15, 25),
        "schedule": _scheduler(),
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        unroll_ddim(**args)
