"""diagnostics.py: what each TRPO iteration reports, the row of progress.csv and the line printed for it.

Nothing here changes what TRPO learns: these are the figures a student watches to see it work
(README, "What you see"), and Theorem 1 of the TRPO paper (arXiv:1502.05477) made visible
(THEORY.md): the change of the return a step predicts, the penalty the theorem puts on it, and the
largest per-state KL that penalty is about, beside the mean KL the constraint holds.

* `progress_row`: an iteration's row, from what trpo_numpy.train_iteration made (the batch, the
  problem of the step, the step, the value fit);
* `predicted_return_change`: the step's predicted change of the episode return, and Theorem 1's penalty;
* `explained_variance`, `first_crossing`; `PROGRESS_COLUMNS` and `format_log_line`.
"""

import numpy as np

PROGRESS_COLUMNS = ["iteration", "env_steps", "rolling_return", "episodes", "kl", "backtracks", "accepted",
                    "expected_improve", "actual_improve", "entropy", "value_loss", "explained_variance",
                    "steps_per_s", "wall_s", "trunk_steps", "branch_steps", "rollout_states", "restores_per_s",
                    "max_kl_state", "predicted_return_change", "theorem_penalty", "batch_return", "return_change"]
TIMING_COLUMNS = ["steps_per_s", "wall_s", "restores_per_s"]  # the columns that differ from run to run


def progress_row(learner, batch, problem, step, value_fit, seconds):
    """The iteration's row of progress.csv (all of PROGRESS_COLUMNS but wall_s, which the loop adds): what
    the step (trpo_numpy.Step) did, and what Theorem 1 says of it. The learner has counted the iteration
    already; `value_fit` is (value loss, why the fit was skipped or "")."""
    cfg, dist, ended = learner.cfg, learner.policy_net.distribution, batch["episode_return"]
    logits_before, logits_after = step.logits_old, step.logits_new
    kl_largest_state = float(np.max(dist.kl(logits_before, logits_after)))  # D_KL^max of Sec. 3
    surrogate_change = problem.in_return_units(logits_after)[0] - problem.in_return_units(problem.logits_old)[0]
    predicted, penalty = predicted_return_change(surrogate_change, cfg.batch_size, np.sum(~np.isnan(ended)),
                                                 kl_largest_state, problem.largest_advantage, cfg.gamma)
    batch_return = float(np.nanmean(ended)) if np.any(~np.isnan(ended)) else float("nan")
    previous = learner.history[-1]["batch_return"] if learner.history else float("nan")
    recent = learner.episode_returns[-100:]
    value_loss, value_skipped = value_fit
    return {
        "iteration": learner.iteration,
        "env_steps": learner.env_steps,
        "rolling_return": float(np.mean(recent)) if recent else float("nan"),
        "episodes": len(learner.episode_returns),
        "kl": step.kl,
        "backtracks": step.backtracks,
        "accepted": int(step.accepted),
        "expected_improve": step.expected_improve,
        "actual_improve": step.actual_improve,
        "entropy": float(np.mean(dist.entropy(logits_before))),
        "value_loss": value_loss,
        "explained_variance": explained_variance(problem.values, problem.value_targets),
        "steps_per_s": cfg.batch_size / seconds,
        "trunk_steps": cfg.batch_size,
        "branch_steps": batch.get("branch_steps", 0),
        "rollout_states": len(batch["rollout_states"]) if "rollout_states" in batch else 0,
        "restores_per_s": batch.get("restores", 0) / batch.get("branch_seconds", seconds),
        "max_kl_state": kl_largest_state,
        "predicted_return_change": predicted,
        "theorem_penalty": penalty,
        "batch_return": batch_return,
        "return_change": batch_return - previous,
        "skipped": "; ".join(why for why in (step.skipped, value_skipped) if why),
    }


def predicted_return_change(surrogate_change, steps, episodes, kl_largest_state, largest_advantage, gamma):
    """What a step predicts for the episode return, and what TRPO's Theorem 1 says of the prediction.

    The performance-difference identity (Kakade & Langford 2002; TRPO Eq. 1) gives
    eta(pi_new) - eta(pi_old) = E_{tau ~ pi_new}[ sum_t gamma^t A_old(s_t, a_t) ]. The surrogate
    takes the states from pi_old instead, and this estimate also drops gamma^t (0.999^t is 0.4
    to 0.8 over LunarLander's episodes of a few hundred steps: one reason it is rough), so the step
    predicts a change of the episode return of (mean episode length) x (L(theta_new) - L(theta_old))
    in the return's units: an approximation, to compare with what follows. Theorem 1 (stated with
    the total-variation distance, Eq. 8) bounds the cost of swapping the states; its KL form, Eq. (9), is
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


def first_crossing(history, threshold):
    """The first iteration's row whose rolling return reached threshold, else None (also if threshold is None)."""
    if threshold is None:
        return None
    return next((row for row in history if row["rolling_return"] >= threshold), None)


def format_log_line(row):
    """One line per iteration: what a student watches to see TRPO work (README, "What you see")."""
    return (f"it {row['iteration']:4d} | steps {row['env_steps']:9,d} | return {row['rolling_return']:7.1f} "
            f"({row['episodes']} ep) | kl {row['kl']:.4f} | backtracks {row['backtracks']} | "
            f"improve exp {row['expected_improve']:.4f} act {row['actual_improve']:.4f} | "
            f"return change pred {row['predicted_return_change']:+.1f} real "
            f"{'n/a' if np.isnan(row['return_change']) else format(row['return_change'], '+.1f')} | "
            f"largest state kl {row['max_kl_state']:.3f} | "
            f"entropy {row['entropy']:.3f} | vloss {row['value_loss']:.1f} ev {row['explained_variance']:.2f} | "
            f"{row['steps_per_s']:,.0f} steps/s"
            + (f" | vine: {row['rollout_states']} states, {row['branch_steps']:,} branch steps, "
               f"{row['restores_per_s']:,.0f} restores/s" if row["rollout_states"] else "")
            + (f" | step skipped: {row['skipped']}" if row["skipped"] else ""))
