"""The moments plot's reference lines, checked by stepping torch's own Adam.

- pure noise: sqrt(E[m_hat^2] / E[v_hat]) under zero-mean gradient noise (0.229 for beta1 = 0.9);
- largest possible: the Cauchy-Schwarz bound on |m_hat| / sqrt(v_hat), attained by a steadily
  growing gradient (7.27 for (0.9, 0.999) once beta2^t is small).
Constants from /work/shared/reference/optimizer-math.md, "Calibration constants".
"""

from __future__ import annotations

import math

import pytest
import torch

from ostate.optimizers.adam import max_snr, pure_noise_snr


def _adam_moments(gradients: torch.Tensor, betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run torch.optim.Adam over ``gradients`` (steps x coordinates); return |m_hat| and sqrt(v_hat)."""
    p = torch.nn.Parameter(torch.zeros(gradients.shape[1], dtype=gradients.dtype))
    opt = torch.optim.Adam([p], lr=0.0, betas=betas)
    for g in gradients:
        p.grad = g.clone()
        opt.step()
    state = opt.state[p]
    t = float(state["step"])
    m_hat = state["exp_avg"].abs() / (1 - betas[0] ** t)
    v_hat = state["exp_avg_sq"] / (1 - betas[1] ** t)
    return m_hat, v_hat.sqrt()


def test_the_documented_constants():
    assert round(pure_noise_snr(0.9), 3) == 0.229
    assert round(max_snr(0.9, 0.999), 2) == 7.27
    assert round(max_snr(0.9, 0.95), 3) == 1.165
    assert max_snr(0.9, 0.9) == pytest.approx(1.0)
    assert max_snr(0.99, 0.95) == math.inf  # beta1^2 >= beta2: unbounded over an infinite history
    # The step-dependent forms tend to the constants and start at 1 (m_hat^2 = v_hat = g^2 at t = 1).
    assert pure_noise_snr(0.9, 10_000) == pytest.approx(pure_noise_snr(0.9), rel=1e-12)
    assert max_snr(0.9, 0.999, 100_000) == pytest.approx(max_snr(0.9, 0.999), rel=1e-9)
    assert pure_noise_snr(0.9, 1) == pytest.approx(1.0) and max_snr(0.9, 0.999, 1) == pytest.approx(1.0)


@pytest.mark.parametrize(("beta1", "beta2", "steps"), [(0.9, 0.999, 200), (0.9, 0.95, 3), (0.5, 0.999, 40)])
def test_pure_noise_line_is_where_torch_adam_puts_zero_mean_noise(beta1, beta2, steps):
    g = torch.Generator().manual_seed(0)
    gradients = torch.randn(steps, 50_000, generator=g) * 0.01
    m_hat, root_v_hat = _adam_moments(gradients, (beta1, beta2))
    measured = math.sqrt(float(m_hat.double().square().mean() / root_v_hat.double().square().mean()))
    assert measured == pytest.approx(pure_noise_snr(beta1, steps), rel=0.015)
    # A gradient with a consistent sign (mean 5 standard deviations) is clearly above the line.
    m_signal, root_signal = _adam_moments(gradients + 0.05, (beta1, beta2))
    assert float(m_signal.square().mean() / root_signal.square().mean()) ** 0.5 > 1.5 * pure_noise_snr(beta1, steps)


@pytest.mark.parametrize(("beta1", "beta2"), [(0.9, 0.999), (0.9, 0.95), (0.95, 0.95), (0.8, 0.99)])
@pytest.mark.parametrize("steps", [1, 7, 60, 2500])
def test_largest_possible_line_is_attained_by_a_growing_gradient(beta1, beta2, steps):
    # Cauchy-Schwarz is tight for g_k proportional to (beta1 / beta2)^(t - k).
    k = torch.arange(1, steps + 1, dtype=torch.float64)
    worst = ((beta1 / beta2) ** (steps - k)).reshape(-1, 1)
    m_hat, root_v_hat = _adam_moments(worst, (beta1, beta2))
    assert float(m_hat / root_v_hat) == pytest.approx(max_snr(beta1, beta2, steps), rel=1e-9)


@pytest.mark.parametrize(("beta1", "beta2"), [(0.9, 0.999), (0.9, 0.95)])
def test_no_gradient_sequence_goes_above_the_largest_possible_line(beta1, beta2):
    g = torch.Generator().manual_seed(3)
    steps = 120
    growth = torch.exp(torch.linspace(0, 1, steps, dtype=torch.float64)).reshape(-1, 1)
    kinds = [
        torch.randn(steps, 4000, generator=g, dtype=torch.float64),  # noise
        torch.randn(steps, 4000, generator=g, dtype=torch.float64) + 1.0,  # biased noise
        torch.rand(steps, 4000, generator=g, dtype=torch.float64) * growth * 10,  # growing, one sign
    ]
    bound = max_snr(beta1, beta2, steps)
    for gradients in kinds:
        m_hat, root_v_hat = _adam_moments(gradients, (beta1, beta2))
        assert float((m_hat / root_v_hat).max()) <= bound * (1 + 1e-9)
