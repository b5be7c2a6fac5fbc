"""bench.py: how fast TRPO learns LunarLander-v3 here, and how close to the simulator's speed it runs.

For each seed it trains with the default hyperparameters (trpo_numpy.Config) and
reports, in one table:
  * the raw stepping rate of the bare simulator (one process, random actions),
    measured just before that seed's run: the ceiling sampling is compared with;
  * the run's end-to-end env steps per second (sampling AND updates), as a ratio
    to that ceiling;
  * the env steps and wall seconds at which the rolling 100-episode training mean
    first reached 200;
  * the final policy's mean return over evaluation episodes on seeds training never
    used, greedy (most likely action) and sampled.
It prints the table, writes it as Markdown and JSON under bench_results/, and plots
every seed's learning curve to plots/<scheme>_learning_curves.png.

Usage:
  python bench.py --scheme single --seeds 0 1 2 3 4
  python bench.py --scheme single --seeds 0 --total-steps 300000 --eval-episodes 20   # a quick look
"""

import argparse
import json
import os
import sys
import time

import trpo_numpy as T  # pins BLAS to one thread before NumPy loads
import numpy as np

SOLVED = 200.0


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


def first_crossing(history, threshold=SOLVED):
    """(env_steps, wall_s) of the first iteration whose rolling return reached threshold, else (None, None)."""
    for row in history:
        if row["rolling_return"] >= threshold:
            return row["env_steps"], row["wall_s"]
    return None, None


def bench_seed(scheme, seed, total_steps, eval_episodes, out_root):
    ceiling = raw_ceiling(T.Config.env, seed=seed)
    cfg = T.Config(scheme=scheme, seed=seed, total_steps=total_steps,
                   out=os.path.join(out_root, f"{scheme}-seed{seed}"))
    net, theta, history = T.train(cfg, verbose=False)
    steps_to_solve, seconds_to_solve = first_crossing(history)
    last = history[-1]
    throughput = last["env_steps"] / last["wall_s"]
    eval_rng = np.random.default_rng(seed)
    greedy = T.evaluate_policy(net, theta, cfg.env, eval_episodes, greedy=True)
    sampled = T.evaluate_policy(net, theta, cfg.env, eval_episodes, greedy=False, rng=eval_rng)
    return {
        "seed": seed,
        "ceiling_steps_per_s": ceiling,
        "train_steps_per_s": throughput,
        "ratio_to_ceiling": throughput / ceiling,
        "steps_to_200": steps_to_solve,
        "seconds_to_200": seconds_to_solve,
        "final_rolling_return": last["rolling_return"],
        "total_env_steps": last["env_steps"],
        "total_wall_s": last["wall_s"],
        "eval_greedy_mean": float(greedy.mean()), "eval_greedy_std": float(greedy.std()),
        "eval_sampled_mean": float(sampled.mean()), "eval_sampled_std": float(sampled.std()),
        "curve": [(row["env_steps"], row["rolling_return"]) for row in history],
    }


def fmt(value, spec, missing="never"):
    return missing if value is None else format(value, spec)


def markdown_table(results, eval_episodes):
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
    solved = [r["steps_to_200"] for r in results if r["steps_to_200"] is not None]
    median = np.median([s if s is not None else np.inf for s in (r["steps_to_200"] for r in results)])
    lines.append(
        f"| **all** | median {fmt(None if np.isinf(median) else int(median), ',d')}, "
        f"{len(solved)}/{len(results)} reached 200 | | "
        f"{np.mean([r['train_steps_per_s'] for r in results]):,.0f} | "
        f"{np.mean([r['ceiling_steps_per_s'] for r in results]):,.0f} | "
        f"{np.mean([r['ratio_to_ceiling'] for r in results]):.2f} | "
        f"{np.mean([r['eval_greedy_mean'] for r in results]):.1f} | "
        f"{np.mean([r['eval_sampled_mean'] for r in results]):.1f} |")
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
    ax.set(xlabel="environment steps", ylabel="mean return of last 100 episodes",
           title=f"TRPO ({scheme} path) on LunarLander-v3, default settings")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scheme", default="single", choices=["single"], help="sampling scheme to benchmark")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument("--total-steps", type=int, default=T.Config.total_steps, help="env steps per run")
    parser.add_argument("--eval-episodes", type=int, default=100, help="evaluation episodes, greedy and sampled")
    parser.add_argument("--out", default="bench_results", help="folder for the table, JSON and run outputs")
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    os.makedirs("plots", exist_ok=True)
    results = []
    for seed in args.seeds:
        print(f"seed {seed}: training {args.total_steps:,} steps ...", file=sys.stderr, flush=True)
        results.append(bench_seed(args.scheme, seed, args.total_steps, args.eval_episodes,
                                  os.path.join(args.out, "runs")))
        r = results[-1]
        print(f"seed {seed}: 200 at {fmt(r['steps_to_200'], ',d')} steps, {r['train_steps_per_s']:,.0f} steps/s "
              f"({r['ratio_to_ceiling']:.2f} of ceiling), greedy eval {r['eval_greedy_mean']:.1f}",
              file=sys.stderr, flush=True)

    table = markdown_table(results, args.eval_episodes)
    command = "python bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(table)
    with open(os.path.join(args.out, f"{args.scheme}.md"), "w") as f:
        f.write(f"Produced by `{command}`\n\n{table}\n")
    with open(os.path.join(args.out, f"{args.scheme}.json"), "w") as f:
        json.dump({"command": command, "config": T.dataclasses.asdict(T.Config(scheme=args.scheme)),
                   "results": results}, f, indent=1)
    plot_curves(results, args.scheme, os.path.join("plots", f"{args.scheme}_learning_curves.png"))


if __name__ == "__main__":
    main()
