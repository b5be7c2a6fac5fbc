"""bench.py: how fast TRPO learns LunarLander-v3 here, and how close to the simulator's speed it runs.

Each seed trains with the scheme's default settings (trpo_numpy.Config and
SCHEME_DEFAULTS). Measured in the same process, just before that seed's run and
again just after it: the raw stepping rate of the bare simulator (one environment,
random actions); the mean of the two is the ceiling that training is compared with.

Single path (--scheme single), per seed: the end-to-end env steps per second
(sampling AND updates) as a ratio to the ceiling; the env steps and wall seconds
at which the rolling 100-episode training mean first reached 200; the final
policy's mean return over evaluation episodes on seeds training never used,
greedy (most likely action) and sampled.

Vine (--scheme vine), per seed, with the vine's defaults (it stops once the rolling
100-episode trunk mean reaches 200, or after 150 iterations): iterations, trunk env
steps, all simulated steps (trunk and branches) and wall seconds to 200; the
simulator's utilisation, i.e. trunk and branch steps per second as a ratio of the
ceiling times the cores; the cost of one fork restore plus a branch, against plain
env steps; and the final policy's greedy evaluation.

It prints a Markdown table, writes it and a JSON file to bench_results/, and
plots every seed's learning curve to plots/<scheme>_learning_curves.png (under --out
instead, when --out is given).

Usage:
  python bench.py --scheme single --seeds 0 1 2 3 4
  python bench.py --scheme vine --seeds 0 1 2 3 4
"""

import argparse
import json
import os
import shutil
import sys
import time

import trpo_numpy as T  # first: it sets up the process (BLAS threads) before NumPy loads
import cli
import parallel
import run_files
import numpy as np
from network import MLP

SOLVED = 200.0
DEFAULT_OUT = "bench_results"


def raw_ceiling(env_id, steps=20_000, seed=0):
    """Env steps per second of the bare simulator: one environment, random actions, this process."""
    env = T.make_env(env_id)
    actions = np.random.default_rng(seed).integers(env.action_space.n, size=steps)
    env.reset(seed=seed)
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(int(action))
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def restore_cost(cfg, branches=100):
    """Wall seconds of one fork-restore + a branch of cfg.vine_horizon steps + collecting its Q,
    one at a time, with an untrained policy from states 50 steps into an episode."""
    rng = np.random.default_rng(0)
    env = T.make_env(cfg.env)
    obs_dim, num_actions = T.env_dims(cfg.env)
    net = MLP([obs_dim, *cfg.hidden, num_actions])
    theta = net.init(rng, output_gain=0.01)
    pool = parallel.ForkPool(max_children=1)
    seconds, steps = 0.0, 0
    for k in range(branches):
        env.reset(seed=k)
        for _ in range(50):
            env.step(0)  # engines off: the lander falls, not yet landed
        uniforms = rng.random(cfg.vine_horizon)
        start = time.perf_counter()
        pool.submit(k, lambda: T.branch_rollout(env, 0, net, theta, uniforms, cfg.gamma))
        steps += pool.gather()[k][1]
        seconds += time.perf_counter() - start
    env.close()
    return seconds / branches, steps / branches


def first_crossing(history, threshold=SOLVED):
    """The first iteration's row whose rolling return reached threshold, else None."""
    return next((row for row in history if row["rolling_return"] >= threshold), None)


def bench_seed(scheme, seed, total_steps, eval_episodes, out_root):
    ceiling_before = raw_ceiling(T.Config.env, seed=seed)
    out = os.path.join(out_root, f"{scheme}-seed{seed}")
    if os.path.isdir(out):  # the previous benchmark's run of this seed: the benchmark's own scratch space
        shutil.rmtree(out)
    if scheme == "vine":  # its defaults: at most T.VINE_ITERATIONS iterations, stopping once solved (200)
        cfg = T.scheme_config(scheme, seed=seed, out=out)
    else:
        cfg = T.scheme_config(scheme, seed=seed, out=out, total_steps=total_steps)
    net, theta, history = T.train(cfg, verbose=False)
    # The machine's speed drifts (a shared virtual machine's by 30% within minutes): the ceiling
    # the run is compared with is the mean of one measure just before it and one just after.
    ceiling_after = raw_ceiling(T.Config.env, seed=seed)
    ceiling = (ceiling_before + ceiling_after) / 2
    solved = first_crossing(history)
    last = history[-1]
    result = {
        "seed": seed,
        "ceiling_steps_per_s": ceiling,
        "ceiling_before_and_after": [ceiling_before, ceiling_after],
        "iterations": last["iteration"],
        "total_env_steps": last["env_steps"],
        "total_wall_s": last["wall_s"],
        "final_rolling_return": last["rolling_return"],
        "steps_to_200": solved["env_steps"] if solved else None,
        "seconds_to_200": solved["wall_s"] if solved else None,
        "iterations_to_200": solved["iteration"] if solved else None,
        "curve": [(row["env_steps"], row["rolling_return"]) for row in history],
    }
    greedy = cli.evaluate_policy(T, net, theta, cfg.env, eval_episodes, greedy=True)
    sampled = cli.evaluate_policy(T, net, theta, cfg.env, eval_episodes, greedy=False,
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
                      simulated_steps_to_200=sum(r["trunk_steps"] + r["branch_steps"] for r in upto) if solved else None,
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


def single_table(results, eval_episodes):
    lines = [
        "| seed | steps to 200 | seconds to 200 | env steps/s | raw ceiling steps/s | ratio | "
        f"greedy eval ({eval_episodes} ep) | sampled eval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['seed']} | {fmt(r['steps_to_200'], ',d')} | {fmt(r['seconds_to_200'], '.0f')} | "
            f"{r['train_steps_per_s']:,.0f} | {r['ceiling_steps_per_s']:,.0f} | {r['ratio_to_ceiling']:.2f} | "
            f"{r['eval_greedy_mean']:.1f} ± {r['eval_greedy_std']:.1f} | "
            f"{r['eval_sampled_mean']:.1f} ± {r['eval_sampled_std']:.1f} |")
    solved = sum(r["steps_to_200"] is not None for r in results)
    lines.append(
        f"| **median / mean** | {fmt(median_of([r['steps_to_200'] for r in results]), ',.0f')} "
        f"({solved}/{len(results)} reached 200) | {fmt(median_of([r['seconds_to_200'] for r in results]), '.0f')} | "
        f"{np.mean([r['train_steps_per_s'] for r in results]):,.0f} | "
        f"{np.mean([r['ceiling_steps_per_s'] for r in results]):,.0f} | "
        f"{np.mean([r['ratio_to_ceiling'] for r in results]):.2f} | "
        f"{np.mean([r['eval_greedy_mean'] for r in results]):.1f} | "
        f"{np.mean([r['eval_sampled_mean'] for r in results]):.1f} |")
    return "\n".join(lines)


def vine_table(results):
    lines = [
        "| seed | iterations to 200 | trunk steps to 200 | simulated steps to 200 | seconds to 200 | "
        "utilisation | raw ceiling steps/s | fork restore + branch | greedy eval (100 ep) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['seed']} | {fmt(r['iterations_to_200'], 'd', 'never in ' + str(r['iterations']))} | "
            f"{fmt(r['steps_to_200'], ',d')} | {fmt(r['simulated_steps_to_200'], ',d')} | "
            f"{fmt(r['seconds_to_200'], '.0f')} | {r['utilisation']:.2f} | {r['ceiling_steps_per_s']:,.0f} | "
            f"{r['restore_branch_ms']:.1f} ms for {r['restore_branch_steps']:.0f} steps "
            f"(= {r['restore_branch_in_plain_steps']:.0f} plain steps) | "
            f"{r['eval_greedy_mean']:.1f} ± {r['eval_greedy_std']:.1f} |")
    solved = sum(r["iterations_to_200"] is not None for r in results)
    lines.append(
        f"| **median** | {fmt(median_of([r['iterations_to_200'] for r in results]), '.0f')} "
        f"({solved}/{len(results)} reached 200) | {fmt(median_of([r['steps_to_200'] for r in results]), ',.0f')} | "
        f"{fmt(median_of([r['simulated_steps_to_200'] for r in results]), ',.0f')} | "
        f"{fmt(median_of([r['seconds_to_200'] for r in results]), '.0f')} | "
        f"{np.median([r['utilisation'] for r in results]):.2f} | "
        f"{np.median([r['ceiling_steps_per_s'] for r in results]):,.0f} | | "
        f"{np.mean([r['eval_greedy_mean'] for r in results]):.1f} (mean) |")
    return "\n".join(lines)


def plot_curves(results, scheme, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        steps, returns = zip(*r["curve"])
        ax.plot(steps, returns, label=f"seed {r['seed']}")
    ax.axhline(SOLVED, color="gray", linestyle="--", label="solved (200)")
    ax.set(ylabel="mean return of last 100 episodes",
           title=f"TRPO ({T.SCHEME_NAMES[scheme]}) on LunarLander-v3, default settings")
    run_files.steps_axis(ax)
    if scheme == "vine":
        ax.set_xlabel("environment steps (trunk)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def trust_region_demo(seed, max_kl, total_steps, out_root, path):
    """Train twice on one seed with a large delta: TRPO, then the same natural-gradient steps without
    the line search (--no-trust-region). Plots both learning curves and the KL each step reached."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for trust_region, label in ((True, "TRPO (line search: KL <= delta)"), (False, "--no-trust-region")):
        cfg = T.Config(seed=seed, max_kl=max_kl, total_steps=total_steps, trust_region=trust_region,
                       out=os.path.join(out_root, f"trust-region-{trust_region}"))
        history = T.train(cfg, verbose=False)[2]
        steps = [row["env_steps"] for row in history]
        left.plot(steps, [row["rolling_return"] for row in history], label=label)
        right.semilogy(steps, [row["kl"] for row in history], ".", label=label)
        print(f"{label}: final rolling return {history[-1]['rolling_return']:.1f}, "
              f"KL above delta in {sum(row['kl'] > max_kl for row in history)} of {len(history)} steps")
    right.axhline(max_kl, color="red", linestyle="--", label="delta")
    left.set(ylabel="mean return of last 100 episodes", title=f"seed {seed}, delta = {max_kl}")
    right.set(ylabel="mean KL(pi_old || pi_new) of the step taken")
    for ax in (left, right):
        run_files.steps_axis(ax)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0],  # bad input: one sentence, exit code 2
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scheme", default="single", choices=["single", "vine"], help="sampling scheme")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument("--total-steps", type=int, default=T.Config.total_steps,
                        help=f"env steps per single-path run (the vine runs at most {T.VINE_ITERATIONS} iterations)")
    parser.add_argument("--eval-episodes", type=int, default=100, help="evaluation episodes of each final policy")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the table, JSON and run outputs; with "
                        "the default, the figures go to plots/ (the ones README.md shows), otherwise under --out too")
    parser.add_argument("--trust-region-demo", action="store_true",
                        help="instead: train the first seed with delta = 1 twice, with and without the line "
                             "search, for 300,000 steps each, and plot both to trust_region.png (in plots/ by default)")
    args = parser.parse_args(argv)
    if args.total_steps < 1 or args.eval_episodes < 1:
        parser.error("--total-steps and --eval-episodes must be positive")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out '{args.out}' is a file, not a folder")

    os.makedirs(args.out, exist_ok=True)
    plots = "plots" if args.out == DEFAULT_OUT else args.out
    os.makedirs(plots, exist_ok=True)
    if args.trust_region_demo:
        trust_region_demo(args.seeds[0], 1.0, 300_000, os.path.join(args.out, "runs"),
                          os.path.join(plots, "trust_region.png"))
        return
    results = []
    command = "python bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for seed in args.seeds:
        print(f"seed {seed}: training ...", file=sys.stderr, flush=True)
        results.append(bench_seed(args.scheme, seed, args.total_steps, args.eval_episodes,
                                  os.path.join(args.out, "runs")))
        r = results[-1]
        print(f"seed {seed}: 200 at {fmt(r['steps_to_200'], ',d')} steps, iteration "
              f"{fmt(r['iterations_to_200'], 'd')}, {fmt(r['seconds_to_200'], '.0f')} s", file=sys.stderr, flush=True)
        # after every seed, so that a benchmark stopped early keeps the seeds it finished
        write_results(results, args, command, plots)
    print(write_results(results, args, command, plots))


def write_results(results, args, command, plots):
    """The table (returned, and written with the JSON to args.out) and the learning-curve figure."""
    table = single_table(results, args.eval_episodes) if args.scheme == "single" else vine_table(results)
    done = [r["seed"] for r in results]
    with open(os.path.join(args.out, f"{args.scheme}.md"), "w") as f:
        f.write(f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores"
                f"{'' if done == list(args.seeds) else f' (seeds finished so far: {done})'}.\n\n{table}\n")
    with open(os.path.join(args.out, f"{args.scheme}.json"), "w") as f:
        config = T.scheme_config(args.scheme)
        json.dump({"command": command, "config": T.dataclasses.asdict(config), "results": results}, f, indent=1)
    plot_curves(results, args.scheme, os.path.join(plots, f"{args.scheme}_learning_curves.png"))
    return table


if __name__ == "__main__":
    main()
