"""cli.py: the command line of trpo_numpy.py, the training run it starts, and evaluation. A reader of the
TRPO paper can skip this file: the algorithm is trpo_numpy.py's, run fast by engine.py.

`python trpo_numpy.py [options]` runs `main` here (trpo_numpy.py hands over at once, so that this
file sets up the process first). What is here:

* `build_parser`: the options, generated from trpo_numpy.Config: each field's one line of help,
  its default, and the defaults of the vine and of continuous actions where trpo_numpy.DEFAULTS
  gives others;
* `validate`: every value the algorithm cannot run with, refused in one sentence;
* environments by name (`make_env`, `env_dims`, `reward_threshold`): what a user can get wrong
  (an unknown id, a missing package, a space the policy cannot handle) said in one sentence;
* `train`: a training run as the command line makes it: engine.py's iterations, with the run's
  folder, progress.csv, checkpoints and plots (run_files.py), --resume, and Ctrl-C;
* the rules of --resume (which settings may change) and of --eval (which options go with it);
* evaluation (`load_policy`, `act`, `evaluate_policy`, `run_evaluation`) and the animated GIF;
* exit codes: 0 done, 1 a worker process died or a file could not be written (a full disk), 2 bad
  input, 130 stopped by Ctrl-C, 143 by SIGTERM, 129 by SIGHUP (a closed terminal); stopped, a run
  saves its last finished iteration.
"""

import parallel  # first: it sets up the process (BLAS threads, memory, Ctrl-C) before NumPy loads

parallel.set_up_process(main=__name__ == "__main__")

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

import engine
import run_files
import trpo_numpy as trpo
from diagnostics import first_crossing
from network import policy_network
from run_files import UserError

MAX_LAYER_SIZE = 4096  # a 4096 x 4096 layer is 128 MB of float64 weights; wider ones exhaust memory
MAX_ENVS = 1024  # environments side by side; each holds its own simulator
MAX_KL = 10.0  # delta, in nats: far past any policy change a trust region is for
MAX_BATCH = 2 ** 21  # steps per iteration: a batch's arrays (observations twice, logits, ...) take ~200 bytes a step
MAX_HORIZON = 10_000  # steps of a vine branch
MAX_BRANCH_NUMBERS = 2 ** 24  # N x H and N x K random numbers (8 bytes each; d each for continuous actions) per iteration
RESUMABLE = {"total_steps", "out", "workers", "save_every"}  # the settings a resumed run may change
SCHEME_NAMES = {"single": "single path", "vine": "vine"}


def flag(name):
    """The command-line flag of a Config field: total_steps -> --total-steps."""
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------
# The options and their help
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


def other_defaults(name):
    """' (vine: ...; continuous actions, single path: ...)' where trpo_numpy.DEFAULTS gives a field another
    default than Config's for a scheme or an action space, with the vine's budget and stop; else ''."""
    default = getattr(trpo.Config(), name)
    others = [f"{'' if actions == 'discrete' else 'continuous actions, '}{SCHEME_NAMES[scheme]}: {settings[name]}"
              for (scheme, actions), settings in trpo.DEFAULTS.items() if settings.get(name, default) != default]
    if name == "total_steps":
        others.append(f"vine: {trpo.VINE_ITERATIONS} iterations' worth")
    if name == "stop_return":
        others.append("vine: " + "".join(f"{value:g} for {env}, " for env, value in trpo.VINE_STOP_RETURN.items())
                      + "the environment's reward threshold for others")
    return f" ({'; '.join(others)})" if others else ""


def build_parser(defaults=True):
    """The command line, generated from trpo_numpy.Config so that --help and the defaults cannot drift apart.

    defaults=False leaves out every default: what remains is what the user typed."""
    parser = ArgumentParser(description="Trust Region Policy Optimization (Schulman et al. 2015) in plain NumPy.",
                            formatter_class=HelpFormatter,
                            argument_default=None if defaults else argparse.SUPPRESS)
    training = parser.add_argument_group("training (with the papers' symbols)")
    for f in dataclasses.fields(trpo.Config):
        settings = dict(f.metadata)
        settings["help"] += other_defaults(f.name)
        default = f.default if defaults else argparse.SUPPRESS
        if f.type in ("bool", bool):
            training.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, **settings)
        elif f.type in ("tuple", tuple):
            training.add_argument(flag(f.name), type=number(int), nargs="+", default=default, **settings)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            convert = number(kind) if kind in (int, float) else kind
            training.add_argument(flag(f.name), type=convert, default=default, **settings)
    other = parser.add_argument_group("checkpoints and evaluation")
    other.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in this checkpoint.npz; "
                       "its settings are kept (only " + ", ".join(flag(name) for name in sorted(RESUMABLE))
                       + " may change)")
    other.add_argument("--eval", metavar="FILE", help="do not train: evaluate the policy in this policy.npz or "
                       "checkpoint.npz on seeds training never uses")
    other.add_argument("--episodes", type=number(int), default=100 if defaults else argparse.SUPPRESS,
                       help="evaluation episodes, with --eval")
    other.add_argument("--greedy", action="store_true", default=False if defaults else argparse.SUPPRESS,
                       help="with --eval, take the most likely action instead of sampling")
    other.add_argument("--gif", metavar="FILE", help="with --eval, write the first episode as an animated GIF, into a new file")
    other.add_argument("--quiet", action="store_true", default=False if defaults else argparse.SUPPRESS,
                       help="training: no progress bar, only the log line of each iteration (a bar is never "
                            "drawn into a file or pipe)")
    return parser


def validate(cfg):
    """Raise UserError, in one sentence, for any value the algorithm cannot run with."""
    env_dims(cfg.env)  # an environment that cannot be made, or whose spaces cannot be handled
    for field in dataclasses.fields(trpo.Config):  # what argparse checks on the command line, for a Config from Python
        value = getattr(cfg, field.name)
        if "choices" in field.metadata and value not in field.metadata["choices"]:
            raise UserError(f"{flag(field.name)} must be one of {', '.join(field.metadata['choices'])}, got {value!r}.")
        if isinstance(field.default, bool) and not isinstance(value, bool):
            raise UserError(f"{field.name} must be True or False, got {value!r}.")
    positive = ["total_steps", "num_envs", "workers", "steps_per_env", "max_kl", "fisher_subsample",
                "cg_iters", "max_backtracks", "vf_lr", "vf_epochs", "vf_minibatch", "save_every",
                "vine_states", "vine_horizon"]
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise UserError(f"{flag(name)} must be positive, got {getattr(cfg, name)}.")
    if not cfg.damping >= 0:
        raise UserError(f"--damping must be zero or positive, got {cfg.damping}.")
    if not 0 < cfg.gamma <= 1:
        raise UserError(f"--gamma must be in (0, 1], got {cfg.gamma}.")
    if not 0 <= cfg.lam <= 1:
        raise UserError(f"--lam must be in [0, 1], got {cfg.lam}.")
    if not 0 < cfg.backtrack_coeff < 1:
        raise UserError(f"--backtrack-coeff must be in (0, 1), got {cfg.backtrack_coeff}.")
    if not cfg.vine_actions >= 0:
        raise UserError(f"--vine-actions must be 0 (all actions) or positive, got {cfg.vine_actions}.")
    if not cfg.hidden or any(n < 1 for n in cfg.hidden):
        raise UserError(f"--hidden needs one or more positive layer sizes, got {list(cfg.hidden)}.")
    for name in ("max_kl", "damping", "vf_lr", "entropy_coef", "stop_return", "log_std_init"):
        value = getattr(cfg, name)
        if value is not None and not np.isfinite(value):
            raise UserError(f"{flag(name)} must be a finite number, got {value}.")
    if cfg.max_kl > MAX_KL:
        raise UserError(f"--max-kl {cfg.max_kl:g} is no trust region (a mean KL of {MAX_KL:g} nats already lets "
                        f"the policy become any other); use a delta such as 0.01 to 0.1, or --no-trust-region.")
    if cfg.workers > cfg.num_envs:
        raise UserError(f"--workers {cfg.workers} is more processes than --num-envs {cfg.num_envs}: each worker "
                        f"steps environments of its own; use at most {cfg.num_envs}.")
    if cfg.seed < 0:
        raise UserError(f"--seed must be zero or positive, got {cfg.seed}.")
    if cfg.vine_actions == 1:
        raise UserError("--vine-actions 1 cannot learn: with one sampled action the self-normalised "
                        "estimate of Eq. (16) is that action's Q whatever theta is, so its gradient is zero; "
                        "use 2 or more, or 0 for all actions.")
    if max(cfg.hidden) > MAX_LAYER_SIZE:
        raise UserError(f"--hidden {max(cfg.hidden)} is wider than this NumPy implementation can hold in "
                        f"memory at a useful speed; use at most {MAX_LAYER_SIZE}.")
    if cfg.num_envs > cfg.total_steps:
        raise UserError(f"--num-envs {cfg.num_envs:,} is more environments than --total-steps "
                        f"{cfg.total_steps:,}: the first step of every environment would already be "
                        f"more than the whole run.")
    if cfg.num_envs > MAX_ENVS:
        raise UserError(f"--num-envs {cfg.num_envs:,} environments would take minutes and gigabytes to "
                        f"build; use at most {MAX_ENVS} (and --steps-per-env for a larger batch).")
    if cfg.batch_size > MAX_BATCH:
        raise UserError(f"--num-envs {cfg.num_envs:,} x --steps-per-env {cfg.steps_per_env:,} is a batch of "
                        f"{cfg.batch_size:,} steps, more than memory holds at a useful speed; use at most "
                        f"{MAX_BATCH:,} steps per iteration.")
    if cfg.vine_horizon > MAX_HORIZON:
        raise UserError(f"--vine-horizon {cfg.vine_horizon:,} is longer than a branch can usefully be (its random "
                        f"numbers alone would fill memory); use at most {MAX_HORIZON:,}.")
    if cfg.log_std_init != 0.0 and not env_dims(cfg.env)[2]:
        raise UserError(f"--log-std-init is for continuous actions; those of {cfg.env} are discrete.")
    if cfg.scheme == "vine":
        validate_vine(cfg)


def validate_vine(cfg):
    """validate's rules of the vine, which depend on the environment's actions (probed here)."""
    _, action_dim, continuous = env_dims(cfg.env)
    if continuous and (cfg.vine_actions == 0 or cfg.vine_proposal == "uniform"):
        raise UserError(("--vine-actions 0 (every action, Eq. 15) has no meaning for" if cfg.vine_actions == 0 else
                         "--vine-proposal uniform is for discrete actions, not for")
                        + f" the continuous actions of {cfg.env}; the vine draws K > 1 actions from pi_old there "
                          f"(the default).")
    rollout_states = min(cfg.vine_states, cfg.batch_size)
    numbers_per_action = action_dim if continuous else 1  # a Gaussian's action takes d standard normals
    for name, per_state in (("vine_horizon", cfg.vine_horizon), ("vine_actions", cfg.vine_actions)):
        if rollout_states * per_state * numbers_per_action > MAX_BRANCH_NUMBERS:
            dims = f" x {action_dim} action dimensions" if continuous else ""
            raise UserError(f"{rollout_states:,} rollout states x {flag(name)} {per_state:,}{dims} are more random "
                            f"numbers per iteration than memory holds at a useful speed; keep their product at "
                            f"most {MAX_BRANCH_NUMBERS:,}.")


# ----------------------------------------------------------------------------
# Environments by name
# ----------------------------------------------------------------------------

# Evaluation resets its episodes with seeds from here on; training below (trpo_numpy.TRAIN_SEED_LIMIT).
EVAL_SEED_BASE = trpo.TRAIN_SEED_LIMIT


def make_env(env_id, render_mode=None):
    """trpo_numpy.make_env, with what a user can get wrong (an unknown id, a missing package, an action or
    observation space this policy cannot handle) said in one sentence rather than deep inside."""
    import gymnasium as gym
    if render_mode == "rgb_array":
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # frames into an array need no display
    try:
        env = trpo.make_env(env_id, render_mode=render_mode)
    except (gym.error.DependencyNotInstalled, ImportError) as e:  # ImportError: a module the environment imports
        raise UserError(f"environment '{env_id}' needs a package that is not installed: {e}") from None
    except gym.error.Error as e:
        raise UserError(f"unknown environment '{env_id}' ({e}).") from None
    space = env.action_space
    flat_box = (isinstance(space, gym.spaces.Box) and len(space.shape) == 1 and space.shape[0] >= 1
                and np.issubdtype(space.dtype, np.floating)
                and np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high)))
    if not (isinstance(space, gym.spaces.Discrete) or flat_box):
        env.close()
        raise UserError(f"environment '{env_id}' has a {type(space).__name__} action space of shape {space.shape}; "
                        "this TRPO needs Discrete actions (a categorical policy) or a flat Box of floats with "
                        "finite bounds (a Gaussian policy).")
    if isinstance(space, gym.spaces.Discrete) and space.start != 0:
        env.close()
        raise UserError(f"environment '{env_id}' numbers its {space.n} actions from {space.start}; the categorical "
                        f"policy gives actions 0 to n - 1, so it needs Discrete actions that start at 0.")
    observations = env.observation_space
    if not (isinstance(observations, gym.spaces.Box) and len(observations.shape) == 1 and observations.shape[0] >= 1):
        env.close()
        raise UserError(f"environment '{env_id}' has observation space {observations}; "
                        "the networks need a flat Box observation of one number or more.")
    return env


def env_dims(env_id):
    """trpo_numpy.env_dims, (observation size, number of actions or action dimensions, continuous?), once
    make_env has found nothing to refuse; or UserError in one sentence."""
    make_env(env_id).close()
    return trpo.env_dims(env_id)


def reward_threshold(env_id):
    """The return at which Gymnasium counts env_id as solved (LunarLander: 200), or None."""
    import gymnasium as gym
    try:
        return gym.spec(env_id).reward_threshold
    except gym.error.Error:
        return None  # an unknown id: make_env says so, in one sentence


# ----------------------------------------------------------------------------
# Evaluation and the animation
# ----------------------------------------------------------------------------

def load_policy(path, env_id=None):
    """(net, theta, env_id) from a policy.npz or checkpoint.npz, checked against the environment's shape."""
    sizes, theta, saved_env_id = run_files.read_policy(path)
    env_id = env_id or saved_env_id
    obs_dim, num_actions, continuous = env_dims(env_id)
    if sizes[0] != obs_dim or sizes[-1] != num_actions:
        raise UserError(f"the network in '{path}' takes {sizes[0]} observations and gives {sizes[-1]} actions "
                        f"(or action dimensions), "
                        f"but {env_id} has {obs_dim} and {num_actions}.")
    net = policy_network(sizes, continuous)
    if theta.shape != (net.num_params,):
        raise UserError(f"'{path}' holds {theta.size} weights, not the {net.num_params} of its network.")
    if not np.all(np.isfinite(theta)):
        raise UserError(f"'{path}' holds weights that are not finite (NaN or infinite): the policy cannot act.")
    return net, theta, env_id


def act(net, theta, obs, greedy=True, rng=None):
    """The action pi_theta takes at one observation: if greedy, the most likely one (a Gaussian's mean),
    else one sampled with rng (a new, unseeded generator if None). An int for discrete actions, an
    array for continuous ones. What a notebook calls to drive an environment."""
    obs = np.asarray(obs, dtype=np.float64)
    if obs.shape != (net.sizes[0],):
        raise UserError(f"act takes one observation, a vector of {net.sizes[0]} numbers, not an array of shape "
                        f"{obs.shape}.")
    if not np.all(np.isfinite(obs)):
        raise UserError(f"act was given an observation that is not finite: {obs}.")
    dist, logits = net.distribution, net.forward(theta, obs[None])[0]
    if greedy:
        action = dist.greedy(logits)[0]
    else:
        noise = dist.noise(rng if rng is not None else np.random.default_rng(), net.sizes[-1])
        action = dist.sample(logits, [noise])[0]
    return int(action) if np.ndim(action) == 0 else action


def evaluate_policy(net, theta, env_id, episodes, greedy, rng=None, gif_path=None):
    """Returns of `episodes` episodes under pi_theta, episode k reset with seed EVAL_SEED_BASE + k,
    a seed training never uses. greedy=True takes the most likely action; otherwise actions are
    sampled with rng. With gif_path, the first episode is also rendered and written there."""
    env = make_env(env_id, render_mode="rgb_array" if gif_path else None)
    returns = np.zeros(episodes)
    frames = []
    for k in range(episodes):
        obs, _ = env.reset(seed=EVAL_SEED_BASE + k)
        done = False
        while not done:
            if gif_path and k == 0:
                frames.append(env.render())
            obs, reward, terminated, truncated, _ = env.step(act(net, theta, obs, greedy, rng))
            returns[k] += reward
            done = terminated or truncated
        if gif_path and k == 0:
            frames.append(env.render())
            run_files.write_gif(gif_path, frames, fps=env.metadata.get("render_fps", 50))
    env.close()
    return returns


def check_gif_path(gif_path):
    """--gif names a new file ending in .gif in a folder that exists and can be written: never one that
    is there already (a symlink included), which would be lost; else one sentence (UserError)."""
    if os.path.isdir(gif_path):
        raise UserError(f"--gif: '{gif_path}' is a folder; give the name of a new file ending in .gif.")
    if not gif_path.lower().endswith(".gif"):
        raise UserError(f"--gif needs a file name ending in .gif, got '{gif_path}'.")
    if os.path.lexists(gif_path):
        raise UserError(f"--gif: '{gif_path}' exists already and would be lost; give a new file name "
                        f"(or remove it first).")
    folder = os.path.dirname(os.path.abspath(gif_path))
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        raise UserError(f"--gif: cannot write into '{folder}' (it does not exist, or is not writable).")


def run_evaluation(path, episodes, greedy, gif_path, env_id=None):
    """--eval: load a policy, report mean and std of the return and the share of episodes at or
    above the environment's reward threshold (LunarLander: 200), where it has one."""
    if gif_path is not None:
        check_gif_path(gif_path)
    net, theta, env_id = load_policy(path, env_id)
    if gif_path is not None:
        env = make_env(env_id)
        render_modes = env.metadata.get("render_modes", [])
        env.close()
        if "rgb_array" not in render_modes:
            raise UserError(f"--gif: {env_id} cannot draw its frames into an image (its render modes: "
                            f"{', '.join(render_modes) or 'none'}).")
    returns = evaluate_policy(net, theta, env_id, episodes, greedy, rng=np.random.default_rng(0),
                              gif_path=gif_path)
    mode = "greedy" if greedy else "sampled"
    threshold = reward_threshold(env_id)
    print(f"{env_id}, {episodes} evaluation episode{'s' if episodes != 1 else ''} ({mode} actions, seeds from {EVAL_SEED_BASE}): "
          f"return {returns.mean():.1f} +- {returns.std():.1f}"
          + (f", {np.mean(returns >= threshold):.0%} at or above {threshold:g}" if threshold is not None else ""))
    if gif_path:
        print(f"animation of the first episode written to {gif_path}")
    return returns


# ----------------------------------------------------------------------------
# A training run, with its files
# ----------------------------------------------------------------------------

def out_dir(cfg):
    """The run's folder: --out, or runs/<scheme>-seed<seed> (which train numbers -2, -3, ... if taken)."""
    return cfg.out or os.path.join("runs", f"{cfg.scheme}-seed{cfg.seed}")


def read_checkpoint(path):
    """(snapshot, Config) of a checkpoint file, for train(cfg, resume=snapshot); or UserError in one sentence."""
    saved = run_files.read_checkpoint(path)
    try:
        cfg = trpo.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()})
    except TypeError:
        raise UserError(f"'{path}' is a checkpoint of another version of trpo_numpy.py.") from None
    for field in dataclasses.fields(trpo.Config):
        value, default = getattr(cfg, field.name), field.default
        kinds = (int, float) if isinstance(default, float) else type(default)
        if default is None:  # stop_return: a number, or None
            kinds = (int, float, type(None))
        if not isinstance(value, kinds) or (isinstance(value, bool) and not isinstance(default, bool)) or (
                isinstance(default, tuple) and not all(isinstance(n, int) for n in value)):
            raise UserError(f"'{path}' is damaged: its setting {field.name} is {value!r}, not a "
                            f"{type(default).__name__ if default is not None else 'number'}.")
    return saved, cfg


def train(cfg, verbose=True, resume=None, progress_bar=True):
    """Train a policy with TRPO as the command line does: trpo_numpy's loop of Sec. 6, its iterations
    computed by engine.py, writing progress.csv, config.json, checkpoint.npz, policy.npz and plots to
    out_dir(cfg). `resume` is a snapshot (read_checkpoint) to continue from. verbose prints a log
    line per iteration, progress_bar draws a bar on a terminal. Ctrl-C (or an error) keeps the last
    finished iteration.

    Returns (policy_net, theta, history), history one dict per iteration. From Python:
        net, theta, history = cli.train(trpo_numpy.scheme_config("single", env="CartPole-v1", total_steps=50_000))"""
    validate(cfg)  # a value the algorithm cannot run with ends here, in one sentence (UserError)
    learner = trpo.Learner(cfg)
    run_id = run_files.new_run_id(cfg.seed)  # tells this run from another in a folder
    if resume is not None:
        run_id = run_files.restore(learner, resume)
    run = run_files.RunFolder(
        out_dir(cfg), not cfg.out, dataclasses.asdict(cfg), run_id, learner.history,
        resuming=resume is not None, sizes=(learner.policy_net.sizes, learner.value_fn.net.sizes), verbose=verbose,
        progress_bar=progress_bar,
        plot_labels=dict(scheme_name=SCHEME_NAMES[cfg.scheme], solved_at=reward_threshold(cfg.env)))
    cfg.out = run.out_dir  # without --out, a new folder: runs/<scheme>-seed<seed>, numbered -2, -3, ... if taken
    if verbose:
        notes(cfg, learner.env_steps)  # what the run will do otherwise than asked (whole batches, ...)
    snapshot, sampler = run_files.snapshot(learner, run_id), None
    start = time.perf_counter() - learner.wall_s
    try:
        # After a resume the simulators cannot be restored (Box2D state is not saved): the
        # environments start new episodes, seeded from the restored generator.
        sampler = engine.make_sampler(cfg, learner)
        while not learner.finished():
            parallel.raise_if_stop_requested()
            row = engine.train_iteration(learner, sampler)
            learner.wall_s = row["wall_s"] = time.perf_counter() - start
            snapshot = run_files.snapshot(learner, run_id)
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
    return learner.policy_net, learner.theta, learner.history


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------

def run_config(args, typed, given):
    """The (Config, checkpoint snapshot or None) of a training run: a new one, or --resume's."""
    if not args.resume:
        vine_only = sorted(k for k in given if k.startswith("vine_"))
        if vine_only and given.get("scheme", "single") != "vine":
            raise UserError(f"{flag(vine_only[0])} is for --scheme vine; a single-path run has no branches.")
        if "normalize_advantages" in given and given.get("scheme") == "vine":
            raise UserError("--normalize-advantages is for the single path; the vine's step uses its branches' Q.")
        env_dims(given.get("env", trpo.Config.env))  # an unknown environment: one sentence, before anything
        cfg = trpo.scheme_config(**given)
        if "workers" not in given:  # the default, 2, with a single environment: one worker, as config.json says
            cfg.workers = min(cfg.workers, cfg.num_envs)
        if cfg.out:  # now, before any time is spent (without --out, train makes a new, numbered folder)
            run_files.check_folder_is_free(cfg.out)
        return cfg, None
    saved, cfg = read_checkpoint(args.resume)
    fixed = sorted(k for k, v in given.items() if k not in RESUMABLE and v != getattr(cfg, k))
    if fixed:
        raise UserError(f"{flag(fixed[0])} cannot change when resuming; the run keeps its saved settings.")
    overrides = {"out": os.path.dirname(os.path.abspath(args.resume))}
    overrides.update({k: v for k, v in typed.items() if k in RESUMABLE})
    cfg = dataclasses.replace(cfg, **overrides)
    run_files.check_folder_is_ours(cfg.out, saved["run_id"], saved["iteration"])  # now, before any time is spent
    edits = run_files.edited_settings(cfg.out, saved["config"], RESUMABLE)
    if edits:
        name, value = edits[0]
        print(f"note: config.json in {cfg.out} says {name} {value!r}, but the checkpoint {saved['config'][name]!r}; a "
              f"resumed run keeps its checkpoint's settings, and config.json is written again with them"
              + (f" ({len(edits) - 1} more setting{'s' if len(edits) > 2 else ''} differ)." if len(edits) > 1 else "."),
              file=sys.stderr)
    if trpo.solved(saved["history"], cfg.stop_return):
        raise UserError(f"nothing to do: the run in {cfg.out} reached --stop-return {cfg.stop_return:g} already.")
    if saved["env_steps"] >= cfg.total_steps:
        raise UserError(f"nothing to do: the run in {cfg.out} has trained {saved['env_steps']:,} of its "
                        f"--total-steps {cfg.total_steps:,} already; give a larger --total-steps to go on.")
    return cfg, saved


def last_good_checkpoint(out):
    """What a run that could not write its files keeps, as the end of a sentence: its last good checkpoint
    (the iteration it holds, and the command to go on from it), or that it has none."""
    checkpoint = run_files.checkpoint_path(out)
    try:
        saved, _ = read_checkpoint(checkpoint)
    except UserError:
        return f"no checkpoint could be saved in {out}."
    return (f"the last good checkpoint, of iteration {saved['iteration']}, is kept: make room, then continue "
            f"with  python trpo_numpy.py --resume {checkpoint}")


def notes(cfg, steps_done=0):
    """What the run will do differently from what was asked, in a line each on stderr, as it starts
    (tqdm.write: above a progress bar already on the screen, not through it)."""
    from tqdm import tqdm
    iterations = -(-(cfg.total_steps - steps_done) // cfg.batch_size)  # whole iterations, rounded up
    if steps_done + iterations * cfg.batch_size != cfg.total_steps:
        tqdm.write(f"note: training runs whole iterations of {cfg.batch_size:,} steps: "
                   f"{steps_done + iterations * cfg.batch_size:,} steps in all for --total-steps "
                   f"{cfg.total_steps:,}.", file=sys.stderr)
    if cfg.scheme == "vine" and cfg.vine_states > cfg.batch_size:
        tqdm.write(f"note: --vine-states {cfg.vine_states:,} is more than the trunk's {cfg.batch_size:,} states; "
                   f"every trunk state is a rollout state.", file=sys.stderr)


def main(argv):
    """The command line: train (or --resume), or --eval; returns the exit code."""
    args = build_parser().parse_args(argv)
    typed = vars(build_parser(defaults=False).parse_args(argv))  # only what the user gave
    config_fields = {f.name for f in dataclasses.fields(trpo.Config)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in typed.items() if k in config_fields}
    cfg = None
    parallel.stop_on_signals()  # from here on Ctrl-C, SIGTERM and SIGHUP stop the program (training or --eval)
    try:
        parallel.raise_if_stop_requested()  # a Ctrl-C that came, and was lost, while Python was importing
        training_options = sorted(k for k in given if k != "env")
        if args.eval and (training_options or args.resume or args.quiet):
            option = flag(training_options[0]) if training_options else "--resume" if args.resume else "--quiet"
            raise UserError(f"{option} is for training; with --eval only --env, --episodes, --greedy and --gif "
                            f"apply (evaluation seeds start at {EVAL_SEED_BASE}).")
        eval_options = [name for name in ("episodes", "greedy", "gif") if name in typed]
        if eval_options and not args.eval:
            raise UserError(f"{flag(eval_options[0])} goes with --eval FILE; training does not use it.")
        if args.eval:
            if args.episodes < 1:
                raise UserError(f"--episodes must be positive, got {args.episodes}.")
            run_evaluation(args.eval, args.episodes, args.greedy, args.gif, typed.get("env"))
            return 0
        cfg, resume = run_config(args, typed, given)
        _, _, history = train(cfg, resume=resume, progress_bar=not args.quiet)
    except run_files.WriteFailed as e:
        if cfg is None or not cfg.out:  # before the run's folder was made: nothing was trained
            print(f"error: {e}.", file=sys.stderr)
            return 1
        print(f"error: {e}; training stopped, and {last_good_checkpoint(cfg.out)}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except parallel.ProcessFailed as e:
        checkpoint = run_files.checkpoint_path(cfg.out)  # train has set cfg.out to its folder
        print(f"error: {e}; training stopped." + (f" The last finished iteration is saved: continue with  "
              f"python trpo_numpy.py --resume {checkpoint}" if os.path.exists(checkpoint) else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        parallel.ignore_stop_signals()  # stopping has begun: more Ctrl-C would only cut the message short
        if args.eval:
            print("\nevaluation stopped.", file=sys.stderr)
            return parallel.exit_code_of_stop()
        checkpoint = run_files.checkpoint_path(cfg.out) if cfg and cfg.out else None
        if checkpoint is None or not os.path.exists(checkpoint):
            print("\nstopped before training began; nothing was saved.", file=sys.stderr)
            return parallel.exit_code_of_stop()
        saved = [name for name in ("checkpoint.npz", "progress.csv", "policy.npz", "learning_curve.png")
                 if os.path.exists(os.path.join(out_dir(cfg), name))]
        print(f"stopped: {', '.join(saved)} are in {out_dir(cfg)}\n"
              f"continue with:  python trpo_numpy.py --resume {checkpoint}", file=sys.stderr)
        return parallel.exit_code_of_stop()
    if trpo.solved(history, cfg.stop_return):
        threshold = reward_threshold(cfg.env)  # the vine stops past it on the landers (trpo_numpy.VINE_STOP_RETURN)
        first = first_crossing(history, threshold)
        if first is not None and threshold < cfg.stop_return:
            print(f"solved: the rolling return reached {threshold:g}, the environment's threshold, at iteration "
                  f"{first['iteration']}, and --stop-return {cfg.stop_return:g} at iteration {history[-1]['iteration']}.")
        else:
            print(f"solved: the rolling return reached --stop-return {cfg.stop_return:g} at iteration "
                  f"{history[-1]['iteration']}.")
    print(f"done: {history[-1]['env_steps']:,} env steps, rolling return {history[-1]['rolling_return']:.1f}; "
          f"outputs in {out_dir(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
