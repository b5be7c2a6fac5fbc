"""trpo_numpy.py: Trust Region Policy Optimization in plain NumPy, on Gymnasium's LunarLander-v3.

Read it beside the papers. It follows the practical algorithm of TRPO Sec. 6, with the
value function of the GAE paper, top to bottom:

  1. sample trajectories with the current policy pi_old        (Sec. 5.1 single path; Sec. 5.2 vine)
  2. estimate advantages                                       (GAE paper Eq. 16, or return-to-go)
  3. build the surrogate L(theta) and its gradient g           (Eq. 14; the vine's Eq. 15 or 16)
  4. solve F x = g by conjugate gradient, F the Fisher matrix  (Appendix C, C.1)
  5. scale to the trust region, beta = sqrt(2 delta / x^T F x) (Appendix C)
  6. backtracking line search: KLbar <= delta and L improves   (Appendix C)
  7. fit the value function for the next advantages            (GAE paper Sec. 5)

(The paper's Algorithm 1 is the theoretical policy iteration of Sec. 3, with exact advantages
and the penalty of Theorem 1; Sec. 6 turns it into the algorithm coded here.) Every derivative
is written by hand in network.py and checked against finite differences in test_trpo.py; no
autodiff framework is used anywhere. What is not the algorithm lives in files a reader may
skip: parallel.py (other processes), run_files.py (files on disk, checkpoints), cli.py (the
command line, environments by name, evaluation and the animation). Anything here that is not in the papers says so: "an addition".

References:
  Schulman, Levine, Moritz, Jordan, Abbeel 2015. Trust Region Policy Optimization. arXiv:1502.05477
  Schulman, Moritz, Levine, Jordan, Abbeel 2015. High-Dimensional Continuous Control Using
      Generalized Advantage Estimation. arXiv:1506.02438
  Kakade & Langford 2002. Approximately Optimal Approximate Reinforcement Learning.

Run it:
  python trpo_numpy.py                   # single path on LunarLander-v3, writes runs/single-seed0/
  python trpo_numpy.py --scheme vine     # the vine
  python trpo_numpy.py --help            # every option, with its paper symbol
"""

import parallel  # first: it sets up the process (BLAS threads, memory, Ctrl-C) before NumPy loads

parallel.set_up_process(main=__name__ == "__main__")

import concurrent.futures
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import cli
import run_files
from cli import EVAL_SEED_BASE, direct_step, env_dims, make_env, reward_threshold  # environments by name
from network import MLP, Adam, Categorical, DiagonalGaussian, policy_network, sample_one, softmax
from run_files import UserError


# ----------------------------------------------------------------------------
# Hyperparameters: one place, each with its paper symbol. cli.py builds --help from these.
# ----------------------------------------------------------------------------

def option(default, help, **argparse_settings):
    """A Config field with its one line of --help (and argparse settings such as choices)."""
    return field(default=default, metadata={"help": help, **argparse_settings})


@dataclass
class Config:
    scheme: str = option("single", "sampling scheme: 'single' path (Sec. 5.1) or 'vine' (Sec. 5.2)",
                         choices=["single", "vine"])
    env: str = option("LunarLander-v3", "Gymnasium environment id, with a flat Box observation, and Discrete "
                                         "actions (a categorical policy) or Box ones (a Gaussian policy)")
    seed: int = option(0, "random seed: the same seed and --workers give the same run, to the bit, on one machine")
    total_steps: int = option(1_000_000, "environment steps to train for, summed over environments (the vine "
                                         "counts its trunk's)")
    num_envs: int = option(32, "environments sampled side by side, with one batched policy pass per time step")
    workers: int = option(2, "processes, one per core, each stepping a share of the environments; 1 = this one")
    steps_per_env: int = option(512, "steps per environment per iteration: the batch is num_envs x steps_per_env")
    hidden: tuple = option((64, 64), "hidden layer sizes of the tanh policy and value networks")
    max_kl: float = option(0.04, "delta, the trust region: the largest mean KL(pi_old || pi_new) of a step (Eq. 12)")
    damping: float = option(0.1, "damping (an addition): CG solves (F + damping I) x = g, better conditioned "
                                 "than F x = g")
    fisher_subsample: int = option(2, "k: F on every k-th of the step's states, the batch in (time, env) "
                                      "order (Appendix C subsamples)")
    cg_iters: int = option(10, "conjugate-gradient iterations to solve (F + damping I) x = g (Appendix C: 10)")
    backtrack_coeff: float = option(0.8, "the line search shrinks the step by this factor at each backtrack")
    max_backtracks: int = option(10, "line-search tries before the step is abandoned and theta_old kept")
    gamma: float = option(0.999, "gamma, the discount factor")
    lam: float = option(0.97, "lambda of GAE(gamma, lambda), GAE paper Eq. 16; also the vine branches' lambda-return")
    advantage: str = option("gae", "'gae': GAE(lambda) with a learned V; 'mc': return-to-go (V at cuts) minus V",
                            choices=["gae", "mc"])
    normalize_advantages: bool = option(True, "single path: standardise each batch's advantages (an addition)")
    vf_lr: float = option(2e-3, "Adam learning rate of the value network")
    vf_epochs: int = option(5, "passes over the batch when fitting the value network, each iteration")
    vf_minibatch: int = option(256, "minibatch size of the value-network fit")
    vine_states: int = option(256, "vine: N, the number of states in the rollout set")
    vine_horizon: int = option(100, "vine: H, the steps of each branch, its first action included")
    vine_actions: int = option(0, "vine: 0 branches on every action (Eq. 15); K > 0 on K actions drawn from q "
                                  "(Eq. 16)")
    vine_proposal: str = option("uniform", "vine with K > 0: q, the distribution the K actions are drawn from",
                                choices=["uniform", "pi_old"])
    vine_bootstrap: bool = option(True, "vine: Q is the branch's lambda-return from V (an addition); "
                                        "--no-vine-bootstrap: the paper's Monte-Carlo Q")
    vine_restore: str = option("auto", "vine: restore a state by 'fork', by seeded 'replay', or 'auto' (the "
                                       "cheaper); all exact", choices=["auto", "fork", "replay"])
    log_std_init: float = option(0.0, "continuous actions: log sigma of the Gaussian policy at the start, the "
                                      "same for every action dimension")
    entropy_coef: float = option(0.0, "weight of an entropy bonus in the surrogate (an addition; 0 is the paper)")
    trust_region: bool = option(True, "--no-trust-region: the full natural-gradient step, with no line search")
    stop_return: float = option(None, "stop once the mean return of the last 100 episodes reaches this")
    save_every: int = option(10, "write checkpoint.npz and policy.npz every this many iterations (the plots at "
                                 "most once a minute), and at the end")
    out: str = option("", "output folder, new or empty; by default runs/<scheme>-seed<seed>, numbered -2, -3, ...")

    @property
    def batch_size(self):
        return self.num_envs * self.steps_per_env

    def out_dir(self):
        return self.out or os.path.join("runs", f"{self.scheme}-seed{self.seed}")


# Where the vine's defaults differ from Config's. Its trunk is half the single path's batch
# (many finished episodes per iteration for the value fit, at little cost next to the branches);
# its estimate of the advantages (all actions, for discrete ones) has so little noise that larger
# steps pay; its Fisher is taken over the few rollout states, every one of them; its value fit keeps
# the learning rate its benchmark was made with (the single path's larger one brought more seeds to
# 200: RESULTS.md). Unless told otherwise, a vine run stops once its rolling mean reaches
# VINE_STOP_RETURN, or the environment's reward threshold, or after VINE_ITERATIONS iterations: a run
# a class can wait for.
SCHEME_DEFAULTS = {"single": {},
                   "vine": {"num_envs": 32, "steps_per_env": 256, "max_kl": 0.05, "fisher_subsample": 1,
                            "vf_lr": 1e-3}}
VINE_ITERATIONS = 150
# Our choice, past the 200 at which Gymnasium counts LunarLander solved: a vine run stopped the moment its
# rolling mean touched 200 left landers that scored 189 to 254 flown greedy (seeds 0 to 8); trained on
# to 240, 2 to 20 iterations more, they scored 232 to 259 (seeds 0 to 9, RESULTS.md). The continuous
# lander's vine, stopped at 200, flew well only with its noise (greedy 20 to 198); stopped at 240, its
# landers scored 167 to 220 greedy and 238 to 260 sampled (seeds 0 to 2), better greedy than at 200 on
# each of seven seeds, but still with the gap. --stop-return 200 stops at the threshold.
VINE_STOP_RETURN = {"LunarLander-v3": 240.0, "LunarLanderContinuous-v3": 240.0}
SCHEME_NAMES = {"single": "single path", "vine": "vine"}

# Where the defaults for continuous actions (a Gaussian policy) differ, on top of the scheme's; chosen
# on LunarLanderContinuous-v3 over ten seeds (RESULTS.md). A smaller initial sigma (e^-1 = 0.37 for
# actions in [-1, 1]) spares the lander the noise it must otherwise unlearn, half the batch gives
# twice the iterations, and a stronger value fit keeps every seed on course. The vine draws K = 4
# actions from q = pi_old (Eq. 16): the paper's q for continuous problems (Sec. 5.2) and its rollouts
# per state (Appendix E); there is no "every action" of a continuous space.
CONTINUOUS_SHARED = {"gamma": 0.99, "log_std_init": -1.0, "vf_lr": 1e-3, "vf_epochs": 10, "vf_minibatch": 128}
CONTINUOUS_DEFAULTS = {"single": {**CONTINUOUS_SHARED, "num_envs": 16},
                       "vine": {**CONTINUOUS_SHARED, "vine_actions": 4, "vine_proposal": "pi_old"}}


def scheme_config(scheme="single", **given):
    """The Config of a run: the settings given, and for the rest the scheme's defaults (SCHEME_DEFAULTS),
    and those of continuous actions (CONTINUOUS_DEFAULTS) if the environment's are."""
    defaults = SCHEME_DEFAULTS[scheme]
    if env_dims(given.get("env", Config.env))[2]:  # continuous actions
        defaults = {**defaults, **CONTINUOUS_DEFAULTS[scheme]}
    cfg = Config(**{**defaults, **given, "scheme": scheme})
    if scheme == "vine" and "total_steps" not in given:
        cfg.total_steps = VINE_ITERATIONS * cfg.batch_size
    if scheme == "vine" and "stop_return" not in given:
        cfg.stop_return = VINE_STOP_RETURN.get(cfg.env, reward_threshold(cfg.env))
    return cfg


# ----------------------------------------------------------------------------
# 1. Sampling: the single-path scheme (TRPO Sec. 5.1)
# ----------------------------------------------------------------------------

# Training resets its episodes with seeds below this; evaluation (cli.py) with seeds from it on.
TRAIN_SEED_LIMIT = EVAL_SEED_BASE


class SinglePathSampler:
    """Runs environments side by side under pi_old and records their transitions.

    Episodes carry over from one batch to the next: an episode cut by the end of a batch
    goes on in the next one, and its value bootstrap covers the cut. Environment e draws
    its actions, and the seed of each of its episodes, from its own generator: a run is
    reproducible from --seed, and an environment follows the same trajectory in whichever
    process it runs.
    """

    def __init__(self, envs, env_seeds, action_seeds):
        self.envs = envs
        self.action_rngs = [np.random.default_rng(int(s)) for s in action_seeds]
        self.episode_seed = [int(s) for s in env_seeds]
        self.obs = np.array([env.reset(seed=s)[0] for env, s in zip(envs, self.episode_seed)], dtype=np.float64)
        self.episode_return = np.zeros(len(envs))  # running return of each environment's current episode

    def sample(self, net, theta, steps):
        """Step every environment `steps` times under pi_theta. Returns a dict of (T, E, ...) arrays.

        A continuous action is recorded as sampled, and the environment takes it clipped to its
        bounds (cli.make_env): the log-prob is the sampled action's, as in most implementations.
        `next_obs[t, e]` is the observation that really followed action t, the final one
        when the episode ended there (before the reset): V(next_obs) is what a truncated
        episode, or the batch's last step, bootstraps with. `episode_return[t, e]` is the
        return of the episode that ended at step t, NaN where none ended.
        """
        E, D = self.obs.shape
        dist = net.distribution  # categorical (discrete actions) or diagonal Gaussian (continuous)
        batch = {
            "obs": np.zeros((steps, E, D)),
            "next_obs": np.zeros((steps, E, D)),
            "rewards": np.zeros((steps, E)),
            "terminated": np.zeros((steps, E), dtype=bool),
            "truncated": np.zeros((steps, E), dtype=bool),
            "episode_return": np.full((steps, E), np.nan),
        }
        logits_steps, action_steps = [], []
        rewards, next_obs, obs_after = [0.0] * E, [None] * E, [None] * E  # step t, per environment
        for t in range(steps):
            # (E, A): ONE forward pass for all environments (kept: the vine's q = pi_old reads it).
            # For a Gaussian policy these "logits" are z = [mu, log sigma], (E, 2d).
            self.logits, _ = net.forward(theta, self.obs)
            action_steps.append(dist.sample(self.logits, [dist.noise(rng, net.sizes[-1])
                                                          for rng in self.action_rngs]))
            # ints for the loop below; continuous actions stay rows of the (E, d) array, as the env's clip wants
            actions = action_steps[-1].tolist() if action_steps[-1].ndim == 1 else action_steps[-1]
            batch["obs"][t] = self.obs
            logits_steps.append(self.logits)
            # The hot path: Python lists per environment, copied into the arrays once per step.
            for e in range(E):
                obs, rewards[e], terminated, truncated, _ = self.step(t, e, actions[e])
                self.episode_return[e] += rewards[e]
                next_obs[e] = obs
                if terminated or truncated:
                    next_obs[e] = np.array(obs)  # a copy: the reset below must not change it
                    batch["terminated"][t, e] = terminated
                    batch["truncated"][t, e] = truncated
                    batch["episode_return"][t, e] = self.episode_return[e]
                    self.episode_return[e] = 0.0
                    self.episode_seed[e] = int(self.action_rngs[e].integers(TRAIN_SEED_LIMIT))
                    obs = self.start_episode(e)
                obs_after[e] = obs
            batch["rewards"][t] = rewards
            batch["next_obs"][t] = next_obs
            self.obs = np.array(obs_after, dtype=np.float64)
        batch["logits"] = np.array(logits_steps)  # (T, E, A), pi_old's logits at every state ((T, E, 2d): mu, log sigma)
        # (T, E) integers, or (T, E, d) floats: the actions sampled, before the environment clips them
        batch["actions"] = np.array(action_steps)
        return batch

    def step(self, t, e, action):
        """Environment e takes its step t. (The vine's trunk also branches here: VineTrunk.step.)"""
        return self.envs[e].step(action)

    def start_episode(self, e):
        """Reset environment e with its next episode's seed; returns the first observation."""
        return self.envs[e].reset(seed=self.episode_seed[e])[0]

    def close(self):
        for env in self.envs:
            env.close()


def single_path_sampler(env_id, env_seeds, action_seeds):
    """A SinglePathSampler on new environments: what each worker of ParallelSampler owns."""
    return SinglePathSampler([make_env(env_id) for _ in env_seeds], env_seeds, action_seeds)


# ----------------------------------------------------------------------------
# 2. Advantages
# ----------------------------------------------------------------------------

def gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """Generalized advantage estimation, GAE paper Eq. (16), on (T, E) arrays:

        delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1},   done = terminated or truncated

    `terminated` means the task ended: there is no future reward, bootstrap with 0.
    `truncated` means a time limit stopped it: the future still exists, so delta
    bootstraps with V(final observation), and only the sum over later deltas stops.
    The last step of the batch bootstraps with V(next_obs) the same way.
    """
    advantages = np.zeros_like(rewards)
    next_advantage = np.zeros(rewards.shape[1:])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_values[t] * ~terminated[t] - values[t]
        continues = ~(terminated[t] | truncated[t])
        next_advantage = delta + gamma * lam * continues * next_advantage
        advantages[t] = next_advantage
    return advantages


def discounted_returns(rewards, next_values, terminated, truncated, gamma):
    """Return-to-go Q_t = sum_l gamma^l r_{t+l} over the rest of the episode, TRPO Sec. 5.1's estimate of Q.

    Where the episode goes on past what we saw (a time-limit truncation, or the end of
    the batch) the tail is estimated by gamma * V(next_obs), an addition (the paper does not
    say how a cut episode's tail is estimated); after a terminated step there is no tail.
    Q_t - V(s_t) equals GAE with lam = 1.
    """
    returns = np.zeros_like(rewards)
    next_return = next_values[-1]  # the episode continues past the batch: bootstrap
    for t in reversed(range(len(rewards))):
        ended = terminated[t] | truncated[t]
        tail = np.where(ended, next_values[t], next_return)  # an episode ending here: its own bootstrap
        returns[t] = rewards[t] + gamma * tail * ~terminated[t]
        next_return = returns[t]
    return returns


def estimate_advantages(batch, value_fn, cfg):
    """Advantages A_t and value targets for the batch, flattened to (T * E,).

    Returns (advantages, value_targets, values), values = V(s_t) before this batch's fit.
    The targets are A_t + V(s_t): the lambda-return with 'gae' (what most implementations
    fit; the GAE paper's Sec. 5 regresses on the discounted return), the return-to-go with 'mc'."""
    T, E, D = batch["obs"].shape
    values = value_fn.predict(batch["obs"].reshape(-1, D)).reshape(T, E)
    next_values = value_fn.predict(batch["next_obs"].reshape(-1, D)).reshape(T, E)
    if cfg.advantage == "gae":
        advantages = gae(batch["rewards"], values, next_values, batch["terminated"], batch["truncated"],
                         cfg.gamma, cfg.lam)
        targets = advantages + values
    else:
        targets = discounted_returns(batch["rewards"], next_values, batch["terminated"], batch["truncated"],
                                     cfg.gamma)
        advantages = targets - values
    return advantages.ravel(), targets.ravel(), values.ravel()


def standardize(advantages):
    """(A - mean) / std: the mean acts as a baseline; the scale does not change the step, which is
    rescaled to the trust region, only CG's stopping tolerance and an entropy bonus's weight."""
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


# ----------------------------------------------------------------------------
# 3. The surrogate objective (Eq. 14) and the mean KL (Eq. 12)
# ----------------------------------------------------------------------------

def surrogate(logits, actions, logp_old, advantages, dist=Categorical):
    """Single-path surrogate of Eq. (14) with q = pi_old:  L(theta) = mean_i [pi_theta(a_i|s_i) / pi_old(a_i|s_i) * A_i].

    Returns (L, dL/dlogits). Since d ratio / dz = ratio * d log pi(a|s) / dz,
    dL/dz_i = ratio_i * A_i * d log pi(a_i|s_i)/dz_i / N: for a categorical (onehot(a_i) - p_i),
    for a Gaussian [(a - mu) / sigma^2, (a - mu)^2 / sigma^2 - 1] (network.py).
    At theta = theta_old the ratio is 1 and this is the policy gradient."""
    N = len(actions)
    ratio = np.exp(dist.log_prob(logits, actions) - logp_old)
    grad = dist.log_prob_grad(logits, actions) * (ratio * advantages / N)[:, None]
    return np.mean(ratio * advantages), grad


def single_path_problem(batch, dist=Categorical):
    """The states of the single-path step and what Eq. (14) needs there: (states (N, D), actions (N,)
    or (N, d), log pi_old(a|s) (N,)), N = T * E in row-major (t, e) order, as the advantages are."""
    states = batch["obs"].reshape(-1, batch["obs"].shape[-1])
    actions = batch["actions"].reshape(len(states), *batch["actions"].shape[2:])
    return states, actions, dist.log_prob(batch["logits"].reshape(len(states), -1), actions)


def entropy_bonus(logits, dist=Categorical):
    """Mean policy entropy H = mean_i H(pi(.|s_i)) and its gradient in the logits, dist.entropy_grad / N.
    An addition (--entropy-coef), not in the paper: it rewards keeping the policy random, against
    settling early on a mediocre behaviour."""
    return float(np.mean(dist.entropy(logits))), dist.entropy_grad(logits) / len(logits)


def with_entropy_bonus(surrogate_of_logits, coef, dist=Categorical):
    """The objective L(theta) + coef * H(theta): the surrogate plus the entropy bonus."""
    def objective(logits):
        L, dL = surrogate_of_logits(logits)
        H, dH = entropy_bonus(logits, dist)
        return L + coef * H, dL + coef * dH
    return objective


def mean_kl(logits_old, logits_new, dist=Categorical):
    """KLbar(theta_old, theta) = mean_i KL(pi_old(.|s_i) || pi_theta(.|s_i)), the constraint of Eq. (12)."""
    return np.mean(dist.kl(logits_old, logits_new))


# ----------------------------------------------------------------------------
# 4.-6. The step: conjugate gradient, maximal step, line search (Appendix C)
# ----------------------------------------------------------------------------

def fisher_vector_product(net, theta, cache, logits, v, damping, slopes=None):
    """(F + damping I) v without forming F (Appendix C.1).

    F = (1/N) sum_i J_i^T M_i J_i is the Hessian of KLbar at theta_old, J_i = dz_i/dtheta and
    M_i the Fisher of the distribution in its parameters z_i = `logits[i]`: diag(p_i) - p_i p_i^T
    for a categorical, diag(1/sigma^2, 2) in (mu, log sigma) for a Gaussian. Three passes:
      u = J v            forward-mode pass (net.jvp)                 # (N, A), or (N, 2d) for a Gaussian
      w = M u, row by row (net.distribution.fisher_product)           # the same shape
      F v = J^T w / N    one ordinary backward pass (net.backward)    # (num_params,)
    `slopes` (net.tanh_slopes(cache)) is passed on to both passes, if the caller has it.
    """
    u = net.jvp(theta, cache, v, slopes)
    w = net.distribution.fisher_product(logits, u)
    return net.backward(theta, cache, w, slopes) / len(logits) + damping * v


def conjugate_gradient(matrix_vector_product, b, iters, residual_tol=1e-10):
    """Solve A x = b for symmetric positive-definite A given only x -> A x (Nocedal & Wright, Alg. 5.2).

    Stops early when the residual is tiny, or when p^T A p is not positive (A should be
    positive definite; numerical trouble must not divide by ~0 or flip the direction)."""
    x = np.zeros_like(b)
    r = b.copy()  # residual; should be b - A x, but x = 0
    p = r.copy()  # search direction
    r_dot_r = r @ r
    for _ in range(iters):
        Ap = matrix_vector_product(p)
        p_Ap = p @ Ap
        if not p_Ap > 1e-12 * (p @ p):
            break
        alpha = r_dot_r / p_Ap
        x += alpha * p
        r -= alpha * Ap
        new_r_dot_r = r @ r
        if new_r_dot_r < residual_tol:
            break
        p = r + (new_r_dot_r / r_dot_r) * p
        r_dot_r = new_r_dot_r
    return x


def maximal_step(x, x_F_x, max_kl):
    """beta x with beta = sqrt(2 delta / x^T F x) (Appendix C): the longest step along x whose
    quadratic model of the KL, 1/2 (beta x)^T F (beta x), equals delta. trpo_step passes
    x^T (F + damping I) x, the matrix it solved with, so its step is a little shorter than
    the undamped model's (the log shows the KL reached)."""
    return np.sqrt(2 * max_kl / x_F_x) * x


def line_search(evaluate, theta_old, full_step, max_kl, backtrack_coeff, max_backtracks, min_improvement=0.0):
    """Backtracking line search on the nonlinear problem (Appendix C).

    `evaluate(theta)` returns (L(theta) - L(theta_old), KLbar(theta_old, theta)). Try
    theta_old + backtrack_coeff^k * full_step for k = 0, 1, ...; accept the first step whose
    mean KL is at most delta (never above: no slack) and whose surrogate improves by more
    than min_improvement. Returns (success, theta, improvement, kl, backtracks). On failure
    theta is theta_old itself, not the last rejected try; on success it is the last theta
    evaluated (trpo_step reuses that evaluation's logits).
    """
    for k in range(max_backtracks):
        theta = theta_old + backtrack_coeff ** k * full_step
        improvement, kl_reached = evaluate(theta)
        if kl_reached <= max_kl and improvement > min_improvement:
            return True, theta, improvement, kl_reached, k
    return False, theta_old, 0.0, 0.0, max_backtracks


def trpo_step(net, theta_old, states, surrogate_of_logits, cfg):
    """One TRPO policy update (Sec. 6, solved as in Appendix C). Shared by both sampling schemes.

    `surrogate_of_logits(logits)` returns (L, dL/dlogits) for the scheme's surrogate
    on `states`. In the code's symbols:
      1. g = dL/dtheta at theta_old (backprop of dL/dz)
      2. x = (F + damping I)^-1 g by conjugate gradient, F the Fisher (= Hessian of KLbar) at
         theta_old; the damping keeps CG well conditioned
      3. beta = sqrt(2 delta / x^T (F + damping I) x): the quadratic KL model of the step is
         at most delta (the damping makes it a little less: about 0.7 delta at the defaults)
      4. full_step = beta x; first-order predicted improvement g . full_step
      5. line search: shrink until KLbar <= delta and L improves; else keep theta_old
    Returns (theta_new, info) with the diagnostics the log line shows; info["logits_new"] holds
    the policy's logits on `states` at theta_new.
    """
    dist = net.distribution
    logits_old, cache = net.forward(theta_old, states)
    L_old, dL_dlogits = surrogate_of_logits(logits_old)
    info = {"kl": 0.0, "kl_largest_state": 0.0, "backtracks": 0, "expected_improve": 0.0, "actual_improve": 0.0,
            "accepted": False, "entropy": float(np.mean(dist.entropy(logits_old))), "logits_new": logits_old}

    # 1. the policy gradient
    g = net.backward(theta_old, cache, dL_dlogits)
    if not np.all(np.isfinite(g)) or not np.any(g):
        info["skipped"] = "gradient is zero or not finite"
        return theta_old, info

    # 2. natural gradient direction x = (F + damping I)^-1 g, F estimated on every k-th row of `states`
    # (the forward pass's cache holds every layer's input: its every k-th row is that state's)
    fisher_cache = [np.ascontiguousarray(h[::cfg.fisher_subsample]) for h in cache]
    fisher_logits = logits_old[::cfg.fisher_subsample]
    fisher_slopes = net.tanh_slopes(fisher_cache)  # tanh' of each layer, the same in every product: once

    def Fvp(v):
        return fisher_vector_product(net, theta_old, fisher_cache, fisher_logits, v, cfg.damping, fisher_slopes)
    x = conjugate_gradient(Fvp, g, cfg.cg_iters)

    # 3. step size from the quadratic model of the KL: 1/2 (beta x)^T (F + damping I) (beta x) = delta
    x_F_x = x @ Fvp(x)
    if not (np.all(np.isfinite(x)) and np.isfinite(x_F_x) and x_F_x > 0):
        info["skipped"] = "conjugate gradient gave a non-finite or non-positive x^T F x"
        return theta_old, info

    # 4. the full step and the improvement a linear model of L predicts for it
    full_step = maximal_step(x, x_F_x, cfg.max_kl)
    expected = g @ full_step

    # 5. backtracking line search on the true surrogate and KL
    tried = {}  # the logits of the last theta evaluated: the accepted one, if any, is the last

    def evaluate(theta):
        tried["logits"] = logits = net.forward(theta, states)[0]
        return surrogate_of_logits(logits)[0] - L_old, mean_kl(logits_old, logits, dist)
    if cfg.trust_region:
        # Rounding moves L by about 1e-16 of max(1, |L_old|); 1e-10 of it is far above that, and
        # still far below any real improvement. Without a threshold, a gradient that is
        # really zero (every action equally good) would "improve" on rounding noise.
        ok, theta_new, improvement, kl_reached, backtracks = line_search(
            evaluate, theta_old, full_step, cfg.max_kl, cfg.backtrack_coeff, cfg.max_backtracks,
            min_improvement=1e-10 * max(1.0, abs(L_old)))
    else:  # --no-trust-region: the natural-gradient step of the same size, taken whatever it does
        ok, theta_new, backtracks = True, theta_old + full_step, 0
        improvement, kl_reached = evaluate(theta_new)
    info.update(kl=kl_reached, backtracks=backtracks, accepted=ok, actual_improve=improvement,
                expected_improve=expected * cfg.backtrack_coeff ** backtracks if ok else expected)
    info["logits_new"] = tried["logits"] if ok else logits_old
    info["kl_largest_state"] = float(np.max(dist.kl(logits_old, info["logits_new"])))  # D_KL^max of Sec. 3
    if not ok:
        info["skipped"] = "line search failed, keeping old parameters"
    return theta_new, info


# ----------------------------------------------------------------------------
# 7. The value function (GAE paper Sec. 5)
# ----------------------------------------------------------------------------

class ValueFunction:
    """V(s) = mean + std * V_phi(s): a tanh MLP fitted to standardised value targets.

    Returns on LunarLander are hundreds of units; Adam moves each weight by about
    its learning rate per step whatever the gradient's scale, so a network asked to
    output -100 directly takes thousands of steps to get there. Fitting
    (target - mean) / std instead, and rescaling the output layer whenever mean and std
    change so that every prediction stays exactly the same (the "preserving outputs" half
    of PopArt, van Hasselt et al. 2016; an addition), keeps the regression at unit scale.
    """

    def __init__(self, net, rng, lr):
        self.net = net
        self.phi = net.init(rng, output_gain=1.0)
        self.adam = Adam(net.num_params, lr=lr)
        self.mean, self.std = 0.0, 1.0

    def predict(self, states):
        """V(s) for a batch of states, shape (N,)."""
        return self.mean + self.std * self.net.forward(self.phi, states)[0][:, 0]

    def set_target_scale(self, mean, std):
        """Change (mean, std) without changing any prediction: rescale the output layer's W and b."""
        W, b = self.net.unflatten(self.phi)[-1]
        W *= self.std / std
        b[:] = (self.std * b + self.mean - mean) / std
        self.mean, self.std = mean, std

    def fit(self, states, targets, epochs, minibatch, rng):
        """Regress V on the value targets: minibatch Adam on the mean squared error.

        The GAE paper (Sec. 5) fits V to discounted returns with a trust-region step of
        its own; here, as in most implementations, a few epochs of Adam on the targets
        estimate_advantages gives. Returns the final mean squared error in the targets' units."""
        self.set_target_scale(float(targets.mean()), max(float(targets.std()), 1e-8))
        scaled = (targets - self.mean) / self.std
        N = len(states)
        for _ in range(epochs):
            order = rng.permutation(N)
            for start in range(0, N, minibatch):
                idx = order[start:start + minibatch]
                prediction, cache = self.net.forward(self.phi, states[idx])
                error = prediction[:, 0] - scaled[idx]
                # d/dV of mean (V - y)^2 is 2 (V - y) / n
                grad = self.net.backward(self.phi, cache, (2.0 / len(idx)) * error[:, None])
                self.phi = self.adam.step(self.phi, grad)
        return float(np.mean((self.predict(states) - targets) ** 2))


def fit_value_function(value_fn, states, targets, cfg, rng):
    """Step 7: refit V to this batch's value targets, for the next iteration's advantages.

    Returns (mean squared error after the fit, "" or why the fit was skipped): one target
    that is not finite would poison every weight of V, so such a batch is not fitted."""
    if not np.all(np.isfinite(targets)):
        return float("nan"), "value targets not finite, value fit skipped"
    return value_fn.fit(states, targets, cfg.vf_epochs, cfg.vf_minibatch, rng), ""


# ----------------------------------------------------------------------------
# The loop: the practical algorithm of Sec. 6
# ----------------------------------------------------------------------------

def train_iteration(state, sampler):
    """One iteration of Sec. 6's practical algorithm, with the GAE paper's value fit.

    Updates state (theta, V, the counters) and returns the iteration's row of progress.csv."""
    cfg, net, value_fn = state.cfg, state.policy_net, state.value_fn
    start = time.perf_counter()
    # 1. sample with pi_old: the single paths, or the vine's trunk and its branches
    batch = sampler.sample(net, state.theta, cfg.steps_per_env)

    # 2. advantages on the (trunk) trajectories; V learns from them in both schemes
    advantages, value_targets, values = estimate_advantages(batch, value_fn, cfg)
    fit_states = batch["obs"].reshape(cfg.batch_size, -1)

    # 3. the scheme's surrogate, over the states the step is taken on
    if cfg.scheme == "vine":  # Eq. (15) or (16) over the rollout set
        states, surrogate_of_logits, branch_values = vine_problem(batch, net.distribution)
        # for the log (progress_row): the surrogate in the return's units, and Theorem 1's eps = max |A|
        logits_old, in_return_units = batch["rollout_logits"], surrogate_of_logits
        largest_advantage = np.nanmax(np.abs(batch["Q"] - branch_values[:, None]))
        if cfg.vine_bootstrap:  # an addition: V also learns the branches' estimates of V(s_n)
            fit_states = np.concatenate([fit_states, states])
            value_targets = np.concatenate([value_targets, branch_values])
            values = np.concatenate([values, value_fn.predict(states)])
    else:  # Eq. (14) over the whole batch
        states, actions, logp_old = single_path_problem(batch, net.distribution)
        logits_old = batch["logits"].reshape(len(states), -1)
        step_advantages = standardize(advantages) if cfg.normalize_advantages else advantages

        def surrogate_of_logits(logits):
            return surrogate(logits, actions, logp_old, step_advantages, net.distribution)

        def in_return_units(logits):  # for the log: the same surrogate with the advantages unscaled
            return surrogate(logits, actions, logp_old, advantages, net.distribution)
        largest_advantage = np.max(np.abs(advantages))
    objective = (with_entropy_bonus(surrogate_of_logits, cfg.entropy_coef, net.distribution) if cfg.entropy_coef
                 else surrogate_of_logits)

    # 4.-6. the trust-region step. 7. The value fit needs nothing from it: a second thread does
    # it meanwhile, on the core the step leaves idle (NumPy releases Python's lock in its array work).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as background:
        value_fit = background.submit(fit_value_function, value_fn, fit_states, value_targets, cfg, state.rng)
        state.theta, step = trpo_step(net, state.theta, states, objective, cfg)
    value_loss, value_skipped = value_fit.result()

    state.record(batch, cfg.batch_size)
    surrogate_change = in_return_units(step["logits_new"])[0] - in_return_units(logits_old)[0]
    return progress_row(state, batch, step, surrogate_change, largest_advantage,
                        value_loss, value_skipped, explained_variance(values, value_targets),
                        time.perf_counter() - start)


def read_checkpoint(path):
    """(snapshot, Config) of a checkpoint file, for train(cfg, resume=snapshot); or UserError in one sentence."""
    saved = run_files.read_checkpoint(path)
    try:
        cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()})
    except TypeError:
        raise UserError(f"'{path}' is a checkpoint of another version of trpo_numpy.py.") from None
    return saved, cfg


def solved(history, stop_return):
    """Whether the last iteration's rolling return reached stop_return (never, if that is None)."""
    return stop_return is not None and bool(history) and history[-1]["rolling_return"] >= stop_return


def first_crossing(history, threshold):
    """The first iteration's row whose rolling return reached threshold, else None (also if threshold is None)."""
    if threshold is None:
        return None
    return next((row for row in history if row["rolling_return"] >= threshold), None)


def train(cfg, verbose=True, resume=None, progress_bar=True):
    """Train a policy with TRPO, writing progress.csv, config.json, checkpoint.npz, policy.npz and
    plots to cfg.out_dir(). `resume` is a snapshot (read_checkpoint) to continue from. verbose
    prints a log line per iteration, progress_bar draws a bar on a terminal.

    Returns (policy_net, theta, history) where history holds one dict per iteration. From Python:
        net, theta, history = train(scheme_config("single", env="CartPole-v1", total_steps=50_000))"""
    cli.validate(cfg)  # a value the algorithm cannot run with ends here, in one sentence (UserError)
    obs_dim, num_actions, continuous = env_dims(cfg.env)  # a bad env fails here, before any folder or worker
    rng = np.random.default_rng(cfg.seed)
    # discrete actions: an MLP giving a categorical's logits; continuous: a Gaussian policy (network.py)
    policy_net = policy_network([obs_dim, *cfg.hidden, num_actions], continuous)
    theta = policy_net.init(rng, output_gain=0.01)  # every action nearly equally likely at first (a Gaussian: mean 0)
    if continuous:
        theta[policy_net.mean_params:] = cfg.log_std_init
    value_fn = ValueFunction(MLP([obs_dim, *cfg.hidden, 1]), rng, lr=cfg.vf_lr)
    state = run_files.TrainingState(cfg, policy_net, value_fn, rng, theta)  # what a checkpoint holds
    if resume is not None:
        state.restore(resume)
    run = run_files.RunFolder(
        cfg.out_dir(), not cfg.out, dataclasses.asdict(cfg), state.run_id, state.history,
        resuming=resume is not None, sizes=(policy_net.sizes, value_fn.net.sizes), verbose=verbose,
        progress_bar=progress_bar,
        plot_labels=dict(scheme_name=SCHEME_NAMES[cfg.scheme], solved_at=reward_threshold(cfg.env)))
    cfg.out = run.out_dir  # without --out, a new folder: runs/<scheme>-seed<seed>, numbered -2, -3, ... if taken
    if verbose:
        cli.notes(cfg, state.env_steps)  # what the run will do otherwise than asked (whole batches, ...)
    snapshot, sampler = state.snapshot(), None
    start = time.perf_counter() - state.wall_s
    try:
        # After a resume the simulators cannot be restored (Box2D state is not saved): the
        # environments start new episodes, seeded from the restored generator.
        sampler = make_sampler(cfg, rng, value_fn)
        while state.env_steps < cfg.total_steps and not solved(state.history, cfg.stop_return):
            parallel.raise_if_stop_requested()
            state.iteration += 1
            row = train_iteration(state, sampler)
            state.wall_s = row["wall_s"] = time.perf_counter() - start
            state.history.append(row)
            snapshot = state.snapshot()
            run.record(row, snapshot)  # progress.csv, the log line; every save_every, checkpoint and policy
    finally:
        # Whatever stopped the loop (the end, Ctrl-C, an error), keep what the finished iterations
        # made; a second Ctrl-C waits until that is written.
        with parallel.signals_held():
            try:
                run.finish(snapshot)  # checkpoint.npz, policy.npz, the plots: a run to --resume, even at iteration 0
            finally:
                if sampler is not None:
                    sampler.close()
    return policy_net, state.theta, state.history


def progress_row(state, batch, step, surrogate_change, largest_advantage, value_loss, value_skipped,
                 value_explained, seconds):
    """The iteration's row of progress.csv: what the step did, and what Theorem 1 says of it."""
    cfg, ended = state.cfg, batch["episode_return"]
    predicted, penalty = predicted_return_change(surrogate_change, cfg.batch_size, np.sum(~np.isnan(ended)),
                                                 step["kl_largest_state"], largest_advantage, cfg.gamma)
    batch_return = float(np.nanmean(ended)) if np.any(~np.isnan(ended)) else float("nan")
    previous = state.history[-1]["batch_return"] if state.history else float("nan")
    recent = state.episode_returns[-100:]
    rollout_states = len(batch["rollout_states"]) if "rollout_states" in batch else 0
    return {
        "iteration": state.iteration,
        "env_steps": state.env_steps,
        "rolling_return": float(np.mean(recent)) if recent else float("nan"),
        "episodes": len(state.episode_returns),
        "kl": step["kl"],
        "backtracks": step["backtracks"],
        "accepted": int(step["accepted"]),
        "expected_improve": step["expected_improve"],
        "actual_improve": step["actual_improve"],
        "entropy": step["entropy"],
        "value_loss": value_loss,
        "explained_variance": value_explained,
        "steps_per_s": cfg.batch_size / seconds,
        "trunk_steps": cfg.batch_size,
        "branch_steps": batch.get("branch_steps", 0),
        "rollout_states": rollout_states,
        "restores_per_s": batch.get("restores", 0) / batch.get("branch_seconds", seconds),
        "max_kl_state": step["kl_largest_state"],
        "predicted_return_change": predicted,
        "theorem_penalty": penalty,
        "batch_return": batch_return,
        "return_change": batch_return - previous,
        "skipped": "; ".join(why for why in (step.get("skipped", ""), value_skipped) if why),
    }


def predicted_return_change(surrogate_change, steps, episodes, kl_largest_state, largest_advantage, gamma):
    """What a step predicts for the episode return, and what TRPO's Theorem 1 says of the prediction.

    The performance-difference identity (Kakade & Langford 2002; TRPO Eq. 1) gives
    eta(pi_new) - eta(pi_old) = E_{tau ~ pi_new}[ sum_t gamma^t A_old(s_t, a_t) ]. The surrogate
    takes the states from pi_old instead, and this estimate also drops gamma^t (0.999^t is 0.4
    to 0.8 over LunarLander's episodes of a few hundred steps: one reason it is rough), so the step predicts a change of the episode return
    of (mean episode length) x (L(theta_new) - L(theta_old)) in the return's units: an
    approximation, to compare with what follows. Theorem 1 (stated with the total-variation
    distance, Eq. 8) bounds the cost of swapping the states; its KL form, Eq. (9), is
    eta(pi_new) >= L(pi_new) - C max_s KL(pi_old || pi_new), C = 4 eps gamma / (1 - gamma)^2, eps = max |A|.
    Returns (predicted change, C max_s KL): the penalty is usually far larger than any
    improvement, which is why the paper replaces it by the constraint KLbar <= delta.
    """
    mean_episode_length = steps / max(episodes, 1)
    penalty = 4 * largest_advantage * gamma / (1 - gamma) ** 2 * kl_largest_state if gamma < 1 else float("inf")
    return mean_episode_length * surrogate_change, penalty


def explained_variance(prediction, target):
    """1 - Var(target - prediction) / Var(target): 1 is perfect, 0 no better than the mean."""
    var = np.var(target)
    return float(1 - np.var(target - prediction) / var) if var > 0 else float("nan")


# ----------------------------------------------------------------------------
# The vine (TRPO Sec. 5.2)
# ----------------------------------------------------------------------------

def branch_rollout(env, first_action, net, theta, noise, gamma, value_fn=None, lam=1.0):
    """One branch of the vine: from env's current state take `first_action`, then follow pi_theta.

    The branch runs len(noise) steps at most, the first action included, and stops earlier if
    the episode ends; H below is the number of steps it took. Step l samples its action with
    noise[l] (a uniform for a categorical policy, d standard normals for a Gaussian one), so
    branches given the same noise share their random numbers. Returns (Q, H).

    With value_fn None, Q is the paper's Monte-Carlo estimate sum_l gamma^l r_l. Otherwise Q
    is the branch's lambda-return, an addition of ours (neither paper bootstraps a branch),
    computed backwards from G_H = V(s_H):
        G_l = r_l + gamma * ((1 - lam) * V(s_{l+1}) + lam * G_{l+1}),   Q = G_0,
    with V = 0 after a terminated step (a time-limit truncation bootstraps like the horizon).
    That is (1 - lam) sum_{n<H} lam^(n-1) G^(n) + lam^(H-1) G^(H), the n-step returns
    G^(n) = sum_{l<n} gamma^l r_l + gamma^n V(s_n) weighted as in the GAE paper's lambda-return.
    lam = 1 gives sum_l gamma^l r_l + gamma^H V(s_H); a smaller lam trusts V more and the far,
    noisy end of the branch less: where the branches of a state have drifted apart, their
    distant rewards differ by chance, not because of the first action.

    The branch steps env through cli.direct_step, which leaves env's time-limit count behind: env is a
    forked copy, thrown away after, or the replay's spare environment, reset before its next use.
    """
    layers = net.unflatten(theta)  # split once: each step's policy pass is then three small products
    sigma = np.exp(theta[net.mean_params:]) if net.distribution is DiagonalGaussian else None
    step = direct_step(env)  # env.step past Gymnasium's wrappers, for discrete actions (cli.py): a branch is cheaper
    obs, reward, terminated, truncated, _ = step(first_action)
    rewards, observations = [reward], [obs]
    while len(rewards) < len(noise) and not (terminated or truncated):
        h = np.asarray(obs, dtype=np.float64)  # (D,): one state, so vector-matrix products
        for W, b in layers[:-1]:
            h = np.tanh(h @ W + b)
        W, b = layers[-1]
        z = h @ W + b
        if sigma is not None:  # a Gaussian policy: z is the mean, a = mu + sigma * n
            action = z + sigma * noise[len(rewards)]
        else:
            action = sample_one(z, noise[len(rewards)])  # network.sample's rule, for one state
        obs, reward, terminated, truncated, _ = step(action)
        rewards.append(reward)
        observations.append(obs)
    if value_fn is None:
        return float(np.sum(np.array(rewards) * gamma ** np.arange(len(rewards)))), len(rewards)
    values = value_fn.predict(np.array(observations, dtype=np.float64))  # V(s_1), ..., V(s_H): one pass
    if terminated:
        values[-1] = 0.0  # no future after the episode's end
    G = values[-1]
    for reward, value in zip(reversed(rewards), reversed(values)):
        G = reward + gamma * ((1 - lam) * value + lam * G)
    return float(G), len(rewards)


def replay(env, seed, actions):
    """Rebuild a state without fork: reset env with the episode's seed and replay its actions.

    Exact, because the simulator is deterministic and its reset seeds the terrain's generator,
    provided no contact cache survives from before: LunarLander's reset builds a new Box2D world,
    and VineTrunk gives environments whose reset keeps theirs (BipedalWalker) a new env for each
    replay. It costs one step per step of the episode so far. Returns env."""
    env.reset(seed=seed)
    for action in actions:
        env.step(action)
    return env


class VineTrunk(SinglePathSampler):
    """One worker's share of the vine: some trunk environments, and the branches from their rollout states.

    Each worker (one per core) steps its trunk environments under pi_old and, as a trunk
    passes a rollout state, restores the simulator there once per action of the state's
    action set and runs that branch. Two exact ways to restore, giving the same Q:
    a fork of this small worker process (parallel.ForkPool: a few ms, the simulator's own
    random state included; two branches run at a time while the trunk goes on), or a
    replay of the episode so far in a spare environment (one step per step so far).
    restore = "auto" replays states younger than the number of steps a fork costs.
    """

    def __init__(self, env_id, env_seeds, action_seeds, restore):
        super().__init__([make_env(env_id) for _ in env_seeds], env_seeds, action_seeds)
        self.env_id = env_id
        self.episode_actions = [[] for _ in env_seeds]  # each current episode's actions so far, for replay
        self.spare = make_env(env_id)  # where states are rebuilt by replay
        # A Box2D world keeps caches (contacts, warm starts) from step to step, so a replay is exact only
        # in a world that the reset built anew. LunarLander's reset builds one; BipedalWalker's keeps its
        # world, so there each replay gets a new environment.
        world = getattr(self.spare.unwrapped, "world", None)
        self.spare.reset(seed=0)
        self.new_env_per_replay = world is not None and self.spare.unwrapped.world is world
        self.pool = parallel.ForkPool(max_children=2) if restore != "replay" else None
        # replay a state whose episode has run fewer steps than this, fork from any other
        if restore == "auto":
            self.replay_below = self.steps_per_fork()
        else:
            self.replay_below = 0 if restore == "fork" else float("inf")

    def steps_per_fork(self):
        """How many simulator steps cost as much as restoring a state by fork, measured here (the
        cost of a fork differs a lot between machines). The steps timed are cheap ones (the lander
        falls, then lies on the ground), which puts the figure on the side of replaying."""
        shape = self.spare.action_space.shape
        no_action = np.zeros(shape) if shape else 0  # action 0, or a zero vector: LunarLander's engines off

        def twenty_steps():
            for _ in range(20):
                _, _, terminated, truncated, _ = self.spare.step(no_action)  # LunarLander: falling, then lying
                if terminated or truncated:  # an episode this short (CartPole) starts again
                    self.spare.reset(seed=0)
        self.spare.reset(seed=0)
        twenty_steps()  # warm up
        seconds, fork_seconds = self.pool.fork_overhead(twenty_steps)
        return fork_seconds / (seconds / 20)

    def sample(self, net, theta, steps, rollout, noise, draws, proposal, gamma, value_fn, lam):
        """The trunk batch of this worker's E environments, plus what the branches found.

        `rollout` (T, E) marks the rollout states. Row i of `noise` (n, H, ...) is the stream of
        random numbers of the i-th of them in row-major (t, e) order, shared by all its branches;
        row i of `draws` (n, K, ...) holds the random numbers that draw its K actions from q
        (`proposal`: "uniform" or "pi_old"); draws is None to branch on every action. Adds to the
        batch, per state: action_sets (T, E, K, ...), its K actions; Q (T, E, K), the Q of each (NaN
        away from rollout states); q_drawn (T, E, K), q of each drawn action; branch_steps and
        branches (T, E), the steps simulated and the branches run.
        """
        dist, A = net.distribution, net.sizes[-1]
        K = A if draws is None else draws.shape[1]
        action_shape = (A,) if dist is DiagonalGaussian else ()
        Q = np.full((*rollout.shape, K), np.nan)
        action_sets = np.zeros((*rollout.shape, K, *action_shape), dtype=np.float64 if action_shape else np.int64)
        q_drawn = np.ones((*rollout.shape, K))
        branch_steps = np.zeros(rollout.shape, dtype=np.int64)
        branches = np.zeros(rollout.shape, dtype=np.int64)
        results = {}  # (t, e, k) -> (Q, branch steps) of the k-th action of the state's set
        shared = {}  # (t, e) -> for each k, the k' whose branch gives its Q (a repeated draw: the first)
        row = np.cumsum(rollout.ravel()).reshape(rollout.shape) - 1  # (t, e) -> its row of noise and draws

        def branch(t, e):
            if draws is None:
                actions = np.arange(A)  # all actions: Eq. (15)
            else:  # K draws from q: Eq. (16)
                q_logits = np.tile(self.logits[e] if proposal == "pi_old" else np.zeros(A), (K, 1))
                actions = dist.sample(q_logits, draws[row[t, e]])
                q_drawn[t, e] = np.exp(dist.log_prob(q_logits, actions))
            action_sets[t, e] = actions
            # a repeated draw shares its branch: same action, same numbers
            _, first, same = np.unique(actions, axis=0, return_index=True, return_inverse=True)
            shared[(t, e)] = first[same.ravel()]
            for k in first:
                if len(self.episode_actions[e]) >= self.replay_below:
                    self.pool.submit((t, e, k), lambda a=actions[k]: branch_rollout(
                        self.envs[e], a, net, theta, noise[row[t, e]], gamma, value_fn, lam))
                else:
                    env = make_env(self.env_id) if self.new_env_per_replay else self.spare
                    replay(env, self.episode_seed[e], self.episode_actions[e])
                    results[(t, e, k)] = branch_rollout(env, actions[k], net, theta, noise[row[t, e]], gamma,
                                                        value_fn, lam)
                    if env is not self.spare:
                        env.close()

        self.rollout, self.branch = rollout, branch
        batch = super().sample(net, theta, steps)
        if self.pool is not None:
            results.update(self.pool.gather())
        for (t, e, k), (q_value, n) in results.items():
            Q[t, e, k] = q_value
            branch_steps[t, e] += n
            branches[t, e] += 1
        for (t, e), first in shared.items():
            Q[t, e] = Q[t, e, first]
        batch.update(Q=Q, action_sets=action_sets, q_drawn=q_drawn, branch_steps=branch_steps, branches=branches)
        return batch

    def step(self, t, e, action):
        """Before the trunk moves on from a rollout state, branch from it (the simulator is there now)."""
        if self.rollout[t, e]:
            self.branch(t, e)
        self.episode_actions[e].append(action)
        return super().step(t, e, action)

    def start_episode(self, e):
        self.episode_actions[e] = []
        return super().start_episode(e)

    def close(self):
        if self.pool is not None:
            self.pool.close()
        self.spare.close()
        super().close()


class VineSampler:
    """The vine (TRPO Sec. 5.2): trunk trajectories under pi_old, and branches from a rollout set of their states.

    Each iteration: pick N of the trunk's T x E states at random (the rollout set); from
    each, once per action in the state's action set, take that action, then follow pi_old:
    a branch of H steps in all, whose return (branch_rollout) estimates Q(s_n, a). The action
    set is every action (the all-actions estimator, Eq. 15) or K draws from q (uniform, or
    pi_old), for the importance-sampling estimator of Eq. (16). All branches from one
    state share one stream of random numbers (common random numbers), so the differences
    between their Q values, which drive the update, have low variance.

    The environments are split over `workers` VineTrunk workers, one per core, each
    stepping its trunks and running its branches. All random numbers are drawn here, per
    state, so the run does not depend on which worker a state falls to.
    """

    def __init__(self, cfg, env_seeds, action_seeds, value_fn, rng):
        self.cfg, self.value_fn, self.rng = cfg, value_fn, rng
        restore = cfg.vine_restore
        if restore != "replay" and not hasattr(os, "fork"):
            print("note: os.fork is not available here; the vine restores states by seeded replay, "
                  "which is exact but slower.", file=sys.stderr)
            restore = "replay"
        self.trunks = ParallelSampler(VineTrunk, cfg.env, env_seeds, action_seeds, cfg.workers, restore)

    def sample(self, net, theta, steps):
        """Trunk batch (as SinglePathSampler's) plus rollout_states (N, D), their action sets and Q estimates."""
        cfg, E = self.cfg, self.cfg.num_envs
        N = min(cfg.vine_states, steps * E)
        rollout = np.zeros((steps, E), dtype=bool)
        rollout.flat[self.rng.choice(steps * E, size=N, replace=False)] = True
        # one row per rollout state, in row-major (t, e) order: a stream shared by all its branches
        dist, A = net.distribution, net.sizes[-1]
        noise = dist.noise(self.rng, A, (N, cfg.vine_horizon))
        draws = dist.noise(self.rng, A, (N, cfg.vine_actions)) if cfg.vine_actions else None
        row = np.zeros((steps, E), dtype=np.int64)
        row[rollout] = np.arange(N)
        rows = [row[:, part][rollout[:, part]] for part in self.trunks.parts]  # each worker's states, in order
        bootstrap = self.value_fn if cfg.vine_bootstrap else None
        started = time.perf_counter()
        batch = self.trunks.sample_parts([
            (net, theta, steps, rollout[:, part], noise[r], None if draws is None else draws[r],
             cfg.vine_proposal, cfg.gamma, bootstrap, cfg.lam) for part, r in zip(self.trunks.parts, rows)])
        seconds = time.perf_counter() - started
        batch.update(
            rollout_states=batch["obs"][rollout],  # (N, D), states in row-major (t, e) order
            rollout_logits=batch["logits"][rollout],
            Q=batch.pop("Q")[rollout],  # (N, K): Q(s_n, a_nk) of the k-th action of state n's set
            action_sets=batch.pop("action_sets")[rollout],
            proposal=batch.pop("q_drawn")[rollout] if cfg.vine_actions else None,
            branch_steps=int(batch.pop("branch_steps").sum()),
            restores=int(batch.pop("branches").sum()),
            branch_seconds=seconds)
        return batch

    def close(self):
        self.trunks.close()


def all_actions_surrogate(logits, Q):
    """Vine surrogate with every action branched (Eq. 15): L = mean_n sum_a pi_theta(a|s_n) Q(s_n, a).

    Returns (L, dL/dlogits). With V_n = sum_a p_n,a Q_n,a, the gradient is
    dL/dz_n = p_n * (Q_n - V_n) / N: the advantage Q - V appears by itself."""
    p = softmax(logits)
    V = (p * Q).sum(axis=1, keepdims=True)  # (N, 1)
    return float(V.mean()), p * (Q - V) / len(Q)


def each_drawn(logits, actions):
    """The K actions drawn at each of N states, (N, K, ...), as N K rows, each beside its state's
    distribution parameters: (logits (N K, ...), actions (N K, ...))."""
    N, K = actions.shape[:2]
    return np.repeat(logits, K, axis=0), actions.reshape(N * K, *actions.shape[2:])


def importance_sampled_surrogate(logits, actions, proposal, Q, dist=Categorical):
    """Vine surrogate with K sampled actions per state, self-normalised importance sampling (Eq. 16):

        L_n = sum_k w_k Q_k / sum_k w_k,   w_k = pi_theta(a_k|s_n) / q(a_k|s_n),   L = mean_n L_n.

    Eq. (16) as printed divides by pi_theta_old; dividing by q, the distribution the actions
    were drawn from, is the consistent estimator for any q (the two agree when q = pi_old).
    `proposal` (q of each drawn action, a density for continuous actions) and `Q` are (N, K),
    `actions` (N, K, ...). Returns (L, dL/dlogits). With W = sum_k w_k and
    dw_k/dz = w_k d log pi(a_k|s_n)/dz:
        dL_n/dz = sum_k (w_k / W) (Q_k - L_n) d log pi(a_k|s_n)/dz,
    where d log pi/dz is onehot(a_k) - p for a categorical (the p term then sums to zero, since
    sum_k w_k (Q_k - L_n) = 0) and [(a - mu) / sigma^2, (a - mu)^2 / sigma^2 - 1] for a Gaussian."""
    N, K = Q.shape
    z, a = each_drawn(logits, actions)
    w = np.exp(dist.log_prob(z, a)).reshape(N, K) / proposal
    W = w.sum(axis=1, keepdims=True)
    L_n = (w * Q).sum(axis=1, keepdims=True) / W  # (N, 1)
    c = w / W * (Q - L_n)  # (N, K)
    grad = (c.reshape(N * K, 1) * dist.log_prob_grad(z, a)).reshape(N, K, -1).sum(axis=1)  # sum over k
    return float(L_n.mean()), grad / N


def vine_problem(batch, dist=Categorical):
    """The states and surrogate of the vine step: the rollout set, with Eq. (15) or Eq. (16).

    Also returns the branches' estimates of V(s_n) = E_{a ~ pi_old}[Q(s_n, a)] (with all actions, the sum
    sum_a pi_old(a|s_n) Q(s_n, a); with K sampled actions, by the same self-normalised weights): the
    surrogate at theta_old."""
    Q, action_sets, logits_old = batch["Q"], batch["action_sets"], batch["rollout_logits"]
    if batch["proposal"] is None:  # every action: action_sets[n] is 0, ..., A - 1, so Q[n, a] = Q(s_n, a)
        def surrogate_of_logits(logits):
            return all_actions_surrogate(logits, Q)
        values = (softmax(logits_old) * Q).sum(axis=1)
    else:
        def surrogate_of_logits(logits):
            return importance_sampled_surrogate(logits, action_sets, batch["proposal"], Q, dist)
        z_old, a = each_drawn(logits_old, action_sets)
        w = np.exp(dist.log_prob(z_old, a)).reshape(Q.shape) / batch["proposal"]
        values = (w * Q).sum(axis=1) / w.sum(axis=1)
    return batch["rollout_states"], surrogate_of_logits, values


# ----------------------------------------------------------------------------
# Several cores (a reader of the paper may skip this)
# ----------------------------------------------------------------------------

class ParallelSampler:
    """A sampler's environments split over worker processes, one per core (this process if one).

    Worker w owns make_part(env_id, its env seeds, its action seeds, *extra_args) (a
    SinglePathSampler, or the vine's VineTrunk) and steps its share of the environments
    with its own batched forward pass; the batches come back joined along the environment
    axis. Because every environment keeps its own seeds, the batch is the one a single
    sampler would give (the logits to rounding: BLAS may sum a smaller batch's product in
    another order). Simulation is most of an iteration's time: two workers nearly halve it.
    """

    def __init__(self, make_part, env_id, env_seeds, action_seeds, workers, *extra_args):
        self.parts = np.array_split(np.arange(len(env_seeds)), min(workers, len(env_seeds)))
        args = [(env_id, [int(env_seeds[i]) for i in part], [int(action_seeds[i]) for i in part], *extra_args)
                for part in self.parts]
        workers = parallel.WorkerProcesses if len(self.parts) > 1 else parallel.InThisProcess
        self.workers = workers(make_part, args)

    def sample(self, net, theta, steps):
        return self.sample_parts([(net, theta, steps)] * len(self.parts))

    def sample_parts(self, args_per_part):
        """Each part's sample(*its args), at once; the batches joined along the environment axis."""
        parts = self.workers.call("sample", args_per_part)
        return {key: np.concatenate([part[key] for part in parts], axis=1) for key in parts[0]}

    def close(self):
        self.workers.close()


def make_sampler(cfg, rng, value_fn):
    """The scheme's sampler for cfg.num_envs environments on cfg.workers processes, seeded from rng."""
    env_seeds = rng.integers(TRAIN_SEED_LIMIT, size=cfg.num_envs)
    action_seeds = rng.integers(2 ** 63, size=cfg.num_envs)
    if cfg.scheme == "vine":
        return VineSampler(cfg, env_seeds, action_seeds, value_fn, rng)
    return ParallelSampler(single_path_sampler, cfg.env, env_seeds, action_seeds, cfg.workers)


if __name__ == "__main__":  # the command line is cli.py's; it is handed this module, not importing it again
    sys.exit(cli.main(sys.argv[1:], sys.modules[__name__]))
