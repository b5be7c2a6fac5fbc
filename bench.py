"""bench.py: how fast TRPO learns an environment (LunarLander-v3 by default), how near the simulator's speed.

Each seed (by default 0 to 9) trains with the default settings of the scheme and of the environment's
actions (trpo_numpy.Config and DEFAULTS), and --total-steps when given.
Measured in the same process, just before that seed's run and again just after it: the raw stepping
rate of the simulator as cli.make_env builds it (one environment, random actions); the mean of the two is the ceiling
that training is compared with. The target is the environment's reward threshold (LunarLander: 200),
or --target.

Single path (--scheme single), per seed: the end-to-end env steps per second
(sampling AND updates) as a ratio to the ceiling; the env steps and wall seconds
at which the rolling 100-episode training mean first reached the target; the final
policy's mean return over evaluation episodes on seeds training never used,
greedy (most likely action, or a Gaussian's mean) and sampled.

Vine (--scheme vine), per seed, with the vine's defaults (it stops once the rolling
100-episode trunk mean reaches 240 on LunarLander, past the target of 200, or the target
elsewhere; or after 150 iterations, or after --total-steps trunk steps when that is given):
iterations, trunk env steps, all simulated steps (trunk and branches) and wall seconds to the
target; the simulator's utilisation, i.e. trunk and branch steps per
second as a ratio of the ceiling times the cores; the cost of one fork restore plus a branch,
against plain env steps; and the final policy's greedy evaluation.

It prints a Markdown table and writes, never over a file it did not make in this run, into a
new folder of its own: bench_runs/<name>, or <out>/<name> with --out (numbered -2, -3, ...
when that folder exists), where <name> is the scheme, or <env>-<scheme> for another environment
than LunarLander-v3: the table <name>.md, the JSON <name>.json (rewritten after every seed, so a
benchmark stopped early keeps the seeds it finished), every seed's learning curve in
<name>_learning_curves.png, and each seed's training run in runs/<scheme>-seed<N>.

The results README.md and RESULTS.md show (bench_results/<name>.md and .json,
plots/<name>_learning_curves.png, plots/trust_region.png) are replaced only with --publish,
once every seed has finished.

Usage:
  python bench.py --scheme single --seeds 0 1 --total-steps 200000   # a quick look: bench_runs/single/
  python bench.py --scheme single --publish    # regenerates bench_results/single.* and plots/single_learning_curves.png
  python bench.py --scheme vine --publish      # regenerates bench_results/vine.* and plots/vine_learning_curves.png
  python bench.py --env LunarLanderContinuous-v3 --seeds 0 1 2 3 4 --publish
  python bench.py --trust-region-demo --publish    # regenerates plots/trust_region.png

Exit codes: 0 done, 1 a worker process died, 2 bad input, 130 stopped by Ctrl-C, 143 by SIGTERM.
"""

import dataclasses
import json
import os
import sys
import time

import parallel  # first: it sets up the process (BLAS threads; Ctrl-C noted while importing) before NumPy loads
parallel.set_up_process(main=__name__ == "__main__")
import trpo_numpy as T
import cli
import engine
import run_files
import numpy as np
from diagnostics import first_crossing
from network import policy_network
from run_files import UserError

DEFAULT_ENV = T.Config.env
DEFAULT_OUT = "bench_runs"  # each benchmark in a new folder <out>/<name> (numbered if taken): the scheme, or <env>-<scheme>
HERE = os.path.dirname(os.path.abspath(__file__))
PUBLISHED_RESULTS = os.path.join(HERE, "bench_results")  # what README.md and RESULTS.md show: only with --publish
PUBLISHED_PLOTS = os.path.join(HERE, "plots")


def raw_ceiling(env_id, steps=20_000, seed=0):
    """Env steps per second of the simulator as cli.make_env builds it (for Box actions, with its clip to the
    bounds): one environment, random actions, this process."""
    env = cli.make_env(env_id)
    space = env.action_space
    space.seed(seed)
    actions = [space.sample() for _ in range(steps)]
    actions = [int(a) for a in actions] if hasattr(space, "n") else actions
    env.reset(seed=seed)
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def restore_cost(cfg, branches=100):
    """Wall seconds of one fork-restore + a branch of cfg.vine_horizon steps + collecting its Q,
    one at a time, with an untrained policy from states 50 steps into an episode."""
    rng = np.random.default_rng(0)
    env = cli.make_env(cfg.env)
    obs_dim, num_actions, continuous = cli.env_dims(cfg.env)
    net = policy_network([obs_dim, *cfg.hidden, num_actions], continuous)
    theta = net.init(rng, output_gain=0.01)
    engines_off = np.zeros(num_actions) if continuous else 0  # LunarLander: the lander falls
    pool = parallel.ForkPool(max_children=1)
    seconds, steps = 0.0, 0
    for k in range(branches):
        env.reset(seed=k)
        for _ in range(50):
            _, _, terminated, truncated, _ = env.step(engines_off)  # the lander falls, not yet landed
            if terminated or truncated:  # an episode this short (CartPole): branch from a new one
                env.reset(seed=k)
        noise = net.distribution.noise(rng, num_actions, (cfg.vine_horizon,))
        start = time.perf_counter()
        act = engine.one_state_policy(net, theta)
        pool.submit(k, lambda: T.branch_rollout(env, engines_off, act, noise, cfg.gamma))
        steps += pool.gather()[k][1]
        seconds += time.perf_counter() - start
    env.close()
    return seconds / branches, steps / branches


def seed_config(scheme, seed, total_steps, out, env=DEFAULT_ENV, target=None):
    """One seed's Config: the defaults of the scheme and of env's actions, and total_steps when the user gave
    --total-steps (else the single path's 1,000,000 steps, or the vine's at most VINE_ITERATIONS iterations).
    A vine run stops where its defaults stop it (both landers: 240, trpo_numpy.VINE_STOP_RETURN), but never
    before target; with no default (an environment without a reward threshold), at target."""
    given = {} if total_steps is None else {"total_steps": total_steps}
    cfg = T.scheme_config(scheme, seed=seed, out=out, env=env, **given)
    if scheme == "vine" and target is not None:
        cfg.stop_return = target if cfg.stop_return is None else max(cfg.stop_return, target)
    return cfg


def bench_seed(cfg, eval_episodes, target):
    """Train one seed's run (cfg, its folder cfg.out new and empty) and measure it: a dict of results,
    with the first iteration whose rolling return reached target."""
    scheme, seed = cfg.scheme, cfg.seed
    ceiling_before = raw_ceiling(cfg.env, seed=seed)
    net, theta, history = cli.train(cfg, verbose=False)
    # The machine's speed drifts (a shared virtual machine's by 30% within minutes): the ceiling
    # the run is compared with is the mean of one measure just before it and one just after.
    ceiling_after = raw_ceiling(cfg.env, seed=seed)
    ceiling = (ceiling_before + ceiling_after) / 2
    solved = first_crossing(history, target)
    last = history[-1]
    result = {
        "seed": seed,
        "env": cfg.env,
        "target": target,
        "run_dir": cfg.out,
        "ceiling_steps_per_s": ceiling,
        "ceiling_before_and_after": [ceiling_before, ceiling_after],
        "iterations": last["iteration"],
        "total_env_steps": last["env_steps"],
        "total_wall_s": last["wall_s"],
        "final_rolling_return": last["rolling_return"],
        "steps_to_target": solved["env_steps"] if solved else None,
        "seconds_to_target": solved["wall_s"] if solved else None,
        "iterations_to_target": solved["iteration"] if solved else None,
        "curve": [(row["env_steps"], row["rolling_return"]) for row in history],
    }
    greedy = cli.evaluate_policy(net, theta, cfg.env, eval_episodes, greedy=True)
    sampled = cli.evaluate_policy(net, theta, cfg.env, eval_episodes, greedy=False,
                                  rng=np.random.default_rng(seed))
    result.update(eval_greedy_mean=float(greedy.mean()), eval_greedy_std=float(greedy.std()),
                  eval_sampled_mean=float(sampled.mean()), eval_sampled_std=float(sampled.std()))
    if scheme == "single":
        throughput = last["env_steps"] / last["wall_s"]
        result.update(train_steps_per_s=throughput, ratio_to_ceiling=throughput / ceiling)
    else:
        simulated = last["env_steps"] + sum(row["branch_steps"] for row in history)
        upto = [row for row in history if row["iteration"] <= (solved or last)["iteration"]]
        seconds, branch_steps = restore_cost(cfg)
        cores = os.cpu_count() or 1
        result.update(simulated_steps=simulated,
                      simulated_steps_to_target=sum(r["trunk_steps"] + r["branch_steps"] for r in upto) if solved else None,
                      utilisation=simulated / last["wall_s"] / (ceiling * cores), cores=cores,
                      restore_branch_ms=1e3 * seconds, restore_branch_steps=branch_steps,
                      restore_branch_in_plain_steps=seconds * ceiling)
    return result


def fmt(value, spec, missing="never"):
    return missing if value is None else format(value, spec)


def median_of(values):
    """Median where None (never reached) counts as infinitely late."""
    m = np.median([np.inf if v is None else v for v in values])
    return None if np.isinf(m) else m


def single_table(results, eval_episodes, target):
    lines = [
        f"| seed | steps to {target:g} | seconds to {target:g} | env steps/s | raw ceiling steps/s | ratio | "
        f"greedy eval ({eval_episodes} ep) | sampled eval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['seed']} | {fmt(r['steps_to_target'], ',d')} | {fmt(r['seconds_to_target'], '.0f')} | "
            f"{r['train_steps_per_s']:,.0f} | {r['ceiling_steps_per_s']:,.0f} | {r['ratio_to_ceiling']:.2f} | "
            f"{r['eval_greedy_mean']:.1f} ± {r['eval_greedy_std']:.1f} | "
            f"{r['eval_sampled_mean']:.1f} ± {r['eval_sampled_std']:.1f} |")
    solved = sum(r["steps_to_target"] is not None for r in results)
    lines.append(
        f"| **median / mean** | {fmt(median_of([r['steps_to_target'] for r in results]), ',.0f')} "
        f"({solved}/{len(results)} reached {target:g}) | {fmt(median_of([r['seconds_to_target'] for r in results]), '.0f')} | "
        f"{np.mean([r['train_steps_per_s'] for r in results]):,.0f} | "
        f"{np.mean([r['ceiling_steps_per_s'] for r in results]):,.0f} | "
        f"{np.mean([r['ratio_to_ceiling'] for r in results]):.2f} | "
        f"{np.mean([r['eval_greedy_mean'] for r in results]):.1f} | "
        f"{np.mean([r['eval_sampled_mean'] for r in results]):.1f} |")
    return "\n".join(lines)


def vine_table(results, eval_episodes, target):
    lines = [
        f"| seed | iterations to {target:g} | trunk steps to {target:g} | simulated steps to {target:g} | "
        f"seconds to {target:g} | "
        f"utilisation | raw ceiling steps/s | fork restore + branch | greedy eval ({eval_episodes} ep) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['seed']} | {fmt(r['iterations_to_target'], 'd', 'never in ' + str(r['iterations']))} | "
            f"{fmt(r['steps_to_target'], ',d')} | {fmt(r['simulated_steps_to_target'], ',d')} | "
            f"{fmt(r['seconds_to_target'], '.0f')} | {r['utilisation']:.2f} | {r['ceiling_steps_per_s']:,.0f} | "
            f"{r['restore_branch_ms']:.1f} ms for {r['restore_branch_steps']:.0f} steps "
            f"(= {r['restore_branch_in_plain_steps']:.0f} plain steps) | "
            f"{r['eval_greedy_mean']:.1f} ± {r['eval_greedy_std']:.1f} |")
    solved = sum(r["iterations_to_target"] is not None for r in results)
    lines.append(
        f"| **median** | {fmt(median_of([r['iterations_to_target'] for r in results]), '.0f')} "
        f"({solved}/{len(results)} reached {target:g}) | {fmt(median_of([r['steps_to_target'] for r in results]), ',.0f')} | "
        f"{fmt(median_of([r['simulated_steps_to_target'] for r in results]), ',.0f')} | "
        f"{fmt(median_of([r['seconds_to_target'] for r in results]), '.0f')} | "
        f"{np.median([r['utilisation'] for r in results]):.2f} | "
        f"{np.median([r['ceiling_steps_per_s'] for r in results]):,.0f} | | "
        f"{np.mean([r['eval_greedy_mean'] for r in results]):.1f} (mean) |")
    return "\n".join(lines)


def write_text(path, text):
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"cannot write '{path}': {e.strerror or e}.") from None


def plot_curves(results, scheme, env_id, target, paths):
    """Every seed's learning curve in one figure, written to each of paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        steps, returns = zip(*r["curve"])
        ax.plot(steps, returns, label=f"seed {r['seed']}")
    ax.axhline(target, color="gray", linestyle="--", label=f"solved ({target:g})")
    ax.set(ylabel="mean return of last 100 episodes",
           title=f"TRPO ({cli.SCHEME_NAMES[scheme]}) on {env_id}, default settings")
    run_files.steps_axis(ax)
    if scheme == "vine":
        ax.set_xlabel("environment steps (trunk)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    run_files.save_figure(fig, paths)


TRUST_REGION_DEMO = dict(max_kl=1.0, total_steps=300_000)  # delta = 1: far too large a step without the line search
TRUST_REGION_RUNS = ((True, "TRPO (line search: KL <= delta)"), (False, "--no-trust-region"))


def trust_region_config(seed, trust_region, total_steps=None, out=""):
    settings = dict(TRUST_REGION_DEMO, **({} if total_steps is None else {"total_steps": total_steps}))
    return T.Config(seed=seed, trust_region=trust_region, out=out, **settings)


def trust_region_demo(seed, total_steps, folder, paths):
    """Train twice on one seed with a large delta: TRPO, then the same natural-gradient steps without
    the line search (--no-trust-region), each in a new folder under folder/runs. Plots both learning
    curves and the KL each step reached, to each of paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    max_kl = TRUST_REGION_DEMO["max_kl"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        for trust_region, label in TRUST_REGION_RUNS:
            out = run_files.new_numbered_folder(os.path.join(folder, "runs", f"trust-region-{trust_region}"))
            history = cli.train(trust_region_config(seed, trust_region, total_steps, out), verbose=False)[2]
            steps = [row["env_steps"] for row in history]
            left.plot(steps, [row["rolling_return"] for row in history], label=label)
            right.semilogy(steps, [row["kl"] for row in history], ".", label=label)
            print(f"{label}: final rolling return {history[-1]['rolling_return']:.1f}, "
                  f"KL above delta in {sum(row['kl'] > max_kl for row in history)} of {len(history)} steps")
    except BaseException:
        plt.close(fig)
        raise
    right.axhline(max_kl, color="red", linestyle="--", label="delta")
    left.set(ylabel="mean return of last 100 episodes", title=f"seed {seed}, delta = {max_kl}")
    right.set(ylabel="mean KL(pi_old || pi_new) of the step taken")
    for ax in (left, right):
        run_files.steps_axis(ax)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    run_files.save_figure(fig, paths)


def build_parser():
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0],  # bad input: one sentence, exit code 2
                                formatter_class=cli.HelpFormatter)
    parser.add_argument("--scheme", default="single", choices=["single", "vine"], help="sampling scheme")
    parser.add_argument("--env", default=DEFAULT_ENV,
                        help="Gymnasium environment id; files are named <env>-<scheme> for any other than the default")
    parser.add_argument("--target", type=cli.number(float), default=None,
                        help="the rolling return that counts as solved; by default the environment's reward "
                             "threshold (LunarLander: 200). The vine stops where its defaults stop it (LunarLander: "
                             "240), or at the target if that is higher or there is no default")
    parser.add_argument("--seeds", type=cli.number(int), nargs="+", default=list(range(10)),
                        help="training seeds, one run each")
    parser.add_argument("--total-steps", type=cli.number(int), default=None,
                        help=f"env steps of each run, when given: for either scheme (the vine counts its trunk's, "
                             f"and still stops where it would without) and for --trust-region-demo; "
                             f"by default {T.Config.total_steps:,} for the single path, at most "
                             f"{T.VINE_ITERATIONS} iterations for the vine, "
                             f"{TRUST_REGION_DEMO['total_steps']:,} for the demo")
    parser.add_argument("--eval-episodes", type=cli.number(int), default=100,
                        help="evaluation episodes of each final policy")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="the benchmark writes into a new folder <out>/<name> (<out>/<name>-2, -3, ... "
                             "if that exists; <out>/trust-region with --trust-region-demo): its table, JSON, "
                             "learning curves, and each seed's run; nothing already there is ever written over")
    parser.add_argument("--publish", action="store_true",
                        help="also replace the results README.md shows, once every seed has finished: "
                             "bench_results/<name>.md and .json and plots/<name>_learning_curves.png (<name>: the scheme, or <env>-<scheme>) "
                             "(plots/trust_region.png with --trust-region-demo)")
    parser.add_argument("--trust-region-demo", action="store_true",
                        help="instead: train the first seed with delta = 1 twice, with and without the line "
                             "search, and plot both to trust_region.png")
    return parser


def check_arguments(args):
    """Every seed's config checked (cli.validate), before any folder is made or training starts."""
    negative = [seed for seed in args.seeds if seed < 0]
    if negative:
        raise UserError(f"--seeds must be zero or positive, got {negative[0]}.")
    repeated = [seed for seed in args.seeds if args.seeds.count(seed) > 1]
    if repeated:
        raise UserError(f"--seeds lists seed {repeated[0]} more than once; each seed is one run, counted once.")
    if args.trust_region_demo and args.scheme != "single":
        raise UserError("--trust-region-demo trains the single path only; leave out --scheme.")
    if args.eval_episodes < 1:
        raise UserError(f"--eval-episodes must be positive, got {args.eval_episodes}.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out '{args.out}' is a file, not a folder.")
    if args.trust_region_demo and args.env != DEFAULT_ENV:
        raise UserError(f"--trust-region-demo runs on {DEFAULT_ENV} only; leave out --env.")
    cli.make_env(args.env).close()  # an unknown or unusable environment says so first, in one sentence
    if args.target is None:
        args.target = cli.reward_threshold(args.env)
        if args.target is None:
            raise UserError(f"{args.env} has no reward threshold; give the return that counts as solved with --target.")
    elif not np.isfinite(args.target):
        raise UserError(f"--target must be a finite number, got {args.target}.")
    if args.trust_region_demo:
        configs = [trust_region_config(args.seeds[0], trust_region, args.total_steps)
                   for trust_region, _ in TRUST_REGION_RUNS]
    else:
        configs = [seed_config(args.scheme, seed, args.total_steps, "", args.env, args.target) for seed in args.seeds]
    for cfg in configs:
        cli.validate(cfg)
        if args.total_steps is not None and args.total_steps < cfg.batch_size:
            raise UserError(f"--total-steps {args.total_steps:,} is less than one iteration, whose batch is "
                            f"{cfg.batch_size:,} steps; give at least that many.")
    if args.total_steps is not None and args.total_steps % configs[0].batch_size:
        iterations = -(-args.total_steps // configs[0].batch_size)
        print(f"note: training runs whole iterations of {configs[0].batch_size:,} steps: "
              f"{iterations * configs[0].batch_size:,} steps for --total-steps {args.total_steps:,}.", file=sys.stderr)


class Benchmark:
    """What a benchmark has done so far: its folder, the seeds finished, the run under way."""

    def __init__(self, args, command):
        self.args, self.command = args, command
        self.folder, self.results, self.seed, self.run_dir, self.published = None, [], None, None, False
        # the name of its files and folder: the scheme, and the environment unless it is the default one
        self.name = args.scheme if args.env == DEFAULT_ENV else f"{args.env}-{args.scheme}"

    def run(self):
        args = self.args
        if args.trust_region_demo:
            self.folder = run_files.new_numbered_folder(os.path.join(args.out, "trust-region"))
            paths = [os.path.join(self.folder, "trust_region.png")]
            if args.publish:
                paths.append(os.path.join(published_folder(PUBLISHED_PLOTS), "trust_region.png"))
            self.seed = args.seeds[0]
            trust_region_demo(args.seeds[0], args.total_steps, self.folder, paths)
            print("written: " + " and ".join(paths), file=sys.stderr)
            return
        self.folder = run_files.new_numbered_folder(os.path.join(args.out, self.name))
        print(f"benchmark of seeds {' '.join(map(str, args.seeds))}: results in {self.folder}", file=sys.stderr)
        for seed in args.seeds:
            self.seed = seed
            self.run_dir = run_files.new_numbered_folder(os.path.join(self.folder, "runs", f"{args.scheme}-seed{seed}"))
            print(f"seed {seed}: training ...", file=sys.stderr, flush=True)
            result = bench_seed(seed_config(args.scheme, seed, args.total_steps, self.run_dir, args.env, args.target),
                                args.eval_episodes, args.target)
            with parallel.signals_held():  # a Ctrl-C now waits until the table and JSON are whole
                self.results.append(result)
                self.seed = self.run_dir = None
                # after every seed, so that a benchmark stopped early keeps the seeds it finished
                table = self.write(self.folder)
            print(seed_line(result), file=sys.stderr, flush=True)
        if args.publish:
            with parallel.signals_held():
                self.write(published_folder(PUBLISHED_RESULTS), published_folder(PUBLISHED_PLOTS))
                self.published = True
            print(f"published: {os.path.join(PUBLISHED_RESULTS, self.name)}.md and .json, "
                  f"{os.path.join(PUBLISHED_PLOTS, self.name)}_learning_curves.png", file=sys.stderr)
        print(table)

    def write(self, folder, plots=None):
        """The table (returned; written with the JSON to folder) and the learning curves (to plots, else folder)."""
        args, results = self.args, self.results
        make_table = single_table if args.scheme == "single" else vine_table
        table = make_table(results, args.eval_episodes, args.target)
        done = [r["seed"] for r in results]
        write_text(os.path.join(folder, f"{self.name}.md"),
                   f"Produced by `{self.command}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores"
                   f"{'' if done == list(args.seeds) else f' (seeds finished so far: {done})'}.\n\n{table}\n")
        config = seed_config(args.scheme, 0, args.total_steps, "", args.env, args.target)  # but for seed and out
        write_text(os.path.join(folder, f"{self.name}.json"),
                   json.dumps({"command": self.command, "config": dataclasses.asdict(config),
                               "results": results}, indent=1))
        plot_curves(results, args.scheme, args.env, args.target,
                    [os.path.join(plots or folder, f"{self.name}_learning_curves.png")])
        return table

    def kept(self):
        """What a benchmark that stopped early keeps, and where: for the one line saying it stopped."""
        args = self.args
        if args.trust_region_demo:
            return (f"the trust-region demo did not finish; its runs so far are in {self.folder}" if self.folder
                    else "the trust-region demo had not started")
        if self.results:
            seeds = ", ".join(str(r["seed"]) for r in self.results)
            line = (f"seed{'s' if len(self.results) > 1 else ''} {seeds} finished, "
                    f"{'their' if len(self.results) > 1 else 'its'} results are in "
                    f"{self.folder} ({self.name}.md, {self.name}.json, {self.name}_learning_curves.png)")
        else:
            line = "no seed finished" + (f"; the benchmark's folder is {self.folder}" if self.folder else "")
        if self.run_dir and run_files.holds_a_run(self.run_dir):
            line += f"; seed {self.seed}'s unfinished run is in {self.run_dir}"
        if args.publish:
            line += f"; the published results were {'replaced' if self.published else 'not changed'}"
        return line


def published_folder(path):
    """path (bench_results/ or plots/, for --publish), made if missing."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the folder '{path}': {e.strerror or e}.") from None
    return path


def seed_line(r):
    """One line on stderr when a seed has finished: when it reached the target, or that it did not."""
    if r["steps_to_target"] is not None:
        return (f"seed {r['seed']}: reached {r['target']:g} at {r['steps_to_target']:,} steps, iteration {r['iterations_to_target']}, "
                f"{r['seconds_to_target']:.0f} s; run in {r['run_dir']}")
    final = r["final_rolling_return"]
    return (f"seed {r['seed']}: did not reach {r['target']:g} in {r['total_env_steps']:,} steps ({r['iterations']} iteration{'s' if r['iterations'] != 1 else ''}, "
            f"{r['total_wall_s']:.0f} s; " + ("no episode finished" if np.isnan(final) else
                                              f"rolling mean {final:.1f} at the end") + f"); run in {r['run_dir']}")


def main(argv=None):
    """The command line; returns the exit code (0 done, 1 a worker died, 2 bad input, 130 or 143 stopped)."""
    args = build_parser().parse_args(argv)
    command = "python bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    bench = Benchmark(args, command)
    parallel.stop_on_signals()  # from here on Ctrl-C and SIGTERM stop the benchmark, keeping the seeds finished
    try:
        parallel.raise_if_stop_requested()  # a Ctrl-C that came while Python was importing
        check_arguments(args)
        bench.run()
    except UserError as e:  # bad input (before anything is made), or a file that cannot be written
        print(f"error: {e}" + (f" The benchmark stopped: {bench.kept()}." if bench.folder else ""),
              file=sys.stderr)
        return 2
    except parallel.ProcessFailed as e:
        parallel.ignore_stop_signals()
        print(f"error: {e}; the benchmark stopped: {bench.kept()}.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        parallel.ignore_stop_signals()  # stopping has begun: more Ctrl-C would only cut the message short
        print(f"stopped: {bench.kept()}.", file=sys.stderr)
        return parallel.exit_code_of_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
