"""test_trpo.py: every derivative and every piece of TRPO checked against an independent reference.

References used here: central finite differences (network.numerical_gradient),
explicit matrices built sample by sample, np.linalg.solve, trajectories worked
out by hand, and plain loops. No autodiff framework.

Run:  python -m pytest -q test_trpo.py
"""

import concurrent.futures
import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import parallel
import run_files
import trpo_numpy as T
from network import (MLP, Adam, categorical_fisher_product, entropy, kl, log_prob, log_softmax,
                     numerical_gradient, relative_error, sample, softmax)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def small_net(rng):
    """Two hidden layers so every path of backward and jvp (first, middle, output layer) is exercised."""
    net = MLP([3, 5, 4, 3])
    theta = net.init(rng, output_gain=0.5) + 0.1 * rng.standard_normal(net.num_params)
    x = rng.standard_normal((6, 3))
    return net, theta, x


# ----------------------------------------------------------------------------
# network.py: the MLP's derivatives
# ----------------------------------------------------------------------------

def test_flatten_and_unflatten_are_inverse(small_net):
    net, theta, _ = small_net
    assert np.array_equal(net.flatten(net.unflatten(theta)), theta)
    layers = net.unflatten(theta)
    assert [W.shape for W, _ in layers] == [(3, 5), (5, 4), (4, 3)]
    layers[1][1][0] = 42.0  # unflatten returns views into theta
    assert 42.0 in theta


def test_forward_matches_plain_formula(small_net):
    net, theta, x = small_net
    (W1, b1), (W2, b2), (W3, b3) = net.unflatten(theta)
    expected = np.tanh(np.tanh(x @ W1 + b1) @ W2 + b2) @ W3 + b3
    y, cache = net.forward(theta, x)
    assert np.allclose(y, expected, rtol=1e-14, atol=1e-14)
    assert len(cache) == 3 and cache[0] is x


def test_backward_matches_finite_differences(small_net, rng):
    net, theta, x = small_net
    grad_y = rng.standard_normal((len(x), 3))
    _, cache = net.forward(theta, x)
    analytic = net.backward(theta, cache, grad_y)
    numeric = numerical_gradient(lambda th: np.sum(net.forward(th, x)[0] * grad_y), theta)
    assert relative_error(analytic, numeric) < 1e-6


def test_jvp_matches_finite_differences(small_net, rng):
    net, theta, x = small_net
    v = rng.standard_normal(net.num_params)
    _, cache = net.forward(theta, x)
    analytic = net.jvp(theta, cache, v)
    jacobian = numerical_gradient(lambda th: net.forward(th, x)[0], theta)  # (P, N, A)
    numeric = np.einsum("pna,p->na", jacobian, v)
    assert analytic.shape == (len(x), 3)
    assert relative_error(analytic, numeric) < 1e-6


def test_backward_is_the_transpose_of_jvp(small_net, rng):
    # <J v, w> = <v, J^T w> for any v, w: the two passes are adjoint.
    net, theta, x = small_net
    v, w = rng.standard_normal(net.num_params), rng.standard_normal((len(x), 3))
    _, cache = net.forward(theta, x)
    assert np.isclose(np.sum(net.jvp(theta, cache, v) * w), v @ net.backward(theta, cache, w), rtol=1e-12)


# ----------------------------------------------------------------------------
# network.py: categorical distributions
# ----------------------------------------------------------------------------

def test_categorical_helpers_match_definitions(rng):
    z = rng.standard_normal((5, 4)) * 3
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert np.allclose(softmax(z), p, rtol=1e-13)
    assert np.allclose(log_softmax(z + 1000.0), np.log(p), rtol=1e-12)  # stable for huge logits
    actions = np.array([0, 3, 1, 2, 2])
    assert np.allclose(log_prob(z, actions), np.log(p[np.arange(5), actions]), rtol=1e-12)
    assert np.allclose(entropy(z), -(p * np.log(p)).sum(axis=1), rtol=1e-12)
    z2 = rng.standard_normal((5, 4))
    q = softmax(z2)
    assert np.allclose(kl(z, z2), (p * np.log(p / q)).sum(axis=1), rtol=1e-12)


def test_kl_of_a_policy_with_itself_is_zero(small_net):
    net, theta, x = small_net
    logits = net.forward(theta, x)[0]
    assert np.all(np.abs(kl(logits, logits)) < 1e-15)
    assert T.mean_kl(logits, logits) == 0.0
    assert T.mean_kl(logits, net.forward(theta * 1.1, x)[0]) > 0


def test_kl_direction_is_old_to_new():
    # KL is not symmetric; the constraint is KL(pi_old || pi_new) (Eq. 12), old first.
    z_old, z_new = np.log([[0.7, 0.2, 0.1]]), np.log([[0.1, 0.3, 0.6]])
    by_hand = 0.7 * np.log(0.7 / 0.1) + 0.2 * np.log(0.2 / 0.3) + 0.1 * np.log(0.1 / 0.6)
    assert np.isclose(kl(z_old, z_new)[0], by_hand, rtol=1e-12)
    assert not np.isclose(kl(z_new, z_old)[0], by_hand)


def test_sample_follows_the_probabilities_within_4_sigma(rng):
    p = np.array([0.1, 0.2, 0.3, 0.4])
    n = 40_000
    draws = sample(np.tile(np.log(p), (n, 1)), rng.random(n))
    counts = np.bincount(draws, minlength=4)
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 4 * sigma)


def test_categorical_fisher_is_the_hessian_of_kl_in_logit_space(rng):
    z_old = rng.standard_normal((1, 4))
    p = softmax(z_old)[0]
    hessian = numerical_gradient(
        lambda z: numerical_gradient(lambda z2: kl(z_old, z2[None])[0], z, eps=1e-4), z_old[0], eps=1e-4)
    assert np.allclose(hessian, np.diag(p) - np.outer(p, p), atol=1e-7)
    u = rng.standard_normal((1, 4))
    assert np.allclose(categorical_fisher_product(p[None], u)[0], (np.diag(p) - np.outer(p, p)) @ u[0],
                       rtol=1e-13)


def test_adam_minimises_a_quadratic():
    target = np.array([1.0, -2.0, 3.0])
    adam, x = Adam(3, lr=0.05), np.zeros(3)
    for _ in range(2000):
        x = adam.step(x, 2 * (x - target))
    assert np.allclose(x, target, atol=1e-3)


# ----------------------------------------------------------------------------
# The Fisher-vector product (Appendix C)
# ----------------------------------------------------------------------------

def explicit_fisher(net, theta, x):
    """F = mean_i J_i^T (diag(p_i) - p_i p_i^T) J_i, with each J_i from finite differences."""
    jacobian = numerical_gradient(lambda th: net.forward(th, x)[0], theta)  # (P, N, A)
    p = softmax(net.forward(theta, x)[0])
    F = np.zeros((net.num_params, net.num_params))
    for i in range(len(x)):
        J = jacobian[:, i, :].T  # (A, P)
        F += J.T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ J
    return F / len(x)


def test_fisher_vector_product_equals_explicit_fisher_and_kl_hessian(small_net, rng):
    net, theta, x = small_net
    logits_old, cache = net.forward(theta, x)
    probs = softmax(logits_old)
    F = explicit_fisher(net, theta, x)
    # The Hessian of KLbar(theta_old, theta) at theta_old, by second-order central differences.
    hessian = numerical_gradient(
        lambda th: numerical_gradient(lambda th2: T.mean_kl(logits_old, net.forward(th2, x)[0]), th, eps=1e-4),
        theta, eps=1e-4)
    assert relative_error(F, hessian) < 1e-5
    damping = 0.1
    for _ in range(3):
        v = rng.standard_normal(net.num_params)
        Fv = T.fisher_vector_product(net, theta, cache, probs, v, damping)
        assert relative_error(Fv, F @ v + damping * v) < 1e-7
        assert relative_error(Fv, hessian @ v + damping * v) < 1e-5


# ----------------------------------------------------------------------------
# Conjugate gradient, the surrogate, the line search, the step
# ----------------------------------------------------------------------------

def test_conjugate_gradient_matches_linear_solve(rng):
    M = rng.standard_normal((8, 8))
    A = M @ M.T + 0.5 * np.eye(8)
    b = rng.standard_normal(8)
    x = T.conjugate_gradient(lambda v: A @ v, b, iters=50, residual_tol=1e-20)
    assert relative_error(x, np.linalg.solve(A, b)) < 1e-8
    # In exact arithmetic CG solves an n x n system in n steps; 10 is plenty for 8.
    assert relative_error(T.conjugate_gradient(lambda v: A @ v, b, iters=10), np.linalg.solve(A, b)) < 1e-4


def test_conjugate_gradient_stops_on_a_non_positive_curvature():
    # An indefinite "Fisher" must not make CG divide by ~0 or return infinities.
    A = np.diag([1.0, -1.0])
    x = T.conjugate_gradient(lambda v: A @ v, np.array([1.0, 1.0]), iters=10)
    assert np.all(np.isfinite(x))


def random_policy_batch(net, theta, rng, n=50):
    states = rng.standard_normal((n, net.sizes[0]))
    logits = net.forward(theta, states)[0]
    actions = sample(logits, rng.random(n))
    return states, actions, log_prob(logits, actions), rng.standard_normal(n)


def test_surrogate_gradient_matches_finite_differences(small_net, rng):
    net, theta, _ = small_net
    states, actions, logp_old, advantages = random_policy_batch(net, theta, rng)
    # At theta_old (ratio 1) and away from it (ratio != 1) the gradient must be right.
    for point in (theta, theta + 0.05 * rng.standard_normal(net.num_params)):
        logits, cache = net.forward(point, states)
        L, dL_dlogits = T.surrogate(logits, actions, logp_old, advantages)
        analytic = net.backward(point, cache, dL_dlogits)
        numeric = numerical_gradient(
            lambda th: T.surrogate(net.forward(th, states)[0], actions, logp_old, advantages)[0], point)
        assert relative_error(analytic, numeric) < 1e-6
    assert np.isclose(T.surrogate(net.forward(theta, states)[0], actions, logp_old, advantages)[0],
                      advantages.mean(), rtol=1e-12)  # ratio = 1 at theta_old


def test_maximal_step_puts_the_quadratic_kl_model_at_delta(rng):
    M = rng.standard_normal((6, 6))
    F = M @ M.T + 0.1 * np.eye(6)
    x = rng.standard_normal(6)
    step = T.maximal_step(x, x @ F @ x, max_kl=0.01)
    assert np.isclose(0.5 * step @ F @ step, 0.01, rtol=1e-12)
    assert np.allclose(step / np.linalg.norm(step), x / np.linalg.norm(x))  # along x, not against it


def test_line_search_never_accepts_kl_above_delta():
    # KL grows with the step; the full step would reach 4 delta.
    delta, theta_old, full_step = 0.01, np.zeros(2), np.array([0.2, 0.0])

    def evaluate(theta):
        return theta[0], 4 * delta * (theta[0] / 0.2) ** 2

    ok, theta, improvement, kl_reached, backtracks = T.line_search(evaluate, theta_old, full_step, delta, 0.8, 10)
    assert ok and backtracks == 4  # 0.8^k * 2 <= 1 first at k = 4 (0.8^4 = 0.41)
    assert kl_reached <= delta and evaluate(theta)[1] <= delta
    assert np.allclose(theta, theta_old + 0.8 ** 4 * full_step)
    # A KL a hair above delta is refused, even at the full step (no 1.5 delta slack).
    ok, theta, *_ = T.line_search(lambda th: (1.0, delta * 1.0000001), theta_old, full_step, delta, 0.8, 10)
    assert not ok


def test_no_step_is_taken_when_every_action_is_equally_good(rng):
    # Eq. (15) with equal Q for every action: the true gradient is zero, the computed one rounding
    # noise; a line search that accepts any improvement > 0 takes a random step of KL up to delta.
    # (Without the threshold, 15 of these 20 seeds took such a step.)
    net = MLP([8, 64, 64, 4])
    Q = np.full((256, 4), -123.456)
    for seed in range(20):
        theta = net.init(np.random.default_rng(seed), output_gain=0.01)
        states = np.random.default_rng(100 + seed).standard_normal((256, 8))
        kept, info = T.trpo_step(net, theta, states, lambda logits: T.all_actions_surrogate(logits, Q),
                                 T.Config(max_kl=0.05))
        assert np.array_equal(kept, theta) and not info["accepted"], f"seed {seed}: a step on rounding noise"


def test_line_search_returns_theta_old_when_nothing_is_accepted():
    theta_old = np.array([1.0, 2.0])
    ok, theta, improvement, kl_reached, backtracks = T.line_search(
        lambda th: (-1.0, 0.0), theta_old, np.array([0.5, 0.5]), 0.01, 0.8, 10)
    assert not ok and backtracks == 10 and improvement == 0.0
    assert np.array_equal(theta, theta_old)


def test_trpo_step_stays_in_the_trust_region_and_improves(rng):
    net = MLP([4, 8, 3])
    theta = net.init(rng, output_gain=0.5)
    states, actions, logp_old, advantages = random_policy_batch(net, theta, rng, n=200)
    # every state in F and little damping: the quadratic model is the KL's own
    cfg = T.Config(max_kl=0.01, cg_iters=20, damping=1e-4, fisher_subsample=1)

    def surrogate_of_logits(logits):
        return T.surrogate(logits, actions, logp_old, advantages)
    theta_new, info = T.trpo_step(net, theta, states, surrogate_of_logits, cfg)
    L_old = surrogate_of_logits(net.forward(theta, states)[0])[0]
    L_new = surrogate_of_logits(net.forward(theta_new, states)[0])[0]
    kl_new = T.mean_kl(net.forward(theta, states)[0], net.forward(theta_new, states)[0])
    assert info["accepted"] and 0 < kl_new <= cfg.max_kl
    assert np.isclose(info["kl"], kl_new) and np.isclose(info["actual_improve"], L_new - L_old)
    assert L_new > L_old
    # The quadratic model sets the step: the KL reached is near delta when nothing backtracks.
    if info["backtracks"] == 0:
        assert kl_new > 0.5 * cfg.max_kl


def test_trpo_step_keeps_theta_old_on_a_non_finite_gradient(rng):
    net = MLP([4, 8, 3])
    theta = net.init(rng)
    states, actions, logp_old, advantages = random_policy_batch(net, theta, rng)
    advantages[3] = np.nan
    theta_new, info = T.trpo_step(net, theta, states, lambda z: T.surrogate(z, actions, logp_old, advantages),
                                  T.Config())
    assert np.array_equal(theta_new, theta) and not info["accepted"] and "skipped" in info


def test_fisher_subsample_uses_every_kth_state(small_net, rng):
    net, theta, _ = small_net
    states, actions, logp_old, advantages = random_policy_batch(net, theta, rng, n=60)
    surrogate_of_logits = lambda z: T.surrogate(z, actions, logp_old, advantages)  # noqa: E731
    a, info_a = T.trpo_step(net, theta, states, surrogate_of_logits, T.Config(fisher_subsample=1))
    b, info_b = T.trpo_step(net, theta, states, surrogate_of_logits, T.Config(fisher_subsample=3))
    assert info_a["accepted"] and info_b["accepted"]
    assert info_a["kl"] <= T.Config.max_kl and info_b["kl"] <= T.Config.max_kl
    assert not np.allclose(a, b)  # the subsampled Fisher really is a different matrix


# ----------------------------------------------------------------------------
# Advantages: terminated vs truncated
# ----------------------------------------------------------------------------

# One environment, five steps: the first episode TERMINATES at t = 1 (no future), the second is
# TRUNCATED by a time limit at t = 3 (the future exists: bootstrap with V(final obs) = 77), and the
# batch is cut after t = 4 (bootstrap with V(next obs) = 66). next_values[1] = 99 is V of a terminal
# observation and must be ignored.
TRAJ = dict(
    rewards=np.array([[1.0], [2.0], [3.0], [4.0], [5.0]]),
    values=np.array([[10.0], [20.0], [30.0], [40.0], [50.0]]),
    next_values=np.array([[20.0], [99.0], [40.0], [77.0], [66.0]]),
    terminated=np.array([[False], [True], [False], [False], [False]]),
    truncated=np.array([[False], [False], [False], [True], [False]]),
)


def test_gae_on_a_hand_computed_trajectory():
    gamma, lam = 0.9, 0.8
    # deltas: d0 = 1 + .9*20 - 10 = 9;  d1 = 2 - 20 = -18 (terminated: no bootstrap);
    # d2 = 3 + .9*40 - 30 = 9;  d3 = 4 + .9*77 - 40 = 33.3 (truncated: bootstrap);  d4 = 5 + .9*66 - 50 = 14.4
    # A4 = 14.4;  A3 = 33.3 (episode ends: no later deltas);  A2 = 9 + .72*33.3 = 32.976;
    # A1 = -18;  A0 = 9 + .72*(-18) = -3.96
    expected = np.array([[-3.96], [-18.0], [32.976], [33.3], [14.4]])
    t = TRAJ
    got = T.gae(t["rewards"], t["values"], t["next_values"], t["terminated"], t["truncated"], gamma, lam)
    assert np.allclose(got, expected, rtol=1e-12)


def test_monte_carlo_returns_on_a_hand_computed_trajectory():
    # G4 = 5 + .9*66 = 64.4 (batch cut);  G3 = 4 + .9*77 = 73.3 (truncated);  G2 = 3 + .9*73.3 = 68.97;
    # G1 = 2 (terminated);  G0 = 1 + .9*2 = 2.8
    expected = np.array([[2.8], [2.0], [68.97], [73.3], [64.4]])
    t = TRAJ
    got = T.discounted_returns(t["rewards"], t["next_values"], t["terminated"], t["truncated"], 0.9)
    assert np.allclose(got, expected, rtol=1e-12)


def test_gae_matches_a_plain_loop_and_lambda_one_is_monte_carlo(rng):
    steps, envs, gamma, lam = 40, 3, 0.95, 0.9
    r, v, nv = rng.standard_normal((steps, envs)), rng.standard_normal((steps, envs)), rng.standard_normal((steps, envs))
    term, trunc = rng.random((steps, envs)) < 0.1, rng.random((steps, envs)) < 0.1
    trunc &= ~term
    got = T.gae(r, v, nv, term, trunc, gamma, lam)
    for e in range(envs):  # plain loop: sum_l (gamma lam)^l delta_{t+l} until the episode ends
        for t in range(steps):
            total, weight = 0.0, 1.0
            for k in range(t, steps):
                delta = r[k, e] + (0.0 if term[k, e] else gamma * nv[k, e]) - v[k, e]
                total += weight * delta
                if term[k, e] or trunc[k, e]:
                    break
                weight *= gamma * lam
            assert np.isclose(got[t, e], total, rtol=1e-10, atol=1e-12)
    # Lambda = 1 telescopes to Monte Carlo when, as in a real batch, V(next state) = V(s_{t+1}) within episodes.
    done = term | trunc
    nv[:-1] = np.where(done[:-1], nv[:-1], v[1:])
    returns = T.discounted_returns(r, nv, term, trunc, gamma)
    assert np.allclose(T.gae(r, v, nv, term, trunc, gamma, 1.0), returns - v, rtol=1e-10, atol=1e-12)


def test_sampler_keeps_the_final_observation_of_a_truncated_episode(rng):
    # CartPole cut by a 5-step time limit: the step that truncates must store the true final
    # observation (to bootstrap from), never the reset observation of the next episode.
    envs = [gym.make("CartPole-v1", max_episode_steps=5) for _ in range(2)]
    net = MLP([4, 8, 2])
    theta = net.init(rng)
    sampler = T.SinglePathSampler(envs, env_seeds=[1, 2], action_seeds=[3, 4])
    batch = sampler.sample(net, theta, 12)
    assert batch["truncated"][4].all() and not batch["terminated"][4].any()
    for e in range(2):
        for t in range(11):
            if batch["terminated"][t, e] or batch["truncated"][t, e]:
                # after an end, the next state is a fresh reset, not the stored final observation
                assert not np.array_equal(batch["next_obs"][t, e], batch["obs"][t + 1, e])
            else:
                assert np.array_equal(batch["next_obs"][t, e], batch["obs"][t + 1, e])
    ended = batch["terminated"] | batch["truncated"]
    assert np.array_equal(~np.isnan(batch["episode_return"]), ended)
    # the first episode of each environment is steps 0..4 (or shorter if it terminated)
    for e in range(2):
        first_end = np.argmax(ended[:, e])
        assert np.isclose(batch["episode_return"][first_end, e], batch["rewards"][:first_end + 1, e].sum())


def test_parallel_sampler_gives_the_serial_batch(rng):
    net = MLP([8, 16, 4])
    theta = net.init(rng, output_gain=0.5)
    env_seeds, action_seeds = [11, 12, 13], [21, 22, 23]
    serial = T.SinglePathSampler([gym.make("LunarLander-v3") for _ in range(3)], env_seeds, action_seeds)
    parallel = T.ParallelSampler(T.single_path_sampler, "LunarLander-v3", env_seeds, action_seeds, workers=2)
    try:
        for _ in range(2):  # the second batch continues the episodes of the first
            a, b = serial.sample(net, theta, 100), parallel.sample(net, theta, 100)
            for key in a:
                if key == "logits":
                    # BLAS may sum a 3-row and a 2-row product in another order: equal to rounding.
                    assert np.allclose(a[key], b[key], rtol=1e-12, atol=1e-14)
                else:
                    assert np.array_equal(a[key], b[key], equal_nan=key == "episode_return"), key
    finally:
        parallel.close()
        serial.close()


# ----------------------------------------------------------------------------
# The value function
# ----------------------------------------------------------------------------

def test_value_rescaling_preserves_every_prediction(rng):
    value_fn = T.ValueFunction(MLP([3, 6, 1]), rng, lr=1e-3)
    states = rng.standard_normal((20, 3))
    before = value_fn.predict(states)
    value_fn.set_target_scale(-57.0, 31.0)
    assert np.allclose(value_fn.predict(states), before, rtol=1e-12, atol=1e-12)


def test_value_fit_learns_large_targets(rng):
    value_fn = T.ValueFunction(MLP([2, 16, 1]), rng, lr=3e-3)
    states = rng.uniform(-1, 1, (512, 2))
    targets = -150.0 + 60.0 * np.sin(2 * states[:, 0]) + 20.0 * states[:, 1]
    for _ in range(5):
        value_fn.fit(states, targets, epochs=10, minibatch=64, rng=rng)
    # Regressing these raw targets with the same budget explains about 6% of their variance:
    # Adam's steps are too small for outputs of -150. Standardised targets make it > 90%.
    assert T.explained_variance(value_fn.predict(states), targets) > 0.9


# ----------------------------------------------------------------------------
# End to end: reproducibility, learning, the command line
# ----------------------------------------------------------------------------

def short_config(tmp_path, name, **overrides):
    settings = dict(env="CartPole-v1", seed=0, total_steps=2048, num_envs=4, steps_per_env=128,
                    hidden=(16, 16), out=str(tmp_path / name))
    settings.update(overrides)
    return T.Config(**settings)


def test_same_seed_same_run_to_the_bit(tmp_path):
    net, theta_a, hist_a = T.train(short_config(tmp_path, "a"), verbose=False)
    _, theta_b, hist_b = T.train(short_config(tmp_path, "b"), verbose=False)
    _, theta_c, _ = T.train(short_config(tmp_path, "c", seed=1), verbose=False)
    assert np.array_equal(theta_a, theta_b)
    timing = ("wall_s", "steps_per_s", "restores_per_s")

    def without_timing(history):  # as text, so that NaN equals NaN
        return [repr({k: float(v) for k, v in row.items() if k not in timing and k != "skipped"}) for row in history]
    assert without_timing(hist_a) == without_timing(hist_b)
    assert not np.array_equal(theta_a, theta_c)


class InlineExecutor:
    """concurrent.futures' thread pool interface, running each task in this thread: at once when
    submitted, or (after_block=True) when the with-block ends."""

    def __init__(self, max_workers=None, after_block=False):
        self.after_block, self.tasks = after_block, []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for future, function, args in self.tasks:
            future.set_result(function(*args))
        return False

    def submit(self, function, *args):
        future = concurrent.futures.Future()
        if self.after_block:
            self.tasks.append((future, function, args))
        else:
            future.set_result(function(*args))
        return future


@pytest.mark.parametrize("scheme", ["single", "vine"])
def test_the_value_fit_beside_the_policy_step_gives_the_run_of_one_thread(tmp_path, monkeypatch, scheme):
    # The value fit runs in a second thread while the policy step is computed. Run in turn, before
    # the step or after it, it must give the same run to the bit: it takes nothing from the step, nor
    # the step from it. Many small minibatches make the fit long enough to overlap the step.
    import functools
    vine = dict(vine_states=16, vine_horizon=20, workers=1) if scheme == "vine" else {}
    runs = {}
    for order, executor in [("threads", None), ("before", InlineExecutor),
                            ("after", functools.partial(InlineExecutor, after_block=True))]:
        if executor is not None:
            monkeypatch.setattr(T.concurrent.futures, "ThreadPoolExecutor", executor)
        cfg = short_config(tmp_path, order, scheme=scheme, vf_epochs=20, vf_minibatch=16, **vine)
        _, theta, history = T.train(cfg, verbose=False)
        saved, _ = T.read_checkpoint(str(tmp_path / order / "checkpoint.npz"))
        runs[order] = (theta, saved["phi"], repr([row["value_loss"] for row in history]))
    for order in ("before", "after"):
        assert np.array_equal(runs[order][0], runs["threads"][0]), order
        assert np.array_equal(runs[order][1], runs["threads"][1]), order  # the value network too
        assert runs[order][2] == runs["threads"][2], order


def test_the_step_returns_the_logits_of_the_theta_it_returns(rng):
    # trpo_step hands on the line search's last logits instead of a new forward pass: they must be
    # those of theta_new, whether the step is accepted after backtracking, refused, or taken blindly.
    net = MLP([3, 8, 3])
    theta = net.init(rng, output_gain=0.5)
    states = rng.standard_normal((200, 3))
    actions = rng.integers(3, size=200)
    logp_old = log_prob(net.forward(theta, states)[0], actions)
    advantages = rng.standard_normal(200)

    def problem(logits):
        return T.surrogate(logits, actions, logp_old, advantages)
    cases = {"backtracks": dict(),  # delta 0.5 is too long a step for the quadratic model
             "refused": dict(max_backtracks=1),
             "no trust region": dict(trust_region=False)}
    for name, settings in cases.items():
        cfg = T.Config(fisher_subsample=1, max_kl=0.5, damping=0.0, backtrack_coeff=0.5, **settings)
        theta_new, info = T.trpo_step(net, theta, states, problem, cfg)
        assert np.array_equal(info["logits_new"], net.forward(theta_new, states)[0]), name
        if name == "backtracks":
            assert info["accepted"] and info["backtracks"] > 0
        if name == "refused":
            assert not info["accepted"] and np.array_equal(theta_new, theta)


def test_training_writes_its_outputs(tmp_path):
    cfg = short_config(tmp_path, "out")
    T.train(cfg, verbose=False)
    out = tmp_path / "out"
    for name in ("progress.csv", "config.json", "policy.npz", "learning_curve.png", "diagnostics.png"):
        assert (out / name).stat().st_size > 0, name
    header = (out / "progress.csv").read_text().splitlines()[0].split(",")
    for column in ("iteration", "env_steps", "rolling_return", "episodes", "kl", "backtracks", "entropy",
                   "wall_s"):
        assert column in header
    assert len((out / "progress.csv").read_text().splitlines()) == 1 + 4  # header + 4 iterations
    saved = np.load(out / "policy.npz")
    assert list(saved["sizes"]) == [4, 16, 16, 2]


def test_cartpole_return_improves(tmp_path):
    cfg = short_config(tmp_path, "learn", total_steps=30_000, num_envs=4, steps_per_env=256, max_kl=0.02)
    _, _, history = T.train(cfg, verbose=False)
    first, last = history[0]["rolling_return"], history[-1]["rolling_return"]
    assert last > 2 * first and last > 100, (first, last)


def run_cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, "trpo_numpy.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, words", [
    (["--env", "NoSuchEnv-v0"], "unknown environment"),
    (["--env", "Pendulum-v1"], "Discrete"),
    (["--max-kl", "-0.01"], "--max-kl must be positive"),
    (["--max-kl", "abc"], "not a number"),
    (["--total-steps", "0"], "--total-steps must be positive"),
    (["--num-envs", "2.5"], "not an integer"),
    (["--gamma", "1.5"], "--gamma"),
    (["--seed", "-1"], "--seed must be zero or positive"),
    (["--max-kl", "inf"], "--max-kl must be a finite number"),
    (["--damping", "inf"], "--damping must be a finite number"),
    (["--vf-lr", "inf"], "--vf-lr must be a finite number"),
    (["--entropy-coef", "nan"], "--entropy-coef must be a finite number"),
    (["--scheme", "vine", "--vine-actions", "1"], "--vine-actions 1 cannot learn"),
    (["--hidden", "100000"], "--hidden 100000 is wider"),
    (["--num-envs", "100000"], "--num-envs 100,000 is more environments than --total-steps 64"),
    (["--total-steps", "100000000", "--num-envs", "5000"], "--num-envs 5,000 environments would take minutes"),
])
def test_bad_input_is_one_sentence_and_exit_code_2(tmp_path, args, words):
    result = run_cli("--total-steps", "64", "--out", str(tmp_path / "x"), *args)  # the last value given wins
    assert result.returncode == 2, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unwritable_output_folder_is_reported(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("--out", str(blocker / "run"), "--total-steps", "64")
    assert result.returncode == 2 and "cannot write to output folder" in result.stderr
    assert "Traceback" not in result.stderr


TINY_RUN = ["--env", "CartPole-v1", "--total-steps", "64", "--num-envs", "2", "--steps-per-env", "32",
            "--hidden", "8", "--workers", "1"]


def test_a_new_run_never_overwrites_another_run(tmp_path):
    first = run_cli(*TINY_RUN, cwd=tmp_path)  # the default folder, twice: numbered
    second = run_cli(*TINY_RUN, cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert sorted(os.listdir(tmp_path / "runs")) == ["single-seed0", "single-seed0-2"]
    folder = tmp_path / "runs" / "single-seed0"
    before = {name: (folder / name).read_bytes() for name in ("config.json", "progress.csv", "checkpoint.npz")}
    third = run_cli(*TINY_RUN, "--scheme", "single", "--out", str(folder))  # an explicit --out: refused
    assert third.returncode == 2 and "holds a run already" in third.stderr and "--resume" in third.stderr
    assert "Traceback" not in third.stderr
    assert {name: (folder / name).read_bytes() for name in before} == before


def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    lock = run_files.lock_folder(str(folder))  # as a run that is still going holds it
    refused = run_cli(*TINY_RUN, "--out", str(folder))
    assert refused.returncode == 2 and "in use by a run that is still going" in refused.stderr
    lock.close()  # that run ends (or is killed: the system lets go of its lock the same way)
    assert run_cli(*TINY_RUN, "--out", str(folder)).returncode == 0


def test_exercise_make_never_deletes_a_students_work(tmp_path):
    def make(*args):
        return subprocess.run([sys.executable, os.path.join(HERE, "exercise.py"), "make", "gae", *args],
                              capture_output=True, text=True, timeout=60)
    copy = tmp_path / "mine"
    assert make("--into", str(copy)).returncode == 0
    answer = copy / "trpo_numpy.py"
    answer.write_text(answer.read_text() + "\n# my answer\n")
    again = make("--into", str(copy))
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert answer.read_text().endswith("# my answer\n")
    assert make("--into", str(copy), "--force").returncode == 0
    assert not answer.read_text().endswith("# my answer\n")
    (tmp_path / "a-file").write_text("")
    into_a_file = make("--into", str(tmp_path / "a-file"))
    assert into_a_file.returncode == 2 and "is a file" in into_a_file.stderr


def test_bench_refuses_bad_input_in_one_sentence(tmp_path):
    (tmp_path / "a-file").write_text("")
    for args, words in ((["--total-steps", "0"], "must be positive"),
                        (["--out", str(tmp_path / "a-file")], "is a file, not a folder")):
        result = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), *args], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_help_explains_every_flag():
    text = run_cli("--help").stdout
    for f in __import__("dataclasses").fields(T.Config):
        assert "--" + f.name.replace("_", "-") in text
    for symbol in ("delta", "gamma", "lambda"):
        assert symbol in text


def test_a_vine_run_by_default_stops_once_solved_or_after_its_iteration_budget():
    vine = T.scheme_config("vine")
    assert vine.stop_return == 200  # LunarLander-v3's reward threshold
    assert vine.total_steps == T.VINE_ITERATIONS * vine.batch_size
    assert T.scheme_config("vine", env="CartPole-v1").stop_return == 475
    given = T.scheme_config("vine", total_steps=5000, stop_return=100.0, num_envs=3)
    assert (given.total_steps, given.stop_return, given.num_envs) == (5000, 100.0, 3)
    single = T.scheme_config("single")
    assert single == T.Config() and single.stop_return is None


def test_the_command_line_gives_the_vine_its_defaults(tmp_path):
    result = run_cli("--scheme", "vine", "--env", "CartPole-v1", "--total-steps", "32", "--num-envs", "2",
                     "--steps-per-env", "8", "--vine-states", "4", "--vine-horizon", "5", "--hidden", "8",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["total_steps"], saved["num_envs"], saved["hidden"]) == (32, 2, [8])  # as given
    assert saved["max_kl"] == T.SCHEME_DEFAULTS["vine"]["max_kl"] and saved["stop_return"] == 475  # the vine's own


# ----------------------------------------------------------------------------
# Checkpoints, resume, interruption, evaluation
# ----------------------------------------------------------------------------

def test_checkpoint_write_is_atomic_under_a_crash(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.npz")
    run_files.write_npz_atomically(path, format=run_files.CHECKPOINT_FORMAT, theta=np.arange(5.0))
    before = open(path, "rb").read()

    def crash_half_way(f, **arrays):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", crash_half_way)
    with pytest.raises(run_files.UserError, match="cannot write .* No space left on device; the last good"):
        run_files.write_npz_atomically(path, format=run_files.CHECKPOINT_FORMAT, theta=np.zeros(5))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # no half-written temporary file left behind
    assert open(path, "rb").read() == before  # the last good checkpoint is untouched
    assert np.array_equal(np.load(path)["theta"], np.arange(5.0))


def test_resume_continues_the_counters_and_the_csv(tmp_path):
    cfg = short_config(tmp_path, "run", total_steps=2048, save_every=1)  # 4 iterations of 512 steps
    T.train(cfg, verbose=False)
    data, saved_cfg = T.read_checkpoint(str(tmp_path / "run" / "checkpoint.npz"))
    assert saved_cfg == cfg
    longer = T.dataclasses.replace(saved_cfg, total_steps=3072)
    _, theta, history = T.train(longer, verbose=False, resume=data)
    assert [row["iteration"] for row in history] == [1, 2, 3, 4, 5, 6]
    assert [row["env_steps"] for row in history] == [512 * k for k in range(1, 7)]
    assert history[4]["wall_s"] > history[3]["wall_s"]
    rows = (tmp_path / "run" / "progress.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[5].startswith("5,2560,")
    assert history[4]["episodes"] >= history[3]["episodes"]  # the episode count carries on too


def test_resumed_run_keeps_the_saved_weights(tmp_path):
    cfg = short_config(tmp_path, "run", total_steps=1024)
    _, theta, _ = T.train(cfg, verbose=False)
    data, saved_cfg = T.read_checkpoint(str(tmp_path / "run" / "checkpoint.npz"))
    assert np.array_equal(data["theta"], theta)
    # Resuming with nothing left to do changes nothing and keeps the weights.
    _, theta_again, history = T.train(saved_cfg, verbose=False, resume=data)
    assert np.array_equal(theta_again, theta) and len(history) == 2


def start_run(out, *args, iterations=3):
    """A small CartPole training run in a new process (and session), returned once `iterations` are done."""
    import time
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "trpo_numpy.py"), "--env", "CartPole-v1", "--num-envs", "4",
         "--steps-per-env", "64", "--hidden", "16", "16", "--out", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    progress, deadline = out / "progress.csv", time.time() + 60
    while time.time() < deadline and not (progress.exists() and len(progress.read_text().splitlines()) > iterations):
        time.sleep(0.05)
    return process


def run_python(script, *import_dirs):
    """Run a Python script in a new interpreter that imports this project's files (and import_dirs')."""
    path = os.pathsep.join([HERE, *map(str, import_dirs)])
    return subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": path})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_a_signal_in_a_held_block_waits_for_its_end_even_if_library_code_unblocks_it():
    # In a new interpreter, with Python's own Ctrl-C handler: a process started in the background
    # inherits SIGINT ignored, and Python then leaves it ignored (a program sets its handler, as main does).
    script = """if True:
        import os, signal, parallel
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ran = []
        try:
            with parallel.signals_held():
                # what multiprocessing does around starting its resource tracker, inside our block
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # many bytecodes: an interrupt not held would be raised in here
                    ran.append(1)
                ran.append("the block finished")
        except KeyboardInterrupt:
            print("interrupted after:", ran[-1])  # and Ctrl-C was delivered after it, not lost
        print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    """
    result = run_python(script)
    assert result.stdout.splitlines() == ["interrupted after: the block finished", "True"], result.stdout + result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_a_worker_stopped_while_it_exits_prints_no_traceback(tmp_path):
    # The main process, stopped by Ctrl-C in the middle of a call, SIGTERMs its workers; one may
    # already be exiting (here: its atexit hook sleeps). That must end it quietly.
    exiting = tmp_path / "exiting"
    (tmp_path / "slow_to_exit.py").write_text(f"""if True:
        import atexit, time
        def exit_slowly():
            open({str(exiting)!r}, "w").close()
            time.sleep(2.0)
        class SlowToExit:
            def __init__(self):
                atexit.register(exit_slowly)
            def ping(self):
                return "pong"
    """)
    script = f"""if True:
        import os, time, parallel, slow_to_exit
        if __name__ == "__main__":
            workers = parallel.WorkerProcesses(slow_to_exit.SlowToExit, [()])
            print(workers.call("ping", [()])[0])
            workers.connections[0].close()  # the worker leaves its loop and starts exiting
            while not os.path.exists({str(exiting)!r}):
                time.sleep(0.01)
            workers.processes[0].terminate()
            workers.processes[0].join(10)
            print(workers.processes[0].exitcode)
    """
    result = run_python(script, tmp_path)
    assert "Traceback" not in result.stderr, result.stdout + result.stderr
    assert result.stdout.split() == ["pong", "-15"], result.stdout + result.stderr  # ended by SIGTERM itself


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_a_ctrl_c_lost_in_library_code_still_stops_the_run():
    script = """if True:
        import os, signal, parallel
        parallel.stop_on_signals()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the interrupt is raised in here ...
                pass
        except KeyboardInterrupt:
            print("swallowed")  # ... and discarded, as some compiled modules' imports do
        try:
            parallel.raise_if_stop_requested()
        except KeyboardInterrupt:
            print("stopped")
    """
    result = run_python(script)
    assert result.stdout.split() == ["swallowed", "stopped"], result.stdout + result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_repeated_ctrl_c_does_not_interrupt_the_final_save(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    process = start_run(out, "--workers", "1")
    deadline = time.time() + 30
    while process.poll() is None and time.time() < deadline:  # Ctrl-C, again and again, until it has stopped
        process.send_signal(signal.SIGINT)
        time.sleep(0.03)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert "one moment" in stderr and f"--resume {out / 'checkpoint.npz'}" in stderr
    saved, _ = T.read_checkpoint(str(out / "checkpoint.npz"))
    assert saved["iteration"] >= 3 and (out / "policy.npz").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
@pytest.mark.parametrize("delay", [0.2, 1.0])
def test_ctrl_c_while_starting_names_only_files_that_exist(tmp_path, delay):
    import signal
    import time
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "trpo_numpy.py"), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(delay)  # while the workers start, or in the first iteration
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    if "nothing was saved" not in stderr:
        named = stderr.split("stopped: ")[1].split(" are in ")[0].split(", ")
        assert named and all((out / name).exists() for name in named), stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_worker_is_reported_with_the_resume_command(tmp_path):
    import signal
    out = tmp_path / "run"
    process = start_run(out, "--workers", "2", iterations=2)
    workers = [pid for pid in processes_in_session(process.pid)
               if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]  # not the resource tracker
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1 and "Traceback" not in stderr, stderr
    assert f"worker process {workers[0]} was killed by signal 9" in stderr
    assert f"--resume {out / 'checkpoint.npz'}" in stderr and (out / "checkpoint.npz").exists()


def processes_in_session(session_id):
    """Linux: pids of the live processes whose session is session_id (a child started in a new session).

    Zombies (state Z) have already exited; they only wait to be reaped by whoever adopted them."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session_id and fields[0] != "Z":  # fields 3 and 6 of stat: state, session
                pids.append(int(entry))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signal_name, scheme", [("SIGINT", "single"), ("SIGTERM", "single"), ("SIGINT", "vine")])
def test_a_signal_stops_cleanly_with_a_loadable_checkpoint(tmp_path, signal_name, scheme):
    import signal
    import time
    out = tmp_path / "run"
    vine = ["--vine-states", "32", "--vine-horizon", "50"] if scheme == "vine" else []
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "trpo_numpy.py"), "--env", "CartPole-v1", "--num-envs", "4",
         "--steps-per-env", "64", "--hidden", "16", "16", "--save-every", "1000", "--out", str(out),
         "--scheme", scheme, *vine],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until a few iterations are done
        progress = out / "progress.csv"
        if progress.exists() and len(progress.read_text().splitlines()) > 3:
            break
        time.sleep(0.1)
    sent = time.time()
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=30)
    assert time.time() - sent < 10, "it must stop promptly, not an iteration later"
    assert process.returncode == 130 and "Traceback" not in stderr
    assert f"--resume {out / 'checkpoint.npz'}" in stderr
    data, cfg = T.read_checkpoint(str(out / "checkpoint.npz"))  # written although --save-every is 1000
    assert data["iteration"] >= 3
    assert np.load(out / "policy.npz")["theta"].shape == data["theta"].shape
    while processes_in_session(process.pid) and time.time() - sent < 10:
        time.sleep(0.1)  # the workers see their pipe close and exit by themselves, within moments
    assert processes_in_session(process.pid) == [], "a worker process was left behind"


def test_a_non_finite_advantage_keeps_theta_and_training_goes_on(tmp_path, monkeypatch):
    real = T.estimate_advantages
    calls = []

    def poisoned(batch, value_fn, cfg):
        advantages, targets, values = real(batch, value_fn, cfg)
        calls.append(1)
        if len(calls) == 2:
            advantages[7] = np.nan
            targets[7] = np.nan
        return advantages, targets, values
    monkeypatch.setattr(T, "estimate_advantages", poisoned)
    thetas = []
    real_step = T.trpo_step

    def recording_step(net, theta_old, *args):
        theta_new, info = real_step(net, theta_old, *args)
        thetas.append((theta_old.copy(), theta_new.copy()))
        return theta_new, info
    monkeypatch.setattr(T, "trpo_step", recording_step)
    _, theta, history = T.train(short_config(tmp_path, "nan", total_steps=2048), verbose=False)
    assert np.array_equal(thetas[1][0], thetas[1][1])  # iteration 2 kept theta_old
    assert history[1]["accepted"] == 0 and "not finite" in history[1]["skipped"]
    assert history[2]["accepted"] == 1 and history[3]["accepted"] == 1  # and training went on
    assert np.all(np.isfinite(theta))


def test_eval_reports_return_and_writes_a_gif(tmp_path):
    T.train(short_config(tmp_path, "run"), verbose=False)
    gif = tmp_path / "episode.gif"
    result = run_cli("--eval", str(tmp_path / "run" / "policy.npz"), "--episodes", "3", "--greedy",
                     "--gif", str(gif))
    assert result.returncode == 0, result.stderr
    assert "3 evaluation episodes (greedy" in result.stdout and "at or above 475" in result.stdout  # CartPole's reward threshold
    assert gif.read_bytes()[:6] == b"GIF89a"
    assert result.stderr == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_ctrl_c_stops_an_evaluation(tmp_path):
    import signal
    import time
    net = MLP([8, 4])
    run_files.save_policy(str(tmp_path / "policy.npz"), net.sizes, net.init(np.random.default_rng(0)),
                          "LunarLander-v3")
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "trpo_numpy.py"), "--eval",
                                str(tmp_path / "policy.npz"), "--episodes", "100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # well into the episodes
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and "evaluation stopped" in stderr and "Traceback" not in stderr, stderr


def bad_files(tmp_path):
    """A checkpoint, and the damaged or wrong files a user might hand over instead."""
    T.train(short_config(tmp_path, "run", total_steps=512), verbose=False)
    good = tmp_path / "run" / "checkpoint.npz"
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[:2000])
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"run_id": "someone else"}')
    return good


def test_bad_checkpoints_and_folders_are_one_sentence_and_exit_code_2(tmp_path):
    good = bad_files(tmp_path)
    cases = [
        (["--resume", str(tmp_path / "missing.npz")], "no checkpoint file"),
        (["--resume", str(tmp_path / "random.npz")], "not a readable checkpoint"),
        (["--resume", str(tmp_path / "truncated.npz")], "not a readable checkpoint"),
        (["--resume", str(tmp_path / "run" / "policy.npz")], "policy file, not a checkpoint"),
        (["--resume", str(good), "--out", str(tmp_path / "other")], "holds another run"),
        (["--resume", str(good), "--max-kl", "0.05"], "--max-kl cannot change when resuming"),
        (["--eval", str(tmp_path / "missing.npz")], "no policy or checkpoint file"),
        (["--eval", str(tmp_path / "random.npz")], "not a readable policy or checkpoint"),
        (["--eval", str(good), "--env", "LunarLander-v3"], "takes 4 observations and gives 2 actions"),
        (["--eval", str(good), "--episodes", "0"], "--episodes must be positive"),
        (["--eval", str(good), "--gif", str(tmp_path / "out")], "--gif needs a file name ending in .gif"),
        (["--eval", str(good), "--gif", str(tmp_path)], "--gif needs a file name ending in .gif"),
        (["--eval", str(good), "--seed", "3"], "--seed is for training"),
        (["--greedy", "--total-steps", "64", "--out", str(tmp_path / "new")], "--greedy goes with --eval"),
    ]
    for args, words in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, args
    same = run_cli("--resume", str(good), "--scheme", "single")  # a setting given again, unchanged: fine
    assert same.returncode == 0, same.stderr


# ----------------------------------------------------------------------------
# The vine (Sec. 5.2): exact restore, common random numbers, Eq. (15) and (16)
# ----------------------------------------------------------------------------

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is not available")


def lander_trajectory(seed=5, steps=60, branch_at=25):
    """Step a lander with fixed random actions; at step `branch_at` also run the rest of the
    actions in a forked copy and by seeded replay. Returns (original, forked, replayed) as lists of
    (observation, reward) from branch_at on."""
    actions = [int(a) for a in np.random.default_rng(seed).integers(4, size=steps)]
    env = T.make_env("LunarLander-v3")
    env.reset(seed=seed)

    def rest_of_trajectory(env):
        return [(obs.copy(), reward) for obs, reward, *_ in (env.step(a) for a in actions[branch_at:])]
    pool = parallel.ForkPool(max_children=2)
    original = []
    for t, a in enumerate(actions):
        if t == branch_at:
            pool.submit("fork", lambda: rest_of_trajectory(env))
            original = rest_of_trajectory(env)  # the parent goes on along the same actions
            break
        env.step(a)
    forked = pool.gather()["fork"]
    spare = T.make_env("LunarLander-v3")  # replay rebuilds the state in an env that has run another episode
    spare.reset(seed=seed + 1)
    for _ in range(40):
        spare.step(2)
    replayed = rest_of_trajectory(T.replay(spare, seed, actions[:branch_at]))
    return original, forked, replayed


@needs_fork
def test_fork_and_replay_restore_a_lander_state_bit_for_bit():
    original, forked, replayed = lander_trajectory()
    assert len(original) == 35
    for (o1, r1), (o2, r2), (o3, r3) in zip(original, forked, replayed):
        assert np.array_equal(o1, o2) and r1 == r2
        assert np.array_equal(o1, o3) and r1 == r3


@needs_fork
def test_common_random_numbers_give_equal_q_for_equal_actions(rng):
    net = MLP([8, 16, 4])
    theta = net.init(rng, output_gain=1.0)
    env = T.make_env("LunarLander-v3")
    env.reset(seed=3)
    uniforms, other = rng.random(50), rng.random(50)
    pool = parallel.ForkPool(max_children=4)
    pool.submit("a", lambda: T.branch_rollout(env, 2, net, theta, uniforms, 0.99))
    pool.submit("b", lambda: T.branch_rollout(env, 2, net, theta, uniforms, 0.99))
    pool.submit("c", lambda: T.branch_rollout(env, 2, net, theta, other, 0.99))
    q = pool.gather()
    assert q["a"] == q["b"]  # same state, same action, same numbers: the same Q, exactly
    assert q["a"] != q["c"]  # other numbers, another path (so the test above is not vacuous)
    assert q["a"][1] == 50


def test_branch_rollout_discounts_and_bootstraps(rng):
    # CartPole pays 1 per step: Q of a 10-step branch is sum_l gamma^l = (1 - g^10) / (1 - g), plus g^10 V.
    net = MLP([4, 8, 2])
    theta = net.init(rng)
    value_fn = T.ValueFunction(MLP([4, 8, 1]), rng, lr=1e-3)
    W, b = value_fn.net.unflatten(value_fn.phi)[-1]
    W[:], b[:], value_fn.mean = 0.0, 0.0, 5.0  # V(s) = 5 everywhere
    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    g = 0.9
    q, steps = T.branch_rollout(env, 0, net, theta, np.full(10, 0.5), g, value_fn)
    if steps == 10:  # the pole did not fall
        assert np.isclose(q, (1 - g ** 10) / (1 - g) + g ** 10 * 5.0, rtol=1e-9)
    env.reset(seed=0)
    q_mc, _ = T.branch_rollout(env, 0, net, theta, np.full(10, 0.5), g, None)
    assert np.isclose(q_mc, (1 - g ** steps) / (1 - g), rtol=1e-12)


@pytest.mark.parametrize("horizon", [6, 40])  # 40: CartPole falls first, so the branch terminates
def test_branch_lambda_return_is_the_weighted_mean_of_n_step_returns(rng, horizon):
    # lambda-return, GAE paper Sec. 5: (1 - lam) sum_n lam^(n-1) G^(n) + lam^(H-1) G^(H), where
    # G^(n) = sum_{l<n} gamma^l r_l + gamma^n V(s_n), and V = 0 once the episode has terminated.
    net = MLP([4, 8, 2])
    theta = net.init(rng)
    value_fn = T.ValueFunction(MLP([4, 8, 1]), rng, lr=1e-3)
    value_fn.phi = rng.standard_normal(value_fn.net.num_params)  # a V that differs from state to state
    gamma, lam = 0.9, 0.7
    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    q, steps = T.branch_rollout(env, 1, net, theta, np.zeros(horizon), gamma, value_fn, lam)  # u = 0: action 0
    env.reset(seed=0)
    rewards, values, terminated = [], [], False
    for action in [1] + [0] * (steps - 1):
        obs, reward, terminated, _, _ = env.step(action)
        rewards.append(reward)
        values.append(0.0 if terminated else value_fn.predict(obs[None])[0])
    assert terminated == (steps < horizon)
    n_step = [sum(gamma ** l * rewards[l] for l in range(n)) + gamma ** n * values[n - 1] for n in range(1, steps + 1)]
    expected = ((1 - lam) * sum(lam ** (n - 1) * n_step[n - 1] for n in range(1, steps))
                + lam ** (steps - 1) * n_step[-1])
    assert np.isclose(q, expected, rtol=1e-12)
    env.reset(seed=0)
    q_one, _ = T.branch_rollout(env, 1, net, theta, np.zeros(horizon), gamma, value_fn, lam=1.0)
    assert np.isclose(q_one, n_step[-1], rtol=1e-12)  # lam = 1: the discounted return plus gamma^H V(s_H)


def test_all_actions_gradient_matches_finite_differences(small_net, rng):
    net, theta, _ = small_net
    states = rng.standard_normal((7, 3))
    Q = rng.standard_normal((7, 3)) * 10
    logits, cache = net.forward(theta, states)
    L, dL_dlogits = T.all_actions_surrogate(logits, Q)
    assert np.isclose(L, np.mean((softmax(logits) * Q).sum(axis=1)), rtol=1e-12)
    analytic = net.backward(theta, cache, dL_dlogits)
    numeric = numerical_gradient(lambda th: T.all_actions_surrogate(net.forward(th, states)[0], Q)[0], theta)
    assert relative_error(analytic, numeric) < 1e-6


def test_importance_sampled_gradient_matches_finite_differences(small_net, rng):
    net, theta, _ = small_net
    states = rng.standard_normal((5, 3))
    actions = rng.integers(3, size=(5, 4))  # K = 4 draws per state, repeats allowed
    proposal = rng.uniform(0.2, 0.5, size=(5, 4))
    Q = rng.standard_normal((5, 4)) * 10
    logits, cache = net.forward(theta, states)
    analytic = net.backward(theta, cache, T.importance_sampled_surrogate(logits, actions, proposal, Q)[1])
    numeric = numerical_gradient(
        lambda th: T.importance_sampled_surrogate(net.forward(th, states)[0], actions, proposal, Q)[0], theta)
    assert relative_error(analytic, numeric) < 1e-6


def test_importance_sampling_estimator_matches_the_all_actions_value(rng):
    # A toy state with known Q: the Eq. (16) estimate of sum_a pi_theta(a) Q(a), with actions drawn from
    # q, averaged over many draws, must match the exact value; weighting by 1/pi_old instead of 1/q
    # (a plausible bug when q is uniform) is off by far more than the bound.
    Q = np.array([1.0, 5.0, -2.0, 8.0])
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]]))  # pi_theta
    pi_old = np.array([0.4, 0.3, 0.2, 0.1])
    exact = float(softmax(logits)[0] @ Q)  # 3.8
    K, draws = 32, 4000
    for q in (np.full(4, 0.25), pi_old):
        estimates, wrong = [], []
        for _ in range(draws):
            a = rng.choice(4, size=(1, K), p=q)
            estimates.append(T.importance_sampled_surrogate(logits, a, q[a], Q[a])[0])
            wrong.append(T.importance_sampled_surrogate(logits, a, pi_old[a], Q[a])[0])
        estimates, wrong = np.array(estimates), np.array(wrong)
        # self-normalised: bias O(1/K), well inside 0.1 here; the sampling error is 4 standard errors
        bound = 0.1 + 4 * estimates.std() / np.sqrt(draws)
        assert abs(estimates.mean() - exact) < bound
        if q is not pi_old:
            assert abs(wrong.mean() - exact) > 5 * bound


@needs_fork
def test_a_killed_branch_process_is_reported():
    import signal
    import time
    pool = parallel.ForkPool(max_children=2, timeout=30)
    pool.submit("slow", lambda: time.sleep(30))
    pid = next(iter(pool.running.values()))[0]
    os.kill(pid, signal.SIGKILL)
    start = time.time()
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        pool.gather()
    assert time.time() - start < 5 and not pool.running


@needs_fork
def test_a_hung_branch_process_is_stopped_not_waited_for():
    import time
    pool = parallel.ForkPool(max_children=2, timeout=1.0)
    pool.submit("hangs", lambda: time.sleep(60))
    pid = next(iter(pool.running.values()))[0]
    start = time.time()
    with pytest.raises(RuntimeError, match="no branch process answered"):
        pool.gather()
    assert time.time() - start < 5
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped: nothing left behind


def vine_config(tmp_path, name, **overrides):
    settings = dict(scheme="vine", vine_states=6, vine_horizon=15, steps_per_env=8, num_envs=2)
    settings.update(overrides)
    return short_config(tmp_path, name, **settings)


def vine_batch(cfg, number=1):
    """The `number`-th batch of 8 steps that a vine sampler for cfg gives a seeded CartPole policy."""
    run_rng = np.random.default_rng(0)
    net = MLP([4, 8, 2])
    theta = net.init(run_rng)
    value_fn = T.ValueFunction(MLP([4, 8, 1]), run_rng, lr=1e-3)
    sampler = T.make_sampler(cfg, run_rng, value_fn)
    for _ in range(number):
        batch = sampler.sample(net, theta, 8)
    sampler.close()
    return batch


@needs_fork
def test_vine_sampler_fork_and_replay_give_the_same_q(tmp_path, rng):
    # the second batch starts mid-episode: replay must cover that
    batches = {restore: vine_batch(vine_config(tmp_path, restore, vine_restore=restore), number=2)
               for restore in ("fork", "replay", "auto")}
    fork, replay = batches["fork"], batches["replay"]
    assert fork["Q"].shape == (6, 2) and np.all(np.isfinite(fork["Q"]))
    assert np.array_equal(fork["Q"], replay["Q"]) and np.array_equal(fork["Q"], batches["auto"]["Q"])
    assert fork["branch_steps"] == replay["branch_steps"] > 6
    # rollout states are trunk states, in (t, e) order
    for s in fork["rollout_states"]:
        assert any(np.array_equal(s, o) for o in fork["obs"].reshape(-1, 4))


@needs_fork
def test_vine_q_does_not_depend_on_the_number_of_workers(tmp_path):
    # Each state's random numbers are drawn by the trainer and sent to whichever worker steps its
    # environment: one worker or two (three environments split 2 + 1) must give the same Q.
    batches = {workers: vine_batch(vine_config(tmp_path, f"w{workers}", workers=workers, num_envs=3,
                                               vine_actions=3, vine_proposal="pi_old"))
               for workers in (1, 2)}
    one, two = batches[1], batches[2]
    assert np.array_equal(one["action_sets"], two["action_sets"])
    assert np.allclose(one["Q"], two["Q"], equal_nan=True, rtol=1e-12) and np.isfinite(one["Q"]).sum() >= 6


@needs_fork
def test_auto_restore_replays_young_states_and_forks_old_ones():
    trunk = T.VineTrunk("LunarLander-v3", [1], [2], "auto")
    # a fork costs as much as some steps, more than none and fewer than a whole episode's worth
    assert 1 < trunk.replay_below < 5000
    net = MLP([8, 8, 4])
    theta = net.init(np.random.default_rng(0))
    trunk.replay_below = 10  # states 0-9 steps into their episode are replayed, the others forked
    rollout = np.zeros((30, 1), dtype=bool)
    rollout[[3, 20]] = True
    forks = []
    submit = trunk.pool.submit
    trunk.pool.submit = lambda key, function: forks.append(key) or submit(key, function)
    batch = trunk.sample(net, theta, 30, rollout, np.full((2, 5), 0.5), None, "uniform", 0.99, None, 1.0)
    trunk.close()
    assert sorted({t for t, _, _ in forks}) == [20]
    assert np.all(np.isfinite(batch["Q"][[3, 20], 0])) and np.isnan(batch["Q"][0, 0]).all()


def test_vine_trains_end_to_end_with_both_estimators(tmp_path):
    for name, extra in (("all", {}), ("sampled", dict(vine_actions=3, vine_proposal="pi_old"))):
        cfg = vine_config(tmp_path, name, total_steps=64, **extra)
        _, theta, history = T.train(cfg, verbose=False)
        assert len(history) == 4 and all(row["rollout_states"] == 6 for row in history)
        assert sum(row["accepted"] for row in history) >= 3 and np.all(np.isfinite(theta))
        assert all(0 < row["kl"] <= cfg.max_kl for row in history if row["accepted"])


def test_vine_value_targets_are_the_surrogate_at_theta_old(rng):
    # V(s_n) = sum_a pi_old(a|s_n) Q(s_n, a), or its self-normalised estimate: per state, what the
    # vine's surrogate is worth at theta_old.
    logits, Q = rng.standard_normal((5, 4)), rng.standard_normal((5, 4)) * 10
    batch = {"Q": Q, "rollout_logits": logits, "rollout_states": np.zeros((5, 2)),
             "action_sets": np.tile(np.arange(4), (5, 1)), "proposal": None}
    _, surrogate_of_logits, values = T.vine_problem(batch)
    assert np.allclose(values, (softmax(logits) * Q).sum(axis=1), rtol=1e-12)
    assert np.isclose(values.mean(), surrogate_of_logits(logits)[0], rtol=1e-12)
    batch.update(action_sets=rng.integers(4, size=(5, 3)), proposal=np.full((5, 3), 0.25))
    _, surrogate_of_logits, values = T.vine_problem(batch)
    assert np.isclose(values.mean(), surrogate_of_logits(logits)[0], rtol=1e-12)


# ----------------------------------------------------------------------------
# The theory made visible
# ----------------------------------------------------------------------------

def test_predicted_return_change_and_theorem_penalty():
    # 4096 steps in 8 episodes: 512 steps each; C = 4 eps gamma / (1 - gamma)^2 = 4 * 50 * 0.9 / 0.01
    predicted, penalty = T.predicted_return_change(0.01, 4096, 8, kl_largest_state=0.02, largest_advantage=50.0,
                                                   gamma=0.9)
    assert np.isclose(predicted, 5.12) and np.isclose(penalty, 18000 * 0.02)


def test_no_trust_region_takes_the_step_the_line_search_refuses(small_net, rng):
    net, theta, _ = small_net
    states, actions, logp_old, advantages = random_policy_batch(net, theta, rng, n=40)

    def misleading(logits):  # its gradient points uphill, its value says every step is worse
        L, grad = T.surrogate(logits, actions, logp_old, advantages)
        return -L, grad
    kept, info = T.trpo_step(net, theta, states, misleading, T.Config())
    assert np.array_equal(kept, theta) and not info["accepted"]
    taken, info = T.trpo_step(net, theta, states, misleading, T.Config(trust_region=False))
    assert not np.array_equal(taken, theta) and info["accepted"] and info["actual_improve"] < 0
    assert info["kl_largest_state"] >= info["kl"] > 0


def test_entropy_bonus_gradient_matches_finite_differences(small_net, rng):
    net, theta, _ = small_net
    states = rng.standard_normal((6, 3))
    logits, cache = net.forward(theta, states)
    H, dH = T.entropy_bonus(logits)
    assert np.isclose(H, entropy(logits).mean(), rtol=1e-12)
    numeric = numerical_gradient(lambda th: T.entropy_bonus(net.forward(th, states)[0])[0], theta)
    assert relative_error(net.backward(theta, cache, dH), numeric) < 1e-6


def a_long_run_history(iterations=140, batch=8192):
    """progress.csv rows of a made-up 1.1M-step run: the x axis a long run's plots have."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1, iterations + 1):
        row = {name: float(rng.random()) for name in run_files.PROGRESS_COLUMNS}
        row.update(iteration=i, env_steps=i * batch, kl=0.02 + 0.01 * rng.random(),
                   max_kl_state=0.3 + 1.5 * rng.random(), theorem_penalty=1e5, rolling_return=i - 100.0)
        rows.append(row)
    return rows


@pytest.mark.parametrize("iterations", [25, 140])  # 205k and 1.1M steps
def test_plot_tick_labels_do_not_run_together_and_the_legend_covers_no_curve(iterations):
    figures = run_files.plot_figures(a_long_run_history(iterations), "LunarLander-v3", 0, "vine", max_kl=0.05,
                                     solved_at=200)
    assert set(figures) == {"learning_curve.png", "diagnostics.png", "theory.png"}
    for name, fig in figures.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        labelled_axes = 0
        for ax in fig.axes:
            low, high = sorted(ax.get_xlim())
            labels = [label for tick, label in zip(ax.get_xticks(), ax.get_xticklabels())
                      if low <= tick <= high and label.get_visible() and label.get_text()]
            boxes = sorted((label.get_window_extent(renderer) for label in labels), key=lambda box: box.x0)
            labelled_axes += len(boxes) >= 3  # a shared x axis shows its labels on the bottom row only
            for left, right in zip(boxes, boxes[1:]):
                assert left.x1 + 2 < right.x0, f"{name}: '{left}' and '{right}' overlap"
        assert labelled_axes >= 1, name
    theory = figures["theory.png"]
    kl_axes = theory.axes[1]
    legend_box = kl_axes.get_legend().get_window_extent(theory.canvas.get_renderer())
    for line in kl_axes.get_lines():
        points = kl_axes.transData.transform(np.column_stack(line.get_data()).astype(float))
        inside = [legend_box.contains(x, y) for x, y in points]
        assert not any(inside), f"the legend covers the line '{line.get_label()}'"
    assert run_files.steps_label(250_000) == "250k" and run_files.steps_label(1_200_000) == "1.2M"
    import matplotlib.pyplot as plt
    for fig in figures.values():
        plt.close(fig)
