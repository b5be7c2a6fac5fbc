"""test_trpo.py: the mathematics and the algorithm of TRPO, each piece checked against an independent reference.

In the order a student reads the TRPO paper (Schulman et al., arXiv:1502.05477) beside the code: the
network's derivatives and the categorical distribution's maths, Adam, sampling (Sec. 5.1), advantages
(GAE paper, arXiv:1506.02438, Eq. 16), the surrogate of Eq. (14) and the mean KL constraint of Eq. (12),
the step of Appendix C, the value function, the diagnostics of Theorem 1, the entropy bonus, the vine
(Sec. 5.2), and short end-to-end learning checks. Continuous actions (the diagonal Gaussian policy) have two
sections: its maths and Fisher after the Fisher-vector product, its surrogates, sampling and step before the
end-to-end checks. Each test's docstring says what it checks and against
what.

References used here: central finite differences (network.numerical_gradient), explicit matrices built
sample by sample, np.linalg.solve, trajectories worked out by hand, closed forms, plain loops, and
seeded statistical checks with stated bounds. No autodiff framework.

The program around the algorithm (command line, output folders, checkpoints, signals, worker processes,
evaluation, plots) is tested in test_program.py, which imports the shared fixtures and helpers from
here. This file runs on its own: exercise.py copies it, without test_program.py, to judge an exercise.

Run:  python -m pytest -q test_trpo.py                      (this file)
      python -m pytest -q test_trpo.py test_program.py      (all the tests)
"""

import copy
import os
import types

import gymnasium as gym
import numpy as np
import pytest

import cli
import diagnostics
import engine
import parallel
import trpo_numpy as T
from network import (MLP, Adam, Categorical, DiagonalGaussian, GaussianPolicy, categorical_fisher_product, entropy,
                     gaussian_entropy, gaussian_fisher_product, gaussian_kl, gaussian_log_prob,
                     gaussian_log_prob_grad, gaussian_sample, kl, log_prob, log_softmax, numerical_gradient,
                     policy_network, relative_error, sample, sample_one, softmax)


# ----------------------------------------------------------------------------
# Fixtures and helpers. short_config and needs_fork serve test_program.py too, which imports them
# from here: each is defined in this one place.
# ----------------------------------------------------------------------------

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


def short_config(tmp_path, name, **overrides):
    settings = dict(env="CartPole-v1", seed=0, total_steps=2048, num_envs=4, steps_per_env=128,
                    hidden=(16, 16), out=str(tmp_path / name))
    settings.update(overrides)
    return T.Config(**settings)


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is not available")


# ----------------------------------------------------------------------------
# network.py: the MLP's derivatives (forward, backward, jvp) against finite differences
# ----------------------------------------------------------------------------

def test_flatten_and_unflatten_are_inverse(small_net):
    """flatten(unflatten(theta)) gives theta back exactly, unflatten yields the layer shapes (3, 5), (5, 4),
    (4, 3), and its arrays are views into theta (a write through one changes theta): one flat vector is the
    whole network."""
    net, theta, _ = small_net
    assert np.array_equal(net.flatten(net.unflatten(theta)), theta)
    layers = net.unflatten(theta)
    assert [W.shape for W, _ in layers] == [(3, 5), (5, 4), (4, 3)]
    layers[1][1][0] = 42.0  # unflatten returns views into theta
    assert 42.0 in theta


def test_forward_matches_plain_formula(small_net):
    """MLP.forward equals the network written out by hand, tanh(tanh(x W1 + b1) W2 + b2) W3 + b3, to 1e-14;
    its cache has one entry per layer, the first being the input x itself."""
    net, theta, x = small_net
    (W1, b1), (W2, b2), (W3, b3) = net.unflatten(theta)
    expected = np.tanh(np.tanh(x @ W1 + b1) @ W2 + b2) @ W3 + b3
    y, cache = net.forward(theta, x)
    assert np.allclose(y, expected, rtol=1e-14, atol=1e-14)
    assert len(cache) == 3 and cache[0] is x


def test_backward_matches_finite_differences(small_net, rng):
    """MLP.backward (backpropagation, the vector-Jacobian product J^T g) equals the gradient of
    sum(forward(theta) * g) taken by central finite differences, to a relative error below 1e-6."""
    net, theta, x = small_net
    grad_y = rng.standard_normal((len(x), 3))
    _, cache = net.forward(theta, x)
    analytic = net.backward(theta, cache, grad_y)
    numeric = numerical_gradient(lambda th: np.sum(net.forward(th, x)[0] * grad_y), theta)
    assert relative_error(analytic, numeric) < 1e-6


def test_jvp_matches_finite_differences(small_net, rng):
    """MLP.jvp (the forward-mode product J v, the first pass of the Fisher-vector product of TRPO
    Appendix C.1) equals the finite-difference Jacobian of the outputs contracted with v, to a relative error
    below 1e-6."""
    net, theta, x = small_net
    v = rng.standard_normal(net.num_params)
    _, cache = net.forward(theta, x)
    analytic = net.jvp(theta, cache, v)
    jacobian = numerical_gradient(lambda th: net.forward(th, x)[0], theta)  # (P, N, A)
    numeric = np.einsum("pna,p->na", jacobian, v)
    assert analytic.shape == (len(x), 3)
    assert relative_error(analytic, numeric) < 1e-6


def test_backward_is_the_transpose_of_jvp(small_net, rng):
    """The two passes are adjoint: <J v, w> = <v, J^T w> for random v and w, to 1e-12, so backward is the
    transpose of jvp (an identity, no finite differences)."""
    # <J v, w> = <v, J^T w> for any v, w: the two passes are adjoint.
    net, theta, x = small_net
    v, w = rng.standard_normal(net.num_params), rng.standard_normal((len(x), 3))
    _, cache = net.forward(theta, x)
    assert np.isclose(np.sum(net.jvp(theta, cache, v) * w), v @ net.backward(theta, cache, w), rtol=1e-12)


def test_tanh_slopes_are_tanh_derivatives_and_the_passes_use_them_when_given(small_net, rng):
    """MLP.tanh_slopes(cache) is tanh' at each hidden layer's pre-activation (central finite differences, to
    1e-8); jvp and backward given those slopes return exactly what they compute without them (for an MLP and a
    GaussianPolicy), and given other slopes something else: they use what they are given (trpo_step computes
    the slopes once for all its Fisher-vector products)."""
    net, theta, x = small_net
    _, cache = net.forward(theta, x)
    slopes = net.tanh_slopes(cache)
    assert len(slopes) == len(net.sizes) - 2
    for l, ((W, b), h_in) in enumerate(zip(net.unflatten(theta)[:-1], cache)):
        a, eps = h_in @ W + b, 1e-5
        assert np.allclose(slopes[l], (np.tanh(a + eps) - np.tanh(a - eps)) / (2 * eps), rtol=0, atol=1e-8)
    gaussian = GaussianPolicy(net.sizes)
    for network, params in ((net, theta), (gaussian, np.concatenate([theta, [-0.5, 0.2, 0.1]]))):
        v = rng.standard_normal(network.num_params)
        z, cache = network.forward(params, x)
        w = rng.standard_normal(z.shape)
        given = network.tanh_slopes(cache)
        assert np.array_equal(network.jvp(params, cache, v, given), network.jvp(params, cache, v))
        assert np.array_equal(network.backward(params, cache, w, given), network.backward(params, cache, w))
        ones = [np.ones_like(slope) for slope in given]
        assert not np.allclose(network.jvp(params, cache, v, ones), network.jvp(params, cache, v))
        assert not np.allclose(network.backward(params, cache, w, ones), network.backward(params, cache, w))


# ----------------------------------------------------------------------------
# network.py: categorical distributions (log-softmax, entropy, KL and its direction, sampling,
# the Fisher in logit space)
# ----------------------------------------------------------------------------

def test_categorical_helpers_match_definitions(rng):
    """softmax, log_softmax, log_prob, entropy and kl agree with their definitions written directly with
    np.exp and np.log, to 1e-12 or closer; log_softmax also stays right for logits shifted by 1000, where a
    plain exp overflows."""
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


def test_kl_direction_is_old_to_new():
    """kl(z_old, z_new) is KL(pi_old || pi_new), the direction of the constraint of TRPO Eq. (12): it equals
    the sum worked out by hand for two 3-action distributions, and the reversed KL does not."""
    # KL is not symmetric; the constraint is KL(pi_old || pi_new) (Eq. 12), old first.
    z_old, z_new = np.log([[0.7, 0.2, 0.1]]), np.log([[0.1, 0.3, 0.6]])
    by_hand = 0.7 * np.log(0.7 / 0.1) + 0.2 * np.log(0.2 / 0.3) + 0.1 * np.log(0.1 / 0.6)
    assert np.isclose(kl(z_old, z_new)[0], by_hand, rtol=1e-12)
    assert not np.isclose(kl(z_new, z_old)[0], by_hand)


def test_sample_follows_the_probabilities_within_4_sigma(rng):
    """network.sample (inverse-CDF sampling from given uniforms) draws each of 4 actions with its probability:
    over 40,000 draws every count is within 4 binomial standard deviations of n p."""
    p = np.array([0.1, 0.2, 0.3, 0.4])
    n = 40_000
    draws = sample(np.tile(np.log(p), (n, 1)), rng.random(n))
    counts = np.bincount(draws, minlength=4)
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 4 * sigma)


def test_sample_one_draws_the_action_sample_draws(rng):
    """network.sample_one, a vine branch's plain-Python draw for one state, gives the action network.sample
    gives: on 20,000 random logits (of scales 0.01 to 10) and uniforms, on u = 0 and u just below 1, and
    on equal logits at u = 1/4, 1/2 and 3/4, where an entry of the cumulative sum equals u times its total."""
    z = rng.standard_normal((20_000, 4)) * 10.0 ** rng.uniform(-2, 1, (20_000, 1))
    u = rng.random(20_000)
    u[:100], u[100:200] = 0.0, 1.0 - 1e-12
    z = np.concatenate([z, np.zeros((3, 4))])
    u = np.concatenate([u, [0.25, 0.5, 0.75]])
    expected = sample(z, u)
    differ = np.flatnonzero(np.array([sample_one(z_i, u_i) for z_i, u_i in zip(z, u)]) != expected)
    assert differ.size == 0, f"{differ.size} of {len(u)} draws differ, the first at {differ[:5]}"
    assert expected[-3:].tolist() == [0, 1, 2]


def test_categorical_fisher_is_the_hessian_of_kl_in_logit_space(rng):
    """In logit space the Fisher matrix of a categorical, diag(p) - p p^T, is the Hessian of z -> KL(pi_z_old
    || pi_z) at z_old (second-order central finite differences, to 1e-7), and categorical_fisher_product
    multiplies a vector by that explicit matrix."""
    z_old = rng.standard_normal((1, 4))
    p = softmax(z_old)[0]
    hessian = numerical_gradient(
        lambda z: numerical_gradient(lambda z2: kl(z_old, z2[None])[0], z, eps=1e-4), z_old[0], eps=1e-4)
    assert np.allclose(hessian, np.diag(p) - np.outer(p, p), atol=1e-7)
    u = rng.standard_normal((1, 4))
    assert np.allclose(categorical_fisher_product(p[None], u)[0], (np.diag(p) - np.outer(p, p)) @ u[0],
                       rtol=1e-13)


# ----------------------------------------------------------------------------
# network.py: Adam, the value function's optimiser
# ----------------------------------------------------------------------------

def test_adam_minimises_a_quadratic():
    """Adam (Kingma & Ba 2014; it fits the value function) brings x to the minimiser of |x - target|^2 within
    1e-3 in 2000 steps."""
    target = np.array([1.0, -2.0, 3.0])
    adam, x = Adam(3, lr=0.05), np.zeros(3)
    for _ in range(2000):
        x = adam.step(x, 2 * (x - target))
    assert np.allclose(x, target, atol=1e-3)


# ----------------------------------------------------------------------------
# Sampling (TRPO Sec. 5.1): the single-path sampler, terminated vs truncated, the parallel sampler
# ----------------------------------------------------------------------------

def test_sampler_keeps_the_final_observation_of_a_truncated_episode(rng):
    """TRPO Sec. 5.1 single-path sampling with CartPole cut by a 5-step time limit: step 4 is marked
    truncated, not terminated; next_obs equals the next step's obs inside an episode and, where an episode
    ended, is not the next episode's reset observation; episode_return is set exactly at the ends, and the
    first equals the sum of its rewards."""
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
    """The ParallelSampler (3 LunarLander environments over 2 worker processes) gives the SinglePathSampler's
    batch on the same seeds, for two successive batches (the second continuing the first's episodes): every
    array bit for bit, the logits to rounding (rtol 1e-12)."""
    net = MLP([8, 16, 4])
    theta = net.init(rng, output_gain=0.5)
    env_seeds, action_seeds = [11, 12, 13], [21, 22, 23]
    serial = T.SinglePathSampler([gym.make("LunarLander-v3") for _ in range(3)], env_seeds, action_seeds)
    parallel = engine.ParallelSampler(engine.single_path_sampler, "LunarLander-v3", env_seeds, action_seeds, workers=2)
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
# Advantages: GAE (GAE paper Eq. 16) and the Monte-Carlo return-to-go, terminated vs truncated
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
    """GAE paper Eq. (16) against the five-step trajectory TRAJ worked out by hand: a terminated step
    bootstraps with 0, a truncated step and the batch's last step with V(next obs), and the sum of
    (gamma lambda)^l delta stops at either kind of episode end."""
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
    """Monte-Carlo return-to-go (the Q estimate of TRPO Sec. 5.1) against the same hand-worked trajectory: no
    tail after the terminated step, a gamma V(final obs) tail after the truncated one, a gamma V(next obs)
    tail at the batch's end."""
    # G4 = 5 + .9*66 = 64.4 (batch cut);  G3 = 4 + .9*77 = 73.3 (truncated);  G2 = 3 + .9*73.3 = 68.97;
    # G1 = 2 (terminated);  G0 = 1 + .9*2 = 2.8
    expected = np.array([[2.8], [2.0], [68.97], [73.3], [64.4]])
    t = TRAJ
    got = T.discounted_returns(t["rewards"], t["next_values"], t["terminated"], t["truncated"], 0.9)
    assert np.allclose(got, expected, rtol=1e-12)


class TenTimesFirstFeature:
    """A value function stand-in: V(s) = 10 s_0, so that which states V is taken at shows in the numbers."""

    def predict(self, states):
        return 10.0 * states[:, 0]


# One environment, three steps whose states are 1, 2, 3; the batch is cut after the third, whose next
# state is 4: V = 10, 20, 30 at the states, and the bootstrap is V(4) = 40.
THREE_STEPS = dict(obs=np.array([[[1.0]], [[2.0]], [[3.0]]]), next_obs=np.array([[[2.0]], [[3.0]], [[4.0]]]),
                   rewards=np.array([[1.0], [2.0], [3.0]]), terminated=np.zeros((3, 1), bool),
                   truncated=np.zeros((3, 1), bool))


@pytest.mark.parametrize("advantage", ["gae", "mc"])
def test_estimate_advantages_on_a_hand_computed_batch(advantage):
    """estimate_advantages on THREE_STEPS with gamma = lambda = 0.5: V at obs is the baseline, V(next_obs)
    the bootstrap of the batch's end. 'gae': deltas 1, -3, -7, A = (-0.1875, -4.75, -7), targets A + V;
    'mc': returns-to-go (7.75, 13.5, 23), A = returns - V = (-2.25, -6.5, -7), the targets the returns."""
    cfg = T.Config(advantage=advantage, gamma=0.5, lam=0.5)
    advantages, targets, values = T.estimate_advantages(THREE_STEPS, TenTimesFirstFeature(), cfg)
    assert np.array_equal(values, [10.0, 20.0, 30.0])
    if advantage == "gae":
        # delta_t = r_t + gamma V(s_t+1) - V(s_t): 1 + 10 - 10 = 1, 2 + 15 - 20 = -3, 3 + 20 - 30 = -7
        # A2 = -7, A1 = -3 + .25 (-7) = -4.75, A0 = 1 + .25 (-4.75) = -0.1875
        expected_advantages = np.array([-0.1875, -4.75, -7.0])
        expected_targets = expected_advantages + [10.0, 20.0, 30.0]
    else:
        # G2 = 3 + .5 * 40 = 23, G1 = 2 + .5 * 23 = 13.5, G0 = 1 + .5 * 13.5 = 7.75
        expected_targets = np.array([7.75, 13.5, 23.0])
        expected_advantages = expected_targets - [10.0, 20.0, 30.0]
    assert np.allclose(advantages, expected_advantages, rtol=1e-12)
    assert np.allclose(targets, expected_targets, rtol=1e-12)


def test_policy_problem_assembles_the_single_paths_step_and_value_fit():
    """policy_problem (steps 2 and 3 of the loop) on THREE_STEPS, widened to CartPole's 4 observations, with
    V = 10 s_0 and gamma = lambda = 0.5: the step's states and pi_old's logits are the batch's, in (t, e)
    order; at theta_old (ratio 1) the objective is the mean of the standardised advantages, 0, with gradient
    (onehot(a) - p) A_std / N; in the return's units it is the mean advantage, -3.979...; the largest
    |A| is 7; V is fitted on the batch's states to A + V, with V = 10, 20, 30 before the fit."""
    cfg = T.Config(env="CartPole-v1", gamma=0.5, lam=0.5, hidden=(4,), num_envs=1, steps_per_env=3)
    learner = T.Learner(cfg)
    learner.value_fn = TenTimesFirstFeature()
    obs = np.zeros((3, 1, 4))
    obs[:, 0, 0] = [1.0, 2.0, 3.0]
    next_obs = np.zeros((3, 1, 4))
    next_obs[:, 0, 0] = [2.0, 3.0, 4.0]
    logits = np.array([[[0.0, 1.0]], [[0.5, -0.5]], [[2.0, 0.0]]])
    actions = np.array([[1], [0], [1]])
    batch = {**THREE_STEPS, "obs": obs, "next_obs": next_obs, "logits": logits, "actions": actions}
    problem = T.policy_problem(learner, batch)
    advantages = np.array([-0.1875, -4.75, -7.0])
    standardized = (advantages - advantages.mean()) / advantages.std()
    assert np.array_equal(problem.states, obs.reshape(3, 4)) and np.array_equal(problem.fit_states, obs.reshape(3, 4))
    assert np.array_equal(problem.logits_old, logits.reshape(3, 2))
    L, dL = problem.objective(problem.logits_old)
    p = softmax(logits.reshape(3, 2))
    onehot = np.eye(2)[actions.ravel()]
    assert abs(L) < 1e-12 and np.allclose(dL, (onehot - p) * standardized[:, None] / 3, rtol=1e-7)
    assert np.isclose(problem.in_return_units(problem.logits_old)[0], advantages.mean(), rtol=1e-12)
    assert problem.largest_advantage == 7.0
    assert np.allclose(problem.value_targets, advantages + [10.0, 20.0, 30.0], rtol=1e-12)
    assert np.array_equal(problem.values, [10.0, 20.0, 30.0])


def test_policy_problem_with_two_dimensional_gaussian_actions():
    """policy_problem on THREE_STEPS with LunarLanderContinuous-v3's Gaussian policy (8 observations, d = 2
    action dimensions, z = [mu, log sigma]): pi_old's z are mu = 0, sigma = 1 at every state, the actions
    (1, 0), (0, -1), (0.5, 0.5). The step's states and z are the batch's, and at theta_old the objective's
    gradient is d log pi / dz = [a - mu, (a - mu)^2 - 1] = [1, 0, 0, -1], [0, -1, -1, 0],
    [0.5, 0.5, -0.75, -0.75], each row times its standardised advantage / 3."""
    cfg = T.scheme_config("single", env="LunarLanderContinuous-v3", gamma=0.5, lam=0.5, hidden=(4,), num_envs=1,
                          steps_per_env=3)
    learner = T.Learner(cfg)
    learner.value_fn = TenTimesFirstFeature()
    obs, next_obs = np.zeros((3, 1, 8)), np.zeros((3, 1, 8))
    obs[:, 0, 0], next_obs[:, 0, 0] = [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]
    z = np.zeros((3, 1, 4))
    actions = np.array([[[1.0, 0.0]], [[0.0, -1.0]], [[0.5, 0.5]]])
    batch = {**THREE_STEPS, "obs": obs, "next_obs": next_obs, "logits": z, "actions": actions}
    problem = T.policy_problem(learner, batch)
    assert np.array_equal(problem.states, obs.reshape(3, 8)) and np.array_equal(problem.logits_old, z.reshape(3, 4))
    advantages = np.array([-0.1875, -4.75, -7.0])  # as in the hand-computed batch above: V and rewards alike
    standardized = (advantages - advantages.mean()) / advantages.std()
    L, dL = problem.objective(problem.logits_old)
    d_log_pi = np.array([[1.0, 0.0, 0.0, -1.0], [0.0, -1.0, -1.0, 0.0], [0.5, 0.5, -0.75, -0.75]])
    assert abs(L) < 1e-12 and np.allclose(dL, d_log_pi * standardized[:, None] / 3, rtol=1e-7)
    assert np.allclose(problem.value_targets, advantages + [10.0, 20.0, 30.0], rtol=1e-12)


def test_policy_problem_assembles_the_vines_step_and_value_fit():
    """policy_problem for the vine (all actions, Eq. 15) on THREE_STEPS as its trunk and two rollout states
    s_1 = (5, 0, 0, 0), s_2 = (6, 0, 0, 0) with pi_old uniform over 2 actions and Q = [[1, 3], [10, 6]]: the
    step is taken on the rollout states; the branches' V(s_n) = sum_a pi_old Q = 2 and 8; at theta_old L is
    their mean, 5, with gradient p (Q - V) / N = [[-0.25, 0.25], [0.5, -0.5]], the same in the return's
    units; the largest |Q - V| is 2; and V is fitted on the trunk's states and the rollout states, to the
    trunk's targets A + V and to the branches' 2 and 8 (the lambda-return's addition)."""
    cfg = T.scheme_config("vine", env="CartPole-v1", gamma=0.5, lam=0.5, hidden=(4,), num_envs=1, steps_per_env=3)
    learner = T.Learner(cfg)
    learner.value_fn = TenTimesFirstFeature()
    obs, next_obs = np.zeros((3, 1, 4)), np.zeros((3, 1, 4))
    obs[:, 0, 0], next_obs[:, 0, 0] = [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]
    rollout_states = np.array([[5.0, 0, 0, 0], [6.0, 0, 0, 0]])
    batch = {**THREE_STEPS, "obs": obs, "next_obs": next_obs, "rollout_states": rollout_states,
             "rollout_logits": np.zeros((2, 2)), "Q": np.array([[1.0, 3.0], [10.0, 6.0]]),
             "action_sets": np.array([[0, 1], [0, 1]]), "proposal": None}
    problem = T.policy_problem(learner, batch)
    assert np.array_equal(problem.states, rollout_states) and np.array_equal(problem.logits_old, np.zeros((2, 2)))
    for objective in (problem.objective, problem.in_return_units):
        L, dL = objective(problem.logits_old)
        assert np.isclose(L, 5.0, rtol=1e-12) and np.allclose(dL, [[-0.25, 0.25], [0.5, -0.5]], rtol=1e-12)
    assert problem.largest_advantage == 2.0
    assert np.array_equal(problem.fit_states, np.concatenate([obs.reshape(3, 4), rollout_states]))
    trunk_targets = np.array([-0.1875, -4.75, -7.0]) + [10.0, 20.0, 30.0]
    assert np.allclose(problem.value_targets, np.concatenate([trunk_targets, [2.0, 8.0]]), rtol=1e-12)
    assert np.array_equal(problem.values, [10.0, 20.0, 30.0, 50.0, 60.0])


def test_policy_problem_assembles_the_vines_importance_sampled_step():
    """policy_problem for the vine with K = 2 drawn actions (Eq. 16) on THREE_STEPS as its trunk and two
    rollout states, pi_old uniform over 2 actions. State 1 drew actions 0 and 1 with q = 0.25 and 0.75,
    Q = 4 and 8: w = pi_old / q = 2 and 2/3, so L_1 = (2 * 4 + 2/3 * 8) / (8/3) = 5, and with
    c = w / W (Q - L_1) = (-0.75, 0.75), dL_1/dz = sum_k c_k (onehot(a_k) - p) = (-0.75, 0.75). State 2
    drew action 1 twice with q = 0.5, Q = 2 and 6: L_2 = 4, and its two terms cancel, dL_2/dz = 0. So
    L = 4.5, dL/dz = [[-0.375, 0.375], [0, 0]] (over N = 2), the branches' V(s_n) = 5 and 4 (the same
    weights), the largest |Q - V| is 3, and V is fitted to the trunk's targets and to 5 and 4."""
    cfg = T.scheme_config("vine", env="CartPole-v1", gamma=0.5, lam=0.5, hidden=(4,), num_envs=1, steps_per_env=3,
                          vine_actions=2)
    learner = T.Learner(cfg)
    learner.value_fn = TenTimesFirstFeature()
    obs, next_obs = np.zeros((3, 1, 4)), np.zeros((3, 1, 4))
    obs[:, 0, 0], next_obs[:, 0, 0] = [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]
    rollout_states = np.array([[5.0, 0, 0, 0], [6.0, 0, 0, 0]])
    batch = {**THREE_STEPS, "obs": obs, "next_obs": next_obs, "rollout_states": rollout_states,
             "rollout_logits": np.zeros((2, 2)), "Q": np.array([[4.0, 8.0], [2.0, 6.0]]),
             "action_sets": np.array([[0, 1], [1, 1]]), "proposal": np.array([[0.25, 0.75], [0.5, 0.5]])}
    problem = T.policy_problem(learner, batch)
    assert np.array_equal(problem.states, rollout_states) and np.array_equal(problem.logits_old, np.zeros((2, 2)))
    for objective in (problem.objective, problem.in_return_units):
        L, dL = objective(problem.logits_old)
        assert np.isclose(L, 4.5, rtol=1e-12) and np.allclose(dL, [[-0.375, 0.375], [0.0, 0.0]], rtol=1e-12,
                                                             atol=1e-15)
    assert np.isclose(problem.largest_advantage, 3.0, rtol=1e-12)
    assert np.array_equal(problem.fit_states, np.concatenate([obs.reshape(3, 4), rollout_states]))
    trunk_targets = np.array([-0.1875, -4.75, -7.0]) + [10.0, 20.0, 30.0]
    assert np.allclose(problem.value_targets, np.concatenate([trunk_targets, [5.0, 4.0]]), rtol=1e-12)
    assert np.array_equal(problem.values, [10.0, 20.0, 30.0, 50.0, 60.0])


@pytest.mark.parametrize("module", [T, engine], ids=["reference", "engine"])
def test_train_iteration_runs_steps_one_to_five_in_order(module, monkeypatch):
    """One train_iteration (the reference's, and the engine's with its value fit in a thread), watched:
    1. the batch is sampled with theta_old, steps_per_env steps; 2. every V used for the advantages is
    taken before V is refitted; 4. the step starts at theta_old on the batch's states, and the learner
    keeps what it returns; 5. V is fitted to the targets that V before the iteration gives
    (estimate_advantages on a copy of the learner), with the same minibatches; and the counters grow by
    one iteration and one batch, the finished episodes' returns join the learner's, the row its history."""
    cfg = T.scheme_config("single", env="CartPole-v1", hidden=(8,), num_envs=2, steps_per_env=16, workers=1, seed=3)
    learner = T.Learner(cfg)
    sampler = T.make_sampler(cfg, learner)
    before = copy.deepcopy(learner)
    events, seen = [], {}
    real_sample, real_predict, real_fit, real_step = sampler.sample, learner.value_fn.predict, \
        learner.value_fn.fit, T.trpo_step

    def sample(net, theta, steps):
        events.append("sample")
        seen["sampled_with"], seen["steps"] = theta.copy(), steps
        seen["batch"] = real_sample(net, theta, steps)
        return seen["batch"]

    def predict(states):
        events.append("predict within the fit" if seen.get("fitting") else "predict")
        return real_predict(states)

    def fit(states, targets, epochs, minibatch, rng):
        events.append("fit")
        seen["fit_states"], seen["targets"], seen["fitting"] = states.copy(), targets.copy(), True
        mse = real_fit(states, targets, epochs, minibatch, rng)
        seen["fitting"] = False
        return mse

    def step(net, theta_old, states, *rest):
        events.append("step")
        seen["theta_old"], seen["step_states"] = theta_old.copy(), states.copy()
        seen["theta_new"], info = real_step(net, theta_old, states, *rest)
        return seen["theta_new"], info
    sampler.sample, learner.value_fn.predict, learner.value_fn.fit = sample, predict, fit
    monkeypatch.setattr(T, "trpo_step", step)
    row = module.train_iteration(learner, sampler)
    sampler.close()

    assert events[0] == "sample" and events.count("fit") == 1 and events.count("step") == 1
    assert "predict" not in events[events.index("fit"):]  # the advantages used V before its fit
    assert np.array_equal(seen["sampled_with"], before.theta) and seen["steps"] == 16
    batch = seen["batch"]
    states = batch["obs"].reshape(32, 4)
    assert np.array_equal(seen["theta_old"], before.theta) and np.array_equal(seen["step_states"], states)
    assert np.array_equal(learner.theta, seen["theta_new"]) and not np.array_equal(learner.theta, before.theta)
    _, expected_targets, _ = T.estimate_advantages(batch, before.value_fn, cfg)
    assert np.array_equal(seen["fit_states"], states) and np.array_equal(seen["targets"], expected_targets)
    before.value_fn.fit(states, expected_targets, cfg.vf_epochs, cfg.vf_minibatch, before.rng)
    assert np.array_equal(learner.value_fn.phi, before.value_fn.phi)
    finished = batch["episode_return"][~np.isnan(batch["episode_return"])]
    assert len(finished) > 0 and learner.episode_returns == list(finished)
    assert (learner.iteration, learner.env_steps) == (1, 32) and learner.history == [row]


def test_standardize_centres_and_scales():
    """standardize([1, 2, 3, 6]): mean 3 and standard deviation sqrt(3.5) give (A - 3) / sqrt(3.5)."""
    got = T.standardize(np.array([1.0, 2.0, 3.0, 6.0]))
    assert np.allclose(got, (np.array([1.0, 2.0, 3.0, 6.0]) - 3.0) / np.sqrt(3.5), rtol=1e-7)


class CountingEnv(gym.Env):
    """A tiny environment: reward 1, 2, 3 on the steps of an episode, which terminates after the third."""
    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1), {}

    def step(self, action):
        self.t += 1
        return np.full(1, float(self.t)), float(self.t), self.t == 3, False, {}


def test_the_sampler_gives_each_episode_its_own_return():
    """CountingEnv's episodes each return 1 + 2 + 3 = 6: over 7 steps the sampler records 6 at steps 2 and 5
    and NaN elsewhere (a running return not reset would give 12 at step 5), the rewards 1, 2, 3, 1, 2, 3, 1,
    and the episode_step of each state 0, 1, 2, 0, 1, 2, 0."""
    net = MLP([1, 4, 2])
    sampler = T.SinglePathSampler([CountingEnv()], env_seeds=[1], action_seeds=[2])
    batch = sampler.sample(net, net.init(np.random.default_rng(0)), 7)
    expected = np.full(7, np.nan)
    expected[[2, 5]] = 6.0
    assert np.array_equal(batch["episode_return"][:, 0], expected, equal_nan=True)
    assert batch["rewards"][:, 0].tolist() == [1, 2, 3, 1, 2, 3, 1]
    assert batch["episode_step"][:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_gae_matches_a_plain_loop_and_lambda_one_is_monte_carlo(rng):
    """GAE paper Eq. (16) against a plain loop summing (gamma lambda)^l delta_{t+l} until the episode ends, on
    40 steps x 3 environments with random ends; and with lambda = 1 GAE equals the Monte-Carlo return minus V,
    once V(next state) equals V(s_{t+1}) inside episodes as in a real batch."""
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


# ----------------------------------------------------------------------------
# The surrogate of TRPO Eq. (14) and the mean KL constraint of Eq. (12)
# ----------------------------------------------------------------------------

def random_policy_batch(net, theta, rng, n=50):
    states = rng.standard_normal((n, net.sizes[0]))
    logits = net.forward(theta, states)[0]
    actions = sample(logits, rng.random(n))
    return states, actions, log_prob(logits, actions), rng.standard_normal(n)


def test_kl_of_a_policy_with_itself_is_zero(small_net):
    """TRPO Eq. (12): the mean KL of the constraint, KLbar(theta_old, theta) (T.mean_kl), is exactly 0 at
    theta = theta_old (and every state's kl below 1e-15), and positive once theta moves (theta scaled by
    1.1)."""
    net, theta, x = small_net
    logits = net.forward(theta, x)[0]
    assert np.all(np.abs(kl(logits, logits)) < 1e-15)
    assert T.mean_kl(logits, logits) == 0.0
    assert T.mean_kl(logits, net.forward(theta * 1.1, x)[0]) > 0


def test_mean_kl_is_the_mean_over_states_of_kl_from_old_to_new():
    """TRPO Eq. (12): the constraint KLbar(theta_old, theta) = mean_s KL(pi_old(.|s) || pi_theta(.|s)), old
    first. T.mean_kl(logits_old, logits_new) equals the mean over two states of the sums worked out by hand
    (0.638), and with the arguments the other way round it is the reversed direction, KL(new || old) (0.588)."""
    p_old = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    p_new = np.array([[0.1, 0.3, 0.6], [0.25, 0.25, 0.5]])
    by_hand = (0.7 * np.log(0.7 / 0.1) + 0.2 * np.log(0.2 / 0.3) + 0.1 * np.log(0.1 / 0.6)  # state 1
               + 0.5 * np.log(0.5 / 0.25) + 0.25 * np.log(0.25 / 0.25) + 0.25 * np.log(0.25 / 0.5)) / 2  # state 2
    reversed_by_hand = (0.1 * np.log(0.1 / 0.7) + 0.3 * np.log(0.3 / 0.2) + 0.6 * np.log(0.6 / 0.1)
                        + 0.25 * np.log(0.25 / 0.5) + 0.25 * np.log(0.25 / 0.25) + 0.5 * np.log(0.5 / 0.25)) / 2
    assert abs(by_hand - reversed_by_hand) > 1e-3  # KL is not symmetric here, so the direction shows
    # logits are log-probabilities plus any constant per state: shift them to be sure softmax is applied
    z_old, z_new = np.log(p_old) + np.array([[1.0], [-2.0]]), np.log(p_new) + np.array([[3.0], [0.5]])
    assert np.isclose(T.mean_kl(z_old, z_new), by_hand, rtol=1e-12)
    assert np.isclose(T.mean_kl(z_new, z_old), reversed_by_hand, rtol=1e-12)


def test_surrogate_gradient_matches_finite_differences(small_net, rng):
    """TRPO Eq. (14) with q = pi_old and advantages in place of Q: the analytic gradient (dL/dlogits,
    backpropagated) matches finite differences both at theta_old (ratio 1) and at a perturbed theta (ratio !=
    1), and at theta_old L equals the mean advantage."""
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


# ----------------------------------------------------------------------------
# The step (TRPO Appendix C), 1: the Fisher-vector product of Appendix C.1
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
    """TRPO Appendix C.1: the Fisher-vector product (jvp, logit-space Fisher, backward) equals (F + damping I)
    v for F built as an explicit matrix from finite-difference Jacobians, and (H + damping I) v for H the
    Hessian of the mean KL at theta_old by second-order finite differences; F and H also agree."""
    net, theta, x = small_net
    assert_fisher_vector_product_is(explicit_fisher(net, theta, x), net, theta, x, Categorical, rng)


def assert_fisher_vector_product_is(F, net, theta, x, dist, rng):
    """T.fisher_vector_product at theta on states x, for 3 random v, equals (F + damping I) v for the explicit
    F given (to 1e-7) and (H + damping I) v for H the Hessian of KLbar(theta_old, theta) at theta_old by
    second-order central differences (to 1e-5); F and H agree (to 1e-5)."""
    logits_old, cache = net.forward(theta, x)
    hessian = numerical_gradient(
        lambda th: numerical_gradient(lambda th2: T.mean_kl(logits_old, net.forward(th2, x)[0], dist), th, eps=1e-4),
        theta, eps=1e-4)
    assert relative_error(F, hessian) < 1e-5
    damping = 0.1
    for _ in range(3):
        v = rng.standard_normal(net.num_params)
        Fv = T.fisher_vector_product(net, theta, cache, logits_old, v, damping)
        assert relative_error(Fv, F @ v + damping * v) < 1e-7
        assert relative_error(Fv, hessian @ v + damping * v) < 1e-5


# ----------------------------------------------------------------------------
# Continuous actions: the diagonal Gaussian, 1: its maths in z = [mu, log sigma] (log-density, entropy, KL
# and its direction, the Fisher), and the GaussianPolicy's derivatives and Fisher-vector product
# ----------------------------------------------------------------------------

@pytest.fixture
def gaussian_net(rng):
    """A GaussianPolicy with two hidden layers (every path of backward and jvp) and d = 2 actions, with
    log sigma = (-0.4, 0.3): two unequal standard deviations, neither 1, so that a sigma or a log sigma put
    in the wrong place shows."""
    net = GaussianPolicy([3, 5, 4, 2])
    theta = net.init(rng, output_gain=0.5) + 0.1 * rng.standard_normal(net.num_params)
    theta[net.mean_params:] = [-0.4, 0.3]
    x = rng.standard_normal((6, 3))
    return net, theta, x


def gaussian_policy_batch(net, theta, rng, n=50):
    """random_policy_batch for a GaussianPolicy: states, actions a = mu + sigma n drawn from pi_old,
    log pi_old(a|s), advantages."""
    states = rng.standard_normal((n, net.sizes[0]))
    z = net.forward(theta, states)[0]
    actions = gaussian_sample(z, rng.standard_normal((n, net.sizes[-1])))
    return states, actions, gaussian_log_prob(z, actions), rng.standard_normal(n)


def test_gaussian_log_prob_is_the_log_of_a_product_of_normal_densities(rng):
    """The log-density of the Gaussian policy of TRPO Appendix D (a diagonal Gaussian): gaussian_log_prob(z, a)
    with z = [mu, log sigma] equals log prod_j exp(-(a_j - mu_j)^2 / (2 sigma_j^2)) / (sigma_j sqrt(2 pi)),
    the 1-D normal densities written out by hand, to 1e-12, for 5 rows of d = 3 with a sigma per row and
    dimension; and gaussian_sample(z, n) is mu + sigma n."""
    mu, sigma = rng.standard_normal((5, 3)), np.exp(rng.uniform(-1.0, 1.0, size=(5, 3)))
    a = mu + 2 * rng.standard_normal((5, 3))
    z = np.concatenate([mu, np.log(sigma)], axis=1)
    densities = np.exp(-(a - mu) ** 2 / (2 * sigma ** 2)) / (sigma * np.sqrt(2 * np.pi))
    assert np.allclose(gaussian_log_prob(z, a), np.log(np.prod(densities, axis=1)), rtol=1e-12, atol=0)
    normals = rng.standard_normal((5, 3))
    assert np.allclose(gaussian_sample(z, normals), mu + sigma * normals, rtol=1e-14)


def test_gaussian_entropy_matches_monte_carlo_and_the_one_dimensional_closed_form(rng):
    """The Gaussian policy's entropy (the value the entropy bonus and the log report): for d = 1 it is the
    closed form 1/2 log(2 pi e sigma^2), to 1e-12, for five sigmas, and whatever mu; for d = 3 it is the sum
    of the three 1-D ones, and -mean log p over 200,000 draws (a Monte-Carlo estimate whose standard
    deviation per draw is sqrt(d / 2): standard error 0.003) is within 4 standard errors of it."""
    for sigma in (0.05, 0.5, 1.0, 2.0, 30.0):
        for mu in (0.0, -7.0):
            assert np.isclose(gaussian_entropy(np.array([[mu, np.log(sigma)]]))[0],
                              0.5 * np.log(2 * np.pi * np.e * sigma ** 2), rtol=1e-12, atol=1e-14)
    mu, sigma = np.array([0.3, -1.0, 2.0]), np.array([0.5, 1.5, 3.0])
    z = np.concatenate([mu, np.log(sigma)])[None]
    H = gaussian_entropy(z)[0]
    assert np.isclose(H, np.sum(0.5 * np.log(2 * np.pi * np.e * sigma ** 2)), rtol=1e-12)
    n = 200_000
    a = gaussian_sample(np.repeat(z, n, axis=0), rng.standard_normal((n, 3)))
    minus_logp = -gaussian_log_prob(np.repeat(z, n, axis=0), a)
    assert abs(minus_logp.mean() - H) < 4 * minus_logp.std() / np.sqrt(n)


def test_gaussian_kl_matches_monte_carlo_and_its_direction_is_old_to_new(rng):
    """gaussian_kl(z_old, z_new) is KL(pi_old || pi_new), the direction of the constraint of TRPO Eq. (12):
    it is exactly 0 (below 1e-15) for identical z and positive for 20 random pairs; for N(0, 1) against
    N(0.5, 2^2) it is log 2 + (1 + 0.25) / 8 - 1/2 worked out by hand, and the reversed KL (0.93 against
    0.35) is not; and for a pair of 2-D Gaussians with asymmetric sigmas it matches the Monte-Carlo
    estimate E_old[log p_old(a) - log p_new(a)] over 200,000 draws from pi_old within 4 standard errors,
    while the reversed KL misses it by more than 20 times that bound."""
    z = rng.standard_normal((20, 4))
    assert np.all(np.abs(gaussian_kl(z, z)) < 1e-15)
    assert np.all(gaussian_kl(z, rng.standard_normal((20, 4))) > 0)
    z_old, z_new = np.array([[0.0, 0.0]]), np.array([[0.5, np.log(2.0)]])
    by_hand = np.log(2.0) + (1.0 + 0.5 ** 2) / (2 * 4.0) - 0.5
    assert np.isclose(gaussian_kl(z_old, z_new)[0], by_hand, rtol=1e-12)
    assert not np.isclose(gaussian_kl(z_new, z_old)[0], by_hand, rtol=0.1)
    # 2-D, sigma_old = (0.5, 2), sigma_new = (2, 0.7): KL(old || new) = 4.15, KL(new || old) = 7.52
    z_old = np.array([[0.2, -0.3, np.log(0.5), np.log(2.0)]])
    z_new = np.array([[-0.4, 0.5, np.log(2.0), np.log(0.7)]])
    n = 200_000
    a = gaussian_sample(np.repeat(z_old, n, axis=0), rng.standard_normal((n, 2)))  # drawn from pi_old
    log_ratio = gaussian_log_prob(np.repeat(z_old, n, axis=0), a) - gaussian_log_prob(np.repeat(z_new, n, axis=0), a)
    bound = 4 * log_ratio.std() / np.sqrt(n)
    assert abs(log_ratio.mean() - gaussian_kl(z_old, z_new)[0]) < bound
    assert abs(log_ratio.mean() - gaussian_kl(z_new, z_old)[0]) > 20 * bound


def test_gaussian_log_prob_grad_matches_finite_differences(rng):
    """The score of the Gaussian, d log pi(a|s) / dz in z = [mu, log sigma] (the factor of every gradient of
    Eq. 14 and Eq. 16 with continuous actions): gaussian_log_prob_grad equals central finite differences of
    gaussian_log_prob in z, row by row (each row's log-density depends on its own z only), to a relative
    error below 1e-7, for 4 rows of d = 3 with actions up to 3 sigma away."""
    z = np.concatenate([rng.standard_normal((4, 3)), rng.uniform(-1.0, 1.0, size=(4, 3))], axis=1)
    a = gaussian_sample(z, rng.uniform(-3.0, 3.0, size=(4, 3)))
    numeric = numerical_gradient(lambda zf: gaussian_log_prob(zf.reshape(z.shape), a).sum(), z.ravel())
    assert relative_error(gaussian_log_prob_grad(z, a), numeric.reshape(z.shape)) < 1e-7


def test_gaussian_fisher_is_the_hessian_of_kl_in_mu_and_log_sigma(rng):
    """TRPO Appendix C.1 for a Gaussian: in z = [mu, log sigma] the Hessian of z -> KL(pi_z_old || pi_z) at
    z_old, by second-order central finite differences, is diag(1 / sigma^2, 2) (to a relative 1e-6, for
    sigma = (e^-0.5, e^0.7): 2.72 and 0.25 on the means), and gaussian_fisher_product multiplies each row of
    u by its own row's diagonal, to 1e-13."""
    log_sigma = np.array([-0.5, 0.7])
    z_old = np.concatenate([[0.3, -1.2], log_sigma])
    hessian = numerical_gradient(
        lambda z: numerical_gradient(lambda z2: gaussian_kl(z_old[None], z2[None])[0], z, eps=1e-4), z_old, eps=1e-4)
    M = np.diag(np.concatenate([np.exp(-2 * log_sigma), [2.0, 2.0]]))
    assert relative_error(hessian, M) < 1e-6
    z = np.concatenate([rng.standard_normal((3, 2)), rng.uniform(-1.0, 1.0, size=(3, 2))], axis=1)
    u = rng.standard_normal((3, 4))
    by_rows = [np.diag(np.concatenate([np.exp(-2 * row[2:]), [2.0, 2.0]])) @ u_row for row, u_row in zip(z, u)]
    assert np.allclose(gaussian_fisher_product(z, u), by_rows, rtol=1e-13, atol=0)


def test_gaussian_policy_forward_is_the_mlp_mean_and_log_sigma_in_every_row(gaussian_net):
    """The policy of TRPO Appendix D (a network for the mean, log sigma a parameter of its own):
    GaussianPolicy.forward gives z = [mu, log sigma] of shape (N, 2d), mu the MLP written out by hand,
    tanh(tanh(x W1 + b1) W2 + b2) W3 + b3, to 1e-14, and log sigma the last d entries of theta in every row;
    policy_network picks it for continuous actions, the categorical MLP otherwise."""
    net, theta, x = gaussian_net
    (W1, b1), (W2, b2), (W3, b3) = net.unflatten(theta)
    z, cache = net.forward(theta, x)
    assert z.shape == (len(x), 4) and net.num_params == net.mean_params + 2
    assert np.allclose(z[:, :2], np.tanh(np.tanh(x @ W1 + b1) @ W2 + b2) @ W3 + b3, rtol=1e-14, atol=1e-14)
    assert np.array_equal(z[:, 2:], np.tile([-0.4, 0.3], (len(x), 1)))
    assert net.distribution is DiagonalGaussian and len(cache) == 3 and cache[0] is x
    assert type(policy_network([3, 8, 2], True)) is GaussianPolicy and type(policy_network([3, 8, 2], False)) is MLP


def test_gaussian_policy_backward_and_jvp_match_finite_differences(gaussian_net, rng):
    """GaussianPolicy.backward (J^T g, the gradient step of every surrogate) and jvp (J v, the first pass of
    the Fisher-vector product of TRPO Appendix C.1), with J = dz/dtheta for z = [mu, log sigma], equal the
    finite-difference Jacobian contracted with g and with v, to a relative error below 1e-6, the log sigma
    block included; and the two are adjoint, <J v, g> = <v, J^T g>, to 1e-12."""
    net, theta, x = gaussian_net
    g, v = rng.standard_normal((len(x), 4)), rng.standard_normal(net.num_params)
    _, cache = net.forward(theta, x)
    jacobian = numerical_gradient(lambda th: net.forward(th, x)[0], theta)  # (P, N, 2d)
    assert relative_error(net.backward(theta, cache, g), np.einsum("pnk,nk->p", jacobian, g)) < 1e-6
    Jv = net.jvp(theta, cache, v)
    assert Jv.shape == (len(x), 4)
    assert relative_error(Jv, np.einsum("pnk,p->nk", jacobian, v)) < 1e-6
    assert np.isclose(np.sum(Jv * g), v @ net.backward(theta, cache, g), rtol=1e-12)


def explicit_gaussian_fisher(net, theta, x):
    """F = mean_i J_i^T M J_i, M = diag(1 / sigma^2, 2) in (mu, log sigma), each J_i from finite differences."""
    jacobian = numerical_gradient(lambda th: net.forward(th, x)[0], theta)  # (P, N, 2d)
    log_sigma = theta[net.mean_params:]
    M = np.diag(np.concatenate([np.exp(-2 * log_sigma), np.full(len(log_sigma), 2.0)]))
    return sum(jacobian[:, i, :] @ M @ jacobian[:, i, :].T for i in range(len(x))) / len(x)


def test_gaussian_fisher_vector_product_equals_explicit_fisher_and_kl_hessian(gaussian_net, rng):
    """TRPO Appendix C.1 for a GaussianPolicy: T.fisher_vector_product (jvp, the Gaussian's Fisher in z,
    backward) equals (F + damping I) v for F = mean_i J_i^T diag(1/sigma^2, 2) J_i built as an explicit matrix
    from finite-difference Jacobians of z = [mu, log sigma], to 1e-7, and (H + damping I) v for H the Hessian
    of theta -> KLbar(theta_old, theta) (T.mean_kl with DiagonalGaussian) at theta_old by second-order finite
    differences, to 1e-5; F and H also agree."""
    net, theta, x = gaussian_net
    assert_fisher_vector_product_is(explicit_gaussian_fisher(net, theta, x), net, theta, x, DiagonalGaussian, rng)


def test_gaussian_fisher_of_log_sigma_is_2_identity_and_uncoupled_from_the_mean(gaussian_net, rng):
    """TRPO Appendix C.1 for a GaussianPolicy, the log sigma columns of the Fisher: the Hessian of theta ->
    KLbar(theta_old, theta) at theta_old, by second-order finite differences in log sigma, has the block 2 I
    on log sigma and 0 between the mean's parameters and log sigma (to 1e-6), whatever sigma is. So for v
    with only log sigma entries T.fisher_vector_product (damping 0) gives exactly 0 on the mean's parameters
    and 2 v_log_sigma (to 1e-14) on log sigma."""
    net, theta, x = gaussian_net
    z_old, cache = net.forward(theta, x)
    P = net.mean_params

    def with_log_sigma(th, log_sigma):
        th = th.copy()
        th[P:] = log_sigma
        return th
    # column j of the Hessian for each log sigma_j: d/dtheta of d KLbar / d log sigma_j
    columns = numerical_gradient(
        lambda th: numerical_gradient(
            lambda ls: T.mean_kl(z_old, net.forward(with_log_sigma(th, ls), x)[0], DiagonalGaussian),
            th[P:], eps=1e-4),
        theta, eps=1e-4)  # (num_params, d)
    assert np.allclose(columns[P:], 2 * np.eye(2), rtol=0, atol=1e-6)
    assert np.allclose(columns[:P], 0.0, rtol=0, atol=1e-6)
    v = np.zeros(net.num_params)
    v[P:] = rng.standard_normal(2)
    Fv = T.fisher_vector_product(net, theta, cache, z_old, v, 0.0)
    assert np.all(Fv[:P] == 0.0)
    assert np.allclose(Fv[P:], 2 * v[P:], rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------
# The step (TRPO Appendix C), 2: conjugate gradient, the maximal step beta = sqrt(2 delta / x^T F x),
# the line search
# ----------------------------------------------------------------------------

def test_conjugate_gradient_matches_linear_solve(rng):
    """Conjugate gradient (TRPO Appendix C) solves A x = b for a random 8 x 8 symmetric positive-definite A as
    np.linalg.solve does: to 1e-8 in at most 50 iterations, to 1e-4 in 10."""
    M = rng.standard_normal((8, 8))
    A = M @ M.T + 0.5 * np.eye(8)
    b = rng.standard_normal(8)
    x = T.conjugate_gradient(lambda v: A @ v, b, iters=50, residual_tol=1e-20)
    assert relative_error(x, np.linalg.solve(A, b)) < 1e-8
    # In exact arithmetic CG solves an n x n system in n steps; 10 is plenty for 8.
    assert relative_error(T.conjugate_gradient(lambda v: A @ v, b, iters=10), np.linalg.solve(A, b)) < 1e-4


def test_conjugate_gradient_stops_on_a_non_positive_curvature():
    """Conjugate gradient (Appendix C) on indefinite matrices stops at the first direction p with p^T A p <= 0
    and returns the iterate it had, worked out by hand: nothing (x = 0) when the very first direction has p^T
    A p = 0 or < 0, and the first CG iterate x = (2, 2) when the second direction has p^T A p = -72; in each
    case after exactly as many products as directions tried, of the 10 allowed."""
    def solve(A, b):
        products = []
        x = T.conjugate_gradient(lambda v: products.append(v) or A @ v, b, iters=10)
        return x, len(products)
    # p = b = (1, 1) has p^T A p = 0, then -2: stop before any step
    for A in (np.diag([1.0, -1.0]), np.diag([1.0, -3.0])):
        x, products = solve(A, np.array([1.0, 1.0]))
        assert np.array_equal(x, [0.0, 0.0]) and products == 1
    # A = diag(2, -1), b = (1, 1): p^T A p = 1, alpha = r.r / p^T A p = 2, x = (2, 2), r = b - 2 A p = (-3, 3);
    # the next direction p = r + (18 / 2) p = (6, 12) has p^T A p = 72 - 144 = -72: stop, keep x = (2, 2).
    x, products = solve(np.diag([2.0, -1.0]), np.array([1.0, 1.0]))
    assert np.array_equal(x, [2.0, 2.0]) and products == 2


def test_maximal_step_puts_the_quadratic_kl_model_at_delta(rng):
    """TRPO Appendix C: the maximal step s = beta x, beta = sqrt(2 delta / x^T F x), puts the quadratic KL
    model 1/2 s^T F s at delta, to 1e-12, for an explicit random F, and points along x, not against it."""
    M = rng.standard_normal((6, 6))
    F = M @ M.T + 0.1 * np.eye(6)
    x = rng.standard_normal(6)
    step = T.maximal_step(x, x @ F @ x, max_kl=0.01)
    assert np.isclose(0.5 * step @ F @ step, 0.01, rtol=1e-12)
    assert np.allclose(step / np.linalg.norm(step), x / np.linalg.norm(x))  # along x, not against it


def test_line_search_never_accepts_kl_above_delta():
    """TRPO Appendix C line search on a toy problem whose KL grows quadratically to 4 delta at the full step:
    it accepts the first step 0.8^k with KL <= delta (k = 4, worked out by hand) and returns that theta and
    what its evaluation handed back; a KL of delta * (1 + 1e-7) is refused even at the full step (no slack
    above delta)."""
    # KL grows with the step; the full step would reach 4 delta.
    delta, theta_old, full_step = 0.01, np.zeros(2), np.array([0.2, 0.0])

    def evaluate(theta):
        return theta[0], 4 * delta * (theta[0] / 0.2) ** 2, theta.copy()  # the try itself, handed back

    ok, theta, improvement, kl_reached, backtracks, tried = T.line_search(evaluate, theta_old, full_step, delta,
                                                                          0.8, 10)
    assert ok and backtracks == 4  # 0.8^k * 2 <= 1 first at k = 4 (0.8^4 = 0.41)
    assert kl_reached <= delta and evaluate(theta)[1] <= delta
    assert np.allclose(theta, theta_old + 0.8 ** 4 * full_step) and np.array_equal(tried, theta)
    # A KL a hair above delta is refused, even at the full step (no 1.5 delta slack).
    ok, theta, *_ = T.line_search(lambda th: (1.0, delta * 1.0000001, None), theta_old, full_step, delta, 0.8, 10)
    assert not ok


def test_line_search_returns_theta_old_when_nothing_is_accepted():
    """When no shrunken step improves the surrogate, the line search reports failure after all 10 backtracks
    with an improvement of 0, and returns theta_old unchanged (not the last rejected try) and nothing of any
    evaluation."""
    theta_old = np.array([1.0, 2.0])
    ok, theta, improvement, kl_reached, backtracks, tried = T.line_search(
        lambda th: (-1.0, 0.0, th), theta_old, np.array([0.5, 0.5]), 0.01, 0.8, 10)
    assert not ok and backtracks == 10 and improvement == 0.0 and tried is None
    assert np.array_equal(theta, theta_old)


# ----------------------------------------------------------------------------
# The step (TRPO Appendix C), 3: trpo_step, the whole update, and the Fisher subsample
# ----------------------------------------------------------------------------

def test_trpo_step_stays_in_the_trust_region_and_improves(rng):
    """trpo_step (Sec. 6, solved as in Appendix C) on a random batch: the step is accepted with 0 < KLbar <=
    delta and improves the Eq. (14) surrogate, both recomputed here by forward passes, and info's kl and
    actual_improve equal them. With damping as small as 1e-4 the full step reaches a KL far above delta (about
    16 delta here), so the line search backtracks: the try before the accepted one, 1/0.8 times as long, broke
    the constraint."""
    net = MLP([4, 8, 3])
    theta = net.init(rng, output_gain=0.5)
    states, actions, logp_old, advantages = random_policy_batch(net, theta, rng, n=200)
    # Every state in F and little damping: x = (F + damping I)^-1 g then moves far along directions in which
    # F is nearly flat, where the quadratic model 1/2 s^T F s misses the KL's higher-order terms.
    cfg = T.Config(max_kl=0.01, cg_iters=20, damping=1e-4, fisher_subsample=1)

    def surrogate_of_logits(logits):
        return T.surrogate(logits, actions, logp_old, advantages)
    theta_new, info = T.trpo_step(net, theta, states, surrogate_of_logits, cfg)
    logits_old = net.forward(theta, states)[0]
    L_old = surrogate_of_logits(logits_old)[0]
    L_new = surrogate_of_logits(net.forward(theta_new, states)[0])[0]
    kl_new = T.mean_kl(logits_old, net.forward(theta_new, states)[0])
    assert info.accepted and 0 < kl_new <= cfg.max_kl
    assert np.isclose(info.kl, kl_new) and np.isclose(info.actual_improve, L_new - L_old)
    assert L_new > L_old
    # The line search shrank the step, and only as far as it had to: the previous try was outside the region.
    assert info.backtracks > 0
    previous_try = theta + (theta_new - theta) / cfg.backtrack_coeff
    assert T.mean_kl(logits_old, net.forward(previous_try, states)[0]) > cfg.max_kl


def natural_gradient_step(net, theta, states, surrogate_of_logits, damping, max_kl, fisher_rows):
    """The full step of Appendix C from explicit matrices: g by finite differences of the surrogate, F built
    from per-sample Jacobians on the states fisher_rows, x = np.linalg.solve(F + damping I, g) and beta =
    sqrt(2 delta / x^T (F + damping I) x). Returns beta x."""
    g = numerical_gradient(lambda th: surrogate_of_logits(net.forward(th, states)[0])[0], theta)
    A = explicit_fisher(net, theta, states[fisher_rows]) + damping * np.eye(net.num_params)
    x = np.linalg.solve(A, g)
    return np.sqrt(2 * max_kl / (x @ A @ x)) * x


def test_trpo_step_is_the_natural_gradient_step_of_an_explicit_fisher(rng):
    """TRPO Appendix C, steps 2-4 of trpo_step: the full step is beta x with x = (F + damping I)^-1 g and beta
    = sqrt(2 delta / x^T (F + damping I) x), for F the Fisher built as an explicit matrix from per-sample
    Jacobians (finite differences) and g the surrogate's finite-difference gradient, solved by
    np.linalg.solve. At the default damping 0.1 (damping it twice would move the step by about 30% here); to
    a relative 1e-6, both without the trust region and with a line search whose first try is accepted."""
    net = MLP([3, 5, 3])
    theta = net.init(rng, output_gain=0.5) + 0.1 * rng.standard_normal(net.num_params)
    # advantages of size 1000: the step does not depend on their scale (it is rescaled to delta), but CG's
    # absolute stopping rule r^T r < 1e-10 then stops it far closer to the solution than the 1e-6 checked
    states, actions, logp_old, advantages = random_policy_batch(net, theta, rng, n=40)

    def surrogate_of_logits(logits):
        return T.surrogate(logits, actions, logp_old, 1000 * advantages)
    damping, max_kl = 0.1, 0.01
    expected = natural_gradient_step(net, theta, states, surrogate_of_logits, damping, max_kl, slice(None))
    for trust_region in (False, True):
        cfg = T.Config(max_kl=max_kl, damping=damping, fisher_subsample=1, cg_iters=2 * net.num_params,
                       trust_region=trust_region)
        theta_new, info = T.trpo_step(net, theta, states, surrogate_of_logits, cfg)
        assert info.accepted and info.backtracks == 0, trust_region  # the full step, untouched
        assert relative_error(theta_new - theta, expected) < 1e-6, trust_region


def test_no_step_is_taken_when_every_action_is_equally_good():
    """With Eq. (15)'s all-actions surrogate and the same Q for every action the true gradient is zero: for 20
    seeds trpo_step keeps theta_old exactly and reports no accepted step, instead of a step in a direction
    set by rounding noise."""
    # Eq. (15) with equal Q for every action: the true gradient is zero, the computed one rounding
    # noise; a line search that accepts any improvement > 0 takes a step that "improves" L by rounding
    # (1e-14 here). Without the threshold, 15 of these 20 seeds took such a step; their KLs were tiny
    # (1e-7 to 7e-6, against delta = 0.05: the noise lies where the policy barely changes), but the
    # step is noise and the log would call it accepted.
    net = MLP([8, 64, 64, 4])
    Q = np.full((256, 4), -123.456)
    for seed in range(20):
        theta = net.init(np.random.default_rng(seed), output_gain=0.01)
        states = np.random.default_rng(100 + seed).standard_normal((256, 8))
        kept, info = T.trpo_step(net, theta, states, lambda logits: T.all_actions_surrogate(logits, Q),
                                 T.Config(max_kl=0.05))
        assert np.array_equal(kept, theta) and not info.accepted, f"seed {seed}: a step on rounding noise"


def test_trpo_step_keeps_theta_old_on_a_non_finite_gradient(rng):
    """With one advantage NaN the gradient is not finite: trpo_step returns theta_old unchanged, not accepted,
    with the reason in info.skipped."""
    net = MLP([4, 8, 3])
    theta = net.init(rng)
    states, actions, logp_old, advantages = random_policy_batch(net, theta, rng)
    advantages[3] = np.nan
    theta_new, info = T.trpo_step(net, theta, states, lambda z: T.surrogate(z, actions, logp_old, advantages),
                                  T.Config())
    assert np.array_equal(theta_new, theta) and not info.accepted and info.skipped


def test_the_step_reports_the_kl_and_improvement_of_the_theta_it_returns(rng):
    """trpo_step's Step holds the policy's logits at theta_old and at the theta it returns, and the mean KL
    and the surrogate's improvement between them, equal to fresh forward passes, in three cases: accepted
    after backtracking (backtracks > 0), refused by the line search (theta_old returned, KL and improvement
    0), and without the trust region."""
    net = MLP([3, 8, 3])
    theta = net.init(rng, output_gain=0.5)
    states = rng.standard_normal((200, 3))
    actions = rng.integers(3, size=200)
    logits_old = net.forward(theta, states)[0]
    logp_old = log_prob(logits_old, actions)
    advantages = rng.standard_normal(200)

    def problem(logits):
        return T.surrogate(logits, actions, logp_old, advantages)
    cases = {"backtracks": dict(),  # delta 0.5 is too long a step for the quadratic model
             "refused": dict(max_backtracks=1),
             "no trust region": dict(trust_region=False)}
    for name, settings in cases.items():
        cfg = T.Config(fisher_subsample=1, max_kl=0.5, damping=0.0, backtrack_coeff=0.5, **settings)
        theta_new, info = T.trpo_step(net, theta, states, problem, cfg)
        logits_new = net.forward(theta_new, states)[0]
        assert np.array_equal(info.logits_old, logits_old) and np.array_equal(info.logits_new, logits_new), name
        assert np.isclose(info.kl, T.mean_kl(logits_old, logits_new), rtol=1e-12, atol=0), name
        assert np.isclose(info.actual_improve, problem(logits_new)[0] - problem(logits_old)[0], rtol=1e-12,
                          atol=0), name
        if name == "backtracks":
            assert info.accepted and info.backtracks > 0 and info.kl > 0
        if name == "refused":
            assert not info.accepted and np.array_equal(theta_new, theta) and info.skipped


def test_no_trust_region_takes_the_step_the_line_search_refuses(small_net, rng):
    """The --no-trust-region ablation: for a surrogate whose value says every step is worse, trpo_step with
    the line search keeps theta_old; without it the full step is taken anyway (accepted, actual improvement <
    0, and 0 < KLbar <= the largest per-state KL)."""
    net, theta, _ = small_net
    states, actions, logp_old, advantages = random_policy_batch(net, theta, rng, n=40)

    def misleading(logits):  # its gradient points uphill, its value says every step is worse
        L, grad = T.surrogate(logits, actions, logp_old, advantages)
        return -L, grad
    kept, info = T.trpo_step(net, theta, states, misleading, T.Config())
    assert np.array_equal(kept, theta) and not info.accepted
    taken, info = T.trpo_step(net, theta, states, misleading, T.Config(trust_region=False))
    assert not np.array_equal(taken, theta) and info.accepted and info.actual_improve < 0
    largest_state_kl = np.max(kl(net.forward(theta, states)[0], net.forward(taken, states)[0]))
    assert largest_state_kl >= info.kl > 0


def test_fisher_subsample_uses_every_kth_state(small_net, rng):
    """cfg.fisher_subsample = k estimates F (Appendix C.1) on every k-th row of the batch in (time,
    environment) row-major order: with 4 environments and k = 2, every time step of environments 0 and 2.
    trpo_step's full step equals the natural-gradient step with F built explicitly from exactly those states
    (and differs from the one with F on every state); with the trust region, both k = 1 and k = 3 give
    accepted steps with KLbar <= delta and different parameters."""
    net, theta, _ = small_net
    steps, envs = 15, 4
    batch_obs = rng.standard_normal((steps, envs, 3))  # (time, environment, observation) as a sampler gives
    states = batch_obs.reshape(-1, 3)  # row-major: row t * envs + e
    logits = net.forward(theta, states)[0]
    actions = sample(logits, rng.random(len(states)))
    logp_old, advantages = log_prob(logits, actions), 1000 * rng.standard_normal(len(states))
    surrogate_of_logits = lambda z: T.surrogate(z, actions, logp_old, advantages)  # noqa: E731
    even_environments = [t * envs + e for t in range(steps) for e in (0, 2)]
    cfg = T.Config(fisher_subsample=2, trust_region=False, cg_iters=2 * net.num_params)
    step = T.trpo_step(net, theta, states, surrogate_of_logits, cfg)[0] - theta
    expected = natural_gradient_step(net, theta, states, surrogate_of_logits, cfg.damping, cfg.max_kl,
                                     even_environments)
    assert relative_error(step, expected) < 1e-6
    every_state = natural_gradient_step(net, theta, states, surrogate_of_logits, cfg.damping, cfg.max_kl,
                                        slice(None))
    assert relative_error(step, every_state) > 1e-3  # so the check above tells the rows apart
    # With the trust region: both are accepted inside it, and they differ.
    a, info_a = T.trpo_step(net, theta, states, surrogate_of_logits, T.Config(fisher_subsample=1))
    b, info_b = T.trpo_step(net, theta, states, surrogate_of_logits, T.Config(fisher_subsample=3))
    assert info_a.accepted and info_b.accepted
    assert info_a.kl <= T.Config.max_kl and info_b.kl <= T.Config.max_kl
    assert not np.allclose(a, b)  # the subsampled Fisher really is a different matrix


# ----------------------------------------------------------------------------
# The value function: regression on the value targets (GAE paper Sec. 5), output rescaling
# ----------------------------------------------------------------------------

def test_value_rescaling_preserves_every_prediction(rng):
    """Output rescaling (the 'preserving outputs' half of PopArt, used by ValueFunction): from a network whose
    output bias is not zero, moving the target mean and std to (-57, 31), then to (12, 0.5), then back to (0,
    1) rescales the output layer so that every prediction V(s) = mean + std * V_phi(s) stays the same to
    1e-12 at each change (the later changes start from a mean and std other than 0 and 1)."""
    value_fn = T.ValueFunction(MLP([3, 6, 1]), rng, lr=1e-3)
    value_fn.phi = rng.standard_normal(value_fn.net.num_params)  # every weight and bias non-zero
    assert value_fn.net.unflatten(value_fn.phi)[-1][1][0] != 0.0
    states = rng.standard_normal((20, 3))
    before = value_fn.predict(states)
    for mean, std in ((-57.0, 31.0), (12.0, 0.5), (0.0, 1.0)):
        value_fn.set_target_scale(mean, std)
        assert (value_fn.mean, value_fn.std) == (mean, std)
        assert np.allclose(value_fn.predict(states), before, rtol=1e-12, atol=1e-12), (mean, std)


def test_value_fit_learns_large_targets(rng):
    """GAE paper Sec. 5 fits V by regression on value targets: ValueFunction.fit (minibatch Adam on
    standardised targets) explains more than 90% of the variance of targets around -150 in 5 x 10 epochs. The
    comment's figure for raw targets is not measured here."""
    value_fn = T.ValueFunction(MLP([2, 16, 1]), rng, lr=3e-3)
    states = rng.uniform(-1, 1, (512, 2))
    targets = -150.0 + 60.0 * np.sin(2 * states[:, 0]) + 20.0 * states[:, 1]
    for _ in range(5):
        value_fn.fit(states, targets, epochs=10, minibatch=64, rng=rng)
    # Regressing these raw targets with the same budget explains about 6% of their variance:
    # Adam's steps are too small for outputs of -150. Standardised targets make it > 90%.
    assert diagnostics.explained_variance(value_fn.predict(states), targets) > 0.9


# ----------------------------------------------------------------------------
# Diagnostics: TRPO Theorem 1 in the form of Eq. (9)
# ----------------------------------------------------------------------------

def test_predicted_return_change_and_theorem_penalty():
    """TRPO Theorem 1 in the form of Eq. (9), worked out by hand: the penalty C max_s KL with C = 4 eps gamma
    / (1 - gamma)^2 is 18000 x 0.02, and the predicted return change is the mean episode length (4096 / 8)
    times the surrogate change 0.01, 5.12."""
    # 4096 steps in 8 episodes: 512 steps each; C = 4 eps gamma / (1 - gamma)^2 = 4 * 50 * 0.9 / 0.01
    predicted, penalty = diagnostics.predicted_return_change(0.01, 4096, 8, kl_largest_state=0.02,
                                                             largest_advantage=50.0, gamma=0.9)
    assert np.isclose(predicted, 5.12) and np.isclose(penalty, 18000 * 0.02)


# ----------------------------------------------------------------------------
# The entropy bonus (an addition, not in the paper)
# ----------------------------------------------------------------------------

def test_entropy_bonus_gradient_matches_finite_differences(small_net, rng):
    """The entropy bonus (an addition, not in the TRPO paper): its value is the mean of network.entropy, and
    its gradient in the logits, backpropagated, matches finite differences."""
    net, theta, _ = small_net
    states = rng.standard_normal((6, 3))
    logits, cache = net.forward(theta, states)
    H, dH = T.entropy_bonus(logits)
    assert np.isclose(H, entropy(logits).mean(), rtol=1e-12)
    numeric = numerical_gradient(lambda th: T.entropy_bonus(net.forward(th, states)[0])[0], theta)
    assert relative_error(net.backward(theta, cache, dH), numeric) < 1e-6


# ----------------------------------------------------------------------------
# The vine (TRPO Sec. 5.2), 1: restoring a state bit for bit, common random numbers
# ----------------------------------------------------------------------------

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
    replayed = rest_of_trajectory(T.restore_by_replay(spare, seed, actions[:branch_at]))
    return original, forked, replayed


def test_replaying_a_trunk_states_episode_rebuilds_that_state(rng):
    """The sampler's record of each state's episode (episode_seed, episode_step, and its actions so far) is
    what a replay needs (TRPO Sec. 5.2 restores trunk states): for every state of two successive batches of
    LunarLander cut by a 9-step time limit (episodes that end within a batch, and ones begun in the batch
    before), episode_step counts the steps since its episode's reset, and a new environment reset with
    episode_seed and given episode_so_far's actions, then the batch's action, gives that step's reward and
    next observation bit for bit."""
    def make():
        return gym.make("LunarLander-v3", max_episode_steps=9)
    net = MLP([8, 8, 4])
    theta = net.init(rng, output_gain=1.0)
    sampler = T.SinglePathSampler([make(), make()], env_seeds=[1, 2], action_seeds=[3, 4])
    for _ in range(2):  # the second batch continues the first's episodes
        before = [list(taken) for taken in sampler.episode_actions]
        batch = sampler.sample(net, theta, 12)
        for e in range(2):
            ends = np.flatnonzero(batch["terminated"][:, e] | batch["truncated"][:, e])
            for t in range(12):
                since_reset = t - ends[ends < t].max() - 1 if np.any(ends < t) else len(before[e]) + t
                assert batch["episode_step"][t, e] == since_reset
                episode = T.episode_so_far(before[e], batch, t, e)
                env = T.restore_by_replay(make(), batch["episode_seed"][t, e], episode)
                obs, reward, *_ = env.step(batch["actions"][t, e])
                assert np.array_equal(obs, batch["next_obs"][t, e]) and reward == batch["rewards"][t, e], (t, e)
    assert len(ends) >= 1  # episodes did end inside a batch


@needs_fork
def test_fork_and_replay_restore_a_lander_state_bit_for_bit():
    """TRPO Sec. 5.2 restores trunk states: from step 25 of a LunarLander episode, the rest of a fixed action
    sequence gives the same 35 observations and rewards, bit for bit, in the original env, in a forked copy,
    and after a seeded replay in an env that had run another episode (restore_by_replay)."""
    original, forked, replayed = lander_trajectory()
    assert len(original) == 35
    for (o1, r1), (o2, r2), (o3, r3) in zip(original, forked, replayed):
        assert np.array_equal(o1, o2) and r1 == r2
        assert np.array_equal(o1, o3) and r1 == r3


@needs_fork
def test_common_random_numbers_give_equal_q_for_equal_actions(rng):
    """TRPO Sec. 5.2 common random numbers: two branches from one LunarLander state with the same first action
    and the same uniforms give exactly the same Monte-Carlo Q, other uniforms another one (so the check is not
    vacuous); the branch runs all its 50 steps."""
    net = MLP([8, 16, 4])
    theta = net.init(rng, output_gain=1.0)
    env = T.make_env("LunarLander-v3")
    env.reset(seed=3)
    uniforms, other = rng.random(50), rng.random(50)
    pool = parallel.ForkPool(max_children=4)
    pool.submit("a", lambda: T.branch_rollout(env, 2, T.one_state_policy(net, theta), uniforms, 0.99))
    pool.submit("b", lambda: T.branch_rollout(env, 2, T.one_state_policy(net, theta), uniforms, 0.99))
    pool.submit("c", lambda: T.branch_rollout(env, 2, T.one_state_policy(net, theta), other, 0.99))
    q = pool.gather()
    assert q["a"] == q["b"]  # same state, same action, same numbers: the same Q, exactly
    assert q["a"] != q["c"]  # other numbers, another path (so the test above is not vacuous)
    assert q["a"][1] == 50


@pytest.mark.parametrize("restore", [pytest.param("fork", marks=needs_fork), "replay", "reference"])
def test_every_branch_of_a_rollout_state_gets_that_states_stream_of_uniforms(monkeypatch, restore):
    """TRPO Sec. 5.2 common random numbers, as the vine hands them out: every branch from one rollout state
    receives the same stream of uniforms, the row of `uniforms` that belongs to that state (row i for the
    i-th rollout state in row-major (t, e) order), and different states receive different rows; for
    branches on every action (Eq. 15) and on K = 3 actions drawn from q (Eq. 16), in the reference's
    VineSampler (replay after the trunk) and in engine.py's trunk, states restored by fork or by replay as
    the trunk passes them. A stand-in for branch_rollout reports a fingerprint of the stream it was given
    as its Q; every action of a state's set gets its Q, and in the engine a repeated draw shares one branch."""
    weights = np.random.default_rng(7).standard_normal(5)

    def fingerprint(env, first_action, act, uniforms, *args):
        return float(uniforms @ weights), len(uniforms)  # as (Q, steps): the stream, recognisable
    monkeypatch.setattr(T, "branch_rollout", fingerprint)
    net = MLP([8, 8, 4])
    theta = net.init(np.random.default_rng(0), output_gain=1.0)
    rollout = np.zeros((12, 2), dtype=bool)
    rollout[[1, 4, 4, 9, 11], [0, 0, 1, 1, 0]] = True  # two of them at the same time step
    states = list(zip(*np.nonzero(rollout)))  # row-major (t, e) order: (1, 0), (4, 0), (4, 1), (9, 1), (11, 0)
    uniforms = np.random.default_rng(1).random((len(states), 5))
    expected = [row @ weights for row in uniforms]  # the stand-in's own sum, to the bit
    assert len(np.unique(expected)) == len(states)  # distinct streams have distinct fingerprints
    for draws in (None, np.random.default_rng(2).random((len(states), 3))):
        if restore == "reference":
            cfg = T.Config(vine_actions=0 if draws is None else 3)
            monkeypatch.setattr(T, "choose_rollout_set", lambda *args: (rollout, uniforms, draws))
            trunk = T.SinglePathSampler([T.make_env("LunarLander-v3") for _ in range(2)], [1, 2], [3, 4])
            vine = T.VineSampler(trunk, cfg, None, None)
            batch = vine.sample(net, theta, 12)
            vine.close()
            Q, sets = batch["Q"], batch["action_sets"]
        else:
            trunk = engine.ForkingVineTrunk("LunarLander-v3", [1, 2], [3, 4], restore)
            try:
                batch = trunk.sample(net, theta, 12, rollout, uniforms, draws, "uniform", 0.99, None, 1.0)
            finally:
                trunk.close()
            assert np.isnan(batch["Q"][~rollout]).all() and batch["branches"][~rollout].sum() == 0
            Q, sets = batch["Q"][rollout], batch["action_sets"][rollout]
            # a repeated draw shares the branch of its first draw: one branch per distinct action
            assert [len(np.unique(s)) for s in sets] == list(batch["branches"][rollout])
        for i in range(len(states)):
            assert draws is not None or np.array_equal(sets[i], np.arange(4))
            assert np.all(Q[i] == expected[i]), (i, restore, draws is None)


# ----------------------------------------------------------------------------
# The vine (TRPO Sec. 5.2), 2: a branch's return and lambda-return
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("continuous", [False, True])
def test_the_engines_one_state_policy_draws_the_references_actions(rng, continuous):
    """engine.one_state_policy, the cheaper policy a vine branch follows in engine.py, draws the action
    trpo_numpy.one_state_policy draws, to the bit, at 2,000 random observations and random numbers: a
    categorical over 4 actions (u uniform, with u = 0 and ties of equal logits among them) and a
    2-dimensional Gaussian (u standard normals)."""
    net = policy_network([8, 16, 16, 2 if continuous else 4], continuous)
    theta = net.init(rng, output_gain=1.0)
    reference, engine_act = T.one_state_policy(net, theta), engine.one_state_policy(net, theta)
    observations = rng.standard_normal((2000, 8)).astype(np.float32)  # as environments give them
    noise = rng.standard_normal((2000, 2)) if continuous else rng.random(2000)
    if not continuous:
        noise[:10] = 0.0  # u = 0: action 0
    differ = [i for i, (obs, u) in enumerate(zip(observations, noise))
              if not np.array_equal(reference(obs, u), engine_act(obs, u))]
    assert differ == []
    if not continuous:  # equal logits: the uniform decides among them alike
        tied = T.one_state_policy(net, np.zeros(net.num_params)), engine.one_state_policy(net, np.zeros(net.num_params))
        assert [tied[0](observations[0], u) for u in noise[:200]] == [tied[1](observations[0], u) for u in noise[:200]]


def test_branch_rollout_discounts_and_bootstraps(rng):
    """A CartPole branch pays 1 per step: with V = 5 everywhere, Q of a 10-step branch is the closed form (1 -
    g^10) / (1 - g) + g^10 * 5 (checked only if the branch ran all 10 steps), and without a value function Q
    is the discounted sum (1 - g^H) / (1 - g)."""
    # CartPole pays 1 per step: Q of a 10-step branch is sum_l gamma^l = (1 - g^10) / (1 - g), plus g^10 V.
    net = MLP([4, 8, 2])
    theta = net.init(rng)
    value_fn = T.ValueFunction(MLP([4, 8, 1]), rng, lr=1e-3)
    W, b = value_fn.net.unflatten(value_fn.phi)[-1]
    W[:], b[:], value_fn.mean = 0.0, 0.0, 5.0  # V(s) = 5 everywhere
    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    g = 0.9
    q, steps = T.branch_rollout(env, 0, T.one_state_policy(net, theta), np.full(10, 0.5), g, value_fn)
    if steps == 10:  # the pole did not fall
        assert np.isclose(q, (1 - g ** 10) / (1 - g) + g ** 10 * 5.0, rtol=1e-9)
    env.reset(seed=0)
    q_mc, _ = T.branch_rollout(env, 0, T.one_state_policy(net, theta), np.full(10, 0.5), g, None)
    assert np.isclose(q_mc, (1 - g ** steps) / (1 - g), rtol=1e-12)


@pytest.mark.parametrize("horizon", [6, 40])  # 40: CartPole falls first, so the branch terminates
def test_branch_lambda_return_is_the_weighted_mean_of_n_step_returns(rng, horizon):
    """The lambda-return of a vine branch equals (1 - lam) sum_n lam^(n-1) G^(n) + lam^(H-1) G^(H) computed
    from the n-step returns, by stepping a fresh env through the branch's actions in a plain loop, for
    horizons 6 and 40 (the longer one meant to end with the pole falling, V = 0 after it); with lam = 1 it is
    the longest n-step return."""
    # lambda-return, weighted as GAE's Eq. (16) weights its k-step estimators: (1 - lam) sum_n lam^(n-1) G^(n) + lam^(H-1) G^(H), where
    # G^(n) = sum_{l<n} gamma^l r_l + gamma^n V(s_n), and V = 0 once the episode has terminated.
    net = MLP([4, 8, 2])
    theta = net.init(rng)
    value_fn = T.ValueFunction(MLP([4, 8, 1]), rng, lr=1e-3)
    value_fn.phi = rng.standard_normal(value_fn.net.num_params)  # a V that differs from state to state
    gamma, lam = 0.9, 0.7
    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    act = T.one_state_policy(net, theta)
    q, steps = T.branch_rollout(env, 1, act, np.zeros(horizon), gamma, value_fn, lam)  # u = 0: action 0
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
    q_one, _ = T.branch_rollout(env, 1, act, np.zeros(horizon), gamma, value_fn, lam=1.0)
    assert np.isclose(q_one, n_step[-1], rtol=1e-12)  # lam = 1: the discounted return plus gamma^H V(s_H)


def test_a_branch_cut_by_the_time_limit_bootstraps_with_v_where_it_was_cut(rng):
    """A vine branch (TRPO Sec. 5.2) that a time limit cuts, not a terminal state: CartPole limited to 8 steps,
    branched after 3, stops after 5 of its 20 steps, truncated. Its lambda-return (the project's addition,
    weighted as the GAE paper's k-step estimators) equals (1 - lam) sum_n lam^(n-1) G^(n) + lam^(H-1) G^(H) worked out in a plain
    loop over a fresh env, with G^(H) bootstrapped with V(s_H), the state at the cut, as a time limit asks
    (only a terminated episode has V = 0 after it); treating the cut as a termination would change Q by
    lam^(H-1) gamma^H V(s_H), far more than the tolerance here."""
    net = MLP([4, 8, 2])
    theta = net.init(rng)
    value_fn = T.ValueFunction(MLP([4, 8, 1]), rng, lr=1e-3)
    value_fn.phi = rng.standard_normal(value_fn.net.num_params)  # a V that differs from state to state
    value_fn.mean = 10.0  # and is far from 0 everywhere
    gamma, lam, limit, trunk_steps = 0.9, 0.7, 8, [0, 1, 0]
    # u = 0 draws action 0, u just below 1 the last action; step l of the branch draws with uniforms[l], so
    # its actions are 1 (the first, given), then 1, 0, 1, 0
    uniforms = np.array([0.0, 1 - 1e-9] * 10)
    env = gym.make("CartPole-v1", max_episode_steps=limit)
    env.reset(seed=0)
    for action in trunk_steps:
        env.step(action)
    q, steps = T.branch_rollout(env, 1, T.one_state_policy(net, theta), uniforms, gamma, value_fn, lam)
    assert steps == limit - len(trunk_steps) == 5  # cut by the time limit, well before the 20 steps
    # the same branch in a plain loop on a fresh env brought to the same state
    env = gym.make("CartPole-v1", max_episode_steps=limit)
    env.reset(seed=0)
    for action in trunk_steps:
        env.step(action)
    rewards, values = [], []
    for l in range(steps):
        obs, reward, terminated, truncated, _ = env.step([1, 1, 0, 1, 0][l])
        rewards.append(reward)
        values.append(value_fn.predict(obs[None])[0])
    assert truncated and not terminated  # a time limit, not the pole falling: V(s_H) is the bootstrap
    n_step = [sum(gamma ** l * rewards[l] for l in range(n)) + gamma ** n * values[n - 1] for n in range(1, steps + 1)]
    expected = ((1 - lam) * sum(lam ** (n - 1) * n_step[n - 1] for n in range(1, steps))
                + lam ** (steps - 1) * n_step[-1])
    assert np.isclose(q, expected, rtol=1e-12)
    assert abs(lam ** (steps - 1) * gamma ** steps * values[-1]) > 1.0  # what a terminal V = 0 would lose


# ----------------------------------------------------------------------------
# The vine (TRPO Sec. 5.2), 3: the surrogates of Eq. (15), all actions, and Eq. (16), importance sampled
# ----------------------------------------------------------------------------

def test_all_actions_gradient_matches_finite_differences(small_net, rng):
    """TRPO Eq. (15): the all-actions surrogate equals mean_n sum_a pi(a|s_n) Q(s_n, a) computed directly, and
    its gradient matches finite differences."""
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
    """TRPO Eq. (16), self-normalised importance sampling with K = 4 drawn actions per state (repeats allowed)
    and a given proposal q: the analytic gradient matches finite differences."""
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
    """TRPO Eq. (16), with the proposal q in place of the paper's pi_old: averaged over 4000 draws of K = 32
    actions, the estimate of sum_a pi(a) Q(a) matches the exact 3.8 within its bias and 4 standard errors, for
    q uniform and q = pi_old; with q uniform, weighting by 1/pi_old instead of 1/q misses by more than 5 times
    that bound."""
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


# ----------------------------------------------------------------------------
# The vine (TRPO Sec. 5.2), 4: the vine sampler's Q, whatever the workers and the restore method;
# the vine's value targets
# ----------------------------------------------------------------------------

def vine_config(tmp_path, name, **overrides):
    settings = dict(scheme="vine", vine_states=6, vine_horizon=15, steps_per_env=8, num_envs=2)
    settings.update(overrides)
    return short_config(tmp_path, name, **settings)


def vine_batch(cfg, number=1, reference=False):
    """The `number`-th batch of 8 steps that a vine sampler for cfg gives a seeded CartPole policy: engine.py's,
    or with reference=True trpo_numpy.py's (one process, replay after the trunk)."""
    run_rng = np.random.default_rng(0)
    net = MLP([4, 8, 2])
    theta = net.init(run_rng)
    value_fn = T.ValueFunction(MLP([4, 8, 1]), run_rng, lr=1e-3)
    make_sampler = T.make_sampler if reference else engine.make_sampler
    sampler = make_sampler(cfg, types.SimpleNamespace(rng=run_rng, value_fn=value_fn))
    for _ in range(number):
        batch = sampler.sample(net, theta, 8)
    sampler.close()
    return batch


@needs_fork
def test_vine_sampler_fork_and_replay_give_the_same_q(tmp_path):
    """The vine sampler's Q does not depend on how states are restored: engine.py's fork, seeded replay and
    'auto', and the reference's replay after the trunk (trpo_numpy.VineSampler), give identical Q (6 rollout
    states x 2 actions, all finite) on a second batch, whose episodes start mid-way, the same trunk and the
    same number of branch steps (more than 6); every rollout state is one of the trunk's states."""
    # the second batch starts mid-episode: replay must cover that
    # 8 environments, 4 on each worker: measured here, OpenBLAS then gives the workers' policy passes the
    # reference's logits to the bit (1 or 3 a worker can differ in the last bit)
    batches = {restore: vine_batch(vine_config(tmp_path, restore, vine_restore=restore, num_envs=8), number=2)
               for restore in ("fork", "replay", "auto")}
    batches["reference"] = vine_batch(vine_config(tmp_path, "reference", num_envs=8), number=2, reference=True)
    fork = batches["fork"]
    assert fork["Q"].shape == (6, 2) and np.all(np.isfinite(fork["Q"]))
    for name, batch in batches.items():
        assert np.array_equal(fork["Q"], batch["Q"]) and fork["branch_steps"] == batch["branch_steps"] > 6, name
        assert np.array_equal(fork["obs"], batch["obs"]) and np.array_equal(fork["actions"], batch["actions"]), name
    # rollout states are trunk states, in (t, e) order
    for s in fork["rollout_states"]:
        assert any(np.array_equal(s, o) for o in fork["obs"].reshape(-1, 4))


@needs_fork
def test_continuous_vine_fork_and_replay_give_the_same_q_on_a_walker(tmp_path):
    """TRPO Sec. 5.2 with continuous actions, on BipedalWalker, whose reset keeps its Box2D world (a replay
    in a reused environment would start from contact caches of earlier episodes): restored by fork or by
    seeded replay (engine.py), or by replay after the trunk (trpo_numpy.VineSampler), the vine sampler gives
    the same Q to the bit for K = 3 Gaussian actions drawn from pi_old at 6 rollout states, on a first and a
    second batch; the action sets are (6, 3, 4) floats."""
    batches = {}
    for restore in ("fork", "replay", "reference"):
        cfg = vine_config(tmp_path, f"walker-{restore}", env="BipedalWalker-v3", vine_restore=restore, num_envs=8,
                          vine_actions=3, vine_proposal="pi_old", vine_horizon=20, vine_bootstrap=False)
        run_rng = np.random.default_rng(0)
        net = GaussianPolicy([24, 8, 4])
        theta = net.init(run_rng, output_gain=1.0)
        value_fn = T.ValueFunction(MLP([24, 8, 1]), run_rng, lr=1e-3)
        make_sampler = T.make_sampler if restore == "reference" else engine.make_sampler
        sampler = make_sampler(cfg, types.SimpleNamespace(rng=run_rng, value_fn=value_fn))
        batches[restore] = [sampler.sample(net, theta, 8) for _ in range(2)]
        sampler.close()
    for other in ("replay", "reference"):
        for fork, replayed in zip(batches["fork"], batches[other]):
            assert fork["action_sets"].shape == (6, 3, 4) and np.all(np.isfinite(fork["Q"]))
            assert np.array_equal(fork["action_sets"], replayed["action_sets"]), other
            assert np.array_equal(fork["Q"], replayed["Q"]), other


@needs_fork
def test_vine_q_does_not_depend_on_the_number_of_workers(tmp_path):
    """With 3 environments on one worker or on two (split 2 + 1), the vine sampler draws the same action sets
    (K = 3 from pi_old) and gets the same Q to 1e-12 (6 states x 3 actions, all finite)."""
    # Each state's random numbers are drawn by the trainer and sent to whichever worker steps its
    # environment: one worker or two (three environments split 2 + 1) must give the same Q.
    batches = {workers: vine_batch(vine_config(tmp_path, f"w{workers}", workers=workers, num_envs=3,
                                               vine_actions=3, vine_proposal="pi_old"))
               for workers in (1, 2)}
    one, two = batches[1], batches[2]
    assert np.array_equal(one["action_sets"], two["action_sets"])
    assert np.allclose(one["Q"], two["Q"], rtol=1e-12) and one["Q"].shape == (6, 3) and np.all(np.isfinite(one["Q"]))


@needs_fork
def test_auto_restore_replays_young_states_and_forks_old_ones():
    """restore='auto': the measured cost of a fork lies between 1 and 5000 steps, and with the threshold set
    to 10 a state 3 steps into its episode is replayed while one 20 steps in is forked (forks recorded at
    pool.submit); both get a finite Q for every action, and state 0, not a rollout state, has NaN for every
    action."""
    trunk = engine.ForkingVineTrunk("LunarLander-v3", [1], [2], "auto")
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


@pytest.mark.parametrize("proposal", ["uniform", "pi_old"])
def test_the_sampled_vine_surrogate_weights_each_branch_by_pi_theta_over_q(tmp_path, rng, proposal):
    """TRPO Eq. (16) on the vine sampler's own batch (6 CartPole states, K = 3 actions drawn from q, uniform
    or pi_old): the proposal recorded for each drawn action is q's probability of it (1/A for uniform,
    pi_old(a|s_n) for pi_old), and vine_problem's surrogate at theta_old and at 3 other logits equals the
    self-normalised estimate written out here, L = mean_n sum_k w_k Q_k / sum_k w_k with w_k = pi_theta(a_k |
    s_n) / q(a_k | s_n), and Q_k the branch's Q of action a_k (batch["Q"][n, k])."""
    batch = vine_batch(vine_config(tmp_path, proposal, vine_actions=3, vine_proposal=proposal), reference=True)
    logits_old, actions = batch["rollout_logits"], batch["action_sets"]
    A = logits_old.shape[1]
    q = np.full(actions.shape, 1 / A) if proposal == "uniform" else softmax(logits_old)[
        np.arange(len(actions))[:, None], actions]
    assert np.allclose(batch["proposal"], q, rtol=1e-12)
    assert np.any(actions != actions[:, :1])  # some state drew two different actions: the weights matter
    _, surrogate_of_logits, _ = T.vine_problem(batch)
    for logits in [logits_old] + [logits_old + rng.standard_normal(logits_old.shape) for _ in range(3)]:
        p = softmax(logits)
        expected = np.mean([sum(p[n, a] / q[n, k] * batch["Q"][n, k] for k, a in enumerate(actions[n]))
                            / sum(p[n, a] / q[n, k] for k, a in enumerate(actions[n])) for n in range(len(actions))])
        assert np.isclose(surrogate_of_logits(logits)[0], expected, rtol=1e-12)


def test_vine_value_targets_are_the_surrogate_at_theta_old(rng):
    """The vine's value targets from vine_problem: with all actions they are V(s_n) = sum_a pi_old(a|s_n)
    Q(s_n, a), checked against the direct sum; with K sampled actions and q = pi_old every weight pi_old / q
    is 1, so each is the plain mean of the drawn actions' Q; and for both estimators (Eq. 15, and Eq. 16 with
    q uniform or pi_old) their mean equals the surrogate at theta_old."""
    # V(s_n) = sum_a pi_old(a|s_n) Q(s_n, a), or its self-normalised estimate: per state, what the
    # vine's surrogate is worth at theta_old.
    logits, Q = rng.standard_normal((5, 4)), rng.standard_normal((5, 4)) * 10
    batch = {"Q": Q, "rollout_logits": logits, "rollout_states": np.zeros((5, 2)),
             "action_sets": np.tile(np.arange(4), (5, 1)), "proposal": None}
    _, surrogate_of_logits, values = T.vine_problem(batch)
    assert np.allclose(values, (softmax(logits) * Q).sum(axis=1), rtol=1e-12)
    assert np.isclose(values.mean(), surrogate_of_logits(logits)[0], rtol=1e-12)
    actions = rng.integers(4, size=(5, 3))
    Q_drawn = Q[np.arange(5)[:, None], actions]  # Q[n, k] is Q(s_n, a_nk), the k-th drawn action's
    batch.update(Q=Q_drawn, action_sets=actions, proposal=np.full((5, 3), 0.25))
    _, surrogate_of_logits, values = T.vine_problem(batch)
    assert np.isclose(values.mean(), surrogate_of_logits(logits)[0], rtol=1e-12)
    batch.update(proposal=softmax(logits)[np.arange(5)[:, None], actions])  # q = pi_old
    _, surrogate_of_logits, values = T.vine_problem(batch)
    assert np.allclose(values, Q_drawn.mean(axis=1), rtol=1e-12)
    assert np.isclose(values.mean(), surrogate_of_logits(logits)[0], rtol=1e-12)


# ----------------------------------------------------------------------------
# Continuous actions: the diagonal Gaussian, 2: the surrogates of Eq. (14) and Eq. (16) and the entropy
# bonus, a Pendulum batch (clipped actions, truncation, GAE), the step, and cli.act
# ----------------------------------------------------------------------------

def test_gaussian_surrogate_gradient_matches_finite_differences(gaussian_net, rng):
    """TRPO Eq. (14) with continuous actions (dist=DiagonalGaussian, q = pi_old, advantages in place of Q):
    the analytic gradient, dL/dz backpropagated through the GaussianPolicy, matches finite differences of
    theta -> surrogate(forward(theta)) to a relative 1e-6, both at theta_old (ratio 1) and at a perturbed
    theta, the log sigma entries included (ratios != 1: checked to be 10% or more away from 1); at theta_old L
    equals the mean advantage."""
    net, theta, _ = gaussian_net
    states, actions, logp_old, advantages = gaussian_policy_batch(net, theta, rng)
    perturbed = theta + 0.05 * rng.standard_normal(net.num_params)
    ratio = np.exp(gaussian_log_prob(net.forward(perturbed, states)[0], actions) - logp_old)
    assert np.max(np.abs(ratio - 1)) > 0.1  # the perturbed point is really away from theta_old
    for point in (theta, perturbed):
        z, cache = net.forward(point, states)
        L, dL_dz = T.surrogate(z, actions, logp_old, advantages, DiagonalGaussian)
        analytic = net.backward(point, cache, dL_dz)
        numeric = numerical_gradient(
            lambda th: T.surrogate(net.forward(th, states)[0], actions, logp_old, advantages, DiagonalGaussian)[0],
            point)
        assert relative_error(analytic, numeric) < 1e-6
    assert np.isclose(T.surrogate(net.forward(theta, states)[0], actions, logp_old, advantages, DiagonalGaussian)[0],
                      advantages.mean(), rtol=1e-12)


@pytest.mark.parametrize("continuous", [False, True])
def test_with_entropy_bonus_adds_coef_times_the_entropy_and_its_gradient(continuous, rng):
    """with_entropy_bonus(L, 0.3): the objective is L + 0.3 H, and its gradient in the logits is that of
    L + 0.3 H, checked against central finite differences (1e-7), for a categorical and for a Gaussian with
    d = 2 action dimensions."""
    dist = DiagonalGaussian if continuous else Categorical
    logits = rng.standard_normal((5, 4 if continuous else 3))
    actions = rng.standard_normal((5, 2)) if continuous else rng.integers(3, size=5)
    logp_old, advantages = dist.log_prob(logits + 0.1, actions), rng.standard_normal(5)

    def surrogate_of_logits(z):
        return T.surrogate(z, actions, logp_old, advantages, dist)
    objective = T.with_entropy_bonus(surrogate_of_logits, 0.3, dist)
    value, grad = objective(logits)
    assert np.isclose(value, surrogate_of_logits(logits)[0] + 0.3 * T.entropy_bonus(logits, dist)[0], rtol=1e-12)
    numeric = numerical_gradient(lambda flat: objective(flat.reshape(logits.shape))[0], logits.ravel())
    assert np.allclose(grad.ravel(), numeric, atol=1e-7)


def test_gaussian_entropy_bonus_gradient_matches_finite_differences(gaussian_net, rng):
    """The entropy bonus (an addition, not in the TRPO paper) with DiagonalGaussian: its value is the mean of
    gaussian_entropy, and its gradient in z, backpropagated through the GaussianPolicy, matches finite
    differences (to 1e-6): 0 on the mean's parameters, 1 on each log sigma."""
    net, theta, _ = gaussian_net
    states = rng.standard_normal((6, 3))
    z, cache = net.forward(theta, states)
    H, dH = T.entropy_bonus(z, DiagonalGaussian)
    assert np.isclose(H, gaussian_entropy(z).mean(), rtol=1e-12)
    numeric = numerical_gradient(lambda th: T.entropy_bonus(net.forward(th, states)[0], DiagonalGaussian)[0], theta)
    assert relative_error(net.backward(theta, cache, dH), numeric) < 1e-6
    assert np.allclose(numeric[net.mean_params:], 1.0, rtol=1e-6)


def test_gaussian_importance_sampled_surrogate_gradient_and_value_at_theta_old(gaussian_net, rng):
    """TRPO Eq. (16) with continuous actions: K = 4 actions of d = 2 per state, shape (N, K, d), drawn from
    pi_old, with proposal q their densities under pi_old. At theta_old every weight pi_theta / q is 1, so L
    is the mean of Q (to 1e-12); the analytic gradient matches finite differences (to 1e-6) at theta_old and
    at a perturbed theta, where the weights differ from 1."""
    net, theta, _ = gaussian_net
    N, K = 5, 4
    states = rng.standard_normal((N, 3))
    z_old = net.forward(theta, states)[0]
    actions = gaussian_sample(np.repeat(z_old, K, axis=0), rng.standard_normal((N * K, 2))).reshape(N, K, 2)
    proposal = np.exp(gaussian_log_prob(np.repeat(z_old, K, axis=0), actions.reshape(N * K, 2))).reshape(N, K)
    Q = rng.standard_normal((N, K)) * 10
    assert np.isclose(T.importance_sampled_surrogate(z_old, actions, proposal, Q, DiagonalGaussian)[0], Q.mean(),
                      rtol=1e-12)
    for point in (theta, theta + 0.05 * rng.standard_normal(net.num_params)):
        z, cache = net.forward(point, states)
        analytic = net.backward(point, cache,
                                T.importance_sampled_surrogate(z, actions, proposal, Q, DiagonalGaussian)[1])
        numeric = numerical_gradient(lambda th: T.importance_sampled_surrogate(
            net.forward(th, states)[0], actions, proposal, Q, DiagonalGaussian)[0], point)
        assert relative_error(analytic, numeric) < 1e-6


def test_pendulum_batch_truncates_every_200_steps_and_gae_bootstraps_with_the_final_observation(rng):
    """TRPO Sec. 5.1 single-path sampling with continuous actions, and GAE paper Eq. (16) at a time limit:
    a GaussianPolicy (network.policy_network([3, 8, 1], True)) runs 2 Pendulum-v1 environments for 450
    steps. The actions are floats of shape (T, E, 1); truncated is True exactly at steps 199 and 399 of each
    environment (Pendulum's 200-step limit) and terminated never; next_obs is obs[t + 1] inside an episode
    and, at a truncation, the true final observation: a fresh Pendulum reset with the same seed and stepped
    through the first 200 actions clipped to +-2 gives the batch's observations, rewards and that final
    observation, bit for bit. T.gae on the batch, with V a fixed linear function of the observation, equals a
    plain per-episode loop summing (gamma lambda)^l delta that bootstraps with V(final observation) at each
    truncation and at the batch's end (to 1e-10); V there is far from 0, so treating the cut as a
    termination would be caught."""
    net = policy_network([3, 8, 1], True)
    theta = net.init(rng)
    steps, env_seeds = 450, [5, 6]
    sampler = engine.single_path_sampler("Pendulum-v1", env_seeds, [7, 8])
    try:
        batch = sampler.sample(net, theta, steps)
    finally:
        sampler.close()
    assert batch["actions"].shape == (steps, 2, 1) and np.issubdtype(batch["actions"].dtype, np.floating)
    expected_truncated = np.zeros((steps, 2), dtype=bool)
    expected_truncated[[199, 399]] = True
    assert np.array_equal(batch["truncated"], expected_truncated) and not batch["terminated"].any()
    for e in range(2):
        for t in range(steps - 1):
            same = np.array_equal(batch["next_obs"][t, e], batch["obs"][t + 1, e])
            assert same != expected_truncated[t, e], (t, e)  # at a truncation: not the next episode's reset
        env = gym.make("Pendulum-v1")  # the first episode again, the actions clipped by hand
        obs, _ = env.reset(seed=env_seeds[e])
        for t in range(200):
            assert np.array_equal(batch["obs"][t, e], obs)
            obs, reward, _, truncated, _ = env.step(np.clip(batch["actions"][t, e], -2.0, 2.0))
            assert reward == batch["rewards"][t, e]
        assert truncated and np.array_equal(batch["next_obs"][199, e], obs)  # the final observation, kept
        env.close()
    w, c, gamma, lam = np.array([0.5, -1.0, 0.2]), 10.0, 0.99, 0.95

    def V(s):
        return s @ w + c  # at least 10 - 0.5 - 1 - 1.6: far from 0
    got = T.gae(batch["rewards"], V(batch["obs"]), V(batch["next_obs"]), batch["terminated"], batch["truncated"],
                gamma, lam)
    for e in range(2):
        for start, end in [(0, 200), (200, 400), (400, steps)]:  # two truncated episodes, one cut by the batch
            # the episode's states, and after its last step the final observation to bootstrap from
            values = V(np.concatenate([batch["obs"][start:end, e], batch["next_obs"][end - 1, e][None]]))
            rewards = batch["rewards"][start:end, e]
            for t in range(end - start):
                total = sum((gamma * lam) ** (k - t) * (rewards[k] + gamma * values[k + 1] - values[k])
                            for k in range(t, end - start))
                assert np.isclose(got[start + t, e], total, rtol=1e-10, atol=1e-10), (start + t, e)
        assert abs(gamma * V(batch["next_obs"][199, e])) > 5.0  # what a terminal bootstrap of 0 would lose


def test_pendulum_takes_the_sampled_action_clipped_to_its_bounds(rng):
    """Continuous actions at the environment (cli.make_env, through T.single_path_sampler): with sigma = 4 a
    Gaussian policy's samples often leave Pendulum's torque bounds +-2. The batch records the action as
    sampled, mu + sigma n with n the environment's own stream of standard normals (to 1e-12), some of them
    beyond +-2, while the Pendulum underneath (a spy on its step) receives exactly np.clip(action, -2, 2) at
    every step. (Pendulum also clips inside its step, so rewards cannot tell; the spy can.)"""
    net = policy_network([3, 8, 1], True)
    theta = net.init(rng)
    theta[net.mean_params:] = np.log(4.0)
    steps = 30
    sampler = engine.single_path_sampler("Pendulum-v1", [3], [4])
    pendulum = sampler.envs[0].unwrapped
    received, pendulum_step = [], pendulum.step
    pendulum.step = lambda action: received.append(np.array(action, dtype=np.float64)) or pendulum_step(action)
    try:
        batch = sampler.sample(net, theta, steps)
    finally:
        sampler.close()
    sampled = batch["actions"][:, 0]  # (steps, 1)
    action_rng = np.random.default_rng(4)
    normals = np.array([action_rng.standard_normal(1) for _ in range(steps)])
    assert np.allclose(sampled, gaussian_sample(batch["logits"][:, 0], normals), rtol=1e-12, atol=0)
    assert np.sum(np.abs(sampled) > 2.0) >= 5  # the bounds are really exceeded
    assert len(received) == steps
    assert np.array_equal(np.array(received).reshape(steps, 1), np.clip(sampled, -2.0, 2.0))


def test_gaussian_trpo_step_stays_in_the_trust_region_and_improves(rng):
    """trpo_step (Sec. 6, solved as in Appendix C) with a GaussianPolicy on a random batch of continuous
    actions: the step is accepted with 0 < KLbar <= delta (T.mean_kl with DiagonalGaussian) and improves the
    Eq. (14) surrogate, both recomputed here by forward passes, and info's kl and actual_improve equal them;
    log sigma moves too. With damping 1e-4 the full step overshoots, so the line search backtracks: the try
    before the accepted one, 1/0.8 times as long, broke the constraint."""
    net = GaussianPolicy([4, 8, 2])
    theta = net.init(rng, output_gain=0.5)
    states, actions, logp_old, advantages = gaussian_policy_batch(net, theta, rng, n=200)
    cfg = T.Config(max_kl=0.01, cg_iters=20, damping=1e-4, fisher_subsample=1)

    def surrogate_of_logits(z):
        return T.surrogate(z, actions, logp_old, advantages, DiagonalGaussian)
    theta_new, info = T.trpo_step(net, theta, states, surrogate_of_logits, cfg)
    z_old, z_new = net.forward(theta, states)[0], net.forward(theta_new, states)[0]
    L_old, L_new = surrogate_of_logits(z_old)[0], surrogate_of_logits(z_new)[0]
    kl_new = T.mean_kl(z_old, z_new, DiagonalGaussian)
    assert info.accepted and 0 < kl_new <= cfg.max_kl
    assert np.isclose(info.kl, kl_new) and np.isclose(info.actual_improve, L_new - L_old)
    assert L_new > L_old
    assert np.all(theta_new[net.mean_params:] != theta[net.mean_params:])
    assert info.backtracks > 0
    previous_try = theta + (theta_new - theta) / cfg.backtrack_coeff
    assert T.mean_kl(z_old, net.forward(previous_try, states)[0], DiagonalGaussian) > cfg.max_kl


def test_act_with_a_gaussian_policy_returns_the_mean_or_a_sample_of_d_floats(rng):
    """cli.act with a continuous policy (GaussianPolicy, d = 2): greedy, it returns an array of shape (d,)
    equal to the mean mu_theta(s) of forward, exactly; not greedy, an array of shape (d,) that is mu + sigma n
    for the rng's next d standard normals (to 1e-14), not the mean."""
    net = policy_network([3, 8, 2], True)
    theta = net.init(rng, output_gain=0.5)
    theta[net.mean_params:] = [-0.5, 0.4]
    obs = rng.standard_normal(3)
    z = net.forward(theta, obs[None])[0][0]
    greedy = cli.act(net, theta, obs)
    assert isinstance(greedy, np.ndarray) and greedy.shape == (2,) and np.array_equal(greedy, z[:2])
    sampled = cli.act(net, theta, obs, greedy=False, rng=np.random.default_rng(9))
    n = np.random.default_rng(9).standard_normal(2)
    assert isinstance(sampled, np.ndarray) and sampled.shape == (2,)
    assert np.allclose(sampled, z[:2] + np.exp(z[2:]) * n, rtol=1e-14, atol=0)
    assert not np.allclose(sampled, greedy)


# ----------------------------------------------------------------------------
# End to end: learning, reproducibility, a bad batch survived
# ----------------------------------------------------------------------------

def test_cartpole_return_improves(tmp_path):
    """Learning check: 30,000 CartPole steps raise the rolling return to more than twice its first value and
    above 100."""
    cfg = short_config(tmp_path, "learn", total_steps=30_000, num_envs=4, steps_per_env=256, max_kl=0.02)
    _, _, history = cli.train(cfg, verbose=False)
    first, last = history[0]["rolling_return"], history[-1]["rolling_return"]
    assert last > 2 * first and last > 100, (first, last)


def test_pendulum_return_improves_with_a_gaussian_policy(tmp_path):
    """Learning check with continuous actions: 8 iterations of 8,192 Pendulum steps (the continuous
    defaults of scheme_config, one worker) raise the mean return of the latest batch's episodes by more
    than 150 over the first batch's (about -1250 at the start, a random policy's return)."""
    cfg = T.scheme_config("single", env="Pendulum-v1", seed=0, workers=1, total_steps=65_536,
                          out=str(tmp_path / "pendulum"))
    _, _, history = cli.train(cfg, verbose=False)
    first, last = history[0]["batch_return"], history[-1]["batch_return"]
    assert len(history) == 8 and last > first + 150, (first, last)


def test_vine_trains_end_to_end_with_both_estimators(tmp_path):
    """The vine (TRPO Sec. 5.2) trains end to end with the all-actions estimator (Eq. 15) and the
    importance-sampled one (Eq. 16, K = 3 from pi_old): each gives 4 iterations of 6 rollout states, at least
    3 steps accepted, every accepted one with 0 < KLbar <= delta, and finite weights."""
    for name, extra in (("all", {}), ("sampled", dict(vine_actions=3, vine_proposal="pi_old"))):
        cfg = vine_config(tmp_path, name, total_steps=64, **extra)
        _, theta, history = T.train(cfg, verbose=False)
        assert len(history) == 4 and all(row["rollout_states"] == 6 for row in history)
        assert sum(row["accepted"] for row in history) >= 3 and np.all(np.isfinite(theta))
        assert all(0 < row["kl"] <= cfg.max_kl for row in history if row["accepted"])


def test_same_seed_same_run_to_the_bit(tmp_path):
    """Two short CartPole runs with seed 0 give bit-identical final weights and progress rows (timing columns
    and the 'skipped' text aside); seed 1 gives other weights."""
    _, theta_a, hist_a = T.train(short_config(tmp_path, "a"), verbose=False)
    _, theta_b, hist_b = T.train(short_config(tmp_path, "b"), verbose=False)
    _, theta_c, _ = T.train(short_config(tmp_path, "c", seed=1), verbose=False)
    assert np.array_equal(theta_a, theta_b)
    timing = ("wall_s", "steps_per_s", "restores_per_s")

    def without_timing(history):  # as text, so that NaN equals NaN
        return [repr({k: float(v) for k, v in row.items() if k not in timing and k != "skipped"}) for row in history]
    assert without_timing(hist_a) == without_timing(hist_b)
    assert not np.array_equal(theta_a, theta_c)


def test_a_non_finite_advantage_keeps_theta_and_training_goes_on(tmp_path, monkeypatch):
    """A NaN put into iteration 2's advantages and value targets: that iteration's trpo_step returns
    theta_old, its row says accepted 0 with a 'not finite' reason, iterations 3 and 4 accept their steps
    again, and the final weights are finite."""
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
