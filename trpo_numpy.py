"""trpo_numpy.py: Trust Region Policy Optimization in plain NumPy, on Gymnasium's LunarLander-v3.

The reference: the whole algorithm in one process, read top to bottom beside the papers. It follows
the practical algorithm of TRPO Sec. 6, with the value function of the GAE paper; each iteration

  1. samples trajectories with the current policy pi_old      (Sec. 5.1 single path; Sec. 5.2 vine)
  2. estimates advantages                                     (GAE paper Eq. 16, or the return-to-go)
  3. builds the surrogate L(theta) on the states of the step  (Eq. 14; the vine's Eq. 15 or 16)
  4. takes the step (Appendix C): g = dL/dtheta, x = F^-1 g by conjugate gradient, beta =
     sqrt(2 delta / x^T F x), then a line search until KLbar <= delta and L improves
  5. fits the value function for the next advantages          (GAE paper Sec. 5)

(The paper's Algorithm 1 is the theoretical policy iteration of Sec. 3; Sec. 6 turns it into the
algorithm coded here.) Every derivative is written by hand in network.py and checked against finite
differences in test_trpo.py. Anything here that is not in the papers says so: "an addition". The
command line runs this algorithm through engine.py, which makes it fast on several cores and is
tested to give this file's runs; a reader of the paper may skip engine.py, parallel.py, run_files.py
and cli.py.

References:
  Schulman, Levine, Moritz, Jordan, Abbeel 2015. Trust Region Policy Optimization. arXiv:1502.05477
  Schulman, Moritz, Levine, Jordan, Abbeel 2015. High-Dimensional Continuous Control Using
      Generalized Advantage Estimation. arXiv:1506.02438
  Kakade & Langford 2002. Approximately Optimal Approximate Reinforcement Learning.

Run it:
  python trpo_numpy.py                   # single path on LunarLander-v3, writes runs/single-seed0/
  python trpo_numpy.py --scheme vine     # the vine
  python trpo_numpy.py --help            # every option, with its paper symbol
From Python, this file alone, in one process:
  import trpo_numpy as trpo
  net, theta, history = trpo.train(trpo.scheme_config("single", env="CartPole-v1", total_steps=50_000))
"""

if __name__ == "__main__":  # run as a program, the command line takes over: cli.py, which imports this file
    import runpy
    runpy.run_module("cli", run_name="__main__")

import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from diagnostics import format_log_line, progress_row
from network import MLP, Adam, Categorical, DiagonalGaussian, policy_network, softmax


# ----------------------------------------------------------------------------
# Hyperparameters: one place, each with its paper symbol. cli.py builds --help from these.
# ----------------------------------------------------------------------------

def option(default, help, **argparse_settings):
    """A Config field with its one line of --help (and argparse settings such as choices)."""
    return field(default=default, metadata={"help": help, **argparse_settings})


@dataclass
class Config:
    """The settings of a run, each with its paper symbol. The defaults are the single path's with
    discrete actions; DEFAULTS below says where the vine's and those of continuous actions differ."""
    scheme: str = option("single", "sampling scheme: 'single' path (Sec. 5.1) or 'vine' (Sec. 5.2)",
                         choices=["single", "vine"])
    env: str = option("LunarLander-v3", "Gymnasium id: a flat Box observation; Discrete actions (categorical "
                                         "policy) or Box ones (Gaussian policy)")
    seed: int = option(0, "random seed: the same seed and --workers give the same run, to the bit, on one machine")
    total_steps: int = option(1_000_000, "environment steps to train for, over all environments (vine: the trunk's)")
    num_envs: int = option(32, "environments sampled side by side, with one batched policy pass per time step")
    workers: int = option(2, "processes, one per core, each stepping a share of the environments; 1 = this one")
    steps_per_env: int = option(512, "steps per environment per iteration: the batch is num_envs x steps_per_env")
    hidden: tuple = option((64, 64), "hidden layer sizes of the tanh policy and value networks")
    max_kl: float = option(0.04, "delta, the trust region: the largest mean KL(pi_old || pi_new) of a step (Eq. 12)")
    damping: float = option(0.1, "damping (an addition): CG solves (F + damping I) x = g, better conditioned")
    fisher_subsample: int = option(2, "k: F on every k-th state of the batch, in (time, env) order (Appendix C)")
    cg_iters: int = option(10, "conjugate-gradient iterations to solve (F + damping I) x = g (Appendix C: 10)")
    backtrack_coeff: float = option(0.8, "the line search shrinks the step by this factor at each backtrack")
    max_backtracks: int = option(10, "line-search tries before the step is abandoned and theta_old kept")
    gamma: float = option(0.999, "gamma, the discount factor")
    lam: float = option(0.97, "lambda of GAE(gamma, lambda) (GAE paper Eq. 16) and of the vine's lambda-return")
    advantage: str = option("gae", "'gae': GAE(lambda) with a learned V; 'mc': return-to-go (V at cuts) minus V",
                            choices=["gae", "mc"])
    normalize_advantages: bool = option(True, "single path: standardise each batch's advantages (an addition)")
    vf_lr: float = option(2e-3, "Adam learning rate of the value network")
    vf_epochs: int = option(5, "passes over the batch when fitting the value network, each iteration")
    vf_minibatch: int = option(256, "minibatch size of the value-network fit")
    vine_states: int = option(256, "vine: N, the number of states in the rollout set")
    vine_horizon: int = option(100, "vine: H, the steps of each branch, its first action included")
    vine_actions: int = option(0, "vine: 0 branches on every action (Eq. 15); K > 0 on K drawn from q (Eq. 16)")
    vine_proposal: str = option("uniform", "vine with K > 0: q, the distribution the K actions are drawn from",
                                choices=["uniform", "pi_old"])
    vine_bootstrap: bool = option(True, "vine: Q is the branch's lambda-return from V (an addition); "
                                        "--no-vine-bootstrap: the paper's Monte-Carlo Q")
    vine_restore: str = option("auto", "vine, engine.py: restore a state by 'fork', seeded 'replay', or 'auto' "
                                       "(the cheaper); all exact", choices=["auto", "fork", "replay"])
    log_std_init: float = option(0.0, "continuous actions: log sigma of the Gaussian policy at the start")
    entropy_coef: float = option(0.0, "weight of an entropy bonus in the surrogate (an addition; 0 is the paper)")
    trust_region: bool = option(True, "--no-trust-region: the full natural-gradient step, with no line search")
    stop_return: float = option(None, "stop once the mean return of the last 100 episodes reaches this")
    save_every: int = option(10, "checkpoint.npz and policy.npz every this many iterations, and at the end")
    out: str = option("", "output folder, new or empty; by default runs/<scheme>-seed<seed>, numbered -2, -3, ...")

    @property
    def batch_size(self):
        return self.num_envs * self.steps_per_env


# The defaults of each scheme and action space where they differ from Config's, chosen over ten seeds
# each (RESULTS.md keeps the tuning record). The vine's trunk is half the single path's batch, its
# estimate of the advantages has so little noise that larger steps pay, and its Fisher is taken on
# every one of its few rollout states. Continuous actions start with a smaller sigma (e^-1 = 0.37 for
# actions in [-1, 1]) and fit V harder; their vine draws K = 4 actions from q = pi_old (Eq. 16), the
# paper's q for continuous problems (Sec. 5.2): a continuous space has no "every action".
DEFAULTS = {
    ("single", "discrete"): {},
    ("vine", "discrete"): dict(steps_per_env=256, max_kl=0.05, fisher_subsample=1, vf_lr=1e-3),
    ("single", "continuous"): dict(num_envs=16, gamma=0.99, log_std_init=-1.0, vf_lr=1e-3, vf_epochs=10,
                                   vf_minibatch=128),
    ("vine", "continuous"): dict(steps_per_env=256, max_kl=0.05, fisher_subsample=1, gamma=0.99, log_std_init=-1.0,
                                 vf_lr=1e-3, vf_epochs=10, vf_minibatch=128, vine_actions=4, vine_proposal="pi_old"),
}
# Unless told otherwise, a vine run stops after VINE_ITERATIONS iterations (a run a class can wait for),
# or once its rolling return reaches VINE_STOP_RETURN (our choice on the landers, past the 200 that
# counts as solved: their landers then fly well without their noise; RESULTS.md) or, elsewhere, the
# environment's reward threshold.
VINE_ITERATIONS = 150
VINE_STOP_RETURN = {"LunarLander-v3": 240.0, "LunarLanderContinuous-v3": 240.0}


def scheme_config(scheme="single", **given):
    """The Config of a run: the settings given, and for the rest the defaults of the scheme and of the
    environment's action space (DEFAULTS), and the vine's budget and stop."""
    continuous = env_dims(given.get("env", Config.env))[2]
    cfg = Config(**{**DEFAULTS[scheme, "continuous" if continuous else "discrete"], **given, "scheme": scheme})
    if scheme == "vine" and "total_steps" not in given:
        cfg.total_steps = VINE_ITERATIONS * cfg.batch_size
    if scheme == "vine" and "stop_return" not in given:
        cfg.stop_return = VINE_STOP_RETURN.get(cfg.env, gym.spec(cfg.env).reward_threshold)
    return cfg


# ----------------------------------------------------------------------------
# The environment
# ----------------------------------------------------------------------------

def make_env(env_id, render_mode=None):
    """gym.make(env_id). A Gaussian policy's sample can fall outside a Box's bounds: the environment
    takes each action clipped to them, while training keeps the log-prob of the action sampled (the
    usual choice). (What gymnasium's ClipAction does, five times faster on float64 arrays.)"""
    env = gym.make(env_id, render_mode=render_mode)
    if isinstance(env.action_space, gym.spaces.Box):
        low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
        env = gym.wrappers.TransformAction(env, lambda action: np.minimum(np.maximum(action, low), high),
                                           env.action_space)
    return env


def env_dims(env_id):
    """(observation size, number of actions or action dimensions, continuous?) of env_id."""
    env = make_env(env_id)
    continuous = isinstance(env.action_space, gym.spaces.Box)
    dims = (env.observation_space.shape[0], env.action_space.shape[0] if continuous else int(env.action_space.n),
            continuous)
    env.close()
    return dims


# ----------------------------------------------------------------------------
# 1. Sampling: the single-path scheme (TRPO Sec. 5.1)
# ----------------------------------------------------------------------------

# Training resets its episodes with seeds below this; evaluation (cli.py) with seeds from it on.
TRAIN_SEED_LIMIT = 2 ** 31


class SinglePathSampler:
    """Runs environments side by side under pi_old and records their transitions.

    Episodes carry over from one batch to the next: an episode cut by the end of a batch goes on
    in the next one, and its value bootstrap covers the cut. Environment e draws its actions, and
    the seed of each of its episodes, from its own generator: a run is reproducible from --seed,
    and an environment follows the same trajectory in whichever process it runs. Each episode's
    seed and actions so far are kept: replayed, they rebuild any of its states (the vine's restore).
    """

    def __init__(self, envs, env_seeds, action_seeds):
        self.envs = envs
        self.action_rngs = [np.random.default_rng(int(s)) for s in action_seeds]
        self.episode_seed = [int(s) for s in env_seeds]
        self.episode_actions = [[] for _ in envs]  # the actions of each environment's episode so far
        self.obs = np.array([env.reset(seed=s)[0] for env, s in zip(envs, self.episode_seed)], dtype=np.float64)
        self.episode_return = np.zeros(len(envs))  # running return of each environment's current episode

    def sample(self, net, theta, steps):
        """Step every environment `steps` times under pi_theta. Returns a dict of (T, E, ...) arrays:

        obs, next_obs, rewards, terminated, truncated, episode_return, logits, actions, and
        episode_seed and episode_step, the seed of each state's episode and its number of steps so far.
        `next_obs[t, e]` is the observation that really followed action t, the final one when the
        episode ended there (before the reset): V(next_obs) is what a truncated episode, or the
        batch's last step, bootstraps with. `episode_return[t, e]` is the return of the episode
        that ended at step t, NaN where none ended. A continuous action is recorded as sampled,
        before the environment clips it (make_env).
        """
        batch = self.empty_batch(net, steps)
        for t in range(steps):
            logits, actions = self.draw_actions(net, theta)
            self.step_environments(batch, t, logits, actions)
        return batch

    def empty_batch(self, net, steps):
        E, D = self.obs.shape
        continuous = net.distribution is DiagonalGaussian
        logits_size = 2 * net.sizes[-1] if continuous else net.sizes[-1]  # a Gaussian's z = [mu, log sigma]
        return {"obs": np.zeros((steps, E, D)), "next_obs": np.zeros((steps, E, D)),
                "rewards": np.zeros((steps, E)), "terminated": np.zeros((steps, E), dtype=bool),
                "truncated": np.zeros((steps, E), dtype=bool), "episode_return": np.full((steps, E), np.nan),
                "logits": np.zeros((steps, E, logits_size)),
                "actions": np.zeros((steps, E, net.sizes[-1])) if continuous else np.zeros((steps, E), np.int64),
                "episode_seed": np.zeros((steps, E), np.int64), "episode_step": np.zeros((steps, E), np.int64)}

    def draw_actions(self, net, theta):
        """pi_theta at every environment's observation, in ONE forward pass: (logits (E, A), actions),
        each environment's action drawn with its own generator. For a Gaussian policy the "logits"
        are z = [mu, log sigma], (E, 2d), and the actions (E, d)."""
        logits, _ = net.forward(theta, self.obs)
        dist = net.distribution
        return logits, dist.sample(logits, [dist.noise(rng, net.sizes[-1]) for rng in self.action_rngs])

    def step_environments(self, batch, t, logits, actions):
        """Every environment takes its action of time step t; the transitions go into row t of batch.
        An environment whose episode ends starts the next one, with a seed from its generator."""
        batch["obs"][t], batch["logits"][t], batch["actions"][t] = self.obs, logits, actions
        batch["episode_seed"][t] = self.episode_seed
        batch["episode_step"][t] = [len(taken) for taken in self.episode_actions]
        # ints for the loop below; continuous actions stay rows of the (E, d) array, as the env's clip wants
        actions = actions.tolist() if actions.ndim == 1 else actions
        # The hot path: Python lists per environment, copied into the arrays once per step.
        E = len(self.envs)
        rewards, next_obs, obs_after = [0.0] * E, [None] * E, [None] * E
        for e in range(E):
            obs, rewards[e], terminated, truncated, _ = self.envs[e].step(actions[e])
            self.episode_actions[e].append(actions[e])
            self.episode_return[e] += rewards[e]
            next_obs[e] = obs
            if terminated or truncated:
                next_obs[e] = np.array(obs)  # a copy: the reset below must not change it
                batch["terminated"][t, e] = terminated
                batch["truncated"][t, e] = truncated
                batch["episode_return"][t, e] = self.episode_return[e]
                self.episode_return[e] = 0.0
                self.episode_seed[e] = int(self.action_rngs[e].integers(TRAIN_SEED_LIMIT))
                self.episode_actions[e] = []
                obs = self.envs[e].reset(seed=self.episode_seed[e])[0]
            obs_after[e] = obs
        batch["rewards"][t] = rewards
        batch["next_obs"][t] = next_obs
        self.obs = np.array(obs_after, dtype=np.float64)

    def close(self):
        for env in self.envs:
            env.close()


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
# 4. The step: Fisher-vector product, conjugate gradient, maximal step, line search (Appendix C)
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

    `evaluate(theta)` returns (L(theta) - L(theta_old), KLbar(theta_old, theta), what else the caller
    wants back of that try: trpo_step's logits). Try theta_old + backtrack_coeff^k * full_step for
    k = 0, 1, ...; accept the first step whose mean KL is at most delta (never above: no slack) and
    whose surrogate improves by more than min_improvement. Returns (success, theta, improvement, kl,
    backtracks, the accepted try's third value). On failure theta is theta_old itself, not the last
    rejected try, and the third value None.
    """
    for k in range(max_backtracks):
        theta = theta_old + backtrack_coeff ** k * full_step
        improvement, kl_reached, extra = evaluate(theta)
        if kl_reached <= max_kl and improvement > min_improvement:
            return True, theta, improvement, kl_reached, k, extra
    return False, theta_old, 0.0, 0.0, max_backtracks, None


@dataclass
class Step:
    """What a policy step did, for the log: accepted, the mean KL reached, the line search's backtracks,
    the improvement of L the linear model predicted for the step taken and the one reached, why no step
    was taken ("" if one was), and the policy's logits on the step's states before and after it."""
    logits_old: np.ndarray
    logits_new: np.ndarray
    accepted: bool = False
    kl: float = 0.0
    backtracks: int = 0
    expected_improve: float = 0.0
    actual_improve: float = 0.0
    skipped: str = ""


def trpo_step(net, theta_old, states, surrogate_of_logits, cfg):
    """Step 4 of the loop: one TRPO policy update (Sec. 6, solved as in Appendix C), the same for both
    schemes. `surrogate_of_logits(logits)` returns (L, dL/dlogits) for the scheme's surrogate on `states`.

      4a. g = dL/dtheta at theta_old (backprop of dL/dz)
      4b. x = (F + damping I)^-1 g by conjugate gradient, F the Fisher (the Hessian of KLbar at theta_old)
          on every k-th state; the damping keeps CG well conditioned
      4c. beta = sqrt(2 delta / x^T (F + damping I) x), the full step beta x: its quadratic KL model is
          delta (the damping makes its real KL a little less: about 0.7 delta at the defaults)
      4d. line search: shrink the step until KLbar <= delta and L improves; if none does, keep theta_old

    Returns (theta_new, Step). A gradient that is zero or not finite, or a curvature x^T F x that is
    not positive, takes no step, and says so."""
    logits_old, cache = net.forward(theta_old, states)
    L_old, dL_dlogits = surrogate_of_logits(logits_old)

    # 4a. the policy gradient
    g = net.backward(theta_old, cache, dL_dlogits)
    if not np.all(np.isfinite(g)) or not np.any(g):
        return theta_old, Step(logits_old, logits_old, skipped="gradient is zero or not finite")

    # 4b. the natural-gradient direction: F on every k-th row of the forward pass's cache (each layer's input)
    fisher_cache = [np.ascontiguousarray(h[::cfg.fisher_subsample]) for h in cache]
    fisher_logits = logits_old[::cfg.fisher_subsample]
    fisher_slopes = net.tanh_slopes(fisher_cache)  # tanh' of each layer, the same in every product: once

    def Fvp(v):
        return fisher_vector_product(net, theta_old, fisher_cache, fisher_logits, v, cfg.damping, fisher_slopes)
    x = conjugate_gradient(Fvp, g, cfg.cg_iters)

    # 4c. the step's length from the quadratic model of the KL, and the improvement a linear model of L predicts
    x_F_x = x @ Fvp(x)
    if not (np.all(np.isfinite(x)) and np.isfinite(x_F_x) and x_F_x > 0):
        return theta_old, Step(logits_old, logits_old,
                               skipped="conjugate gradient gave a non-finite or non-positive x^T F x")
    full_step = maximal_step(x, x_F_x, cfg.max_kl)
    expected = g @ full_step

    # 4d. backtracking line search on the true surrogate and KL
    def evaluate(theta):
        logits = net.forward(theta, states)[0]
        return surrogate_of_logits(logits)[0] - L_old, mean_kl(logits_old, logits, net.distribution), logits
    if cfg.trust_region:
        # Rounding moves L by about 1e-16 of max(1, |L_old|); 1e-10 of it is far above that, and still
        # far below any real improvement. Without a threshold, a gradient that is really zero (every
        # action equally good) would "improve" on rounding noise.
        accepted, theta_new, improvement, kl_reached, backtracks, logits_new = line_search(
            evaluate, theta_old, full_step, cfg.max_kl, cfg.backtrack_coeff, cfg.max_backtracks,
            min_improvement=1e-10 * max(1.0, abs(L_old)))
    else:  # --no-trust-region: the natural-gradient step of the same size, taken whatever it does
        accepted, theta_new, backtracks = True, theta_old + full_step, 0
        improvement, kl_reached, logits_new = evaluate(theta_new)
    if not accepted:
        return theta_old, Step(logits_old, logits_old, backtracks=backtracks, expected_improve=expected,
                               skipped="line search failed, keeping old parameters")
    return theta_new, Step(logits_old, logits_new, True, kl_reached, backtracks,
                           expected * cfg.backtrack_coeff ** backtracks, improvement)


# ----------------------------------------------------------------------------
# 5. The value function (GAE paper Sec. 5)
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


def fit_value_function(value_fn, problem, cfg, rng):
    """Step 5 of the loop: refit V to this iteration's value targets, for the next iteration's advantages.

    Returns (mean squared error after the fit, "" or why the fit was skipped): one target
    that is not finite would poison every weight of V, so such a batch is not fitted."""
    if not np.all(np.isfinite(problem.value_targets)):
        return float("nan"), "value targets not finite, value fit skipped"
    return value_fn.fit(problem.fit_states, problem.value_targets, cfg.vf_epochs, cfg.vf_minibatch, rng), ""


# ----------------------------------------------------------------------------
# The vine (TRPO Sec. 5.2): trunk, rollout set, a branch per action, Eq. (15) or (16)
# ----------------------------------------------------------------------------

class VineSampler:
    """The vine (TRPO Sec. 5.2), three steps each iteration:

      (a) the trunk: sample trajectories under pi_old with the single-path sampler;
      (b) the rollout set: choose N of the trunk's T x E states at random;
      (c) from each state s_n, once per action a of its action set: restore the simulator to s_n
          (by seeded replay, exact), take a, then follow pi_old for a branch of H steps in all, whose
          return (branch_rollout) estimates Q(s_n, a).

    The action set is every action (the all-actions estimator, Eq. 15) or K draws from q (uniform,
    or pi_old), for the importance-sampling estimator of Eq. (16). All branches from one state share
    one stream of random numbers (common random numbers), so the differences between their Q values,
    which drive the update, have low variance.
    """

    def __init__(self, trunk, cfg, rng, value_fn):
        self.trunk, self.cfg, self.rng, self.value_fn = trunk, cfg, rng, value_fn

    def sample(self, net, theta, steps):
        """The trunk's batch (SinglePathSampler's), and what the branches found: rollout_states (N, D) and
        rollout_logits in row-major (t, e) order, their action_sets (N, K, ...), Q (N, K), proposal (N, K,
        q of each drawn action; None with every action), branch_steps and restores (counts)."""
        cfg, dist = self.cfg, net.distribution
        actions_before = [list(taken) for taken in self.trunk.episode_actions]  # episodes begun before this batch
        # (a) the trunk
        batch = self.trunk.sample(net, theta, steps)
        # (b) the rollout set, and the random numbers of its branches
        rollout, noise, draws = choose_rollout_set(self.rng, batch["obs"].shape[:2], cfg, dist, net.sizes[-1])
        logits = batch["logits"][rollout]
        action_sets, proposal = branch_actions(logits, draws, cfg.vine_proposal, dist, net.sizes[-1])
        # (c) from each state, a branch for each action of its set, all with the state's own noise
        Q = np.zeros(action_sets.shape[:2])
        branch_steps, bootstrap, act = 0, self.value_fn if cfg.vine_bootstrap else None, one_state_policy(net, theta)
        for n, (t, e) in enumerate(np.argwhere(rollout)):
            episode = episode_so_far(actions_before[e], batch, t, e)
            for k, action in enumerate(action_sets[n]):
                env = restore_by_replay(make_env(cfg.env), batch["episode_seed"][t, e], episode)
                Q[n, k], H = branch_rollout(env, action, act, noise[n], cfg.gamma, bootstrap, cfg.lam)
                env.close()
                branch_steps += H
        batch.update(rollout_states=batch["obs"][rollout], rollout_logits=logits, Q=Q, action_sets=action_sets,
                     proposal=proposal, branch_steps=branch_steps, restores=Q.size)
        return batch

    def close(self):
        self.trunk.close()


def choose_rollout_set(rng, trunk_shape, cfg, dist, num_actions):
    """Step (b) of the vine: N = min(vine_states, T E) of the trunk's states, as a (T, E) mask, and their
    random numbers, one row per state in row-major (t, e) order: noise (N, H, ...), the stream its
    branches share (common random numbers), and draws (N, K, ...), which pick its K actions from q
    (None with every action)."""
    N = min(cfg.vine_states, trunk_shape[0] * trunk_shape[1])
    rollout = np.zeros(trunk_shape, dtype=bool)
    rollout.flat[rng.choice(rollout.size, size=N, replace=False)] = True
    noise = dist.noise(rng, num_actions, (N, cfg.vine_horizon))
    draws = dist.noise(rng, num_actions, (N, cfg.vine_actions)) if cfg.vine_actions else None
    return rollout, noise, draws


def branch_actions(logits, draws, proposal, dist, num_actions):
    """The action set of each rollout state, (N, K, ...), and q of each drawn action, (N, K): every action
    (Eq. 15: K = A, q None), or K actions drawn with `draws` from q, uniform (equal logits) or pi_old
    (the state's own logits), for Eq. (16)."""
    if draws is None:
        return np.tile(np.arange(num_actions), (len(logits), 1)), None
    N, K = draws.shape[:2]
    q_logits = np.repeat(logits if proposal == "pi_old" else np.zeros_like(logits), K, axis=0)  # (N K, ...)
    actions = dist.sample(q_logits, draws.reshape(N * K, *draws.shape[2:]))
    q = np.exp(dist.log_prob(q_logits, actions)).reshape(N, K)
    return actions.reshape(N, K, *actions.shape[1:]), q


def episode_so_far(actions_before, batch, t, e):
    """The actions environment e's episode took before step t of the batch (`actions_before`: those of its
    episode before the batch began): replayed from the episode's seed, they rebuild the state s_t."""
    taken = actions_before + list(batch["actions"][:t, e])
    return taken[len(taken) - batch["episode_step"][t, e]:]


def restore_by_replay(env, seed, actions):
    """Bring env to the state an episode reached: reset it with the episode's seed, then take the episode's
    actions again. Returns env.

    Exact: the simulator is deterministic and its reset seeds the terrain, provided env keeps no
    contact caches from earlier episodes. LunarLander's reset builds a new Box2D world; BipedalWalker's
    keeps its world, which is why the vine replays in a new environment. It costs one step per step of
    the episode so far (engine.py restores older states by fork instead, exact too and cheaper)."""
    env.reset(seed=int(seed))
    for action in actions:
        env.step(action)
    return env


def one_state_policy(net, theta):
    """pi_theta for one state at a time, as a branch follows it: act(obs, u), the action at observation obs
    drawn with the random numbers u (a uniform for a categorical, d standard normals for a Gaussian)."""
    def act(obs, u):
        logits, _ = net.forward(theta, np.asarray(obs, dtype=np.float64)[None])  # (1, A): one state
        return net.distribution.sample(logits, u[None])[0]
    return act


def branch_rollout(env, first_action, act, noise, gamma, value_fn=None, lam=1.0):
    """One branch of the vine: from env's current state take `first_action`, then follow the policy act
    (one_state_policy: pi_old).

    The branch runs len(noise) steps at most, the first action included, and stops earlier if
    the episode ends; H below is the number of steps it took. Step l draws its action with
    noise[l], so branches given the same noise share their random numbers. Returns (Q, H).

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
    """
    obs, reward, terminated, truncated, _ = env.step(first_action)
    rewards, observations = [reward], [obs]
    while len(rewards) < len(noise) and not (terminated or truncated):
        obs, reward, terminated, truncated, _ = env.step(act(obs, noise[len(rewards)]))
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
# The loop: the practical algorithm of Sec. 6
# ----------------------------------------------------------------------------

class Learner:
    """Everything that changes as TRPO learns: the policy's theta, the value function, the run's one
    random generator, the counters, every finished episode's return and one row per iteration."""

    def __init__(self, cfg):
        obs_dim, num_actions, continuous = env_dims(cfg.env)
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        # discrete actions: an MLP giving a categorical's logits; continuous: a Gaussian policy (network.py)
        self.policy_net = policy_network([obs_dim, *cfg.hidden, num_actions], continuous)
        # every action nearly equally likely at first (a Gaussian: mean 0, log sigma = log_std_init)
        self.theta = self.policy_net.init(self.rng, output_gain=0.01)
        if continuous:
            self.theta[self.policy_net.mean_params:] = cfg.log_std_init
        self.value_fn = ValueFunction(MLP([obs_dim, *cfg.hidden, 1]), self.rng, lr=cfg.vf_lr)
        self.iteration, self.env_steps, self.wall_s = 0, 0, 0.0
        self.episode_returns = []  # in order of (step, environment)
        self.history = []  # the rows of progress.csv

    def finished(self):
        """Whether the run is over: its steps trained, or its rolling return at cfg.stop_return."""
        return self.env_steps >= self.cfg.total_steps or solved(self.history, self.cfg.stop_return)


def make_sampler(cfg, learner):
    """The scheme's sampler for cfg.num_envs environments in this process, seeded from the run's generator:
    each environment gets the seed of its first episode and one for the generator of its actions."""
    env_seeds = learner.rng.integers(TRAIN_SEED_LIMIT, size=cfg.num_envs)
    action_seeds = learner.rng.integers(2 ** 63, size=cfg.num_envs)
    trunk = SinglePathSampler([make_env(cfg.env) for _ in env_seeds], env_seeds, action_seeds)
    return VineSampler(trunk, cfg, learner.rng, learner.value_fn) if cfg.scheme == "vine" else trunk


@dataclass
class Problem:
    """What the step (4) and the value fit (5) work on, made by steps 2 and 3 from a batch."""
    states: np.ndarray  # (N, D): the states the step is taken on, the batch's or the vine's rollout set
    objective: object  # logits -> (L, dL/dlogits): the scheme's surrogate, with any entropy bonus
    logits_old: np.ndarray  # pi_old's logits at those states
    in_return_units: object  # for the log: the surrogate with advantages in the return's units
    largest_advantage: float  # for the log: eps = max |A| of Theorem 1
    fit_states: np.ndarray  # step 5 fits V(fit_states) to value_targets; values: V there before the fit
    value_targets: np.ndarray
    values: np.ndarray


def policy_problem(learner, batch):
    """Steps 2 and 3 of the loop: the advantages, and the scheme's surrogate on the states of the step."""
    cfg, value_fn, dist = learner.cfg, learner.value_fn, learner.policy_net.distribution
    # 2. advantages on the (trunk) trajectories; V learns from them in both schemes
    advantages, value_targets, values = estimate_advantages(batch, value_fn, cfg)
    fit_states = batch["obs"].reshape(cfg.batch_size, -1)
    # 3. the surrogate
    if cfg.scheme == "vine":  # Eq. (15) or (16) over the rollout set, already in the return's units
        states, surrogate_of_logits, branch_values = vine_problem(batch, dist)
        logits_old, in_return_units = batch["rollout_logits"], surrogate_of_logits
        largest_advantage = np.nanmax(np.abs(batch["Q"] - branch_values[:, None]))
        if cfg.vine_bootstrap:  # an addition: V also learns the branches' estimates of V(s_n)
            fit_states = np.concatenate([fit_states, states])
            value_targets = np.concatenate([value_targets, branch_values])
            values = np.concatenate([values, value_fn.predict(states)])
    else:  # Eq. (14) over the whole batch, in row-major (t, e) order as the advantages are
        states = fit_states
        actions = batch["actions"].reshape(len(states), *batch["actions"].shape[2:])
        logits_old = batch["logits"].reshape(len(states), -1)
        logp_old = dist.log_prob(logits_old, actions)
        step_advantages = standardize(advantages) if cfg.normalize_advantages else advantages

        def surrogate_of_logits(logits):
            return surrogate(logits, actions, logp_old, step_advantages, dist)

        def in_return_units(logits):
            return surrogate(logits, actions, logp_old, advantages, dist)
        largest_advantage = np.max(np.abs(advantages))
    objective = with_entropy_bonus(surrogate_of_logits, cfg.entropy_coef, dist) if cfg.entropy_coef \
        else surrogate_of_logits
    return Problem(states, objective, logits_old, in_return_units, largest_advantage, fit_states, value_targets,
                   values)


def train_iteration(learner, sampler):
    """One iteration of Sec. 6's practical algorithm, with the GAE paper's value fit: steps 1 to 5.
    Updates the learner and returns the iteration's row of progress.csv."""
    cfg, net = learner.cfg, learner.policy_net
    start = time.perf_counter()
    batch = sampler.sample(net, learner.theta, cfg.steps_per_env)  # 1. sample with pi_old
    problem = policy_problem(learner, batch)  # 2. advantages, 3. the surrogate
    learner.theta, step = trpo_step(net, learner.theta, problem.states, problem.objective, cfg)  # 4. the step
    value_fit = fit_value_function(learner.value_fn, problem, cfg, learner.rng)  # 5. the value fit
    return record_iteration(learner, batch, problem, step, value_fit, time.perf_counter() - start)


def record_iteration(learner, batch, problem, step, value_fit, seconds):
    """Count the iteration and its batch in the learner; its row of progress.csv, what the step did and what
    Theorem 1 says of it (diagnostics.py), joins the history. Returns the row."""
    ended = batch["episode_return"]
    learner.iteration += 1
    learner.env_steps += learner.cfg.batch_size
    learner.episode_returns.extend(ended[~np.isnan(ended)])
    row = progress_row(learner, batch, problem, step, value_fit, seconds)
    learner.history.append(row)
    return row


def solved(history, stop_return):
    """Whether the last iteration's rolling return reached stop_return (never, if that is None)."""
    return stop_return is not None and bool(history) and history[-1]["rolling_return"] >= stop_return


def train(cfg, verbose=True):
    """Train a policy with TRPO in this process, with nothing written to disk: the loop of Sec. 6 until
    cfg.total_steps or cfg.stop_return. verbose prints a line per iteration. Returns (policy_net, theta,
    history), history one dict per iteration. (The command line runs the same loop through engine.py,
    with its files: cli.train.)"""
    learner = Learner(cfg)
    sampler = make_sampler(cfg, learner)
    start = time.perf_counter()
    try:
        while not learner.finished():
            row = train_iteration(learner, sampler)
            learner.wall_s = row["wall_s"] = time.perf_counter() - start
            if verbose:
                print(format_log_line(row))
    finally:
        sampler.close()
    return learner.policy_net, learner.theta, learner.history
