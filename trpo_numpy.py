"""trpo_numpy.py: Trust Region Policy Optimization in plain NumPy, on Gymnasium's LunarLander-v3.

Read this file beside the papers; it follows Algorithm 1 of TRPO in order:

  1. sample trajectories with the current policy pi_old         (Sec. 5.1, single path)
  2. estimate advantages                                        (GAE paper, Eq. 16; or Monte Carlo)
  3. build the surrogate L(theta) and its gradient g            (TRPO Eq. 14)
  4. solve F x = g by conjugate gradient, F the Fisher matrix   (Appendix C)
  5. scale to the trust region, beta = sqrt(2 delta / x^T F x)  (Appendix C)
  6. backtracking line search: KLbar <= delta and L improves    (Appendix C)
  7. fit the value function used by the next advantage estimate (GAE paper, Sec. 5)

Every derivative is written by hand in network.py and checked against finite
differences in test_trpo.py. No autodiff framework is used anywhere. What is not
about the algorithm lives beside it: parallel.py runs work in other processes
(sampler workers, the fork that restores a simulator state for the vine), and
run_files.py writes what a run leaves on disk (progress.csv, checkpoints, plots).

References:
  Schulman, Levine, Moritz, Jordan, Abbeel 2015. Trust Region Policy Optimization. arXiv:1502.05477
  Schulman, Moritz, Levine, Jordan, Abbeel 2015. High-Dimensional Continuous Control Using
      Generalized Advantage Estimation. arXiv:1506.02438
  Kakade & Langford 2002. Approximately Optimal Approximate Reinforcement Learning.

Run it:
  python trpo_numpy.py                       # single path on LunarLander-v3, writes runs/single-seed0/
  python trpo_numpy.py --seed 1 --max-kl 0.02
  python trpo_numpy.py --help                # every option, with its paper symbol
"""

import parallel  # first: it pins BLAS to one thread before NumPy loads

parallel.pin_blas_threads()
parallel.keep_freed_memory()
if __name__ == "__main__":
    parallel.stop_on_signals(interrupt=False)  # a Ctrl-C during the imports below is noted; main acts on it

import argparse
import concurrent.futures
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import run_files
from network import MLP, Adam, categorical_fisher_product, entropy, kl, log_prob, log_softmax, sample, softmax
from run_files import UserError


# Evaluation episodes reset with seeds from here on; training seeds its environments
# below TRAIN_SEED_LIMIT, so the two never share a start state by seed.
TRAIN_SEED_LIMIT = 2 ** 31
EVAL_SEED_BASE = 2 ** 31


# ----------------------------------------------------------------------------
# Hyperparameters: one place, each with its paper symbol. --help is built from these.
# ----------------------------------------------------------------------------

def option(default, help, **extra):
    """A Config field carrying its --help text (and optional argparse settings)."""
    return field(default=default, metadata={"help": help, **extra})


SCHEME_NAMES = {"single": "single path", "vine": "vine"}

# Where the vine's settings differ from the single path's (Config's defaults), for options
# not given on the command line. Its trunk is half the single path's batch (32 x 256 states:
# many finished episodes per iteration for the value fit and the rolling return, at little
# cost next to the branches); its all-actions estimate has so
# little noise that larger steps pay; its Fisher is taken over the few rollout states, every
# one of them. Unless told otherwise, a vine run stops once solved (the environment's reward
# threshold, 200 for LunarLander) or after VINE_ITERATIONS iterations: a run a class can wait for.
SCHEME_DEFAULTS = {"single": {},
                   "vine": {"num_envs": 32, "steps_per_env": 256, "max_kl": 0.05, "fisher_subsample": 1}}
VINE_ITERATIONS = 150
MAX_LAYER_SIZE = 4096  # a 4096 x 4096 layer is 128 MB of float64 weights; wider ones exhaust memory
MAX_ENVS = 1024  # environments side by side; each holds its own simulator


@dataclass
class Config:
    scheme: str = option("single", "sampling scheme: 'single' path (TRPO Sec. 5.1) or 'vine' (Sec. 5.2)",
                         choices=["single", "vine"])
    env: str = option("LunarLander-v3", "Gymnasium environment id; needs a Box observation and a Discrete action space")
    seed: int = option(0, "random seed for networks, action sampling and environment resets; "
                          "the same seed gives the same run, to the bit, on the same machine")
    total_steps: int = option(1_000_000, "environment steps to train for (trunk steps, summed over all environments; "
                                         "the vine: 150 iterations' worth unless given)")
    num_envs: int = option(32, "environments sampled side by side; the policy runs one batched forward pass "
                               "for all")
    workers: int = option(2, "processes working in parallel, one per core, each stepping its share of the "
                             "environments (the vine's also run their states' branches); 1 = all in this "
                             "process; a run is reproducible to the bit for the same seed and the same number "
                             "of workers")
    steps_per_env: int = option(512, "steps per environment per iteration; batch size = num_envs * steps_per_env "
                                     "(the vine's trunk: 256 unless given)")
    hidden: tuple = option((64, 64), "hidden layer sizes of the tanh policy and value networks "
                                     "('--hidden 16 16' gives LunarLander an 8-16-16-4 policy)", nargs="+")
    max_kl: float = option(0.04, "delta, the trust region: the mean KL(pi_old || pi_new) a step may reach (Eq. 12) "
                                 "(the vine: 0.05 unless given)")
    damping: float = option(0.1, "lambda, added to the Fisher matrix (F + lambda I) so conjugate gradient stays "
                                 "well conditioned; raise it if steps often fail the line search")
    fisher_subsample: int = option(2, "use every k-th state of the batch in Fisher-vector products: k times "
                                      "cheaper conjugate gradient, a noisier F (baselines uses 5); the KL check "
                                      "of the line search always uses every state (the vine: 1 unless given)")
    cg_iters: int = option(10, "conjugate-gradient iterations to solve F x = g (Appendix C); about 10 is enough")
    backtrack_coeff: float = option(0.8, "alpha, the line search shrinks the step by this factor each backtrack")
    max_backtracks: int = option(10, "line-search attempts before keeping theta_old")
    gamma: float = option(0.999, "gamma, the discount factor: LunarLander's +100 for coming to rest arrives at the "
                                 "end of episodes hundreds of steps long")
    lam: float = option(0.97, "lambda of GAE(gamma, lambda) (GAE paper Eq. 16); 1 is Monte Carlo, 0 is TD(0); "
                              "the vine uses it twice: for the value targets on its trunk, and for the "
                              "lambda-return of each branch, its Q")
    advantage: str = option("gae", "advantage estimator: 'gae' (GAE(lambda) with a learned value function) or "
                                   "'mc' (discounted return-to-go minus the value baseline, as TRPO Sec. 5.1)",
                            choices=["gae", "mc"])
    normalize_advantages: bool = option(True, "single path: shift and scale each batch's advantages to mean 0, "
                                              "std 1; the mean acts as a baseline; the scale does not change the "
                                              "step (it is rescaled to the trust region), only conjugate "
                                              "gradient's stopping tolerance and the entropy bonus's weight")
    vf_lr: float = option(1e-3, "Adam learning rate of the value network")
    vf_epochs: int = option(5, "passes over the batch when fitting the value network each iteration")
    vf_minibatch: int = option(256, "minibatch size of the value-network fit")
    vine_states: int = option(256, "vine: N, states in the rollout set, drawn from the trunk each iteration")
    vine_horizon: int = option(100, "vine: H, steps of each branch (the first is the branched action)")
    vine_actions: int = option(0, "vine: 0 branches on every action (all-actions estimator, Eq. 15); K > 0 "
                                  "branches on K actions drawn from q (importance sampling, Eq. 16)")
    vine_proposal: str = option("uniform", "vine with K > 0: q, the distribution the K actions are drawn from",
                                choices=["uniform", "pi_old"])
    vine_bootstrap: bool = option(True, "vine: Q is the branch's lambda-return, which uses V at every state "
                                        "the branch reaches (--no-vine-bootstrap: the paper's Monte-Carlo Q, "
                                        "the discounted sum of the branch's rewards, with no V and no lambda)")
    vine_restore: str = option("auto", "vine: how a trunk state is restored, all exact and giving the same run: "
                                       "'fork' copies the process (a few ms, however old the episode); 'replay' "
                                       "resets a spare env with the episode's seed and replays its actions (one "
                                       "step per step so far; used where fork is missing); 'auto' replays where "
                                       "that is cheaper than a fork (measured at start), else forks",
                               choices=["auto", "fork", "replay"])
    entropy_coef: float = option(0.0, "beta, adds beta x the mean policy entropy to the surrogate (not in the "
                                      "paper; 0 is TRPO as published)")
    trust_region: bool = option(True, "--no-trust-region takes the natural-gradient step of the same size "
                                      "without the line search: nothing then keeps the KL at delta or makes "
                                      "the surrogate improve (to watch what the trust region prevents)")
    stop_return: float = option(None, "stop early once the mean return of the last 100 episodes reaches this "
                                      "(e.g. 200, LunarLander's 'solved'); by default train for --total-steps "
                                      "(the vine: stops at the environment's reward threshold unless given)")
    save_every: int = option(10, "write <out>/checkpoint.npz every this many iterations (and always at the end)")
    out: str = option("", "output folder for progress.csv, config.json, policy.npz and plots; a new run "
                          "refuses a folder that holds another run (continue that with --resume). By default "
                          "runs/<scheme>-seed<seed>, numbered -2, -3, ... if taken")

    @property
    def batch_size(self):
        return self.num_envs * self.steps_per_env

    def out_dir(self):
        return self.out or os.path.join("runs", f"{self.scheme}-seed{self.seed}")

    def validate(self):
        """Raise UserError, in one sentence, for any value the algorithm cannot run with."""
        positive = ["total_steps", "num_envs", "workers", "steps_per_env", "max_kl", "fisher_subsample",
                    "cg_iters", "max_backtracks", "vf_lr", "vf_epochs", "vf_minibatch", "save_every",
                    "vine_states", "vine_horizon"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        if not self.damping >= 0:
            raise UserError(f"--damping must be zero or positive, got {self.damping}.")
        if not 0 < self.gamma <= 1:
            raise UserError(f"--gamma must be in (0, 1], got {self.gamma}.")
        if not 0 <= self.lam <= 1:
            raise UserError(f"--lam must be in [0, 1], got {self.lam}.")
        if not 0 < self.backtrack_coeff < 1:
            raise UserError(f"--backtrack-coeff must be in (0, 1), got {self.backtrack_coeff}.")
        if not self.vine_actions >= 0:
            raise UserError(f"--vine-actions must be 0 (all actions) or positive, got {self.vine_actions}.")
        if not self.hidden or any(n < 1 for n in self.hidden):
            raise UserError(f"--hidden needs one or more positive layer sizes, got {list(self.hidden)}.")
        for name in ("max_kl", "damping", "vf_lr", "entropy_coef", "stop_return"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}.")
        if self.seed < 0:
            raise UserError(f"--seed must be zero or positive, got {self.seed}.")
        if self.vine_actions == 1:
            raise UserError("--vine-actions 1 cannot learn: with one sampled action the self-normalised "
                            "estimate of Eq. (16) is that action's Q whatever theta is, so its gradient is zero; "
                            "use 2 or more, or 0 for all actions.")
        if max(self.hidden) > MAX_LAYER_SIZE:
            raise UserError(f"--hidden {max(self.hidden)} is wider than this NumPy implementation can hold in "
                            f"memory at a useful speed; use at most {MAX_LAYER_SIZE}.")
        if self.num_envs > self.total_steps:
            raise UserError(f"--num-envs {self.num_envs:,} is more environments than --total-steps "
                            f"{self.total_steps:,}: the first step of every environment would already be "
                            f"more than the whole run.")
        if self.num_envs > MAX_ENVS:
            raise UserError(f"--num-envs {self.num_envs:,} environments would take minutes and gigabytes to "
                            f"build; use at most {MAX_ENVS} (and --steps-per-env for a larger batch).")


def scheme_config(scheme="single", **given):
    """The Config of a run: the settings given, and the scheme's defaults (SCHEME_DEFAULTS) for the rest."""
    cfg = Config(**{**SCHEME_DEFAULTS[scheme], **given, "scheme": scheme})
    if scheme == "vine" and "total_steps" not in given:
        cfg.total_steps = VINE_ITERATIONS * cfg.batch_size
    if scheme == "vine" and "stop_return" not in given:
        cfg.stop_return = reward_threshold(cfg.env)
    return cfg


# ----------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------

def make_env(env_id, render_mode=None):
    """gym.make with the errors a user can cause turned into one sentence.

    The policy is categorical over a Discrete action space and the networks take a
    flat Box observation; anything else is refused here rather than deep inside."""
    import gymnasium as gym
    if render_mode == "rgb_array":
        # Frames drawn into an array need no window; without this SDL looks for a display
        # and prints an error on a headless machine.
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    try:
        env = gym.make(env_id, render_mode=render_mode)
    except gym.error.DependencyNotInstalled as e:
        raise UserError(f"environment '{env_id}' needs a package that is not installed: {e}") from None
    except gym.error.Error as e:
        raise UserError(f"unknown environment '{env_id}' ({e}).") from None
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise UserError(f"environment '{env_id}' has a {type(env.action_space).__name__} action space; "
                        "this TRPO's categorical policy needs a Discrete one.")
    if not (isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1):
        raise UserError(f"environment '{env_id}' has observation space {env.observation_space}; "
                        "the networks need a flat Box observation.")
    return env


def reward_threshold(env_id):
    """The return at which Gymnasium counts env_id as solved (LunarLander: 200), or None."""
    import gymnasium as gym
    try:
        return gym.spec(env_id).reward_threshold
    except gym.error.Error:
        return None  # an unknown id: make_env says so, in one sentence


def env_dims(env):
    """(observation size, number of actions) of an environment accepted by make_env."""
    return env.observation_space.shape[0], int(env.action_space.n)


# ----------------------------------------------------------------------------
# 1. Sampling: the single-path scheme (TRPO Sec. 5.1)
# ----------------------------------------------------------------------------

class SinglePathSampler:
    """Runs environments side by side under pi_old and records their transitions.

    Episodes carry over from one batch to the next: an episode cut by the end of a
    batch is continued in the next one, and its value bootstrap covers the cut.
    Environment e draws its actions, and the seed each of its episodes is reset with,
    from its own generator: a run is reproducible from --seed, the same environment
    follows the same trajectory whether it runs in this process or in a worker
    (ParallelSampler), and any state can be rebuilt by replaying its episode's actions
    from the episode's seed (the vine's fallback where fork is missing).
    """

    def __init__(self, envs, env_seeds, action_seeds):
        self.envs = envs
        self.action_rngs = [np.random.default_rng(int(s)) for s in action_seeds]
        self.episode_seed = [int(s) for s in env_seeds]
        self.episode_actions = [[] for _ in envs]  # the current episode's actions so far, for replay
        self.obs = np.array([env.reset(seed=s)[0] for env, s in zip(envs, self.episode_seed)], dtype=np.float64)
        self.episode_return = np.zeros(len(envs))  # running return of each environment's current episode

    def sample(self, net, theta, steps, branch_points=None, branch=None):
        """Step every environment `steps` times under pi_theta. Returns a dict of (T, E, ...) arrays.

        `next_obs[t, e]` is the observation that really followed action t, the final one
        when the episode ended there (before the reset): V(next_obs) is what a truncated
        episode, or the batch's last step, bootstraps with. `episode_return[t, e]` is the
        return of the episode that ended at step t, NaN where none ended.
        The vine passes a (T, E) mask `branch_points`: at those states `branch(t, e, self)`
        is called before environment e takes its step t, to start rollouts from there.
        """
        E, D = self.obs.shape
        batch = {
            "obs": np.zeros((steps, E, D)),
            "next_obs": np.zeros((steps, E, D)),
            "actions": np.zeros((steps, E), dtype=np.int64),
            "logits": None,
            "rewards": np.zeros((steps, E)),
            "terminated": np.zeros((steps, E), dtype=bool),
            "truncated": np.zeros((steps, E), dtype=bool),
            "episode_return": np.full((steps, E), np.nan),
        }
        logits_steps = []
        rewards, next_obs, obs_after = [0.0] * E, [None] * E, [None] * E  # step t, per environment
        for t in range(steps):
            logits, _ = net.forward(theta, self.obs)  # (E, A): ONE forward pass for all environments
            actions = sample(logits, [rng.random() for rng in self.action_rngs]).tolist()
            self.last_logits = logits
            batch["obs"][t] = self.obs
            batch["actions"][t] = actions
            logits_steps.append(logits)
            # The hot path: Python lists per environment, copied into the arrays once per step.
            for e, env in enumerate(self.envs):
                if branch_points is not None and branch_points[t, e]:
                    branch(t, e, self)
                obs, rewards[e], terminated, truncated, _ = env.step(actions[e])
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
                    obs, _ = env.reset(seed=self.episode_seed[e])
                obs_after[e] = obs
            batch["rewards"][t] = rewards
            batch["next_obs"][t] = next_obs
            self.obs = np.array(obs_after, dtype=np.float64)
        batch["logits"] = np.array(logits_steps)  # (T, E, A), pi_old's logits at every state
        return batch

    def close(self):
        for env in self.envs:
            env.close()


def single_path_sampler(env_id, env_seeds, action_seeds):
    """A SinglePathSampler on new environments: what each of ParallelSampler's workers owns."""
    return SinglePathSampler([make_env(env_id) for _ in env_seeds], env_seeds, action_seeds)


class ParallelSampler:
    """The same sampler, its environments split over worker processes, one per core.

    Each worker steps its share of the environments with its own batched forward pass;
    the main process only sends theta and joins the batches along the environment axis.
    Because every environment keeps its own seeds, the batch is the same as
    SinglePathSampler's on the same seeds (the logits to rounding: BLAS may sum a
    smaller batch's product in another order). Simulation is most of a TRPO
    iteration's time, so two workers on two cores nearly halve it.
    """

    def __init__(self, env_id, env_seeds, action_seeds, workers):
        parts = np.array_split(np.arange(len(env_seeds)), workers)
        self.workers = parallel.WorkerProcesses(single_path_sampler, [
            (env_id, [int(env_seeds[i]) for i in part], [int(action_seeds[i]) for i in part]) for part in parts])

    def sample(self, net, theta, steps):
        parts = self.workers.call("sample", [(net, theta, steps)] * len(self.workers.connections))
        return {key: np.concatenate([part[key] for part in parts], axis=1) for key in parts[0]}

    def close(self):
        self.workers.close()


# ----------------------------------------------------------------------------
# 1b. Sampling: the vine scheme (TRPO Sec. 5.2)
# ----------------------------------------------------------------------------

def branch_rollout(env, first_action, net, theta, uniforms, gamma, value_fn=None, lam=1.0):
    """One branch of the vine: from env's current state take `first_action`, then follow pi_theta.

    The branch runs len(uniforms) steps at most, the first action included, and stops
    earlier if the episode ends; H below is the number of steps it took. Step l samples its
    action with uniforms[l], so branches given the same uniforms share their random numbers.
    Returns (Q, H).

    With value_fn None, Q is the paper's Monte-Carlo estimate sum_l gamma^l r_l. Otherwise
    Q is the branch's lambda-return (GAE paper Sec. 5), computed backwards from G_H = V(s_H):
        G_l = r_l + gamma * ((1 - lam) * V(s_{l+1}) + lam * G_{l+1}),   Q = G_0,
    with V = 0 after a terminated step (a time-limit truncation bootstraps like the horizon).
    That is (1 - lam) sum_{n<H} lam^(n-1) G^(n) + lam^(H-1) G^(H), the n-step returns
    G^(n) = sum_{l<n} gamma^l r_l + gamma^n V(s_n) weighted as in the GAE paper.
    lam = 1 gives sum_l gamma^l r_l + gamma^H V(s_H); a smaller lam trusts V more and the far,
    noisy end of the branch less: where the branches of a state have drifted apart, their
    distant rewards differ by chance, not because of the first action.
    """
    layers = net.unflatten(theta)  # split once: each step's policy pass is then three small products
    obs, reward, terminated, truncated, _ = env.step(int(first_action))
    rewards, observations = [reward], [obs]
    while len(rewards) < len(uniforms) and not (terminated or truncated):
        h = np.asarray(obs, dtype=np.float64)  # (D,): one state, so vector-matrix products
        for W, b in layers[:-1]:
            h = np.tanh(h @ W + b)
        W, b = layers[-1]
        z = h @ W + b
        # network.sample's rule for one state, without its batch shapes: the action is the number
        # of entries of the (unnormalised) cumulative distribution below u times its total
        cdf = np.cumsum(np.exp(z - z.max()))
        action = int(np.count_nonzero(uniforms[len(rewards)] * cdf[-1] > cdf))
        obs, reward, terminated, truncated, _ = env.step(action)
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

    Exact, because the simulator is deterministic given its seed (reset rebuilds every
    body), but it costs one step per step of the episode so far. Returns env."""
    env.reset(seed=seed)
    for action in actions:
        env.step(action)
    return env


class VineTrunk:
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
        self.trunk = SinglePathSampler([make_env(env_id) for _ in env_seeds], env_seeds, action_seeds)
        self.spare = make_env(env_id)  # where states are rebuilt by replay
        self.pool = parallel.ForkPool(max_children=2) if restore != "replay" else None
        # replay a state whose episode has run fewer steps than this, fork from any other
        if restore == "auto":
            self.replay_below = self.steps_per_fork()
        else:
            self.replay_below = 0 if restore == "fork" else float("inf")

    def steps_per_fork(self):
        """How many simulator steps cost as much as restoring a state by fork (measured here:
        the cost of a fork differs a lot between machines).

        The steps timed are cheap ones: after the first tries the lander lies on the ground. That
        raises the figure, which is as it should be: a fork that runs a real branch, with a policy
        pass per step, costs more than this one. (Measured once, on a batch of a solved policy in
        one worker: replaying the states younger than 440 steps took 9.1 s of CPU, replaying only
        those younger than 150 and forking the rest 10.1 s.)"""
        def twenty_steps():
            for _ in range(20):
                self.spare.step(0)  # engines off: falling, then lying on the ground
        self.spare.reset(seed=0)
        twenty_steps()  # warm up
        seconds, fork_seconds = self.pool.fork_overhead(twenty_steps)
        return fork_seconds / (seconds / 20)

    def sample(self, net, theta, steps, rollout, uniforms, draws, proposal, gamma, value_fn, lam):
        """The trunk batch of this worker's E environments, plus what the branches found.

        `rollout` (T, E) marks the rollout states. Row i of `uniforms` (n, H) is the stream of
        random numbers of the i-th of them in row-major (t, e) order, shared by all its branches;
        row i of `draws` (n, K) holds the uniforms that draw its K actions from q (`proposal`:
        "uniform" or "pi_old"); draws is None to branch on every action. Adds to the batch, per
        state: Q (T, E, A), NaN for actions not branched on; action_sets (T, E, K); q_drawn
        (T, E, K), q of each drawn action; branch_steps (T, E).
        """
        A = net.sizes[-1]
        K = A if draws is None else draws.shape[-1]
        Q = np.full((steps, rollout.shape[1], A), np.nan)
        action_sets = np.zeros((steps, rollout.shape[1], K), dtype=np.int64)
        q_drawn = np.ones((steps, rollout.shape[1], K))
        branch_steps = np.zeros(rollout.shape, dtype=np.int64)
        results = {}  # (t, e, a) -> (Q, branch steps)
        row = np.cumsum(rollout.ravel()).reshape(rollout.shape) - 1  # (t, e) -> its row of uniforms and draws

        def branch(t, e, trunk):
            if draws is None:
                actions = np.arange(A)  # all actions: Eq. (15)
            else:  # K draws from q: Eq. (16)
                q_logits = trunk.last_logits[e] if proposal == "pi_old" else np.zeros(A)
                actions = sample(np.tile(q_logits, (K, 1)), draws[row[t, e]])
                q_drawn[t, e] = softmax(q_logits[None])[0, actions]
            action_sets[t, e] = actions
            for a in np.unique(actions):  # a repeated draw shares its branch: same action, same numbers
                if len(trunk.episode_actions[e]) >= self.replay_below:
                    self.pool.submit((t, e, a), lambda a=a: branch_rollout(
                        trunk.envs[e], a, net, theta, uniforms[row[t, e]], gamma, value_fn, lam))
                else:
                    env = replay(self.spare, trunk.episode_seed[e], trunk.episode_actions[e])
                    results[(t, e, a)] = branch_rollout(env, a, net, theta, uniforms[row[t, e]], gamma, value_fn,
                                                        lam)

        batch = self.trunk.sample(net, theta, steps, branch_points=rollout, branch=branch)
        if self.pool is not None:
            results.update(self.pool.gather())
        for (t, e, a), (q_value, n) in results.items():
            Q[t, e, a] = q_value
            branch_steps[t, e] += n
        batch.update(Q=Q, action_sets=action_sets, q_drawn=q_drawn, branch_steps=branch_steps)
        return batch

    def close(self):
        if self.pool is not None:
            self.pool.close()
        self.spare.close()
        self.trunk.close()


class VineSampler:
    """The vine (TRPO Sec. 5.2): trunk trajectories under pi_old, and branches from a rollout set of their states.

    Each iteration: pick N of the trunk's T x E states at random (the rollout set); from
    each, once per action in the state's action set, take that action, then follow pi_old:
    a branch of H steps in all, whose lambda-return (branch_rollout) estimates Q(s_n, a). The action
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
        self.parts = np.array_split(np.arange(cfg.num_envs), min(cfg.workers, cfg.num_envs))
        args = [(cfg.env, [int(env_seeds[i]) for i in part], [int(action_seeds[i]) for i in part], restore)
                for part in self.parts]
        workers = parallel.WorkerProcesses if len(self.parts) > 1 else parallel.InThisProcess
        self.trunks = workers(VineTrunk, args)

    def sample(self, net, theta, steps):
        """Trunk batch (as SinglePathSampler's) plus rollout_states (N, D), their Q estimates and action sets."""
        cfg, E = self.cfg, self.cfg.num_envs
        N = min(cfg.vine_states, steps * E)
        rollout = np.zeros((steps, E), dtype=bool)
        rollout.flat[self.rng.choice(steps * E, size=N, replace=False)] = True
        # one row per rollout state, in row-major (t, e) order: a stream shared by all its branches
        uniforms = self.rng.random((N, cfg.vine_horizon))
        draws = self.rng.random((N, cfg.vine_actions)) if cfg.vine_actions else None
        row = np.zeros((steps, E), dtype=np.int64)
        row[rollout] = np.arange(N)
        rows = [row[:, part][rollout[:, part]] for part in self.parts]  # each worker's states, in its own order
        bootstrap = self.value_fn if cfg.vine_bootstrap else None
        started = time.perf_counter()
        parts = self.trunks.call("sample", [
            (net, theta, steps, rollout[:, part], uniforms[r], None if draws is None else draws[r],
             cfg.vine_proposal, cfg.gamma, bootstrap, cfg.lam) for part, r in zip(self.parts, rows)])
        seconds = time.perf_counter() - started
        batch = {key: np.concatenate([part[key] for part in parts], axis=1) for key in parts[0]}
        Q = batch.pop("Q")[rollout]  # (N, A), states in row-major (t, e) order
        batch.update(
            rollout_states=batch["obs"][rollout],
            rollout_logits=batch["logits"][rollout],
            Q=Q,
            action_sets=batch.pop("action_sets")[rollout],
            proposal=batch.pop("q_drawn")[rollout] if cfg.vine_actions else None,
            branch_steps=int(batch.pop("branch_steps").sum()),
            restores=int(np.sum(~np.isnan(Q))),
            branch_seconds=seconds)
        return batch

    def close(self):
        self.trunks.close()


def make_sampler(cfg, rng, value_fn):
    """The scheme's sampler for cfg.num_envs environments, seeded from rng.

    Single path: worker processes if cfg.workers > 1. Vine: cfg.workers processes (this
    one if 1), each stepping its share of the trunk environments and forking its branches."""
    env_seeds = rng.integers(TRAIN_SEED_LIMIT, size=cfg.num_envs)
    action_seeds = rng.integers(2 ** 63, size=cfg.num_envs)
    if cfg.scheme == "vine":
        return VineSampler(cfg, env_seeds, action_seeds, value_fn, rng)
    if cfg.workers > 1:
        return ParallelSampler(cfg.env, env_seeds, action_seeds, min(cfg.workers, cfg.num_envs))
    return SinglePathSampler([make_env(cfg.env) for _ in range(cfg.num_envs)], env_seeds, action_seeds)


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
    """Monte-Carlo return-to-go Q_t = sum_l gamma^l r_{t+l} over the rest of the episode (TRPO Sec. 5.1).

    Where the episode goes on past what we saw (a time-limit truncation, or the end
    of the batch) the tail is estimated by gamma * V(next_obs); after a terminated
    step there is no tail. With a value baseline, Q_t - V(s_t) equals GAE with lam = 1.
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

    Returns (advantages, value_targets, values) where values = V(s_t) before this batch's fit."""
    T, E, D = batch["obs"].shape
    values = value_fn.predict(batch["obs"].reshape(-1, D)).reshape(T, E)
    next_values = value_fn.predict(batch["next_obs"].reshape(-1, D)).reshape(T, E)
    if cfg.advantage == "gae":
        advantages = gae(batch["rewards"], values, next_values, batch["terminated"], batch["truncated"],
                         cfg.gamma, cfg.lam)
        targets = advantages + values  # the lambda-return, GAE paper Sec. 5
    else:
        targets = discounted_returns(batch["rewards"], next_values, batch["terminated"], batch["truncated"],
                                     cfg.gamma)
        advantages = targets - values
    return advantages.ravel(), targets.ravel(), values.ravel()


# ----------------------------------------------------------------------------
# 3. The surrogate objectives (Eq. 14 single path, Eq. 15 and 16 vine) and the mean KL (Eq. 12)
# ----------------------------------------------------------------------------

def surrogate(logits, actions, logp_old, advantages):
    """Single-path surrogate of Eq. (14) with q = pi_old:  L(theta) = mean_i [pi_theta(a_i|s_i) / pi_old(a_i|s_i) * A_i].

    Returns (L, dL/dlogits). The gradient through the softmax is
    dL/dz_i = ratio_i * A_i * (onehot(a_i) - p_i) / N, since d log p_a / dz = onehot(a) - p.
    At theta = theta_old the ratio is 1 and this is the policy gradient."""
    N = len(actions)
    ratio = np.exp(log_prob(logits, actions) - logp_old)
    grad = -softmax(logits)
    grad[np.arange(N), actions] += 1.0
    grad *= (ratio * advantages / N)[:, None]
    return np.mean(ratio * advantages), grad


def all_actions_surrogate(logits, Q):
    """Vine surrogate with every action branched (Eq. 15): L = mean_n sum_a pi_theta(a|s_n) Q(s_n, a).

    Returns (L, dL/dlogits). With V_n = sum_a p_n,a Q_n,a, the gradient is
    dL/dz_n = p_n * (Q_n - V_n) / N: the advantage Q - V appears by itself."""
    p = softmax(logits)
    V = (p * Q).sum(axis=1, keepdims=True)  # (N, 1)
    return float(V.mean()), p * (Q - V) / len(Q)


def importance_sampled_surrogate(logits, actions, proposal, Q):
    """Vine surrogate with K sampled actions per state, self-normalised importance sampling (Eq. 16):

        L_n = sum_k w_k Q_k / sum_k w_k,   w_k = pi_theta(a_k|s_n) / q(a_k|s_n),   L = mean_n L_n.

    `actions`, `proposal` (q of each drawn action) and `Q` are (N, K). Returns (L, dL/dlogits).
    With W = sum_k w_k and dw_k/dz = w_k (onehot(a_k) - p):
        dL_n/dz = sum_k (w_k / W) (Q_k - L_n) (onehot(a_k) - p).
    (The p term sums to zero, since sum_k w_k (Q_k - L_n) = 0; it is kept to show the chain rule.)"""
    N = len(actions)
    p = softmax(logits)
    w = np.exp(np.take_along_axis(log_softmax(logits), actions, axis=1)) / proposal  # (N, K)
    W = w.sum(axis=1, keepdims=True)
    L_n = (w * Q).sum(axis=1, keepdims=True) / W  # (N, 1)
    c = w / W * (Q - L_n)  # (N, K)
    grad = np.zeros_like(logits)
    np.add.at(grad, (np.arange(N)[:, None], actions), c)  # sum_k c_k onehot(a_k); repeated actions add up
    grad -= c.sum(axis=1, keepdims=True) * p
    return float(L_n.mean()), grad / N


def entropy_bonus(logits):
    """Mean policy entropy H = mean_i -sum_a p_a log p_a and its gradient in the logits,
    dH_i/dz = -p * (log p + H_i) / N. Not in the paper: an option (--entropy-coef) that
    rewards keeping the policy random, against settling early on a mediocre behaviour."""
    logp = log_softmax(logits)
    p = np.exp(logp)
    H = -(p * logp).sum(axis=1, keepdims=True)  # (N, 1)
    return float(H.mean()), -p * (logp + H) / len(logits)


def mean_kl(logits_old, logits_new):
    """KLbar(theta_old, theta) = mean_i KL(pi_old(.|s_i) || pi_theta(.|s_i)), the constraint of Eq. (12)."""
    return np.mean(kl(logits_old, logits_new))


# ----------------------------------------------------------------------------
# 4.-6. The step: conjugate gradient, maximal step, line search (Appendix C)
# ----------------------------------------------------------------------------

def fisher_vector_product(net, theta, cache, probs, v, damping):
    """(F + damping I) v without forming F (Appendix C).

    F = (1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i is the Hessian of KLbar at theta_old,
    J_i = dz_i/dtheta. Three passes over the batch:
      u = J v            forward-mode pass (net.jvp)                 # (N, A)
      w = (diag p - p p^T) u, row by row                               # (N, A)
      F v = J^T w / N    one ordinary backward pass (net.backward)    # (num_params,)
    """
    u = net.jvp(theta, cache, v)
    w = categorical_fisher_product(probs, u)
    return net.backward(theta, cache, w) / len(probs) + damping * v


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
    x^T (F + lambda I) x, the damped matrix it solved with, so its step is a little shorter
    and its KL model a little above the true quadratic one (the log shows the KL reached)."""
    return np.sqrt(2 * max_kl / x_F_x) * x


def line_search(evaluate, theta_old, full_step, max_kl, backtrack_coeff, max_backtracks, min_improvement=0.0):
    """Backtracking line search on the nonlinear problem (Appendix C).

    `evaluate(theta)` returns (L(theta) - L(theta_old), KLbar(theta_old, theta)). Try
    theta_old + alpha^k * full_step for k = 0, 1, ...; accept the first step whose mean
    KL is at most delta (never above: no slack) and whose surrogate improves by more
    than min_improvement (the size of rounding noise: a smaller "improvement" is no
    evidence that the step is better). Returns (success, theta, improvement, kl,
    backtracks). On failure theta is theta_old itself, not the last rejected try; on
    success it is the last theta evaluated (trpo_step reuses that evaluation's logits).
    """
    for k in range(max_backtracks):
        theta = theta_old + backtrack_coeff ** k * full_step
        improvement, kl_reached = evaluate(theta)
        if kl_reached <= max_kl and improvement > min_improvement:
            return True, theta, improvement, kl_reached, k
    return False, theta_old, 0.0, 0.0, max_backtracks


def trpo_step(net, theta_old, states, surrogate_of_logits, cfg):
    """One TRPO policy update (Algorithm 1, solved as in Appendix C). Shared by every sampling scheme.

    `surrogate_of_logits(logits)` returns (L, dL/dlogits) for the scheme's surrogate
    on `states`. In the code's symbols:
      1. g = dL/dtheta at theta_old (backprop of dL/dz)
      2. x = (F + lambda I)^-1 g by conjugate gradient, F the Fisher (= Hessian of KLbar) at
         theta_old, lambda the damping that keeps CG well conditioned
      3. beta = sqrt(2 delta / x^T (F + lambda I) x): the quadratic KL model of the step is
         at most delta (the damping makes it a little less: about 0.7 delta at the defaults)
      4. full_step = beta x; first-order predicted improvement g . full_step
      5. line search: shrink until KLbar <= delta and L improves; else keep theta_old
    Returns (theta_new, info) with the diagnostics the log line shows; info["logits_new"] holds
    the policy's logits at theta_new on `states`, for whoever needs them next.
    """
    logits_old, cache = net.forward(theta_old, states)
    probs_old = softmax(logits_old)
    L_old, dL_dlogits = surrogate_of_logits(logits_old)
    info = {"kl": 0.0, "max_kl": 0.0, "backtracks": 0, "expected_improve": 0.0, "actual_improve": 0.0,
            "accepted": False, "entropy": float(np.mean(entropy(logits_old))), "logits_new": logits_old}

    # 1. the policy gradient
    g = net.backward(theta_old, cache, dL_dlogits)
    if not np.all(np.isfinite(g)) or not np.any(g):
        info["skipped"] = "gradient is zero or not finite"
        return theta_old, info

    # 2. natural gradient direction x = (F + lambda I)^-1 g, F estimated on every k-th state
    # (the forward pass's cache holds every layer's input: its every k-th row is that state's)
    fisher_cache = [np.ascontiguousarray(h[::cfg.fisher_subsample]) for h in cache]
    fisher_probs = probs_old[::cfg.fisher_subsample]

    def Fvp(v):
        return fisher_vector_product(net, theta_old, fisher_cache, fisher_probs, v, cfg.damping)
    x = conjugate_gradient(Fvp, g, cfg.cg_iters)

    # 3. step size from the quadratic model of the KL: 1/2 (beta x)^T (F + lambda I) (beta x) = delta
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
        return surrogate_of_logits(logits)[0] - L_old, mean_kl(logits_old, logits)
    if cfg.trust_region:
        # L is a mean of terms of L_old's size: differences below 1e-10 of it are rounding, which a
        # gradient that is really zero (every action equally good) would otherwise "improve" on.
        ok, theta_new, improvement, kl_reached, backtracks = line_search(
            evaluate, theta_old, full_step, cfg.max_kl, cfg.backtrack_coeff, cfg.max_backtracks,
            min_improvement=1e-10 * max(1.0, abs(L_old)))
    else:  # --no-trust-region: the natural-gradient step of the same size, taken whatever it does
        ok, theta_new, backtracks = True, theta_old + full_step, 0
        improvement, kl_reached = evaluate(theta_new)
    info.update(kl=kl_reached, backtracks=backtracks, accepted=ok, actual_improve=improvement,
                expected_improve=expected * cfg.backtrack_coeff ** backtracks if ok else expected)
    info["logits_new"] = tried["logits"] if ok else logits_old
    info["max_kl"] = float(np.max(kl(logits_old, info["logits_new"])))
    if not ok:
        info["skipped"] = "line search failed, keeping old parameters"
    return theta_new, info


# ----------------------------------------------------------------------------
# 7. The value function
# ----------------------------------------------------------------------------

class ValueFunction:
    """V(s) = mean + std * V_phi(s): a tanh MLP fitted to standardised value targets.

    Returns on LunarLander are hundreds of units; Adam moves each weight by about
    its learning rate per step whatever the gradient's scale, so a network asked to
    output -100 directly takes thousands of steps to get there (the explained
    variance stays near 0). Fitting (target - mean) / std instead, and rescaling the
    output layer whenever mean and std change so that every prediction stays exactly
    the same (the "preserving outputs" half of PopArt, van Hasselt et al. 2016),
    keeps the regression at unit scale for any environment's rewards.
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
        """Regress V on the value targets by minibatch Adam on the mean squared error.

        The GAE paper (Sec. 5) fits V to the lambda-returns each iteration; any
        regression works, and a few epochs of Adam are simple and fast. Returns the
        final mean squared error in the targets' own units."""
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


def explained_variance(prediction, target):
    """1 - Var(target - prediction) / Var(target): 1 is perfect, 0 no better than the mean."""
    var = np.var(target)
    return float(1 - np.var(target - prediction) / var) if var > 0 else float("nan")


# ----------------------------------------------------------------------------
# The training loop (Algorithm 1)
# ----------------------------------------------------------------------------

class TrainingState:
    """Everything that changes during a run, and so everything a checkpoint must hold."""

    def __init__(self, cfg, policy_net, value_fn, rng, theta):
        self.cfg, self.policy_net, self.value_fn, self.rng, self.theta = cfg, policy_net, value_fn, rng, theta
        self.run_id = run_files.new_run_id(cfg.seed)  # tells this run from another in a folder
        self.iteration = 0
        self.env_steps = 0
        self.wall_s = 0.0  # training time before this process started (a resumed run)
        self.episode_returns = []  # every finished training episode's return, in order of (step, environment)
        self.history = []  # one dict per iteration: the rows of progress.csv

    def snapshot(self):
        """A copy of the state now, cheap enough to take every iteration; `save_checkpoint` writes one.

        Taken at the end of an iteration, it is a clean point to stop at: an interruption in
        the middle of the next iteration discards that half-done iteration, nothing else."""
        vf = self.value_fn
        return dict(theta=self.theta.copy(), phi=vf.phi.copy(), adam_m=vf.adam.m.copy(), adam_v=vf.adam.v.copy(),
                    adam_t=vf.adam.t, value_mean=vf.mean, value_std=vf.std, rng_state=self.rng.bit_generator.state,
                    iteration=self.iteration, env_steps=self.env_steps, wall_s=self.wall_s, run_id=self.run_id,
                    history=self.history[:], episode_returns=self.episode_returns[:])

    def save_checkpoint(self, path, snapshot):
        """Write a snapshot, with the settings and the networks' sizes, to checkpoint.npz."""
        run_files.write_checkpoint(path, snapshot, dataclasses.asdict(self.cfg), self.policy_net.sizes,
                                   self.value_fn.net.sizes, self.cfg.env)

    def restore(self, saved):
        """Continue from a snapshot read back from a checkpoint (read_checkpoint)."""
        if saved["theta"].shape != self.theta.shape or saved["phi"].shape != self.value_fn.phi.shape:
            raise UserError("the checkpoint's networks do not match its own configuration; it is damaged.")
        vf = self.value_fn
        self.theta, vf.phi, vf.adam.m, vf.adam.v = saved["theta"], saved["phi"], saved["adam_m"], saved["adam_v"]
        vf.adam.t, vf.mean, vf.std = saved["adam_t"], saved["value_mean"], saved["value_std"]
        self.rng.bit_generator.state = saved["rng_state"]
        self.run_id, self.iteration, self.env_steps = saved["run_id"], saved["iteration"], saved["env_steps"]
        self.wall_s, self.history, self.episode_returns = saved["wall_s"], saved["history"], saved["episode_returns"]


def read_checkpoint(path):
    """(snapshot, Config) of a checkpoint file, or UserError in one sentence."""
    saved = run_files.read_checkpoint(path)
    try:
        cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()})
    except TypeError:
        raise UserError(f"'{path}' is a checkpoint of another version of trpo_numpy.py.") from None
    return saved, cfg


def single_path_problem(batch, advantages):
    """The states and surrogate of the single-path step (Eq. 14) for a batch and its advantages."""
    num_actions = batch["logits"].shape[-1]
    states = batch["obs"].reshape(-1, batch["obs"].shape[-1])
    actions = batch["actions"].ravel()
    logp_old = log_prob(batch["logits"].reshape(-1, num_actions), actions)

    def surrogate_of_logits(logits):
        return surrogate(logits, actions, logp_old, advantages)
    return states, surrogate_of_logits


def vine_problem(batch):
    """The states and surrogate of the vine step: the rollout set, with Eq. (15) or Eq. (16).

    Also returns value targets for the rollout states: the branches estimate
    V(s_n) = sum_a pi_old(a|s_n) Q(s_n, a) directly (with K sampled actions, by the same
    self-normalised weights), with less noise than one trunk trajectory's return."""
    Q, action_sets, p_old = batch["Q"], batch["action_sets"], softmax(batch["rollout_logits"])
    if batch["proposal"] is None:
        def surrogate_of_logits(logits):
            return all_actions_surrogate(logits, Q)
        values = (p_old * Q).sum(axis=1)
    else:
        Q_drawn = np.take_along_axis(Q, action_sets, axis=1)  # (N, K): Q of each drawn action

        def surrogate_of_logits(logits):
            return importance_sampled_surrogate(logits, action_sets, batch["proposal"], Q_drawn)
        w = np.take_along_axis(p_old, action_sets, axis=1) / batch["proposal"]
        values = (w * Q_drawn).sum(axis=1) / w.sum(axis=1)
    return batch["rollout_states"], surrogate_of_logits, values


def with_entropy_bonus(surrogate_of_logits, coef):
    """The objective L(theta) + coef * H(theta): the surrogate plus the entropy bonus."""
    def objective(logits):
        L, dL = surrogate_of_logits(logits)
        H, dH = entropy_bonus(logits)
        return L + coef * H, dL + coef * dH
    return objective


def train_iteration(state, sampler):
    """One iteration of Algorithm 1; updates state and returns its row of progress.csv."""
    cfg, policy_net, value_fn = state.cfg, state.policy_net, state.value_fn
    start = time.perf_counter()
    # 1. sample with pi_old (the vine's trunk and branches, or the single paths)
    batch = sampler.sample(policy_net, state.theta, cfg.steps_per_env)
    ended = batch["episode_return"]
    state.episode_returns.extend(ended[~np.isnan(ended)])
    state.env_steps += cfg.batch_size

    # 2. advantages on the (trunk) trajectories; the value function learns from them in both schemes
    advantages, value_targets, values = estimate_advantages(batch, value_fn, cfg)
    raw_advantages = advantages
    if cfg.normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    # 3.-6. the trust-region step on the scheme's surrogate
    fit_states = batch["obs"].reshape(cfg.batch_size, -1)
    if cfg.scheme == "vine":
        states, surrogate_of_logits, branch_values = vine_problem(batch)
        fit_states = np.concatenate([fit_states, states])
        value_targets = np.concatenate([value_targets, branch_values])
        values = np.concatenate([values, value_fn.predict(states)])
    else:
        states, surrogate_of_logits = single_path_problem(batch, advantages)
    theta_old = state.theta
    if cfg.entropy_coef:
        surrogate_of_logits = with_entropy_bonus(surrogate_of_logits, cfg.entropy_coef)
    # Step 7, the value fit, needs nothing from the policy step: a second thread does it meanwhile,
    # on the core the step leaves idle (NumPy releases Python's lock inside its array operations).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as background:
        value_fit = background.submit(fit_value_function, value_fn, fit_states, value_targets, cfg, state.rng)
        state.theta, step = trpo_step(policy_net, theta_old, states, surrogate_of_logits, cfg)
    value_loss, value_skipped = value_fit.result()
    if value_skipped:
        step["skipped"] = step.get("skipped", "") + "; " + value_skipped

    # What the step predicted for the return, beside Theorem 1's penalty (see predicted_return_change)
    if cfg.scheme == "vine":
        surrogate_change = step["actual_improve"]  # in the units of Q already
        largest_advantage = np.nanmax(np.abs(batch["Q"] - branch_values[:, None]))
    else:
        raw_problem = single_path_problem(batch, raw_advantages)[1]
        surrogate_change = (raw_problem(step["logits_new"])[0]
                            - raw_problem(batch["logits"].reshape(len(states), -1))[0])
        largest_advantage = np.max(np.abs(raw_advantages))
    predicted, penalty = predicted_return_change(surrogate_change, cfg.batch_size, np.sum(~np.isnan(ended)),
                                                 step["max_kl"], largest_advantage, cfg.gamma)
    batch_return = float(np.nanmean(ended)) if np.any(~np.isnan(ended)) else float("nan")
    previous = state.history[-1]["batch_return"] if state.history else float("nan")

    recent = state.episode_returns[-100:]
    seconds = time.perf_counter() - start
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
        "explained_variance": explained_variance(values, value_targets),
        "steps_per_s": cfg.batch_size / seconds,
        "trunk_steps": cfg.batch_size,
        "branch_steps": batch.get("branch_steps", 0),
        "rollout_states": len(states) if cfg.scheme == "vine" else 0,
        "restores_per_s": batch.get("restores", 0) / batch.get("branch_seconds", seconds),
        "max_kl_state": step["max_kl"],
        "predicted_return_change": predicted,
        "theorem_penalty": penalty,
        "batch_return": batch_return,
        "return_change": batch_return - previous,
        "skipped": step.get("skipped", "").lstrip("; "),
    }


def fit_value_function(value_fn, states, targets, cfg, rng):
    """Step 7: refit V to this batch's value targets, for the next iteration's advantages.

    Returns (mean squared error after the fit, "" or why the fit was skipped): one target
    that is not finite would poison every weight of V, so such a batch is not fitted."""
    if not np.all(np.isfinite(targets)):
        return float("nan"), "value targets not finite, value fit skipped"
    return value_fn.fit(states, targets, cfg.vf_epochs, cfg.vf_minibatch, rng), ""


def predicted_return_change(surrogate_change, steps, episodes, max_kl_state, largest_advantage, gamma):
    """What a step predicts for the episode return, and what TRPO's Theorem 1 says of the prediction.

    The performance-difference identity (Kakade & Langford 2002; TRPO Eq. 1) gives
    eta(pi_new) - eta(pi_old) = E_{tau ~ pi_new}[ sum_t gamma^t A_old(s_t, a_t) ]. The surrogate
    (Eq. 14) takes the states from pi_old instead, and this estimate also drops gamma^t
    (close to 1 over an episode when gamma = 0.999, not when gamma = 0.99), so the step
    predicts a change of the episode return of (mean episode length) x (L(theta_new) -
    L(theta_old)), with raw advantages: an approximation, to compare with what follows. Theorem 1 bounds the cost of swapping the states: eta(pi_new) >=
    L(pi_new) - C max_s KL(pi_old || pi_new), C = 4 eps gamma / (1 - gamma)^2, eps = max |A|.
    Returns (predicted change, C max_s KL): the penalty is usually far larger than any
    improvement, which is why the paper replaces it by the constraint KLbar <= delta.
    """
    mean_episode_length = steps / max(episodes, 1)
    penalty = 4 * largest_advantage * gamma / (1 - gamma) ** 2 * max_kl_state if gamma < 1 else float("inf")
    return mean_episode_length * surrogate_change, penalty


def solved(history, stop_return):
    """Whether the last iteration's rolling return reached stop_return (never, if that is None)."""
    return stop_return is not None and bool(history) and history[-1]["rolling_return"] >= stop_return


def train(cfg, verbose=True, resume=None):
    """Train a policy with TRPO, writing progress.csv, config.json, checkpoint.npz, policy.npz and
    plots to cfg.out_dir(). `resume` is the arrays of a checkpoint (read_checkpoint) to continue from.

    Returns (policy_net, theta, history) where history holds one dict per iteration."""
    from tqdm import tqdm
    tqdm.monitor_interval = 0  # no monitor thread: the vine forks this process, and fork copies only one thread

    cfg.validate()
    out_dir = cfg.out_dir()
    run_files.prepare_out_dir(out_dir)
    folder_lock = run_files.lock_folder(out_dir)  # held until this process ends
    if resume is None:
        run_files.check_folder_is_free(out_dir)
    probe = make_env(cfg.env)  # fail here, in one sentence, before any worker starts
    obs_dim, num_actions = env_dims(probe)
    probe.close()

    rng = np.random.default_rng(cfg.seed)
    policy_net = MLP([obs_dim, *cfg.hidden, num_actions])
    theta = policy_net.init(rng, output_gain=0.01)
    value_fn = ValueFunction(MLP([obs_dim, *cfg.hidden, 1]), rng, lr=cfg.vf_lr)
    state = TrainingState(cfg, policy_net, value_fn, rng, theta)
    if resume is not None:
        state.restore(resume)
        run_files.check_folder_is_ours(out_dir, state.run_id)

    run_files.write_config(out_dir, {**dataclasses.asdict(cfg), "run_id": state.run_id})
    progress = run_files.ProgressCsv(out_dir, state.history)  # with a resumed run's earlier rows
    checkpoint_path = os.path.join(out_dir, "checkpoint.npz")

    # After a resume, the simulators cannot be restored (Box2D state is not saved): the
    # environments start new episodes, seeded from the restored generator.
    sampler = make_sampler(cfg, rng, value_fn)
    snapshot = state.snapshot()
    start = time.perf_counter() - state.wall_s
    bar = tqdm(total=cfg.total_steps, initial=state.env_steps, unit="step", unit_scale=True,
               disable=not verbose, file=sys.stderr)
    try:
        while state.env_steps < cfg.total_steps and not solved(state.history, cfg.stop_return):
            parallel.raise_if_stop_requested()
            state.iteration += 1
            row = train_iteration(state, sampler)
            state.wall_s = row["wall_s"] = time.perf_counter() - start
            state.history.append(row)
            progress.write(row)
            snapshot = state.snapshot()
            if state.iteration % cfg.save_every == 0:
                state.save_checkpoint(checkpoint_path, snapshot)
            bar.update(cfg.batch_size)
            bar.set_postfix(ret=f"{row['rolling_return']:.1f}")
            if verbose:
                line = run_files.format_log_line(row)
                tqdm.write(line + (f" | step skipped: {row['skipped']}" if row["skipped"] else ""))
    finally:
        # Whatever stopped the loop (the end, Ctrl-C, an error), keep what the finished iterations made;
        # a second Ctrl-C waits until that is written.
        with parallel.signals_held():
            bar.close()
            if sys.exc_info()[0] is KeyboardInterrupt:
                print("\nstopping: saving the last finished iteration, one moment ...", file=sys.stderr)
            progress.close()
            sampler.close()
            state.save_checkpoint(checkpoint_path, snapshot)
            run_files.save_policy(os.path.join(out_dir, "policy.npz"), policy_net.sizes, snapshot["theta"], cfg.env)
            if state.history:
                run_files.save_plots(state.history, out_dir, cfg.env, cfg.seed, SCHEME_NAMES[cfg.scheme],
                                     cfg.max_kl, solved_at=reward_threshold(cfg.env))
            folder_lock.close()
    return policy_net, state.theta, state.history


# ----------------------------------------------------------------------------
# Evaluation and animation
# ----------------------------------------------------------------------------

def evaluate_policy(net, theta, env_id, episodes, greedy, rng=None, seed_base=EVAL_SEED_BASE, gif_path=None):
    """Returns of `episodes` episodes under pi_theta, each reset with its own seed from seed_base on.

    greedy=True takes the most likely action; otherwise actions are sampled with rng.
    With gif_path, the first episode is also rendered and written there as an animation."""
    env = make_env(env_id, render_mode="rgb_array" if gif_path else None)
    returns = np.zeros(episodes)
    frames = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed_base + k)
        done = False
        while not done:
            if gif_path and k == 0:
                frames.append(env.render())
            logits = net.forward(theta, np.asarray(obs, dtype=np.float64)[None])[0]
            action = int(np.argmax(logits[0])) if greedy else int(sample(logits, rng.random(1))[0])
            obs, reward, terminated, truncated, _ = env.step(action)
            returns[k] += reward
            done = terminated or truncated
        if gif_path and k == 0:
            frames.append(env.render())
            run_files.write_gif(gif_path, frames, fps=env.metadata.get("render_fps", 50))
    env.close()
    return returns


def load_policy(path, env_id=None):
    """(net, theta, env_id) from a policy.npz or checkpoint.npz, checked against the environment's shape."""
    sizes, theta, saved_env_id = run_files.read_policy(path)
    env_id = env_id or saved_env_id
    env = make_env(env_id)
    obs_dim, num_actions = env_dims(env)
    env.close()
    if sizes[0] != obs_dim or sizes[-1] != num_actions:
        raise UserError(f"the network in '{path}' takes {sizes[0]} observations and gives {sizes[-1]} actions, "
                        f"but {env_id} has {obs_dim} and {num_actions}.")
    net = MLP(sizes)
    if theta.shape != (net.num_params,):
        raise UserError(f"'{path}' holds {theta.size} weights, not the {net.num_params} of its network.")
    return net, theta, env_id


def run_evaluation(path, episodes, greedy, gif_path, env_id=None):
    """--eval: load a policy, report mean and std of the return and the share of episodes at or
    above the environment's reward threshold (LunarLander: 200), where it has one."""
    if gif_path is not None and (os.path.isdir(gif_path) or not gif_path.lower().endswith(".gif")):
        raise UserError(f"--gif needs a file name ending in .gif, got '{gif_path}'.")
    net, theta, env_id = load_policy(path, env_id)
    returns = evaluate_policy(net, theta, env_id, episodes, greedy, rng=np.random.default_rng(0),
                              gif_path=gif_path)
    mode = "greedy" if greedy else "sampled"
    threshold = reward_threshold(env_id)
    print(f"{env_id}, {episodes} evaluation episodes ({mode} actions, seeds from {EVAL_SEED_BASE}): "
          f"return {returns.mean():.1f} +- {returns.std():.1f}"
          + (f", {np.mean(returns >= threshold):.0%} at or above {threshold:g}" if threshold is not None else ""))
    if gif_path:
        print(f"animation of the first episode written to {gif_path}")
    return returns


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none to show (None, or --out's
    empty string, whose folder is made from the scheme and seed)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option ends with one sentence on stderr and exit code 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help).\n")


def number(kind):
    """argparse type: a number of the given kind, with a one-sentence error for anything else."""
    def convert(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a{'n integer' if kind is int else ' number'}")
    convert.__name__ = kind.__name__
    return convert


def build_parser(defaults=True):
    """The command line, generated from Config so that --help and the defaults cannot drift apart.

    defaults=False leaves out every default: what remains is what the user typed."""
    parser = ArgumentParser(description="Trust Region Policy Optimization (Schulman et al. 2015) in plain NumPy.",
                            formatter_class=HelpFormatter,
                            argument_default=None if defaults else argparse.SUPPRESS)
    training = parser.add_argument_group("training (paper symbols in parentheses)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        default = f.default if defaults else argparse.SUPPRESS
        if f.type in ("bool", bool):
            training.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.type in ("tuple", tuple):
            training.add_argument(flag, type=number(int), default=default, help=help_text, **meta)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            convert = number(kind) if kind in (int, float) else kind
            training.add_argument(flag, type=convert, default=default, help=help_text, **meta)
    other = parser.add_argument_group("checkpoints and evaluation")
    other.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in this checkpoint.npz; "
                       "its settings are kept (only --total-steps, --out, --workers and --save-every may change)")
    other.add_argument("--eval", metavar="FILE", help="do not train: evaluate the policy in this policy.npz or "
                       "checkpoint.npz on seeds training never uses")
    other.add_argument("--episodes", type=number(int), default=100 if defaults else argparse.SUPPRESS,
                       help="evaluation episodes, with --eval")
    other.add_argument("--greedy", action="store_true", default=False if defaults else argparse.SUPPRESS,
                       help="with --eval, take the most likely action instead of sampling")
    other.add_argument("--gif", metavar="FILE", help="with --eval, write the first episode as an animated GIF")
    return parser


RESUMABLE_FLAGS = {"total_steps", "out", "workers", "save_every"}


def main(argv=None):
    """The command line: train (or --resume), or --eval; returns the exit code."""
    args = build_parser().parse_args(argv)
    typed = vars(build_parser(defaults=False).parse_args(argv))  # only what the user gave
    config_fields = {f.name for f in dataclasses.fields(Config)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in typed.items() if k in config_fields}
    cfg = None
    parallel.stop_on_signals()  # from here on Ctrl-C and SIGTERM stop the program (training or --eval)
    try:
        parallel.raise_if_stop_requested()  # a Ctrl-C that came, and was lost, while Python was importing
        training_options = sorted(k for k in given if k != "env")
        if args.eval and (training_options or args.resume):
            option = f"--{training_options[0].replace('_', '-')}" if training_options else "--resume"
            raise UserError(f"{option} is for training; with --eval only --env, --episodes, --greedy and --gif "
                            f"apply (evaluation seeds start at {EVAL_SEED_BASE}).")
        eval_options = [name for name in ("episodes", "greedy", "gif") if name in typed]
        if eval_options and not args.eval:
            raise UserError(f"--{eval_options[0]} goes with --eval FILE; training does not use it.")
        if args.eval:
            if args.episodes < 1:
                raise UserError(f"--episodes must be positive, got {args.episodes}.")
            run_evaluation(args.eval, args.episodes, args.greedy, args.gif, typed.get("env"))
            return 0
        if args.resume:
            resume, cfg = read_checkpoint(args.resume)
            fixed = sorted(k for k, v in given.items() if k not in RESUMABLE_FLAGS and v != getattr(cfg, k))
            if fixed:
                raise UserError(f"--{fixed[0].replace('_', '-')} cannot change when resuming; "
                                f"the run keeps its saved settings.")
            overrides = {"out": os.path.dirname(os.path.abspath(args.resume))}
            overrides.update({k: v for k, v in typed.items() if k in RESUMABLE_FLAGS})
            cfg = dataclasses.replace(cfg, **overrides)
        else:
            resume = None
            cfg = scheme_config(**given)
            if not cfg.out:  # the default folder: numbered, so that running again keeps the last run
                cfg.out = run_files.unused_folder(cfg.out_dir())
        _, _, history = train(cfg, resume=resume)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except parallel.ProcessFailed as e:
        checkpoint = os.path.join(cfg.out_dir(), "checkpoint.npz")
        print(f"error: {e}; training stopped." + (f" The last finished iteration is saved: continue with  "
              f"python trpo_numpy.py --resume {checkpoint}" if os.path.exists(checkpoint) else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        parallel.ignore_stop_signals()  # stopping has begun: more Ctrl-C would only cut the message short
        if args.eval:
            print("\nevaluation stopped.", file=sys.stderr)
            return 130
        checkpoint = os.path.join(cfg.out_dir(), "checkpoint.npz") if cfg else None
        if checkpoint is None or not os.path.exists(checkpoint):
            print("\nstopped before training began; nothing was saved.", file=sys.stderr)
            return 130
        saved = [name for name in ("checkpoint.npz", "progress.csv", "policy.npz", "learning_curve.png")
                 if os.path.exists(os.path.join(cfg.out_dir(), name))]
        print(f"stopped: {', '.join(saved)} are in {cfg.out_dir()}\n"
              f"continue with:  python trpo_numpy.py --resume {checkpoint}", file=sys.stderr)
        return 130
    if solved(history, cfg.stop_return):
        print(f"solved: the rolling return reached --stop-return {cfg.stop_return:g} at iteration "
              f"{history[-1]['iteration']}.")
    print(f"done: {history[-1]['env_steps']:,} env steps, rolling return {history[-1]['rolling_return']:.1f}; "
          f"outputs in {cfg.out_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
