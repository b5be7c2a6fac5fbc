"""engine.py: trpo_numpy.py's algorithm, made fast on several cores. A reader of the TRPO paper can skip it.

The reference, trpo_numpy.py, runs the whole algorithm in one process. The command line runs the
same algorithm through this file, which changes how it is computed, never what:

* `ParallelSampler`: the environments split over worker processes (one per core), each stepping
  its share with trpo_numpy.SinglePathSampler and its own batched policy pass;
* `ForkingVineTrunk` and `VineSampler`: the vine's trunk in those workers, which restore each
  rollout state as the trunk passes it: by a fork of the worker (parallel.ForkPool: exact, the
  simulator's own random state included, a few ms however old the episode), or, for a state
  younger than a fork costs in steps, by the reference's seeded replay;
* `one_state_policy`: the policy a branch follows, one state at a time, with fewer NumPy calls;
* `train_iteration`: the reference's iteration, with the value fit (step 5) in a second thread
  beside the policy step (4), which it needs nothing from.

Every random number is drawn as the reference draws it, so a run here is the reference's run:
test_program.py checks that progress.csv (but its timings) and theta come out the same to the bit,
for both schemes and both action spaces, and test_trpo.py each piece against its reference. (The
same to the bit needs the workers' smaller policy passes to give the reference's logits to the bit.
Measured here with OpenBLAS: batches of 4, 8, 16 or 32 states gave the rows of a 64-state batch to the
bit, batches of 1 or 3 states did not (the last bit differs, which can change a sampled action); the
defaults give each worker 16 environments of 32.)
"""

import concurrent.futures
import os
import sys
import time

import parallel  # first: one BLAS thread in every process started from here (and freed memory kept)

parallel.set_up_process(main=False)

import numpy as np

import trpo_numpy as trpo
from network import sample_one


class ParallelSampler:
    """A sampler's environments split over worker processes, one per core (this process if one).

    Worker w owns make_part(env_id, its env seeds, its action seeds, *extra_args) (a
    SinglePathSampler, or a ForkingVineTrunk) and steps its share of the environments with its own
    batched forward pass; the batches come back joined along the environment axis. Because every
    environment keeps its own seeds, the batch is the one a single sampler gives. Simulation is most
    of an iteration's time: two workers nearly halve it.
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


def single_path_sampler(env_id, env_seeds, action_seeds):
    """A SinglePathSampler on new environments: what each worker of ParallelSampler owns."""
    return trpo.SinglePathSampler([trpo.make_env(env_id) for _ in env_seeds], env_seeds, action_seeds)


class ForkingVineTrunk(trpo.SinglePathSampler):
    """One worker's share of the vine: some trunk environments, and the branches from their rollout states.

    It samples its trunk as the single-path sampler does, and as a trunk passes a rollout state it
    runs that state's branches (trpo_numpy.branch_rollout) from the simulator as it is at that
    moment: in forked copies of this process, two at a time while the trunk goes on, or, for a state
    younger than `replay_below` steps into its episode, after trpo_numpy.restore_by_replay. The two
    are exact and give the same Q. restore = "auto" sets replay_below to the number of steps a fork
    costs here, measured; "fork" forks every state, "replay" replays every state.
    """

    def __init__(self, env_id, env_seeds, action_seeds, restore):
        super().__init__([trpo.make_env(env_id) for _ in env_seeds], env_seeds, action_seeds)
        self.env_id = env_id
        # Where states are rebuilt by replay: one spare environment, if its reset builds a new Box2D world
        # (LunarLander's does), so that no contact cache survives from before; else (BipedalWalker, whose
        # reset keeps its world) a new environment for each replay, as the reference always makes.
        self.spare = trpo.make_env(env_id)
        world = getattr(self.spare.unwrapped, "world", None)
        self.spare.reset(seed=0)
        self.reuse_spare = world is None or self.spare.unwrapped.world is not world
        self.pool = parallel.ForkPool(max_children=2) if restore != "replay" else None
        if restore == "auto":
            self.replay_below = self.steps_per_fork()
        else:
            self.replay_below = 0 if restore == "fork" else float("inf")

    def steps_per_fork(self):
        """How many simulator steps cost as much as restoring a state by fork, measured here (the cost of
        a fork differs a lot between machines). The steps timed are cheap ones (the lander falls, then
        lies on the ground), which puts the figure on the side of replaying."""
        env = trpo.make_env(self.env_id)
        shape = env.action_space.shape
        no_action = np.zeros(shape) if shape else 0  # action 0, or a zero vector: LunarLander's engines off

        def twenty_steps():
            for _ in range(20):
                _, _, terminated, truncated, _ = env.step(no_action)  # LunarLander: falling, then lying
                if terminated or truncated:  # an episode this short (CartPole) starts again
                    env.reset(seed=0)
        env.reset(seed=0)
        twenty_steps()  # warm up
        seconds, fork_seconds = self.pool.fork_overhead(twenty_steps)
        env.close()
        return fork_seconds / (seconds / 20)

    def sample(self, net, theta, steps, rollout, noise, draws, proposal, gamma, value_fn, lam):
        """The trunk batch of this worker's E environments, plus what the branches found.

        `rollout` (T, E) marks the rollout states; row i of `noise` and of `draws` (None: every action)
        belongs to the i-th of them in row-major (t, e) order (trpo_numpy.choose_rollout_set). Adds to
        the batch, per state: action_sets (T, E, K, ...), Q and proposal (T, E, K; q of each drawn
        action), NaN away from rollout states, and branch_steps and branches (T, E). An action drawn twice
        from one state runs one branch (the same action with the same noise: the same Q); branch_steps
        counts it twice, as the reference, which runs it twice, does, and branches (the restores) once."""
        dist, A = net.distribution, net.sizes[-1]
        K = A if draws is None else draws.shape[1]
        continuous = dist is trpo.DiagonalGaussian
        found = {"Q": np.full((*rollout.shape, K), np.nan), "proposal": np.full((*rollout.shape, K), np.nan),
                 "action_sets": np.zeros((*rollout.shape, K, *((A,) if continuous else ())),
                                         dtype=np.float64 if continuous else np.int64)}
        row = np.cumsum(rollout.ravel()).reshape(rollout.shape) - 1  # (t, e) -> its row of noise and draws
        act = one_state_policy(net, theta)  # pi_old, one state at a time, for the branches
        results = {}  # (t, e, k) -> (Q, steps) of the k-th action of the state's set
        repeats = {}  # (t, e, k) -> (t, e, k') of an earlier draw of the same action, whose branch it shares
        batch = self.empty_batch(net, steps)
        for t in range(steps):
            logits, actions = self.draw_actions(net, theta)
            for e in np.flatnonzero(rollout[t]):  # the trunk is at these rollout states now: branch from them
                i = row[t, e]
                action_set, q = trpo.branch_actions(logits[e][None], None if draws is None else draws[i][None],
                                                    proposal, dist, A)
                found["action_sets"][t, e] = action_set[0]
                if q is not None:
                    found["proposal"][t, e] = q[0]
                first = {}  # action -> the k of its first draw
                for k, action in enumerate(action_set[0]):
                    if first.setdefault(action.tobytes(), k) != k:  # drawn again: the same branch (action, noise)
                        repeats[(t, e, k)] = (t, e, first[action.tobytes()])
                        continue
                    if len(self.episode_actions[e]) >= self.replay_below:  # the child runs it from this state
                        self.pool.submit((t, e, k), lambda env=self.envs[e], a=action, u=noise[i]: trpo.branch_rollout(
                            env, a, act, u, gamma, value_fn, lam))
                    else:
                        env = self.spare if self.reuse_spare else trpo.make_env(self.env_id)
                        trpo.restore_by_replay(env, self.episode_seed[e], self.episode_actions[e])
                        results[(t, e, k)] = trpo.branch_rollout(env, action, act, noise[i], gamma, value_fn, lam)
                        if env is not self.spare:
                            env.close()
            self.step_environments(batch, t, logits, actions)
        if self.pool is not None:
            results.update(self.pool.gather())
        found["branches"] = np.zeros(rollout.shape, dtype=np.int64)  # the branches run (restores)
        for t, e, _ in results:
            found["branches"][t, e] += 1
        results.update({repeat: results[earlier] for repeat, earlier in repeats.items()})
        found["branch_steps"] = np.zeros(rollout.shape, dtype=np.int64)  # as the reference counts them
        for (t, e, k), (q_value, steps_taken) in results.items():
            found["Q"][t, e, k] = q_value
            found["branch_steps"][t, e] += steps_taken
        batch.update(found)
        return batch

    def close(self):
        if self.pool is not None:
            self.pool.close()
        self.spare.close()
        super().close()


def one_state_policy(net, theta):
    """trpo_numpy.one_state_policy, the policy a vine branch follows, made cheaper: the layers are split
    from theta once, the one state goes through them as a vector (the same products as a 1-row batch),
    and a categorical's action is drawn in plain Python (network.sample_one, sample's rule). The same
    actions (test_trpo.py); a branch step costs about a third less (RESULTS.md)."""
    layers = net.unflatten(theta)
    sigma = np.exp(theta[net.mean_params:]) if net.distribution is trpo.DiagonalGaussian else None

    def act(obs, u):
        h = np.asarray(obs, dtype=np.float64)  # (D,)
        for W, b in layers[:-1]:
            h = np.tanh(h @ W + b)
        W, b = layers[-1]
        z = h @ W + b  # the logits, or a Gaussian's mean
        return sample_one(z, u) if sigma is None else z + sigma * u
    return act


class VineSampler:
    """trpo_numpy.VineSampler's batch, computed by ForkingVineTrunk workers, one per core.

    The rollout set and every random number of the branches are drawn here, as the reference draws
    them (trpo_numpy.choose_rollout_set), and each worker is sent those of its environments' states:
    the run does not depend on which worker a state falls to, nor on how it is restored.
    """

    def __init__(self, cfg, env_seeds, action_seeds, value_fn, rng):
        self.cfg, self.value_fn, self.rng = cfg, value_fn, rng
        restore = cfg.vine_restore
        if restore != "replay" and not hasattr(os, "fork"):
            print("note: os.fork is not available here; the vine restores states by seeded replay, "
                  "which is exact but slower.", file=sys.stderr)
            restore = "replay"
        self.trunks = ParallelSampler(ForkingVineTrunk, cfg.env, env_seeds, action_seeds, cfg.workers, restore)

    def sample(self, net, theta, steps):
        cfg, dist = self.cfg, net.distribution
        rollout, noise, draws = trpo.choose_rollout_set(self.rng, (steps, cfg.num_envs), cfg, dist, net.sizes[-1])
        row = np.zeros(rollout.shape, dtype=np.int64)
        row[rollout] = np.arange(np.count_nonzero(rollout))
        rows = [row[:, part][rollout[:, part]] for part in self.trunks.parts]  # each worker's states, in order
        bootstrap = self.value_fn if cfg.vine_bootstrap else None
        started = time.perf_counter()
        batch = self.trunks.sample_parts([
            (net, theta, steps, rollout[:, part], noise[r], None if draws is None else draws[r],
             cfg.vine_proposal, cfg.gamma, bootstrap, cfg.lam) for part, r in zip(self.trunks.parts, rows)])
        batch.update(
            rollout_states=batch["obs"][rollout],  # (N, D), states in row-major (t, e) order
            rollout_logits=batch["logits"][rollout],
            Q=batch.pop("Q")[rollout],  # (N, K): Q(s_n, a_nk) of the k-th action of state n's set
            action_sets=batch.pop("action_sets")[rollout],
            proposal=batch.pop("proposal")[rollout] if cfg.vine_actions else None,
            branch_steps=int(batch.pop("branch_steps").sum()),
            restores=int(batch.pop("branches").sum()),
            branch_seconds=time.perf_counter() - started)
        return batch

    def close(self):
        self.trunks.close()


def make_sampler(cfg, learner):
    """trpo_numpy.make_sampler's sampler, on cfg.workers processes: the same environments and seeds."""
    env_seeds = learner.rng.integers(trpo.TRAIN_SEED_LIMIT, size=cfg.num_envs)
    action_seeds = learner.rng.integers(2 ** 63, size=cfg.num_envs)
    if cfg.scheme == "vine":
        return VineSampler(cfg, env_seeds, action_seeds, learner.value_fn, learner.rng)
    return ParallelSampler(single_path_sampler, cfg.env, env_seeds, action_seeds, cfg.workers)


def train_iteration(learner, sampler):
    """trpo_numpy.train_iteration, with step 5 (the value fit) in a second thread beside step 4 (the policy
    step), on the core the step leaves idle (NumPy releases Python's lock in its array work). Neither
    takes anything from the other, so the run is the same to the bit."""
    cfg, net = learner.cfg, learner.policy_net
    start = time.perf_counter()
    batch = sampler.sample(net, learner.theta, cfg.steps_per_env)
    problem = trpo.policy_problem(learner, batch)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as background:
        value_fit = background.submit(trpo.fit_value_function, learner.value_fn, problem, cfg, learner.rng)
        learner.theta, step = trpo.trpo_step(net, learner.theta, problem.states, problem.objective, cfg)
    return trpo.record_iteration(learner, batch, problem, step, value_fit.result(), time.perf_counter() - start)
