"""exercise.py: turn the reference code into exercises, and check a student's answer.

An exercise is one function of network.py or trpo_numpy.py. `make` writes a copy of
the project in which that function's body is replaced by `raise NotImplementedError`
(its signature and docstring stay), and a marker file, .exercise, naming the exercise; the
student fills it in; `check` runs the tests that judge it. `check` takes only that one file from
the student's folder, and only from a folder whose .exercise names the same exercise: it copies the
file into a scratch folder beside this project's own code and test_trpo.py and runs the tests there,
within a time limit, so that nothing else in the student's folder (their copy of the tests, a
conftest.py, another file) can change the verdict. `make` never writes over the project itself, nor
over a folder it did not make. `verify` proves every exercise sound: its tests pass on the reference
code, and fail both with the function blanked and with a plausible wrong version of
it (a sign flipped, a term dropped), so a test can never pass by accident.
EXERCISES.md describes each exercise with its equation and hints.

`mutants` proves the tests themselves: MUTANTS is a list of small, plausible bugs spread over the
whole algorithm (sampling, advantages, the surrogates, the KL, the Fisher-vector product, CG, the
step size, the line search, the value function, the vine's restores, common random numbers and
branch returns, the network's derivatives, the distribution maths). Each is put into a scratch copy
of the project on its own and the tests named for it must fail; a bug that survives, or whose
original code no longer occurs exactly once in the file (the list has fallen behind the code), fails
the command. `verify` runs it after the exercises.

Usage:
  python exercise.py list
  python exercise.py make gae                    # writes exercise-gae/, a copy with gae() blanked
  python exercise.py check gae --from exercise-gae  # --timeout 120: seconds before an answer is stopped
  python exercise.py verify                      # every exercise: reference passes, blank and wrong fail;
                                                 # then every mutant is caught
  python exercise.py mutants                     # only the mutants
"""

import argparse
import ast
import importlib.util
import concurrent.futures
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import tokenize
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT_FILES = ["network.py", "diagnostics.py", "parallel.py", "run_files.py", "trpo_numpy.py", "engine.py", "cli.py",
                 "test_trpo.py",
                 "requirements.txt"]
MARKER = ".exercise"  # in a copy written by `make`: the name of its exercise, which `check` reads


@dataclass
class Exercise:
    name: str
    file: str  # where the function lives
    function: str  # its name, "Class.method" for a method
    tests: list  # the tests in test_trpo.py that judge it
    wrong: str  # a plausible wrong body (without signature and docstring), to prove the tests catch it
    summary: str


# In the order of EXERCISES.md, which `list` follows (test_program.py checks that they agree).
EXERCISES = [
    Exercise("log_softmax", "network.py", "log_softmax",
             ["test_categorical_helpers_match_definitions"],
             """
             return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # no max shift: exp overflows
             """, "log-probabilities of a categorical from logits, without overflow"),
    Exercise("kl", "network.py", "kl",
             ["test_categorical_helpers_match_definitions", "test_kl_of_a_policy_with_itself_is_zero",
              "test_kl_direction_is_old_to_new"],
             """
             logp_new = log_softmax(z_new)
             return (np.exp(logp_new) * (logp_new - log_softmax(z_old))).sum(axis=-1)  # KL(new || old)
             """, "KL divergence between two categoricals, in the paper's direction"),
    Exercise("mlp_backward", "network.py", "MLP.backward",
             ["test_backward_matches_finite_differences", "test_backward_is_the_transpose_of_jvp"],
             """
             layers = self.unflatten(theta)
             grads = [None] * len(layers)
             delta = grad_y
             for l in reversed(range(len(layers))):
                 W, _ = layers[l]
                 h_in = cache[l]
                 grads[l] = (h_in.T @ delta, delta.sum(axis=0))
                 if l > 0:
                     delta = delta @ W.T  # forgets tanh' = 1 - h^2
             return self.flatten(grads)
             """, "backpropagation through the tanh MLP (vector-Jacobian product)"),
    Exercise("mlp_jvp", "network.py", "MLP.jvp",
             ["test_jvp_matches_finite_differences", "test_backward_is_the_transpose_of_jvp"],
             """
             layers = self.unflatten(theta)
             tangents = self.unflatten(v)
             for l, ((W, _), (dW, db)) in enumerate(zip(layers, tangents)):
                 da = cache[l] @ dW + db  # forgets the tangent flowing in from the layer below
                 if l == len(layers) - 1:
                     return da
             """, "forward-mode Jacobian-vector product through the MLP"),
    Exercise("categorical_fisher_product", "network.py", "categorical_fisher_product",
             ["test_categorical_fisher_is_the_hessian_of_kl_in_logit_space",
              "test_fisher_vector_product_equals_explicit_fisher_and_kl_hessian"],
             """
             return p * u  # diag(p) only: drops - p p^T
             """, "the Fisher information of a categorical in logit space, times a vector"),
    Exercise("gaussian_kl", "network.py", "gaussian_kl",
             ["test_gaussian_kl_matches_monte_carlo_and_its_direction_is_old_to_new",
              "test_gaussian_fisher_is_the_hessian_of_kl_in_mu_and_log_sigma"],
             """
             mu_old, log_std_old = gaussian_parts(z_old)
             mu_new, log_std_new = gaussian_parts(z_new)
             var_new = np.exp(2 * log_std_new)
             return (log_std_new - log_std_old + (np.exp(2 * log_std_old) + (mu_old - mu_new) ** 2) / var_new
                     - 0.5).sum(axis=-1)  # forgets the 2 of 2 sigma_new^2
             """, "KL divergence between two diagonal Gaussians, in closed form"),
    Exercise("gaussian_fisher_product", "network.py", "gaussian_fisher_product",
             ["test_gaussian_fisher_is_the_hessian_of_kl_in_mu_and_log_sigma",
              "test_gaussian_fisher_vector_product_equals_explicit_fisher_and_kl_hessian"],
             """
             mu_u, log_std_u = gaussian_parts(u)
             _, log_std = gaussian_parts(z)
             return np.concatenate([mu_u * np.exp(-2 * log_std), log_std_u], axis=-1)  # 1, not 2, for log sigma
             """, "the Fisher information of a diagonal Gaussian in (mu, log sigma), times a vector"),
    Exercise("gae", "trpo_numpy.py", "gae",
             ["test_gae_on_a_hand_computed_trajectory", "test_gae_matches_a_plain_loop_and_lambda_one_is_monte_carlo"],
             """
             advantages = np.zeros_like(rewards)
             next_advantage = np.zeros(rewards.shape[1:])
             for t in reversed(range(len(rewards))):
                 done = terminated[t] | truncated[t]
                 delta = rewards[t] + gamma * next_values[t] * ~done - values[t]  # a time limit is no terminal
                 next_advantage = delta + gamma * lam * ~done * next_advantage
                 advantages[t] = next_advantage
             return advantages
             """, "generalized advantage estimation with terminated and truncated episodes"),
    Exercise("discounted_returns", "trpo_numpy.py", "discounted_returns",
             ["test_monte_carlo_returns_on_a_hand_computed_trajectory",
              "test_gae_matches_a_plain_loop_and_lambda_one_is_monte_carlo"],
             """
             returns = np.zeros_like(rewards)
             next_return = next_values[-1]
             for t in reversed(range(len(rewards))):
                 ended = terminated[t] | truncated[t]
                 returns[t] = rewards[t] + gamma * next_return * ~ended  # every end treated as terminal
                 next_return = returns[t]
             return returns
             """, "Monte-Carlo discounted return-to-go, bootstrapped where the episode goes on"),
    Exercise("surrogate", "trpo_numpy.py", "surrogate",
             ["test_surrogate_gradient_matches_finite_differences",
              "test_gaussian_surrogate_gradient_matches_finite_differences",
              "test_trpo_step_stays_in_the_trust_region_and_improves"],
             """
             N = len(actions)
             ratio = np.exp(dist.log_prob(logits, actions) - logp_old)
             grad = dist.log_prob_grad(logits, actions) * (advantages / N)[:, None]  # forgets the ratio
             return np.mean(ratio * advantages), grad
             """, "the single-path surrogate of Eq. (14) and its gradient in the logits"),
    Exercise("fisher_vector_product", "trpo_numpy.py", "fisher_vector_product",
             ["test_fisher_vector_product_equals_explicit_fisher_and_kl_hessian",
              "test_gaussian_fisher_vector_product_equals_explicit_fisher_and_kl_hessian"],
             """
             u = net.jvp(theta, cache, v)
             w = net.distribution.fisher_product(logits, u)
             return net.backward(theta, cache, w) + damping * v  # forgets the mean's 1/N
             """, "(F + damping I) v from a JVP, the distribution's Fisher and a backward pass"),
    Exercise("conjugate_gradient", "trpo_numpy.py", "conjugate_gradient",
             ["test_conjugate_gradient_matches_linear_solve",
              "test_conjugate_gradient_stops_on_a_non_positive_curvature"],
             """
             x = np.zeros_like(b)
             r = b.copy()
             p = r.copy()
             for _ in range(iters):
                 Ap = matrix_vector_product(p)
                 alpha = (r @ r) / (p @ p)  # the step of plain gradient descent, not CG's r.r / p.Ap
                 x += alpha * p
                 r -= alpha * Ap
                 p = r.copy()
             return x
             """, "solve F x = g with only F-vector products"),
    Exercise("maximal_step", "trpo_numpy.py", "maximal_step",
             ["test_maximal_step_puts_the_quadratic_kl_model_at_delta"],
             """
             return np.sqrt(max_kl / x_F_x) * x  # forgets the 2 of the quadratic model
             """, "the step length beta = sqrt(2 delta / x^T F x)"),
    Exercise("line_search", "trpo_numpy.py", "line_search",
             ["test_line_search_never_accepts_kl_above_delta",
              "test_line_search_returns_theta_old_when_nothing_is_accepted"],
             """
             for k in range(max_backtracks):
                 theta = theta_old + backtrack_coeff ** k * full_step
                 improvement, kl_reached, extra = evaluate(theta)
                 if kl_reached <= 1.5 * max_kl and improvement > 0:  # baselines' slack: too lenient
                     return True, theta, improvement, kl_reached, k, extra
             return False, theta_old, 0.0, 0.0, max_backtracks, None
             """, "backtracking line search: KL at most delta, and the surrogate improves"),
    Exercise("restore_by_replay", "trpo_numpy.py", "restore_by_replay",
             ["test_replaying_a_trunk_states_episode_rebuilds_that_state",
              "test_fork_and_replay_restore_a_lander_state_bit_for_bit"],
             """
             env.reset(seed=int(seed))
             for action in actions[:-1]:  # stops one step short of the state
                 env.step(action)
             return env
             """, "the vine's restore: rebuild a trunk state by replaying its episode from its seed"),
    Exercise("branch_rollout", "trpo_numpy.py", "branch_rollout",
             ["test_branch_rollout_discounts_and_bootstraps",
              "test_branch_lambda_return_is_the_weighted_mean_of_n_step_returns",
              "test_a_branch_cut_by_the_time_limit_bootstraps_with_v_where_it_was_cut"],
             """
             obs, reward, terminated, truncated, _ = env.step(first_action)
             rewards, observations = [reward], [obs]
             while len(rewards) < len(noise) and not (terminated or truncated):
                 obs, reward, terminated, truncated, _ = env.step(act(obs, noise[len(rewards)]))
                 rewards.append(reward)
                 observations.append(obs)
             if value_fn is None:
                 return float(np.sum(np.array(rewards) * gamma ** np.arange(len(rewards)))), len(rewards)
             values = value_fn.predict(np.array(observations, dtype=np.float64))  # V even after the episode's end
             G = values[-1]
             for reward, value in zip(reversed(rewards), reversed(values)):
                 G = reward + gamma * ((1 - lam) * value + lam * G)
             return float(G), len(rewards)
             """, "one branch of the vine and its Q: the Monte-Carlo sum, or the lambda-return"),
    Exercise("all_actions_surrogate", "trpo_numpy.py", "all_actions_surrogate",
             ["test_all_actions_gradient_matches_finite_differences"],
             """
             p = softmax(logits)
             V = (p * Q).sum(axis=1, keepdims=True)
             return float(V.mean()), p * Q / len(Q)  # forgets the baseline V: not the gradient
             """, "the vine's all-actions surrogate of Eq. (15) and its gradient"),
    Exercise("importance_sampled_surrogate", "trpo_numpy.py", "importance_sampled_surrogate",
             ["test_importance_sampled_gradient_matches_finite_differences",
              "test_importance_sampling_estimator_matches_the_all_actions_value",
              "test_gaussian_importance_sampled_surrogate_gradient_and_value_at_theta_old"],
             """
             N, K = Q.shape
             z, a = each_drawn(logits, actions)
             w = np.exp(dist.log_prob(z, a)).reshape(N, K)  # forgets 1 / q
             W = w.sum(axis=1, keepdims=True)
             L_n = (w * Q).sum(axis=1, keepdims=True) / W
             c = w / W * (Q - L_n)
             grad = (c.reshape(N * K, 1) * dist.log_prob_grad(z, a)).reshape(N, K, -1).sum(axis=1)
             return float(L_n.mean()), grad / N
             """, "the vine's self-normalised importance-sampling surrogate of Eq. (16)"),
]
BY_NAME = {exercise.name: exercise for exercise in EXERCISES}


@dataclass
class Mutant:
    file: str  # where the bug goes
    original: str  # code as it is now (code lines, not a docstring or comment), exactly once in the file
    replacement: str  # the bug
    tests: list  # tests that must catch it (the first is expected to), in test_trpo.py unless "file::name"
    description: str


# Plausible bugs, each a small change that still runs, in the order of the paper. They differ from the
# exercises' wrong versions above. The six marked "(once missed)" passed every test of the suite before
# the tests named for them were written; so did three more (the vine's value targets without 1/q, the
# first N/k rows for the Fisher, CG going on through negative curvature), before their tests were
# strengthened.
MUTANTS = [
    # Sampling (Sec. 5.1): terminated vs truncated
    Mutant("trpo_numpy.py", 'batch["terminated"][t, e] = terminated',
           'batch["terminated"][t, e] = terminated or truncated',
           ["test_sampler_keeps_the_final_observation_of_a_truncated_episode"],
           "the sampler records a time-limit end as terminated"),
    # Advantages (GAE paper Eq. 16, the return-to-go)
    Mutant("trpo_numpy.py", "next_advantage = delta + gamma * lam * continues * next_advantage",
           "next_advantage = delta + gamma * lam * ~terminated[t] * next_advantage",
           ["test_gae_on_a_hand_computed_trajectory"],
           "GAE's sum runs on across a time limit into the next episode"),
    Mutant("trpo_numpy.py", "tail = np.where(ended, next_values[t], next_return)", "tail = next_return",
           ["test_monte_carlo_returns_on_a_hand_computed_trajectory"],
           "the return-to-go of a truncated episode bootstraps with the next episode's return"),
    # The surrogates: Eq. (14), (15), (16)
    Mutant("trpo_numpy.py", "ratio = np.exp(dist.log_prob(logits, actions) - logp_old)",
           "ratio = np.exp(logp_old - dist.log_prob(logits, actions))",
           ["test_surrogate_gradient_matches_finite_differences"],
           "Eq. (14)'s ratio upside down: pi_old / pi_theta"),
    Mutant("trpo_numpy.py", "return float(V.mean()), p * (Q - V) / len(Q)", "return float(V.mean()), p * (Q - V)",
           ["test_all_actions_gradient_matches_finite_differences"],
           "Eq. (15)'s gradient is a sum over states, its value a mean"),
    Mutant("trpo_numpy.py", "c = w / W * (Q - L_n)", "c = w / W * Q",
           ["test_importance_sampled_gradient_matches_finite_differences"],
           "Eq. (16)'s gradient forgets the self-normalisation's baseline L_n"),
    Mutant("trpo_numpy.py", "q = np.exp(dist.log_prob(q_logits, actions)).reshape(N, K)",
           "q = np.exp(dist.log_prob(np.repeat(logits, K, axis=0), actions)).reshape(N, K)",
           ["test_the_sampled_vine_surrogate_weights_each_branch_by_pi_theta_over_q"],
           "Eq. (16) weights by pi_theta / pi_old when the actions were drawn uniformly (once missed)"),
    Mutant("trpo_numpy.py", 'w = np.exp(dist.log_prob(z_old, a)).reshape(Q.shape) / batch["proposal"]',
           "w = np.exp(dist.log_prob(z_old, a)).reshape(Q.shape)",
           ["test_vine_value_targets_are_the_surrogate_at_theta_old"],
           "the vine's value targets forget to divide by q"),
    # The mean KL of Eq. (12)
    Mutant("trpo_numpy.py", "return np.mean(dist.kl(logits_old, logits_new))",
           "return np.mean(dist.kl(logits_new, logits_old))",
           ["test_mean_kl_is_the_mean_over_states_of_kl_from_old_to_new"],
           "mean_kl is KL(new || old) (once missed)"),
    # The Fisher-vector product (Appendix C.1)
    Mutant("network.py", "return p * u - p * (p * u).sum(axis=-1, keepdims=True)", "return p * u - p * (p * u).sum()",
           ["test_fisher_vector_product_equals_explicit_fisher_and_kl_hessian"],
           "the categorical's logit-space Fisher sums p . u over the whole batch, not per state"),
    Mutant("trpo_numpy.py",
           "return fisher_vector_product(net, theta_old, fisher_cache, fisher_logits, v, cfg.damping, fisher_slopes)",
           "return fisher_vector_product(net, theta_old, fisher_cache, fisher_logits, v, cfg.damping, fisher_slopes)"
           " + cfg.damping * v",
           ["test_trpo_step_is_the_natural_gradient_step_of_an_explicit_fisher"],
           "trpo_step's Fisher-vector product adds the damping a second time (once missed)"),
    Mutant("trpo_numpy.py",
           "fisher_cache = [np.ascontiguousarray(h[::cfg.fisher_subsample]) for h in cache]\n"
           "    fisher_logits = logits_old[::cfg.fisher_subsample]",
           "fisher_cache = [np.ascontiguousarray(h[:len(h) // cfg.fisher_subsample]) for h in cache]\n"
           "    fisher_logits = logits_old[:len(logits_old) // cfg.fisher_subsample]",
           ["test_fisher_subsample_uses_every_kth_state"],
           "the Fisher subsample takes the first N/k rows of the batch, not every k-th"),
    # Conjugate gradient
    Mutant("trpo_numpy.py", "r_dot_r = new_r_dot_r", "pass",
           ["test_conjugate_gradient_matches_linear_solve"],
           "CG keeps the first r.r instead of carrying each new one on"),
    Mutant("trpo_numpy.py", "if not p_Ap > 1e-12 * (p @ p):", "if abs(p_Ap) <= 1e-12 * (p @ p):",
           ["test_conjugate_gradient_stops_on_a_non_positive_curvature"],
           "CG guards against p^T A p = 0 but goes on through negative curvature"),
    # The step size (Appendix C)
    Mutant("trpo_numpy.py", "full_step = maximal_step(x, x_F_x, cfg.max_kl)",
           "full_step = maximal_step(g, x_F_x, cfg.max_kl)",
           ["test_trpo_step_is_the_natural_gradient_step_of_an_explicit_fisher"],
           "the full step points along the plain gradient g, not x = F^-1 g"),
    # The line search
    Mutant("trpo_numpy.py", "return theta_new, Step(logits_old, logits_new, True, kl_reached, backtracks,",
           "return theta_old + full_step, Step(logits_old, logits_new, True, kl_reached, backtracks,",
           ["test_trpo_step_stays_in_the_trust_region_and_improves",
            "test_the_step_reports_the_kl_and_improvement_of_the_theta_it_returns"],
           "the line search's result thrown away: the full step is taken (modular_rl, wojzaremba/trpo)"),
    Mutant("trpo_numpy.py", "return False, theta_old, 0.0, 0.0, max_backtracks, None",
           "return False, theta, 0.0, 0.0, max_backtracks, None",
           ["test_line_search_returns_theta_old_when_nothing_is_accepted"],
           "a failed line search keeps its last rejected try (tianshou, before its fix)"),
    Mutant("trpo_numpy.py", "if kl_reached <= max_kl and improvement > min_improvement:",
           "if kl_reached <= max_kl:",
           ["test_line_search_returns_theta_old_when_nothing_is_accepted"],
           "the line search accepts a step that makes the surrogate worse"),
    Mutant("trpo_numpy.py", "min_improvement=1e-10 * max(1.0, abs(L_old)))", "min_improvement=0.0)",
           ["test_no_step_is_taken_when_every_action_is_equally_good"],
           "the line search accepts an 'improvement' of rounding noise"),
    # The value function
    Mutant("trpo_numpy.py", "b[:] = (self.std * b + self.mean - mean) / std", "b[:] = (b + self.mean - mean) / std",
           ["test_value_rescaling_preserves_every_prediction"],
           "rescaling V's output drops the old std from the bias (once missed)"),
    Mutant("trpo_numpy.py", "scaled = (targets - self.mean) / self.std", "scaled = targets - self.mean",
           ["test_value_fit_learns_large_targets"],
           "the value fit centres its targets but forgets to divide them by their std"),
    # The vine (Sec. 5.2): restoring states, common random numbers, a branch's return
    Mutant("trpo_numpy.py", "env.reset(seed=int(seed))", "env.reset()",
           ["test_fork_and_replay_restore_a_lander_state_bit_for_bit"],
           "replay resets without the episode's seed"),
    Mutant("trpo_numpy.py", "self.episode_actions[e] = []", "pass",
           ["test_replaying_a_trunk_states_episode_rebuilds_that_state"],
           "a new episode keeps the last one's actions for replay"),
    Mutant("engine.py", "lambda env=self.envs[e], a=action, u=noise[i]: trpo.branch_rollout(",
           "lambda env=self.envs[e], a=action, u=np.roll(noise[i], k): trpo.branch_rollout(",
           ["test_every_branch_of_a_rollout_state_gets_that_states_stream_of_uniforms"],
           "each forked branch reads its state's random numbers rotated by its place in the action set: no "
           "common random numbers (once missed)"),
    Mutant("engine.py",
           "results[(t, e, k)] = trpo.branch_rollout(env, action, act, noise[i], gamma, value_fn, lam)",
           "results[(t, e, k)] = trpo.branch_rollout(env, action, act, np.roll(noise[i], k), gamma, value_fn, lam)",
           ["test_every_branch_of_a_rollout_state_gets_that_states_stream_of_uniforms"],
           "each replayed branch reads its state's random numbers rotated by its place in the action set"),
    Mutant("trpo_numpy.py",
           "Q[n, k], H = branch_rollout(env, action, act, noise[n], cfg.gamma, bootstrap, cfg.lam)",
           "Q[n, k], H = branch_rollout(env, action, act, np.roll(noise[n], k), cfg.gamma, bootstrap, cfg.lam)",
           ["test_every_branch_of_a_rollout_state_gets_that_states_stream_of_uniforms"],
           "the reference's branches read their state's random numbers rotated by their place in the action set"),
    Mutant("trpo_numpy.py", "taken = actions_before + list(batch[\"actions\"][:t, e])",
           "taken = list(batch[\"actions\"][:t, e])",
           ["test_vine_sampler_fork_and_replay_give_the_same_q"],
           "the reference's replay of a state forgets its episode's actions from before the batch"),
    Mutant("engine.py", "self.reuse_spare = world is None or self.spare.unwrapped.world is not world",
           "self.reuse_spare = True",
           ["test_continuous_vine_fork_and_replay_give_the_same_q_on_a_walker"],
           "a replay reuses BipedalWalker's spare environment, whose reset keeps its Box2D world and caches"),
    Mutant("trpo_numpy.py", "if terminated:", "if terminated or truncated:",
           ["test_a_branch_cut_by_the_time_limit_bootstraps_with_v_where_it_was_cut"],
           "a branch cut by the time limit gets V = 0, as if terminated (once missed)"),
    Mutant("trpo_numpy.py", "G = reward + gamma * ((1 - lam) * value + lam * G)",
           "G = reward + gamma * (lam * value + (1 - lam) * G)",
           ["test_branch_lambda_return_is_the_weighted_mean_of_n_step_returns"],
           "the branch's lambda-return swaps lam and 1 - lam"),
    Mutant("trpo_numpy.py", "gamma ** np.arange(len(rewards))", "gamma ** np.arange(1, len(rewards) + 1)",
           ["test_branch_rollout_discounts_and_bootstraps"],
           "the branch's Monte-Carlo Q discounts its first reward too"),
    Mutant("network.py", "threshold = float(u) * cdf[-1]", "threshold = float(u)",
           ["test_sample_one_draws_the_action_sample_draws",
            "test_the_engines_one_state_policy_draws_the_references_actions"],
           "a vine branch's draw compares u with the unnormalised cumulative sum, not u times its total"),
    # The network's derivatives
    Mutant("network.py", "grads[l] = (h_in.T @ delta, delta.sum(axis=0))",
           "grads[l] = (h_in.T @ delta, delta.mean(axis=0))",
           ["test_backward_matches_finite_differences"],
           "backprop averages the bias gradient over the batch"),
    Mutant("network.py", "return [1.0 - h ** 2 for h in cache[1:]]", "return [(1.0 - h) ** 2 for h in cache[1:]]",
           ["test_jvp_matches_finite_differences"],
           "tanh' misplaces a bracket: (1 - h)^2"),
    # The categorical distribution
    Mutant("network.py", "cdf = np.cumsum(softmax(z), axis=-1)", "cdf = softmax(z)",
           ["test_sample_follows_the_probabilities_within_4_sigma"],
           "sampling compares u with the probabilities, not their cumulative sum"),
    Mutant("network.py", "return e / e.sum(axis=-1, keepdims=True)", "return e / e.sum()",
           ["test_categorical_helpers_match_definitions"],
           "softmax normalises over the whole batch, not each state"),
    # Missed by the suite, or caught only by a learning threshold, until the tests named here were written
    Mutant("trpo_numpy.py", "advantages = targets - values", "advantages = targets",
           ["test_estimate_advantages_on_a_hand_computed_batch"],
           "--advantage mc takes the returns-to-go as advantages, with no baseline"),
    Mutant("trpo_numpy.py", 'value_fn.predict(batch["next_obs"].reshape(-1, D))',
           'value_fn.predict(batch["obs"].reshape(-1, D))',
           ["test_estimate_advantages_on_a_hand_computed_batch"],
           "the bootstrap V(s_t+1) is taken at s_t"),
    Mutant("trpo_numpy.py", "return (advantages - advantages.mean()) / (advantages.std() + 1e-8)",
           "return advantages / (advantages.std() + 1e-8)",
           ["test_standardize_centres_and_scales"],
           "the standardised advantages are scaled but not centred"),
    Mutant("trpo_numpy.py", "self.episode_return[e] = 0.0", "self.episode_return[e] += 0.0",
           ["test_the_sampler_gives_each_episode_its_own_return"],
           "an episode's running return is never reset: each return counts all the episodes before it"),
    Mutant("trpo_numpy.py", "return L + coef * H, dL + coef * dH", "return L + coef * H, dL + dH",
           ["test_with_entropy_bonus_adds_coef_times_the_entropy_and_its_gradient"],
           "the entropy bonus's gradient is added without its coefficient"),
    Mutant("run_files.py", 'learner.theta, vf.phi, vf.adam.m, vf.adam.v = saved["theta"], saved["phi"], '
                           'saved["adam_m"], saved["adam_v"]',
           'learner.theta, vf.phi = saved["theta"], saved["phi"]',
           ["test_program.py::test_a_checkpoint_restores_the_whole_state_of_the_learner"],
           "a resumed run's Adam starts again from zero moments"),
    Mutant("run_files.py", 'learner.rng.bit_generator.state = saved["rng_state"]', 'learner.rng = learner.rng',
           ["test_program.py::test_a_checkpoint_restores_the_whole_state_of_the_learner"],
           "a resumed run's random generator starts again from the seed"),
    Mutant("run_files.py", 'vf.adam.t, vf.mean, vf.std = saved["adam_t"], saved["value_mean"], saved["value_std"]',
           'vf.adam.t = saved["adam_t"]',
           ["test_program.py::test_a_checkpoint_restores_the_whole_state_of_the_learner"],
           "a resumed run's value function forgets its targets' mean and std"),
    # The loop's assembly of steps 2 and 3 (policy_problem), for each scheme
    Mutant("trpo_numpy.py", "return surrogate(logits, actions, logp_old, step_advantages, dist)",
           "return surrogate(logits, actions, logp_old, advantages, dist)",
           ["test_policy_problem_assembles_the_single_paths_step_and_value_fit"],
           "the single path's step takes the raw advantages, not the standardised ones it was told to"),
    Mutant("trpo_numpy.py", 'largest_advantage = np.nanmax(np.abs(batch["Q"] - branch_values[:, None]))',
           'largest_advantage = np.nanmax(np.abs(batch["Q"]))',
           ["test_policy_problem_assembles_the_vines_step_and_value_fit"],
           "the vine's eps of Theorem 1 is the largest |Q|, not the largest |Q - V|"),
    Mutant("trpo_numpy.py", "values = (w * Q).sum(axis=1) / w.sum(axis=1)", "values = (w * Q).mean(axis=1)",
           ["test_policy_problem_assembles_the_vines_importance_sampled_step"],
           "with K drawn actions, the branches' V(s_n) weighs Q by w without normalising the weights"),
    Mutant("trpo_numpy.py", 'w = np.exp(dist.log_prob(z_old, a)).reshape(Q.shape) / batch["proposal"]',
           'w = np.exp(dist.log_prob(z_old, a)).reshape(Q.shape)',
           ["test_policy_problem_assembles_the_vines_importance_sampled_step"],
           "with K drawn actions, the branches' V(s_n) forgets to divide by q, the proposal"),
    # The loop itself: train_iteration and record_iteration
    Mutant("trpo_numpy.py", "batch = sampler.sample(net, learner.theta, cfg.steps_per_env)",
           "batch = sampler.sample(net, learner.theta, cfg.num_envs)",
           ["test_train_iteration_runs_steps_one_to_five_in_order"],
           "the loop samples num_envs steps from each environment, not steps_per_env"),
    Mutant("engine.py", "batch = sampler.sample(net, learner.theta, cfg.steps_per_env)",
           "batch = sampler.sample(net, learner.theta, cfg.num_envs)",
           ["test_train_iteration_runs_steps_one_to_five_in_order"],
           "the engine's loop samples num_envs steps from each environment, not steps_per_env"),
    Mutant("trpo_numpy.py", "learner.env_steps += learner.cfg.batch_size",
           "learner.env_steps += learner.cfg.steps_per_env",
           ["test_train_iteration_runs_steps_one_to_five_in_order"],
           "an iteration counts one environment's steps, not the whole batch's"),
]


class ProjectChanged(Exception):
    """The project no longer holds what an exercise or a mutant names (a file, a function): said in one sentence."""


def find_function(tree, qualified_name):
    """The FunctionDef node of `name` or `Class.name` in a module's syntax tree (ProjectChanged if none)."""
    *classes, name = qualified_name.split(".")
    scope = tree.body
    for class_name in classes:
        scope = next((n.body for n in scope if isinstance(n, ast.ClassDef) and n.name == class_name), [])
    found = next((n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if found is None:
        raise ProjectChanged(f"the project has no function {qualified_name} any more (renamed or moved?), so its "
                             f"exercise cannot be made; the list EXERCISES in exercise.py needs updating.")
    return found


def check_project_files():
    """ProjectChanged, in one sentence, if a file the exercises copy is missing from the project."""
    missing = [name for name in PROJECT_FILES if not os.path.isfile(os.path.join(HERE, name))]
    if missing:
        raise ProjectChanged(f"{os.path.join(HERE, missing[0])} is missing; the exercises need the whole project "
                             f"(restore it, e.g. with git checkout).")


def replace_body(source, qualified_name, new_body):
    """`source` with the body of one function replaced by `new_body`, keeping its signature and docstring.

    The syntax tree says where the body starts and ends; everything else in the file is
    kept to the character, comments included."""
    function = find_function(ast.parse(source), qualified_name)
    body = function.body
    has_docstring = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
        and isinstance(body[0].value.value, str)
    code = body[1:] if has_docstring else body
    lines = source.splitlines(keepends=True)
    indent = " " * code[0].col_offset
    new_lines = textwrap.indent(textwrap.dedent(new_body).strip("\n") + "\n", indent)
    return "".join(lines[:code[0].lineno - 1]) + new_lines + "".join(lines[code[-1].end_lineno:])


def blank_body(exercise):
    return f'raise NotImplementedError("exercise {exercise.name}: write this function (see EXERCISES.md)")'


def copy_project(source_dir, target_dir, exercise=None, body=None):
    """Copy the project's files; with an exercise, replace that function's body by `body` (worked out
    first: a function that is not there is a ProjectChanged before anything is written)."""
    replaced = None
    if exercise is not None:
        with open(os.path.join(source_dir, exercise.file)) as f:
            replaced = replace_body(f.read(), exercise.function, body)
    os.makedirs(target_dir, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy(os.path.join(source_dir, name), os.path.join(target_dir, name))
    if exercise is not None:
        with open(os.path.join(target_dir, exercise.file), "w") as f:
            f.write(replaced)


def run_tests(directory, tests, stop_at_first_failure=False, timeout=None, columns=1000):
    """Run the named tests (of test_trpo.py, or "file::name") in `directory`, in the order given;
    returns (all passed, pytest's report). BLAS gets one thread: its matrices are tiny, and `verify`
    runs two of these at once. Its report is `columns` wide (1000 by default: summary lines in full, for
    `mutants` to read). With a timeout (seconds), pytest runs in a process group of its own,
    which is killed, whatever it started included, when the time is up (subprocess.TimeoutExpired is
    raised) or when this process is interrupted.

    "All passed" is pytest's own account, read from the JUnit XML report it writes as it finishes: at
    least one test ran, none failed, none erred. An exit code of 0 alone is not enough: code under test
    that ends the process early (os._exit(0)) leaves no report, and fails."""
    ids = [name if "::" in name else f"test_trpo.py::{name}" for name in tests]
    own_group = timeout is not None and os.name == "posix"
    report_file = os.path.join(directory, ".exercise-report.xml")
    if os.path.exists(report_file):
        os.remove(report_file)
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "--tb=short", "-rfE", "--no-header",
                                "-p", "no:cacheprovider", f"--junitxml={report_file}",
                                *(["-x"] if stop_at_first_failure else []), *ids],
                               cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=own_group,
                               env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                                    "MKL_NUM_THREADS": "1", "COLUMNS": str(columns)})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:  # the time is up, Ctrl-C, SIGTERM or a closed terminal: nothing may go on running
        if own_group:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            process.kill()
        process.communicate()
        raise
    report = stdout + stderr
    counts = junit_counts(report_file)
    if counts is None:
        return False, report + (f"\nthe test process ended (exit code {process.returncode}) before pytest "
                                f"could report: something in the code under test ended it early.\n")
    passed = counts["tests"] - counts["skipped"] > 0 and counts["failures"] == counts["errors"] == 0
    return process.returncode == 0 and passed, report


def junit_counts(path):
    """The tests, failures, errors and skipped counts of pytest's JUnit XML report, or None without one."""
    import xml.etree.ElementTree as ElementTree
    try:
        suite = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    if suite is None:
        return None
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def read_marker(directory):
    """The exercise named in `directory`'s marker file, or None if it has none (or it cannot be read)."""
    try:
        with open(os.path.join(directory, MARKER)) as f:
            lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except (OSError, UnicodeDecodeError):
        return None
    return lines[0] if lines else None


def write_marker(directory, exercise):
    with open(os.path.join(directory, MARKER), "w") as f:
        f.write(f"# written by exercise.py make: this folder is the copy made for the exercise below, "
                f"which exercise.py check reads\n{exercise.name}\n")


def holds_the_project(directory):
    """Whether `directory` is this project, or holds a project of its own (its exercise.py; a copy made by
    `make` has none)."""
    return os.path.isfile(os.path.join(directory, "exercise.py")) or os.path.samefile(directory, HERE)


def make_refusal(exercise, target, force):
    """Why `make` must not write its copy into `target` (one sentence), or None. It writes only into a new
    or empty folder, or over a copy it made itself (with --force): never over the project's own files."""
    if os.path.exists(target) and not os.path.isdir(target):
        return f"'{target}' is a file, not a folder; give --into a folder."
    if not os.path.isdir(target):
        return None
    if holds_the_project(target):
        return (f"'{target}' holds the project's own code, which make would write over; give --into another "
                f"folder (the default is exercise-{exercise.name}).")
    made_for = read_marker(target)
    present = [name for name in PROJECT_FILES if os.path.exists(os.path.join(target, name))]
    if present and made_for is None:
        return (f"'{target}' already holds {present[0]}, which make would write over, and make did not write "
                f"it (there is no {MARKER} file); give --into a new or empty folder.")
    if made_for is None and os.listdir(target):
        return (f"'{target}' holds files that make did not write (there is no {MARKER} file); give --into a "
                f"new or empty folder.")
    if present and not force:
        return (f"'{target}' holds a copy already, maybe with your work in it; check it with "
                f"'python exercise.py check {made_for} --from {target}', or start over with --force "
                f"(which replaces it).")
    return None


def command_list(args):
    for exercise in EXERCISES:
        print(f"{exercise.name:30s} {exercise.file}: {exercise.function} - {exercise.summary}")


def os_error(error):
    """An OSError in words: what went wrong, and with which file."""
    where = f" ({error.filename})" if error.filename else ""
    return f"{(error.strerror or str(error)).lower()}{where}"


def command_make(args):
    exercise = BY_NAME[args.name]
    target = args.into if args.into is not None else f"exercise-{exercise.name}"
    if not target.strip():
        print("error: --into needs a folder name; leave it out for exercise-NAME.", file=sys.stderr)
        return 2
    refusal = make_refusal(exercise, target, args.force)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    with open(os.path.join(HERE, exercise.file)) as f:
        replace_body(f.read(), exercise.function, blank_body(exercise))  # the function is there: before any write
    try:
        os.makedirs(target, exist_ok=True)
        write_marker(target, exercise)  # first: a copy cut short is still known as one
        copy_project(HERE, target, exercise, blank_body(exercise))
    except OSError as error:
        print(f"error: cannot write the copy into '{target}': {os_error(error)}; give --into a folder you "
              f"can write to.", file=sys.stderr)
        return 2
    print(f"wrote {target}/: {exercise.file} has {exercise.function} to fill in (see EXERCISES.md).\n"
          f"check it with:  python exercise.py check {exercise.name} --from {target}")


def command_check(args):
    """Run the exercise's tests, this project's own, on the exercise's file from the student's folder."""
    exercise = BY_NAME[args.name]
    directory = args.source or f"exercise-{exercise.name}"
    answer = os.path.join(directory, exercise.file)
    if not os.path.isfile(answer):
        print(f"error: no {exercise.file} in '{directory}'; make one with: python exercise.py make {args.name}",
              file=sys.stderr)
        return 2
    made_for = read_marker(directory)
    if made_for is None:
        print(f"error: '{directory}' was not made by 'python exercise.py make {exercise.name}' (it has no "
              f"{MARKER} file naming the exercise); make a copy with that command, or, for a copy made before "
              f"{MARKER} files existed, write the exercise's name into {os.path.join(directory, MARKER)}.",
              file=sys.stderr)
        return 2
    if made_for != exercise.name:
        print(f"error: '{directory}' is the copy made for exercise {made_for}, not {exercise.name}; check it "
              f"with: python exercise.py check {made_for} --from {directory}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        try:
            copy_project(HERE, scratch)  # the reference code and tests, then the student's one file
            shutil.copyfile(answer, os.path.join(scratch, exercise.file))
            with open(os.path.join(scratch, "pytest.ini"), "w") as f:
                f.write("[pytest]\n")  # no configuration from the folders above
        except OSError as error:
            print(f"error: cannot copy {answer} to check it: {os_error(error)}.", file=sys.stderr)
            return 2
        print(f"checking {exercise.function} in {answer} with this project's tests "
              f"({os.path.join(HERE, 'test_trpo.py')})", flush=True)
        try:
            passed, report = run_tests(scratch, exercise.tests, timeout=args.timeout,
                                       columns=shutil.get_terminal_size().columns)
        except subprocess.TimeoutExpired:
            print(f"{exercise.name}: the answer did not finish in {args.timeout:g} s, so the tests were stopped: "
                  f"look for a loop that never ends (or allow more time with --timeout).")
            return 1
    print(report.rstrip())
    print(f"\n{exercise.name}: " + ("all tests pass. Well done." if passed else
                                    "not yet: the failures above say what was expected and what came out."))
    return 0 if passed else 1


def command_verify(args):
    """For every exercise: reference passes, blanked fails, the wrong version fails."""
    unsound = 0
    with tempfile.TemporaryDirectory() as tmp:
        reference = os.path.join(tmp, "reference")
        copy_project(HERE, reference)
        all_tests = sorted({t for e in EXERCISES for t in e.tests})
        reference_ok, report = run_tests(reference, all_tests)
        if not reference_ok:
            print(report)
            print("the reference code fails the exercises' tests")
            return 1
        for exercise in EXERCISES:
            verdicts = []
            for label, body in (("blanked", blank_body(exercise)), ("wrong", exercise.wrong)):
                copy = os.path.join(tmp, f"{exercise.name}-{label}")
                copy_project(HERE, copy, exercise, body)
                passed, _ = run_tests(copy, exercise.tests)
                verdicts.append(f"{label} {'PASSES (unsound)' if passed else 'fails'}")
                unsound += passed
            print(f"{exercise.name:30s} reference passes, " + ", ".join(verdicts))
    if unsound:
        print(f"{unsound} unsound exercise version(s): a test passed that must fail")
    else:
        print(f"{len(EXERCISES)} exercises verified")
    print()
    mutants_failed = command_mutants(args)
    return 1 if unsound or mutants_failed else 0


def prose_spans(source):
    """(start, end) character offsets of the docstrings and comments of a Python source."""
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    spans = [(line_starts[token.start[0] - 1] + token.start[1], line_starts[token.end[0] - 1] + token.end[1])
             for token in tokenize.generate_tokens(io.StringIO(source).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                # whole lines: in this project no code shares a line with a docstring
                spans.append((line_starts[first.lineno - 1], line_starts[first.end_lineno]))
    return spans


def code_occurrences(source, text):
    """The offsets at which `text` occurs in the code of `source`, outside docstrings and comments."""
    spans = prose_spans(source)
    found, start = [], source.find(text)
    while start != -1:
        if not any(a <= start < b for a, b in spans):
            found.append(start)
        start = source.find(text, start + 1)
    return found


def copy_test_files(tests, directory):
    """Copy into `directory` the test files named in `tests` ("file::name") that PROJECT_FILES leaves out
    (test_program.py)."""
    for test_file in {test.split("::")[0] for test in tests if "::" in test} - set(PROJECT_FILES):
        shutil.copy(os.path.join(HERE, test_file), os.path.join(directory, test_file))


def try_mutant(mutant, directory):
    """Put one bug into a copy of the project in `directory` and run its tests, stopping at the first failure.
    Returns (verdict, the line to print): verdict "caught", "SURVIVED" or "BROKEN"."""
    copy_project(HERE, directory)
    copy_test_files(mutant.tests, directory)
    path = os.path.join(directory, mutant.file)
    with open(path) as f:
        source = f.read()
    at, = code_occurrences(source, mutant.original)
    with open(path, "w") as f:
        f.write(source[:at] + mutant.replacement + source[at + len(mutant.original):])
    passed, report = run_tests(directory, mutant.tests, stop_at_first_failure=True)
    if passed:
        return "SURVIVED", "SURVIVED: every named test passed"
    failure = re.search(r"^(?:FAILED|ERROR) \S+?::(\S+)(?: - (\w+))?", report, re.MULTILINE)
    if failure is None:  # the tests did not even run: an import or collection error
        return "BROKEN", "BROKEN: the tests could not run with it:\n" + textwrap.indent(report.strip()[-1500:], "    ")
    test, error = failure.group(1), failure.group(2) or "error"
    how = "an assertion" if error in ("assert", "AssertionError") else error  # else it crashed: still caught
    return "caught", f"caught by {test} ({how})"


def command_mutants(args):
    """Every bug of MUTANTS must make one of its named tests fail; its original code must occur exactly once."""
    started = time.perf_counter()
    sources = {}
    for name in {mutant.file for mutant in MUTANTS}:
        with open(os.path.join(HERE, name)) as f:
            sources[name] = f.read()
    stale = {i for i, mutant in enumerate(MUTANTS)
             if len(code_occurrences(sources[mutant.file], mutant.original)) != 1}
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        reference = os.path.join(tmp, "reference")
        copy_project(HERE, reference)
        all_tests = list(dict.fromkeys(test for mutant in MUTANTS for test in mutant.tests))
        copy_test_files(all_tests, reference)
        reference_run = pool.submit(run_tests, reference, all_tests)
        runs = {i: pool.submit(try_mutant, mutant, os.path.join(tmp, f"mutant-{i}"))
                for i, mutant in enumerate(MUTANTS) if i not in stale}
        reference_ok, report = reference_run.result()
        if not reference_ok:
            print(report)
            print("the reference code fails the mutants' tests: a failure would prove nothing")
            for run in runs.values():
                run.cancel()
            return 1
        counts = {"caught": 0, "SURVIVED": 0, "BROKEN": 0, "stale": len(stale)}
        for i, mutant in enumerate(MUTANTS):
            if i in stale:
                n = len(code_occurrences(sources[mutant.file], mutant.original))
                line = f"NO LONGER APPLIES: its original code occurs {n} times in {mutant.file}, not once"
            else:
                verdict, line = runs[i].result()
                counts[verdict] += 1
            print(f"{i + 1:2d}. {mutant.file:13s} {mutant.description}: {line}")
    seconds = time.perf_counter() - started
    print(f"{len(MUTANTS)} bugs: {counts['caught']} caught, {counts['SURVIVED']} survived, "
          f"{counts['stale']} no longer apply, {counts['BROKEN']} broken ({seconds:.0f} s)")
    return 0 if counts["caught"] == len(MUTANTS) else 1


def positive_seconds(text):
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not '{text}'")
    return seconds


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option ends with one sentence on stderr and exit code 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help).\n")


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the exercises")
    make = commands.add_parser("make", help="write a copy of the project with one function blanked")
    make.add_argument("name", choices=list(BY_NAME))
    make.add_argument("--into", help="folder for the copy (default exercise-NAME)")
    make.add_argument("--force", action="store_true",
                      help="replace a copy that is there already (the work in it is lost)")
    check = commands.add_parser("check", help="run an exercise's tests on a student's copy")
    check.add_argument("name", choices=list(BY_NAME))
    check.add_argument("--from", dest="source", help="the student's folder (default exercise-NAME)")
    check.add_argument("--timeout", type=positive_seconds, default=120.0,
                       help="seconds the tests may take before they are stopped (default 120)")
    commands.add_parser("verify", help="prove every exercise's tests pass on the reference and fail when "
                                       "the function is blanked or wrong; then run the mutants")
    commands.add_parser("mutants", help="put each plausible bug of MUTANTS into a copy of the code and prove "
                                        "that its tests fail")
    args = parser.parse_args(argv)
    stop_on_signals()
    if args.command in ("check", "verify", "mutants") and importlib.util.find_spec("pytest") is None:
        print("error: the exercises' tests run with pytest, which is not installed; install it with: "
              "pip install pytest", file=sys.stderr)
        return 2
    try:
        if args.command != "list":
            check_project_files()
        return {"list": command_list, "make": command_make, "check": command_check,
                "verify": command_verify, "mutants": command_mutants}[args.command](args) or 0
    except ProjectChanged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nstopped: {args.command} did not finish.", file=sys.stderr)
        return 128 + (stop_signal[0] if stop_signal else signal.SIGINT)


stop_signal = []  # the signal that stopped the command, if one did


def stop_on_signals():
    """SIGTERM and SIGHUP (a closed terminal) stop a command as Ctrl-C does, by KeyboardInterrupt, so that
    the tests it is running are stopped with it (run_tests); the exit code is 128 + the signal's number."""
    def stop(signum, frame):
        stop_signal.append(signum)
        raise KeyboardInterrupt
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)


if __name__ == "__main__":
    sys.exit(main())
