"""run_files.py: what a training run leaves on disk. A reader of the TRPO paper can skip this file.

What is here, none of it about TRPO's mathematics (it imports nothing from trpo_numpy.py; the rows it
writes and their log line are diagnostics.py's):

* `snapshot` and `restore`: everything that changes during a run (a trpo_numpy.Learner: theta, the
  value function and its Adam moments, the generator, the counters, the history), and so what a
  checkpoint holds;
* `RunFolder`: the bookkeeping of one training run, behind one object: the folder checks
  and lock, config.json, progress.csv and the log line, the progress bar, checkpoints every
  few iterations, and the final save (checkpoint, policy, plots);
* the output folder: `prepare_out_dir` (writable before training starts), `new_numbered_folder`,
  `check_folder_is_free` and `check_folder_is_ours` (a run never writes over another run's
  files, nor among anyone's files), `lock_folder` (nor two runs into one folder at once);
* `config.json` and `progress.csv` (one row per iteration, diagnostics.PROGRESS_COLUMNS);
* `policy.npz` (the weights and their architecture, for --eval) and `checkpoint.npz`
  (everything a run needs to continue), both written atomically;
* the plots `learning_curve.png`, `diagnostics.png`, `theory.png`, and the GIF of an episode;
* `UserError`: a mistake the user can fix (a bad option, an unreadable file), which the
  command line reports in one sentence with exit code 2; `WriteFailed`, a file that cannot be
  written (a full disk), which stops a run with its last good checkpoint kept.

What is not here: the algorithm (trpo_numpy.py), other processes (parallel.py), the
command line (cli.py).
"""

import csv
import json
import os
import sys
import time

import numpy as np

from diagnostics import PROGRESS_COLUMNS, format_log_line


class UserError(Exception):
    """Something the user can fix (a bad option, an unknown env): reported in one sentence, exit code 2."""


class WriteFailed(UserError):
    """A file could not be written (a full disk, say). A training run stops, keeping its last good
    checkpoint, and the command line says which in one sentence (exit code 1)."""


def cannot_write(path, error):
    """The WriteFailed of an OSError met writing path."""
    return WriteFailed(f"cannot write '{path}': {error.strerror or error}")


CHECKPOINT_FORMAT = "trpo-numpy checkpoint v1"
POLICY_FORMAT = "trpo-numpy policy v1"


# ----------------------------------------------------------------------------
# One training run's folder
# ----------------------------------------------------------------------------

def checkpoint_path(out_dir):
    return os.path.join(out_dir, "checkpoint.npz")


class RunFolder:
    """What a training run writes, and when. Opening one checks and locks the folder (a new run
    never writes over another run's files, nor two runs into one folder at once), writes
    config.json, starts progress.csv (with a resumed run's earlier rows) and the progress bar.

    `settings` is the run's configuration as a dict (it must hold env, seed, max_kl,
    total_steps and save_every); `history` the rows of the iterations so far; `sizes` the
    layer sizes of the policy and value networks; `plot_labels` what save_plots needs besides.
    """

    PLOT_EVERY_S = 60  # plots with a checkpoint at most this often: drawing them takes about a second

    def __init__(self, out_dir, numbered, settings, run_id, history, resuming, sizes, verbose, progress_bar,
                 plot_labels):
        from tqdm import tqdm
        tqdm.monitor_interval = 0  # no monitor thread: the vine forks this process, and fork copies one thread
        if numbered:  # the default folder: a new one, numbered, so that running again keeps the last run
            out_dir = new_numbered_folder(out_dir)
        settings = {**settings, "out": out_dir}
        self.out_dir, self.settings, self.sizes, self.plot_labels = out_dir, settings, sizes, plot_labels
        self.verbose, self.write_line = verbose, tqdm.write
        prepare_out_dir(out_dir)
        self.lock = lock_folder(out_dir)
        try:
            if resuming:
                check_folder_is_ours(out_dir, run_id, len(history))
            else:
                check_folder_is_free(out_dir)
            write_config(out_dir, {**settings, "run_id": run_id})
            self.progress = ProgressCsv(out_dir, history)
        except BaseException:
            self.lock.close()
            raise
        self.history = history
        self.last_plots = time.monotonic()
        # disable=None: tqdm draws no bar into a file or a pipe, where redraws would fill a log
        self.bar = tqdm(total=settings["total_steps"], initial=history[-1]["env_steps"] if history else 0,
                        unit="step", unit_scale=True, disable=None if progress_bar else True, file=sys.stderr)

    def record(self, row, snapshot):
        """One finished iteration: its row in progress.csv, the log line, the bar; and every
        save_every iterations, the snapshot in checkpoint.npz, its policy in policy.npz, and the plots
        if the last were drawn PLOT_EVERY_S seconds ago or more."""
        self.progress.write(row)
        if row["iteration"] % self.settings["save_every"] == 0:
            self.save_checkpoint(snapshot)
            if time.monotonic() - self.last_plots >= self.PLOT_EVERY_S:
                self.save_plots()
        self.bar.update(row["trunk_steps"])
        self.bar.set_postfix(ret=f"{row['rolling_return']:.1f}")
        if self.verbose:
            self.write_line(format_log_line(row))

    def save_checkpoint(self, snapshot):
        """checkpoint.npz, and policy.npz with the same weights."""
        write_checkpoint(checkpoint_path(self.out_dir), snapshot, self.settings, *self.sizes, self.settings["env"])
        save_policy(os.path.join(self.out_dir, "policy.npz"), self.sizes[0], snapshot["theta"], self.settings["env"])

    def save_plots(self):
        save_plots(self.history, self.out_dir, self.settings["env"], self.settings["seed"],
                   self.plot_labels["scheme_name"], self.settings["max_kl"], solved_at=self.plot_labels["solved_at"])
        self.last_plots = time.monotonic()

    def finish(self, snapshot):
        """The end of the run, whatever ended it: the last snapshot in checkpoint.npz, its policy in
        policy.npz, what is left of progress.csv, the plots; then the folder is let go. Each is tried
        even if one before it cannot be written (a full disk), the checkpoint first; the first such
        failure is raised once all were tried. A terminal that is gone (EIO) stops no save."""
        failures = []
        try:
            try:
                self.bar.close()
                if sys.exc_info()[0] is KeyboardInterrupt:
                    print("\nstopping: saving the last finished iteration, one moment ...", file=sys.stderr)
            except OSError:
                pass  # the terminal is closed: nothing can be shown, everything can still be saved
            for save in (lambda: self.save_checkpoint(snapshot), self.progress.close,
                         self.save_plots if self.history else lambda: None):
                try:
                    save()
                except WriteFailed as e:
                    failures.append(e)
        finally:
            self.lock.close()
        if failures:
            raise failures[0]


def snapshot(learner, run_id):
    """A copy of everything that changes during a run (a trpo_numpy.Learner), cheap enough to take every
    iteration: a clean point to stop at, and what a checkpoint holds."""
    vf = learner.value_fn
    return dict(theta=learner.theta.copy(), phi=vf.phi.copy(), adam_m=vf.adam.m.copy(), adam_v=vf.adam.v.copy(),
                adam_t=vf.adam.t, value_mean=vf.mean, value_std=vf.std, rng_state=learner.rng.bit_generator.state,
                iteration=learner.iteration, env_steps=learner.env_steps, wall_s=learner.wall_s, run_id=run_id,
                history=learner.history[:], episode_returns=learner.episode_returns[:])


def restore(learner, saved):
    """Continue a new learner from a snapshot read back from a checkpoint (read_checkpoint); returns its run id."""
    if saved["theta"].shape != learner.theta.shape or saved["phi"].shape != learner.value_fn.phi.shape:
        raise UserError("the checkpoint's networks do not match its own configuration; it is damaged.")
    vf = learner.value_fn
    learner.theta, vf.phi, vf.adam.m, vf.adam.v = saved["theta"], saved["phi"], saved["adam_m"], saved["adam_v"]
    vf.adam.t, vf.mean, vf.std = saved["adam_t"], saved["value_mean"], saved["value_std"]
    learner.rng.bit_generator.state = saved["rng_state"]
    learner.iteration, learner.env_steps, learner.wall_s = saved["iteration"], saved["env_steps"], saved["wall_s"]
    learner.history, learner.episode_returns = saved["history"], saved["episode_returns"]
    return saved["run_id"]


# ----------------------------------------------------------------------------
# The output folder, config.json and progress.csv
# ----------------------------------------------------------------------------

def prepare_out_dir(path):
    """Create the output folder and prove it is writable now, before any training time is spent."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder '{path}': {e.strerror or e}.") from None


def holds_a_run(path):
    """Whether the folder holds a run's files (its config.json or checkpoint.npz)."""
    return any(os.path.exists(os.path.join(path, name)) for name in ("config.json", "checkpoint.npz"))


def holds_other_files(path):
    """Whether the folder exists and holds anything but a run's lock file."""
    return os.path.isdir(path) and any(name != ".lock" for name in os.listdir(path))


def new_numbered_folder(path):
    """Create and return the first of path, path-2, path-3, ... that does not exist yet (as
    Stable-Baselines3 numbers PPO_1, PPO_2). os.mkdir either creates a folder or finds it there,
    atomically: two runs started at the same moment get two folders, and no one's folder is taken."""
    candidate, number = path, 1
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        while True:
            try:
                os.mkdir(candidate)
                return candidate
            except FileExistsError:
                number += 1
                candidate = f"{path}-{number}"
    except OSError as e:
        raise UserError(f"cannot make the folder '{candidate}': {e.strerror or e}.") from None


def check_folder_is_free(out_dir):
    """A new run writes into a new or empty folder: never over another run's files, nor among files of
    anyone else's (a folder of plots, another tool's progress.csv). Our own lock file does not count."""
    if holds_a_run(out_dir):
        raise UserError(f"'{out_dir}' holds a run already; continue it with --resume "
                        f"{checkpoint_path(out_dir)}, or give another --out.")
    if holds_other_files(out_dir):
        raise UserError(f"'{out_dir}' is not empty; a new run writes into a new or empty folder, never "
                        f"among other files: give another --out.")


def lock_folder(out_dir):
    """Hold the folder for this run until the process ends: a second run into it is refused while
    this one lives (the operating system drops the lock of a process that was killed).
    Returns the open lock file; closing it lets the folder go."""
    import fcntl
    lock = open(os.path.join(out_dir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise UserError(f"'{out_dir}' is in use by a run that is still going; wait for it, or give "
                        f"another --out.") from None
    return lock


def new_run_id(seed):
    """A name for a new run, different from any other run's: start time, seed and process id."""
    return f"{int(time.time())}-{seed}-{os.getpid()}"


def check_folder_is_ours(out_dir, run_id, iteration):
    """A resumed run may continue in its own folder or an empty one, never over another run's files nor
    among anyone else's (a folder of plots, another tool's progress.csv), nor over a later point of
    itself: a checkpoint there past `iteration`, the one resumed from."""
    config_path = os.path.join(out_dir, "config.json")
    if not os.path.exists(config_path):
        if holds_other_files(out_dir):
            raise UserError(f"'{out_dir}' is not empty and holds no run; resume into the run's own folder or an "
                            f"empty one (--out).")
        return
    try:
        with open(config_path) as f:
            other = json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        other = None
    if other != run_id:
        raise UserError(f"'{out_dir}' holds another run; resume into its own folder or an empty one (--out).")
    there = checkpoint_path(out_dir)
    try:
        later = read_checkpoint(there)["iteration"] if os.path.exists(there) else None
    except UserError:
        later = None
    if later is not None and later > iteration:
        raise UserError(f"'{out_dir}' holds this run at iteration {later}, later than the {iteration} resumed from, "
                        f"which would replace it; resume from {there}, or give --out an empty folder.")


def edited_settings(out_dir, settings, may_change):
    """The settings whose value in out_dir's config.json (edited by hand, say) is not the one in `settings`
    (a resumed checkpoint's), but those in may_change: [(name, value in config.json)]."""
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            written = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(written, dict):
        return []
    return [(name, written[name]) for name in settings
            if name not in may_change and name in written and written[name] != settings[name]]


def write_config(out_dir, settings):
    """config.json: the run's settings (a dict), readable by people and by json.load. Written to a
    temporary file renamed over it: a full disk keeps the one there (and is a WriteFailed)."""
    path = os.path.join(out_dir, "config.json")
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(settings, f, indent=2)
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise cannot_write(path, e) from None


class ProgressCsv:
    """progress.csv, one row per iteration, flushed after each so a crash loses no finished row."""

    def __init__(self, out_dir, earlier_rows=()):
        path = os.path.join(out_dir, "progress.csv")
        try:
            self.file = open(path, "w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=PROGRESS_COLUMNS, extrasaction="ignore")
            self.writer.writeheader()
            self.writer.writerows(earlier_rows)  # a resumed run's rows, up to its checkpoint (which holds them)
            self.file.flush()
        except OSError as e:
            raise cannot_write(path, e) from None

    def write(self, row):
        try:
            self.writer.writerow(row)
            self.file.flush()
        except OSError as e:
            raise cannot_write(self.file.name, e) from None

    def close(self):
        try:
            self.file.close()  # the file is closed even when its last flush fails
        except OSError as e:
            raise cannot_write(self.file.name, e) from None


# ----------------------------------------------------------------------------
# policy.npz and checkpoint.npz
# ----------------------------------------------------------------------------

def write_npz_atomically(path, **arrays):
    """np.savez to a temporary file, flushed to disk, then renamed over `path`.

    A rename is atomic: a crash at any moment leaves either the old file or the new
    one, never half of one. A failed write (a full disk) is a WriteFailed, and removes
    the temporary file."""
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:  # a full disk, say: keep the last good file, leave no half-written one
        if os.path.exists(temporary):
            os.remove(temporary)
        raise cannot_write(path, e) from None


def save_policy(path, sizes, theta, env_id):
    """The policy's weights and the layer sizes they belong to (what --eval needs, nothing more)."""
    write_npz_atomically(path, format=POLICY_FORMAT, theta=theta, sizes=np.array(sizes), env=env_id)


def open_npz(path, what):
    """np.load a file this program wrote, or raise UserError saying in one sentence why it cannot be used."""
    if not os.path.isfile(path):
        raise UserError(f"no {what} file at '{path}'.")
    try:
        data = dict(np.load(path, allow_pickle=False))
    except Exception as e:  # zip, pickle and header errors all mean: not a file of ours
        raise UserError(f"'{path}' is not a readable {what} file ({type(e).__name__}).") from None
    if str(data.get("format", "")) not in (CHECKPOINT_FORMAT, POLICY_FORMAT):
        raise UserError(f"'{path}' is not a {what} file written by trpo_numpy.py.")
    return data


def read_policy(path):
    """(layer sizes, theta, env id) from a policy.npz or checkpoint.npz, each of the type it must have;
    or UserError in one sentence."""
    data = open_npz(path, "policy or checkpoint")
    sizes, theta, env = data.get("sizes"), data.get("theta"), data.get("env")
    if not (is_array(sizes, 1, np.integer) and len(sizes) >= 2 and np.all(sizes >= 1)
            and is_array(theta, 1, np.floating) and is_array(env, 0, np.str_)):
        raise UserError(f"'{path}' is damaged: its layer sizes, weights or environment id are missing or of "
                        f"the wrong kind.")
    return [int(n) for n in sizes], theta.astype(np.float64), str(env)


def is_array(value, ndim, kind):
    """Whether value is a NumPy array of ndim dimensions whose dtype is of `kind` (np.integer, ...)."""
    return isinstance(value, np.ndarray) and value.ndim == ndim and np.issubdtype(value.dtype, kind)


def write_checkpoint(path, snapshot, settings, sizes, value_sizes, env_id):
    """checkpoint.npz, atomically: a snapshot of the training state (a dict: arrays for the weights
    and Adam's moments, numbers and lists for the rest, the generator's state as a dict),
    the run's settings and both networks' layer sizes. read_checkpoint gives the snapshot back."""
    meta = {k: snapshot[k] for k in ("adam_t", "value_mean", "value_std", "iteration", "env_steps", "wall_s",
                                     "run_id", "history")}
    meta.update(config=settings)
    write_npz_atomically(
        path, format=CHECKPOINT_FORMAT, meta=json.dumps(meta), rng_state=json.dumps(snapshot["rng_state"]),
        theta=snapshot["theta"], phi=snapshot["phi"], adam_m=snapshot["adam_m"], adam_v=snapshot["adam_v"],
        episode_returns=np.array(snapshot["episode_returns"], dtype=np.float64),
        sizes=np.array(sizes), value_sizes=np.array(value_sizes), env=env_id)


def read_checkpoint(path):
    """The snapshot a checkpoint file holds, with its settings under "config"; or UserError in one sentence."""
    data = open_npz(path, "checkpoint")
    if str(data["format"]) != CHECKPOINT_FORMAT:
        raise UserError(f"'{path}' is a policy file, not a checkpoint: it cannot be resumed, only evaluated.")
    try:
        saved = json.loads(str(data["meta"]))
        saved["config"].items()
        saved["rng_state"] = json.loads(str(data["rng_state"]))
        saved.update({k: data[k] for k in ("theta", "phi", "adam_m", "adam_v")})
        saved["episode_returns"] = list(data["episode_returns"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"'{path}' is a checkpoint of another version of trpo_numpy.py.") from None
    counters = {"adam_t": int, "iteration": int, "env_steps": int, "wall_s": (int, float), "value_mean": (int, float),
                "value_std": (int, float), "run_id": str, "history": list, "rng_state": dict}
    if not (all(isinstance(saved.get(k), kinds) and not isinstance(saved.get(k), bool) for k, kinds in counters.items())
            and all(isinstance(row, dict) for row in saved["history"]) and saved["value_std"] > 0
            and all(is_array(saved[k], 1, np.floating) for k in ("theta", "phi", "adam_m", "adam_v"))
            and saved["adam_m"].shape == saved["adam_v"].shape == saved["phi"].shape
            and is_array(data["episode_returns"], 1, np.floating)):
        raise UserError(f"'{path}' is damaged: a field of its training state is missing or of the wrong kind.")
    return saved


# ----------------------------------------------------------------------------
# Plots and the animation
# ----------------------------------------------------------------------------

def steps_label(x, _position=None):
    """A tick label for an environment-step count, short enough that labels never run together:
    0, 500, 20k, 250k, 1.2M."""
    if abs(x) >= 1e6:
        return f"{x / 1e6:.3g}M"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.3g}k"
    return f"{x:.0f}"


def steps_axis(ax):
    """Label ax's x axis in environment steps with at most 6 ticks, each like 250k or 1.2M."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(steps_label))
    ax.set_xlabel("environment steps")


def plot_figures(history, env_id, seed, scheme_name, max_kl, solved_at=None):
    """The three figures of a run, {file name: matplotlib figure}:

    learning_curve.png: rolling return vs env steps, with the return that counts as solved if
    solved_at is given; diagnostics.png: KL, backtracks, entropy, improvement ratio;
    theory.png: predicted vs realised improvement, mean vs max KL."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = {k: np.array([row[k] for row in history], dtype=np.float64) for k in PROGRESS_COLUMNS}
    steps = col["env_steps"]
    figures = {}

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, col["rolling_return"], label=f"{scheme_name}, seed {seed}")
    if solved_at is not None:
        ax.axhline(solved_at, color="gray", linestyle="--", label=f"solved ({solved_at:g})")
    ax.set(ylabel="mean return of last 100 episodes", title=f"TRPO on {env_id}")
    steps_axis(ax)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    figures["learning_curve.png"] = fig

    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    axes[0, 0].plot(steps, col["kl"], label="KL reached")
    axes[0, 0].axhline(max_kl, color="red", linestyle="--", label="delta")
    axes[0, 0].set(ylabel="mean KL(old || new)")
    axes[0, 0].legend()
    axes[0, 1].plot(steps, col["backtracks"], ".")
    axes[0, 1].set(ylabel="line-search backtracks")
    axes[1, 0].plot(steps, col["entropy"])
    axes[1, 0].set(ylabel="policy entropy (nats)")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = col["actual_improve"] / col["expected_improve"]
    axes[1, 1].plot(steps, ratio, ".")
    axes[1, 1].axhline(1.0, color="gray", linestyle="--")
    axes[1, 1].set(ylabel="actual / expected improvement")
    for ax in axes.ravel():
        steps_axis(ax)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.set_xlabel("")  # the bottom row's label serves both rows
    fig.suptitle(f"TRPO diagnostics, {env_id}, seed {seed}")
    fig.tight_layout()
    figures["diagnostics.png"] = fig

    # theory.png: a step's predicted change of the return against the change that followed (the
    # next batch's), and the mean KL the constraint holds against the max KL Theorem 1 is about.
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    predicted, realised = col["predicted_return_change"][:-1], col["return_change"][1:]
    left.scatter(predicted, realised, s=10, alpha=0.6)
    finite = np.isfinite(predicted) & np.isfinite(realised)
    if finite.any():
        low, high = np.percentile(np.concatenate([predicted[finite], realised[finite]]), [2, 98])
        left.plot([low, high], [low, high], color="gray", linestyle="--", label="realised = predicted")
        left.legend(loc="upper left")
    left.set(xlabel="predicted change of the episode return (surrogate x episode length)",
             ylabel="realised change (next batch's mean return)",
             title=f"prediction vs outcome, corr {np.corrcoef(predicted[finite], realised[finite])[0, 1]:.2f}"
             if finite.sum() > 2 else "prediction vs outcome")
    right.semilogy(steps, col["kl"], label="mean KL over states (constrained)")
    right.semilogy(steps, col["max_kl_state"], label="max KL over states (Theorem 1)")
    right.axhline(max_kl, color="red", linestyle="--", label="delta")
    right.set(ylabel="KL(pi_old || pi_new)",
              title=f"Theorem 1's penalty C max KL: median {np.nanmedian(col['theorem_penalty']):.3g}")
    steps_axis(right)
    # below the axes, where it cannot cover a curve
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    figures["theory.png"] = fig
    return figures


def save_plots(history, out_dir, env_id, seed, scheme_name, max_kl, solved_at=None):
    """Write plot_figures' three PNGs into out_dir. A short or degenerate run (no episode finished yet,
    every step refused) has curves with nothing to draw: they stay empty, without NumPy's and
    matplotlib's warnings about it, which a user could not act on."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figures = plot_figures(history, env_id, seed, scheme_name, max_kl, solved_at)
        for name, fig in figures.items():
            save_figure(fig, [os.path.join(out_dir, name)])


def save_figure(fig, paths):
    """fig as a PNG at each of paths, then closed. Each is drawn into a temporary file renamed over
    the path, so a full disk leaves the last good plot, never half of one (and a WriteFailed)."""
    import matplotlib.pyplot as plt
    try:
        for path in paths:
            temporary = path + ".tmp"
            try:
                fig.savefig(temporary, dpi=100, format="png")
                os.replace(temporary, path)
            except OSError as e:
                if os.path.exists(temporary):
                    os.remove(temporary)
                raise cannot_write(path, e) from None
    finally:
        plt.close(fig)


def write_gif(path, frames, fps, every=2, max_width=300):
    """Write RGB frames as an animated GIF with Pillow (which matplotlib already needs), as a new file.

    Every second frame at half size keeps a 1000-step episode to a few MB. The GIF goes to a temporary
    file beside `path`, which then takes its name only if nothing has it (os.link refuses a name that
    exists): a full disk leaves no partial file, and nothing that is there is replaced."""
    from PIL import Image
    shrink = max(1, int(np.ceil(frames[0].shape[1] / max_width)))
    images = [Image.fromarray(np.ascontiguousarray(frame[::shrink, ::shrink])) for frame in frames[::every]]
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        images[0].save(temporary, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(1000 * every / fps), loop=0)
        os.link(temporary, path)
    except FileExistsError:
        raise UserError(f"'{path}' appeared while the animation was drawn; it is kept, and the animation "
                        f"was not written.") from None
    except OSError as e:
        raise UserError(f"cannot write the animation to '{path}': {e.strerror or e}.") from None
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)
