"""test_program.py: the program around the algorithm, checked as a user meets it.

The command line and its answer to bad input (exit code 2, one sentence, no traceback), the help text,
output folders, checkpoints and resuming, a full disk, Ctrl-C, SIGTERM and a closed terminal, worker
and branch processes that are killed or hang, evaluation and its GIF, the plots' tick labels, the input checks of bench.py and
exercise.py, and the value fit's second thread. The mathematics and the algorithm (TRPO,
arXiv:1502.05477; GAE, arXiv:1506.02438) are tested in test_trpo.py.

References used here: the real scripts run in new processes, judged by their exit codes, their stderr
and the files they leave; real signals sent to them; /proc for the processes left behind; files
compared byte for byte; and, for the value-fit thread, the same run computed in one thread. No autodiff
framework. Tests that send signals or read /proc need Linux, those that fork need os.fork; elsewhere
they are skipped.

The fixtures and helpers both files use (short_config, needs_fork) are defined once, in test_trpo.py,
and imported from there.

Run:  python -m pytest -q test_program.py                   (this file)
      python -m pytest -q test_trpo.py test_program.py      (all the tests)
"""

import concurrent.futures
import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cli
import diagnostics
import engine
import parallel
import run_files
import trpo_numpy as T
from network import MLP
from test_trpo import needs_fork, short_config

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------
# The command line: bad input is one sentence and exit code 2; the help text; the schemes' defaults
# ----------------------------------------------------------------------------

def run_cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, "trpo_numpy.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, words", [
    (["--env", "NoSuchEnv-v0"], "unknown environment"),
    (["--env", "CarRacing-v3"], "flat Box observation"),
    (["--env", "Blackjack-v1"], "flat Box observation"),
    (["--env", "Pendulum-v1", "--scheme", "vine", "--vine-actions", "0"], "--vine-actions 0"),
    (["--env", "Pendulum-v1", "--scheme", "vine", "--vine-proposal", "uniform"], "--vine-proposal uniform"),
    (["--log-std-init", "-0.5"], "--log-std-init is for continuous actions"),
    (["--env", "Pendulum-v1", "--log-std-init", "inf"], "--log-std-init must be a finite number"),
    (["--max-kl", "-0.01"], "--max-kl must be positive"),
    (["--max-kl", "abc"], "not a number"),
    (["--total-steps", "0"], "--total-steps must be positive"),
    (["--num-envs", "2.5"], "not an integer"),
    (["--gamma", "1.5"], "--gamma"),
    (["--seed", "-1"], "--seed must be zero or positive"),
    (["--max-kl", "inf"], "--max-kl must be a finite number"),
    (["--damping", "inf"], "--damping must be a finite number"),
    (["--vf-lr", "inf"], "--vf-lr must be a finite number"),
    (["--entropy-coef", "nan"], "--entropy-coef must be a finite number"),
    (["--scheme", "vine", "--vine-actions", "1"], "--vine-actions 1 cannot learn"),
    (["--hidden", "100000"], "--hidden 100000 is wider"),
    (["--num-envs", "100000"], "--num-envs 100,000 is more environments than --total-steps 64"),
    (["--total-steps", "100000000", "--num-envs", "5000"], "--num-envs 5,000 environments would take minutes"),
    (["--max-kl", "1e300"], "--max-kl 1e+300 is no trust region"),
    (["--workers", "64", "--num-envs", "2"], "--workers 64 is more processes than --num-envs 2"),
    (["--env", "GymV26Environment-v0"], "needs a package that is not installed"),
])
def test_bad_input_is_one_sentence_and_exit_code_2(tmp_path, args, words):
    """Each bad command line (an unknown environment, or one with image or tuple observations; the vine's
    every-action estimator or uniform proposal on continuous actions; a number that is negative, zero, out of
    range, infinite, NaN or not a number; a size too large, or a setting that cannot learn or would take
    minutes) exits with code 2 and one line on stderr that names the problem, with no traceback."""
    result = run_cli("--total-steps", "64", "--out", str(tmp_path / "x"), *args)  # the last value given wins
    assert result.returncode == 2, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_spaces_the_policy_cannot_serve_are_refused_in_one_sentence(tmp_path):
    """Environments registered here: Discrete actions numbered from 1 (the categorical gives 0 to n - 1), and
    a Box observation of shape (0,) (no input for the networks): cli.env_dims refuses each with a UserError
    saying why; the same environment with actions from 0 and one observation is accepted, and evaluating a
    policy on it with --gif is refused before any episode: it has no render mode that draws an image."""
    import gymnasium as gym

    class Tiny(gym.Env):
        def __init__(self, start=0, observations=1, render_mode=None):
            self.action_space = gym.spaces.Discrete(3, start=start)
            self.observation_space = gym.spaces.Box(-1.0, 1.0, (observations,), np.float64)

        def reset(self, seed=None, options=None):
            return np.zeros(self.observation_space.shape), {}

        def step(self, action):
            return np.zeros(self.observation_space.shape), 0.0, True, False, {}
    for name, settings in (("TinyFromOne-v0", dict(start=1)), ("TinyNoObservation-v0", dict(observations=0)),
                           ("TinyFine-v0", {})):
        if name not in gym.registry:
            gym.register(name, entry_point=Tiny, kwargs=settings)
    with pytest.raises(cli.UserError, match="numbers its 3 actions from 1; the categorical policy gives actions 0"):
        cli.env_dims("TinyFromOne-v0")
    with pytest.raises(cli.UserError, match="the networks need a flat Box observation of one number or more"):
        cli.env_dims("TinyNoObservation-v0")
    assert cli.env_dims("TinyFine-v0") == (1, 3, False)
    policy = str(tmp_path / "policy.npz")  # an environment that cannot render: --gif says so before any episode
    run_files.save_policy(policy, [1, 4, 3], MLP([1, 4, 3]).init(np.random.default_rng(0)), "TinyFine-v0")
    with pytest.raises(cli.UserError, match="--gif: TinyFine-v0 cannot draw its frames into an image"):
        cli.run_evaluation(policy, 1, True, str(tmp_path / "tiny.gif"))
    assert not (tmp_path / "tiny.gif").exists()


def test_help_explains_every_flag():
    """--help names a flag for every field of Config, and mentions delta, gamma and lambda."""
    text = run_cli("--help").stdout
    for f in __import__("dataclasses").fields(T.Config):
        assert "--" + f.name.replace("_", "-") in text
    for symbol in ("delta", "gamma", "lambda"):
        assert symbol in text


def test_a_vine_run_by_default_stops_once_solved_or_after_its_iteration_budget():
    """scheme_config: the vine stops at 240 on LunarLander-v3 and LunarLanderContinuous-v3 (past their reward
    threshold of 200: VINE_STOP_RETURN), at the reward threshold elsewhere (CartPole-v1's 475), and runs
    VINE_ITERATIONS batches; values given explicitly win; the single-path scheme is the plain Config, with no
    stop return."""
    vine = T.scheme_config("vine")
    assert vine.stop_return == 240 and cli.reward_threshold("LunarLander-v3") == 200
    assert T.scheme_config("vine", env="LunarLanderContinuous-v3").stop_return == 240
    assert vine.total_steps == T.VINE_ITERATIONS * vine.batch_size
    assert T.scheme_config("vine", env="CartPole-v1").stop_return == 475
    given = T.scheme_config("vine", total_steps=5000, stop_return=100.0, num_envs=3)
    assert (given.total_steps, given.stop_return, given.num_envs) == (5000, 100.0, 3)
    single = T.scheme_config("single")
    assert single == T.Config() and single.stop_return is None


def test_a_run_stopped_past_the_threshold_says_where_it_passed_each(tmp_path, capsys, monkeypatch):
    """A run whose --stop-return lies past the environment's threshold (as the vine's 240 does past
    LunarLander's 200) ends by naming the iteration at which its rolling mean reached each; here CartPole-v1
    with its threshold taken as 15 and --stop-return 30."""
    import signal
    handlers = {s: signal.getsignal(s) for s in parallel.STOP_SIGNALS}
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # cli.main installs its own: pytest's comes back
    monkeypatch.setattr(cli, "reward_threshold", lambda env_id: 15.0)
    try:
        code = cli.main(["--env", "CartPole-v1", "--stop-return", "30", "--num-envs", "4", "--steps-per-env", "128",
                         "--workers", "1", "--total-steps", "40000", "--quiet", "--out", str(tmp_path / "run")])
    finally:
        for stop_signal, handler in handlers.items():
            signal.signal(stop_signal, handler)
    out = capsys.readouterr().out
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "progress.csv")))
    first = next(int(r["iteration"]) for r in rows if float(r["rolling_return"]) >= 15)
    assert float(rows[-1]["rolling_return"]) >= 30 > float(rows[-2]["rolling_return"])
    assert (f"solved: the rolling return reached 15, the environment's threshold, at iteration {first}, and "
            f"--stop-return 30 at iteration {len(rows)}.") in out


def test_the_command_line_gives_the_vine_its_defaults(tmp_path):
    """A --scheme vine run from the command line saves in config.json the values given on the command line and
    the vine's own defaults for the rest (its max_kl, and CartPole's stop return 475)."""
    result = run_cli("--scheme", "vine", "--env", "CartPole-v1", "--total-steps", "32", "--num-envs", "2",
                     "--steps-per-env", "8", "--vine-states", "4", "--vine-horizon", "5", "--hidden", "8",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["total_steps"], saved["num_envs"], saved["hidden"]) == (32, 2, [8])  # as given
    assert saved["max_kl"] == T.DEFAULTS["vine", "discrete"]["max_kl"] and saved["stop_return"] == 475  # the vine's own


# ----------------------------------------------------------------------------
# Output folders: what a run writes, and never over another run
# ----------------------------------------------------------------------------

def test_unwritable_output_folder_is_reported(tmp_path):
    """An --out folder under a regular file: exit code 2, 'cannot write to output folder', no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("--out", str(blocker / "run"), "--total-steps", "64")
    assert result.returncode == 2 and "cannot write to output folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_training_writes_its_outputs(tmp_path):
    """A short run writes non-empty progress.csv, config.json, policy.npz and both plots; progress.csv has the
    expected columns and one row per iteration (4), and policy.npz holds the layer sizes [4, 16, 16, 2]."""
    cfg = short_config(tmp_path, "out")
    cli.train(cfg, verbose=False)
    out = tmp_path / "out"
    for name in ("progress.csv", "config.json", "policy.npz", "learning_curve.png", "diagnostics.png"):
        assert (out / name).stat().st_size > 0, name
    header = (out / "progress.csv").read_text().splitlines()[0].split(",")
    for column in ("iteration", "env_steps", "rolling_return", "episodes", "kl", "backtracks", "entropy",
                   "wall_s"):
        assert column in header
    assert len((out / "progress.csv").read_text().splitlines()) == 1 + 4  # header + 4 iterations
    saved = np.load(out / "policy.npz")
    assert list(saved["sizes"]) == [4, 16, 16, 2]


TINY_RUN = ["--env", "CartPole-v1", "--total-steps", "64", "--num-envs", "2", "--steps-per-env", "32",
            "--hidden", "8", "--workers", "1"]


def test_a_new_run_never_overwrites_another_run(tmp_path):
    """Two runs into the default folder land in runs/single-seed0 and runs/single-seed0-2; a third whose
    explicit --out is the first's folder is refused (exit 2, pointing to --resume) and leaves its config.json,
    progress.csv and checkpoint.npz byte for byte as they were."""
    first = run_cli(*TINY_RUN, cwd=tmp_path)  # the default folder, twice: numbered
    second = run_cli(*TINY_RUN, cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert sorted(os.listdir(tmp_path / "runs")) == ["single-seed0", "single-seed0-2"]
    folder = tmp_path / "runs" / "single-seed0"
    before = {name: (folder / name).read_bytes() for name in ("config.json", "progress.csv", "checkpoint.npz")}
    third = run_cli(*TINY_RUN, "--scheme", "single", "--out", str(folder))  # an explicit --out: refused
    assert third.returncode == 2 and "holds a run already" in third.stderr and "--resume" in third.stderr
    assert "Traceback" not in third.stderr
    assert {name: (folder / name).read_bytes() for name in before} == before


def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path):
    """While another holder keeps the folder's lock (run_files.lock_folder), a run into it exits with code 2
    ('in use by a run that is still going'); once the lock is closed the same command succeeds."""
    folder = tmp_path / "busy"
    folder.mkdir()
    lock = run_files.lock_folder(str(folder))  # as a run that is still going holds it
    refused = run_cli(*TINY_RUN, "--out", str(folder))
    assert refused.returncode == 2 and "in use by a run that is still going" in refused.stderr
    lock.close()  # that run ends (or is killed: the system lets go of its lock the same way)
    assert run_cli(*TINY_RUN, "--out", str(folder)).returncode == 0


# ----------------------------------------------------------------------------
# Checkpoints and resuming
# ----------------------------------------------------------------------------

def test_checkpoint_write_is_atomic_under_a_crash(tmp_path, monkeypatch):
    """write_npz_atomically with np.savez failing half way (a full disk, simulated): a WriteFailed that names
    the file and the reason, no temporary file left behind, and the previous checkpoint byte for byte intact
    and loadable. (What the command line then says: test_a_full_disk_stops_the_run_keeping_its_last_checkpoint.)"""
    path = str(tmp_path / "checkpoint.npz")
    run_files.write_npz_atomically(path, format=run_files.CHECKPOINT_FORMAT, theta=np.arange(5.0))
    before = open(path, "rb").read()

    def crash_half_way(f, **arrays):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", crash_half_way)
    with pytest.raises(run_files.WriteFailed, match="cannot write '.*checkpoint.npz': No space left on device"):
        run_files.write_npz_atomically(path, format=run_files.CHECKPOINT_FORMAT, theta=np.zeros(5))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # no half-written temporary file left behind
    assert open(path, "rb").read() == before  # the last good checkpoint is untouched
    assert np.array_equal(np.load(path)["theta"], np.arange(5.0))


@pytest.fixture
def small_file_system(tmp_path):
    """A folder on a file system of `size` KB, a tmpfs mounted for the test (Linux, with the right to
    mount, as root); skips the test where it cannot be mounted."""
    mounted = []

    def make(size_kb):
        folder = tmp_path / f"disk{size_kb}k"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"a small file system cannot be mounted here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder
    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resource limits, tmpfs")
@pytest.mark.parametrize("full, size_kb", [("disk", 16), ("disk", 64), ("file", 40)])
def test_a_full_disk_stops_the_run_keeping_its_last_checkpoint(tmp_path, small_file_system, full, size_kb):
    """A run whose disk fills: on a file system of size_kb (16 KB fills before the first checkpoint, 64 KB
    after a few), or where no file may grow past size_kb (RLIMIT_FSIZE, which needs no mount: a write past
    it fails as on a full disk, here a checkpoint's after a few). It stops
    with exit code 1 and one sentence, no traceback: the file that could not be written, and the last good
    checkpoint it keeps, which loads and holds the iteration the sentence names, with its --resume command
    (or that none could be saved). No temporary file is left, and every PNG there is whole."""
    import importlib
    import resource
    import signal
    importlib.import_module("matplotlib.font_manager")  # its font cache is built now, not by the limited run

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_kb * 1024, size_kb * 1024))
    out = (small_file_system(size_kb) if full == "disk" else tmp_path) / "run"
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "trpo_numpy.py"), "--env", "CartPole-v1", "--num-envs", "2",
         "--steps-per-env", "32", "--hidden", "8", "--total-steps", str(64 * 200), "--save-every", "3",
         "--workers", "1", "--quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size if full == "file" else None)
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    reason = "No space left on device" if full == "disk" else "File too large"
    assert message[0].startswith("error: cannot write '") and f"{reason}; training stopped, and " in message[0]
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    for png in out.glob("*.png"):
        assert png.read_bytes().endswith(b"IEND\xaeB`\x82")  # a PNG's last chunk: the file is whole
    if "no checkpoint could be saved" in message[0]:
        assert not (out / "checkpoint.npz").exists() and size_kb == 16
        return
    assert f"continue with  python trpo_numpy.py --resume {out / 'checkpoint.npz'}" in message[0]
    saved, _ = cli.read_checkpoint(str(out / "checkpoint.npz"))
    assert f"of iteration {saved['iteration']}, is kept" in message[0]
    assert saved["iteration"] >= 3 and len(saved["history"]) == saved["iteration"]


def test_a_checkpoint_restores_the_whole_state_of_the_learner(tmp_path):
    """A learner trained 3 iterations, written to a checkpoint, read back and restored into a new learner:
    every part of the state is the saved one (theta, phi, Adam's moments and step, V's mean and std, the
    generator's state, the counters, the history and the episode returns), and the two then compute the
    same things: the same next random numbers, the same V, and the same value fit from the same data."""
    cfg = short_config(tmp_path, "run", total_steps=3 * 512)
    learner = T.Learner(cfg)
    sampler = engine.make_sampler(cfg, learner)
    try:
        for _ in range(3):
            engine.train_iteration(learner, sampler)
    finally:
        sampler.close()
    learner.wall_s = 12.5
    path = str(tmp_path / "checkpoint.npz")
    os.makedirs(cfg.out)
    run_files.write_checkpoint(path, run_files.snapshot(learner, "run-id"), dataclasses.asdict(cfg),
                               learner.policy_net.sizes, learner.value_fn.net.sizes, cfg.env)
    saved, saved_cfg = cli.read_checkpoint(path)
    restored = T.Learner(saved_cfg)
    assert run_files.restore(restored, saved) == "run-id"
    original, again = run_files.snapshot(learner, "run-id"), run_files.snapshot(restored, "run-id")
    assert original.keys() == again.keys()
    for key in original:
        if isinstance(original[key], np.ndarray):
            assert np.array_equal(original[key], again[key]) and original[key].dtype == again[key].dtype, key
        elif key == "history":  # a row's NaN (no episode ended, say) must come back NaN
            assert [row.keys() for row in original[key]] == [row.keys() for row in again[key]]
            assert all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k])
                       for a, b in zip(original[key], again[key]) for k in a), key
        else:
            assert original[key] == again[key], key
    assert learner.value_fn.adam.t > 0 and learner.value_fn.std != 1.0  # the fit has changed them
    states = np.random.default_rng(5).standard_normal((64, 4))
    assert np.array_equal(learner.value_fn.predict(states), restored.value_fn.predict(states))
    assert np.array_equal(learner.rng.integers(2 ** 62, size=8), restored.rng.integers(2 ** 62, size=8))
    targets = np.random.default_rng(6).standard_normal(64)
    for vf, rng in ((learner.value_fn, np.random.default_rng(7)), (restored.value_fn, np.random.default_rng(7))):
        vf.fit(states, targets, epochs=2, minibatch=16, rng=rng)
    assert np.array_equal(learner.value_fn.phi, restored.value_fn.phi)


def test_resume_continues_the_counters_and_the_csv(tmp_path):
    """The checkpoint holds the run's config; resuming the finished 4-iteration run with a larger total_steps
    runs iterations 5 and 6: iteration, env_steps, wall time and episode count carry on, and progress.csv
    gains rows 5 and 6 after the first four."""
    cfg = short_config(tmp_path, "run", total_steps=2048, save_every=1)  # 4 iterations of 512 steps
    cli.train(cfg, verbose=False)
    data, saved_cfg = cli.read_checkpoint(str(tmp_path / "run" / "checkpoint.npz"))
    assert saved_cfg == cfg
    longer = dataclasses.replace(saved_cfg, total_steps=3072)
    _, theta, history = cli.train(longer, verbose=False, resume=data)
    assert [row["iteration"] for row in history] == [1, 2, 3, 4, 5, 6]
    assert [row["env_steps"] for row in history] == [512 * k for k in range(1, 7)]
    assert history[4]["wall_s"] > history[3]["wall_s"]
    rows = (tmp_path / "run" / "progress.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[5].startswith("5,2560,")
    assert history[4]["episodes"] >= history[3]["episodes"]  # the episode count carries on too


def test_resumed_run_keeps_the_saved_weights(tmp_path):
    """The checkpoint holds the run's final weights, and resuming a run that has nothing left to do returns
    those same weights and its 2 history rows."""
    cfg = short_config(tmp_path, "run", total_steps=1024)
    _, theta, _ = cli.train(cfg, verbose=False)
    data, saved_cfg = cli.read_checkpoint(str(tmp_path / "run" / "checkpoint.npz"))
    assert np.array_equal(data["theta"], theta)
    # Resuming with nothing left to do changes nothing and keeps the weights.
    _, theta_again, history = cli.train(saved_cfg, verbose=False, resume=data)
    assert np.array_equal(theta_again, theta) and len(history) == 2


def bad_files(tmp_path):
    """A checkpoint, and the damaged or wrong files a user might hand over instead."""
    cli.train(short_config(tmp_path, "run", total_steps=512), verbose=False)
    good = tmp_path / "run" / "checkpoint.npz"
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[:2000])
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"run_id": "someone else"}')
    return good


def test_bad_checkpoints_and_folders_are_one_sentence_and_exit_code_2(tmp_path):
    """--resume and --eval given a missing, random or truncated file, a policy instead of a checkpoint,
    another run's folder, a changed setting, the wrong environment, or a bad --episodes, --gif, --seed or
    --greedy: each exits with code 2 and one line on stderr, no traceback; resuming with a setting repeated
    unchanged works."""
    good = bad_files(tmp_path)
    cases = [
        (["--resume", str(tmp_path / "missing.npz")], "no checkpoint file"),
        (["--resume", str(tmp_path / "random.npz")], "not a readable checkpoint"),
        (["--resume", str(tmp_path / "truncated.npz")], "not a readable checkpoint"),
        (["--resume", str(tmp_path / "run" / "policy.npz")], "policy file, not a checkpoint"),
        (["--resume", str(good), "--out", str(tmp_path / "other")], "holds another run"),
        (["--resume", str(good), "--max-kl", "0.05"], "--max-kl cannot change when resuming"),
        (["--eval", str(tmp_path / "missing.npz")], "no policy or checkpoint file"),
        (["--eval", str(tmp_path / "random.npz")], "not a readable policy or checkpoint"),
        (["--eval", str(good), "--env", "LunarLander-v3"], "takes 4 observations and gives 2 actions"),
        (["--eval", str(good), "--episodes", "0"], "--episodes must be positive"),
        (["--eval", str(good), "--gif", str(tmp_path / "out")], "--gif needs a file name ending in .gif"),
        (["--eval", str(good), "--gif", str(tmp_path)], "is a folder; give the name of a new file"),
        (["--eval", str(good), "--seed", "3"], "--seed is for training"),
        (["--greedy", "--total-steps", "64", "--out", str(tmp_path / "new")], "--greedy goes with --eval"),
    ]
    for args, words in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, args
    # a setting given again, unchanged: fine (with more steps to train: the run has done its 512)
    same = run_cli("--resume", str(good), "--scheme", "single", "--total-steps", "1024")
    assert same.returncode == 0, same.stderr


# ----------------------------------------------------------------------------
# Signals: Ctrl-C and SIGTERM stop a run cleanly, with a checkpoint to resume from
# ----------------------------------------------------------------------------

def run_python(script, *import_dirs):
    """Run a Python script in a new interpreter that imports this project's files (and import_dirs')."""
    path = os.pathsep.join([HERE, *map(str, import_dirs)])
    return subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": path})


def start_run(out, *args, iterations=3):
    """A small CartPole training run in a new process (and session), returned once `iterations` are done."""
    import time
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "trpo_numpy.py"), "--env", "CartPole-v1", "--num-envs", "4",
         "--steps-per-env", "64", "--hidden", "16", "16", "--out", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    progress, deadline = out / "progress.csv", time.time() + 60
    while time.time() < deadline and not (progress.exists() and len(progress.read_text().splitlines()) > iterations):
        time.sleep(0.05)
    return process


def processes_in_session(session_id):
    """Linux: pids of the live processes whose session is session_id (a child started in a new session).

    Zombies (state Z) have already exited; they only wait to be reaped by whoever adopted them."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session_id and fields[0] != "Z":  # fields 3 and 6 of stat: state, session
                pids.append(int(entry))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_a_signal_in_a_held_block_waits_for_its_end_even_if_library_code_unblocks_it():
    """parallel.signals_held, in a new interpreter: a Ctrl-C sent inside the block, even after code in the
    block unblocked SIGINT, arrives only once the block has finished (KeyboardInterrupt after its last
    statement), and Python's own SIGINT handler is back afterwards."""
    # In a new interpreter, with Python's own Ctrl-C handler: a process started in the background
    # inherits SIGINT ignored, and Python then leaves it ignored (a program sets its handler, as main does).
    script = """if True:
        import os, signal, parallel
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ran = []
        try:
            with parallel.signals_held():
                # what multiprocessing does around starting its resource tracker, inside our block
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # many bytecodes: an interrupt not held would be raised in here
                    ran.append(1)
                ran.append("the block finished")
        except KeyboardInterrupt:
            print("interrupted after:", ran[-1])  # and Ctrl-C was delivered after it, not lost
        print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    """
    result = run_python(script)
    assert result.stdout.splitlines() == ["interrupted after: the block finished", "True"], result.stdout + result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_a_ctrl_c_lost_in_library_code_still_stops_the_run():
    """With parallel.stop_on_signals, a KeyboardInterrupt that some code catches and discards is remembered:
    parallel.raise_if_stop_requested() raises it again."""
    script = """if True:
        import os, signal, parallel
        parallel.stop_on_signals()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the interrupt is raised in here ...
                pass
        except KeyboardInterrupt:
            print("swallowed")  # ... and discarded, as some compiled modules' imports do
        try:
            parallel.raise_if_stop_requested()
        except KeyboardInterrupt:
            print("stopped")
    """
    result = run_python(script)
    assert result.stdout.split() == ["swallowed", "stopped"], result.stdout + result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_a_ctrl_c_in_a_del_or_weakref_callback_prints_no_traceback():
    """A Ctrl-C that lands in a __del__ (or a weakref callback), where Python cannot raise it and prints
    it as a traceback instead: with parallel.stop_on_signals nothing is printed, the stop is still
    remembered, and other errors in a __del__ are printed as Python prints them: a ValueError, and a
    KeyboardInterrupt raised there by the code itself before any Ctrl-C came."""
    script = """if True:
        import os, signal, parallel
        parallel.stop_on_signals()
        class RaisesItsOwn:
            def __del__(self):
                raise KeyboardInterrupt("raised by the code, no Ctrl-C yet")
        RaisesItsOwn()
        class Interrupted:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the interrupt is raised in here, inside __del__
                    pass
        class Failing:
            def __del__(self):
                raise ValueError("an error of its own")
        Interrupted()
        print("went on")
        try:
            parallel.raise_if_stop_requested()
        except KeyboardInterrupt:
            print("stopped")
        Failing()
    """
    result = run_python(script)
    assert result.stdout.split() == ["went", "on", "stopped"], result.stdout + result.stderr
    assert result.stderr.count("KeyboardInterrupt") == 1 and "raised by the code, no Ctrl-C yet" in result.stderr
    assert "ValueError: an error of its own" in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_repeated_ctrl_c_does_not_interrupt_the_final_save(tmp_path):
    """Ctrl-C every 30 ms until the run has stopped: exit code 130, no traceback, a 'one moment' notice and
    the --resume command; the checkpoint (iteration >= 3) and policy.npz are written and no .tmp file is
    left."""
    import signal
    import time
    out = tmp_path / "run"
    process = start_run(out, "--workers", "1")
    deadline = time.time() + 30
    while process.poll() is None and time.time() < deadline:  # Ctrl-C, again and again, until it has stopped
        process.send_signal(signal.SIGINT)
        time.sleep(0.03)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert "one moment" in stderr and f"--resume {out / 'checkpoint.npz'}" in stderr
    saved, _ = cli.read_checkpoint(str(out / "checkpoint.npz"))
    assert saved["iteration"] >= 3 and (out / "policy.npz").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
@pytest.mark.parametrize("delay", [0.2, 1.0])
def test_ctrl_c_while_starting_names_only_files_that_exist(tmp_path, delay):
    """Ctrl-C 0.2 s or 1 s after a default run starts (while its workers start, or in its first iteration):
    exit code 130, no traceback, and every file the stop message names exists (unless it says nothing was
    saved)."""
    import signal
    import time
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "trpo_numpy.py"), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(delay)  # while the workers start, or in the first iteration
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    if "nothing was saved" not in stderr:
        named = stderr.split("stopped: ")[1].split(" are in ")[0].split(", ")
        assert named and all((out / name).exists() for name in named), stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signal_name, scheme", [("SIGINT", "single"), ("SIGTERM", "single"), ("SIGINT", "vine"),
                                                 ("SIGHUP", "vine")])
def test_a_signal_stops_cleanly_with_a_loadable_checkpoint(tmp_path, signal_name, scheme):
    """SIGINT, SIGTERM or SIGHUP after three iterations: the run stops within 10 s with exit code 130
    (SIGINT), 143 (SIGTERM) or 129 (SIGHUP), the shell's 128 + signal number, no traceback and the --resume
    command; its checkpoint loads (iteration >= 3 although --save-every is 1000), policy.npz has the same
    shape, and within 10 s no process of its session is left. SIGHUP goes, as from a closed terminal, to
    every process of the run's group, its workers and the vine's forked branches included."""
    import signal
    import time
    out = tmp_path / "run"
    vine = ["--vine-states", "32", "--vine-horizon", "50"] if scheme == "vine" else []
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "trpo_numpy.py"), "--env", "CartPole-v1", "--num-envs", "4",
         "--steps-per-env", "64", "--hidden", "16", "16", "--save-every", "1000", "--out", str(out),
         "--scheme", scheme, *vine],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until a few iterations are done
        progress = out / "progress.csv"
        if progress.exists() and len(progress.read_text().splitlines()) > 3:
            break
        time.sleep(0.1)
    sent = time.time()
    if signal_name == "SIGHUP":
        os.killpg(process.pid, signal.SIGHUP)  # the run's whole process group, as a closed terminal does
    else:
        process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=30)
    assert time.time() - sent < 10, "it must stop promptly, not an iteration later"
    assert process.returncode == 128 + getattr(signal, signal_name) and "Traceback" not in stderr
    assert f"--resume {out / 'checkpoint.npz'}" in stderr
    data, cfg = cli.read_checkpoint(str(out / "checkpoint.npz"))  # written although --save-every is 1000
    assert data["iteration"] >= 3
    assert np.load(out / "policy.npz")["theta"].shape == data["theta"].shape
    while processes_in_session(process.pid) and time.time() - sent < 10:
        time.sleep(0.1)  # the workers see their pipe close and exit by themselves, within moments
    assert processes_in_session(process.pid) == [], "a worker process was left behind"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal, reads /proc")
def test_a_closed_terminal_saves_like_ctrl_c(tmp_path):
    """The run's terminal (a pseudo-terminal, with its progress bar and log lines) closes after three
    iterations: the kernel sends SIGHUP, and from then on every write to that terminal fails. The run still
    saves as on Ctrl-C: exit code 129, a checkpoint that loads with iteration >= 3 (--save-every is 1000),
    and within 10 s no process of its session is left."""
    import pty
    import threading
    import time
    out = tmp_path / "run"
    pid, terminal = pty.fork()
    if pid == 0:  # the run, with the pseudo-terminal as its controlling terminal, stdout and stderr
        os.execv(sys.executable, [sys.executable, os.path.join(HERE, "trpo_numpy.py"), "--env", "CartPole-v1",
                                  "--num-envs", "4", "--steps-per-env", "64", "--hidden", "16", "16",
                                  "--save-every", "1000", "--out", str(out)])
    shown = []

    def read_terminal():  # what the run writes must be read, or it would block on a full terminal
        try:
            while chunk := os.read(terminal, 4096):
                shown.append(chunk)
        except OSError:
            pass
    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        progress = out / "progress.csv"
        if progress.exists() and len(progress.read_text().splitlines()) > 3:
            break
        time.sleep(0.1)
    sent = time.time()
    os.close(terminal)  # the terminal closes: SIGHUP to the run's processes
    while True:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            break
        if time.time() - sent > 30:
            os.kill(pid, 9)
            pytest.fail("the run did not stop after its terminal closed")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 129, b"".join(shown)[-3000:]
    data, _ = cli.read_checkpoint(str(out / "checkpoint.npz"))
    assert data["iteration"] >= 3
    while processes_in_session(pid) and time.time() - sent < 10:
        time.sleep(0.1)
    assert processes_in_session(pid) == [], "a worker process was left behind"


# ----------------------------------------------------------------------------
# Worker and branch processes that are killed or hang
# ----------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_a_worker_stopped_while_it_exits_prints_no_traceback(tmp_path):
    """A WorkerProcesses worker sent SIGTERM while it is already exiting (its atexit hook sleeping) ends
    quietly: no traceback, and exit code -15, killed by the SIGTERM itself."""
    # The main process, stopped by Ctrl-C in the middle of a call, SIGTERMs its workers; one may
    # already be exiting (here: its atexit hook sleeps). That must end it quietly.
    exiting = tmp_path / "exiting"
    (tmp_path / "slow_to_exit.py").write_text(f"""if True:
        import atexit, time
        def exit_slowly():
            open({str(exiting)!r}, "w").close()
            time.sleep(2.0)
        class SlowToExit:
            def __init__(self):
                atexit.register(exit_slowly)
            def ping(self):
                return "pong"
    """)
    script = f"""if True:
        import os, time, parallel, slow_to_exit
        if __name__ == "__main__":
            workers = parallel.WorkerProcesses(slow_to_exit.SlowToExit, [()])
            print(workers.call("ping", [()])[0])
            workers.connections[0].close()  # the worker leaves its loop and starts exiting
            while not os.path.exists({str(exiting)!r}):
                time.sleep(0.01)
            workers.processes[0].terminate()
            workers.processes[0].join(10)
            print(workers.processes[0].exitcode)
    """
    result = run_python(script, tmp_path)
    assert "Traceback" not in result.stderr, result.stdout + result.stderr
    assert result.stdout.split() == ["pong", "-15"], result.stdout + result.stderr  # ended by SIGTERM itself


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_worker_is_reported_with_the_resume_command(tmp_path):
    """SIGKILL to one of the two sampler worker processes: the run exits with code 1 and no traceback, names
    the worker's pid and signal 9, and gives the --resume command for its checkpoint, which exists."""
    import signal
    out = tmp_path / "run"
    process = start_run(out, "--workers", "2", iterations=2)
    workers = [pid for pid in processes_in_session(process.pid)
               if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]  # not the resource tracker
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1 and "Traceback" not in stderr, stderr
    assert f"worker process {workers[0]} was killed by signal 9" in stderr
    assert f"--resume {out / 'checkpoint.npz'}" in stderr and (out / "checkpoint.npz").exists()


@needs_fork
def test_a_killed_branch_process_is_reported():
    """A forked branch process killed by SIGKILL: ForkPool.gather raises 'killed by signal 9' within 5 s and
    has no child left running."""
    import signal
    import time
    pool = parallel.ForkPool(max_children=2, timeout=30)
    pool.submit("slow", lambda: time.sleep(30))
    pid = next(iter(pool.running.values()))[0]
    os.kill(pid, signal.SIGKILL)
    start = time.time()
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        pool.gather()
    assert time.time() - start < 5 and not pool.running


@needs_fork
def test_a_hung_branch_process_is_stopped_not_waited_for():
    """A forked branch process that hangs: ForkPool.gather raises 'no branch process answered' after its 1 s
    timeout (within 5 s), and the child has already been reaped."""
    import time
    pool = parallel.ForkPool(max_children=2, timeout=1.0)
    pool.submit("hangs", lambda: time.sleep(60))
    pid = next(iter(pool.running.values()))[0]
    start = time.time()
    with pytest.raises(RuntimeError, match="no branch process answered"):
        pool.gather()
    assert time.time() - start < 5
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped: nothing left behind


# ----------------------------------------------------------------------------
# Evaluation and the GIF
# ----------------------------------------------------------------------------

def test_eval_reports_return_and_writes_a_gif(tmp_path):
    """--eval of a freshly trained CartPole policy, 3 greedy episodes with --gif: exit code 0, a summary that
    reports the share of episodes at or above CartPole's threshold 475, a file that starts GIF89a, nothing on
    stderr."""
    cli.train(short_config(tmp_path, "run"), verbose=False)
    gif = tmp_path / "episode.gif"
    result = run_cli("--eval", str(tmp_path / "run" / "policy.npz"), "--episodes", "3", "--greedy",
                     "--gif", str(gif))
    assert result.returncode == 0, result.stderr
    assert "3 evaluation episodes (greedy" in result.stdout and "at or above 475" in result.stdout  # CartPole's reward threshold
    assert gif.read_bytes()[:6] == b"GIF89a"
    assert result.stderr == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_ctrl_c_stops_an_evaluation(tmp_path):
    """Ctrl-C during a long --eval (100,000 LunarLander episodes) stops it: exit code 130, 'evaluation
    stopped', no traceback."""
    import signal
    import time
    net = MLP([8, 4])
    run_files.save_policy(str(tmp_path / "policy.npz"), net.sizes, net.init(np.random.default_rng(0)),
                          "LunarLander-v3")
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "trpo_numpy.py"), "--eval",
                                str(tmp_path / "policy.npz"), "--episodes", "100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # well into the episodes
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and "evaluation stopped" in stderr and "Traceback" not in stderr, stderr


# ----------------------------------------------------------------------------
# Plots: tick labels and legends
# ----------------------------------------------------------------------------

def a_long_run_history(iterations=140, batch=8192):
    """progress.csv rows of a made-up 1.1M-step run: the x axis a long run's plots have."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1, iterations + 1):
        row = {name: float(rng.random()) for name in run_files.PROGRESS_COLUMNS}
        row.update(iteration=i, env_steps=i * batch, kl=0.02 + 0.01 * rng.random(),
                   max_kl_state=0.3 + 1.5 * rng.random(), theorem_penalty=1e5, rolling_return=i - 100.0)
        rows.append(row)
    return rows


@pytest.mark.parametrize("iterations", [25, 140])  # 205k and 1.1M steps
def test_plot_tick_labels_do_not_run_together_and_the_legend_covers_no_curve(iterations):
    """The three figures of a made-up run of 25 or 140 iterations (205k and 1.1M steps): in each, the visible
    x tick labels of an axis do not overlap and at least one axis shows 3 or more; the theory figure's KL
    legend covers no point of its lines; steps_label writes 250k and 1.2M."""
    figures = run_files.plot_figures(a_long_run_history(iterations), "LunarLander-v3", 0, "vine", max_kl=0.05,
                                     solved_at=200)
    assert set(figures) == {"learning_curve.png", "diagnostics.png", "theory.png"}
    for name, fig in figures.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        labelled_axes = 0
        for ax in fig.axes:
            low, high = sorted(ax.get_xlim())
            labels = [label for tick, label in zip(ax.get_xticks(), ax.get_xticklabels())
                      if low <= tick <= high and label.get_visible() and label.get_text()]
            boxes = sorted((label.get_window_extent(renderer) for label in labels), key=lambda box: box.x0)
            labelled_axes += len(boxes) >= 3  # a shared x axis shows its labels on the bottom row only
            for left, right in zip(boxes, boxes[1:]):
                assert left.x1 + 2 < right.x0, f"{name}: '{left}' and '{right}' overlap"
        assert labelled_axes >= 1, name
    theory = figures["theory.png"]
    kl_axes = theory.axes[1]
    legend_box = kl_axes.get_legend().get_window_extent(theory.canvas.get_renderer())
    for line in kl_axes.get_lines():
        points = kl_axes.transData.transform(np.column_stack(line.get_data()).astype(float))
        inside = [legend_box.contains(x, y) for x, y in points]
        assert not any(inside), f"the legend covers the line '{line.get_label()}'"
    assert run_files.steps_label(250_000) == "250k" and run_files.steps_label(1_200_000) == "1.2M"
    import matplotlib.pyplot as plt
    for fig in figures.values():
        plt.close(fig)


# ----------------------------------------------------------------------------
# bench.py and exercise.py: their input checks
# ----------------------------------------------------------------------------

def test_exercise_make_never_deletes_a_students_work(tmp_path):
    """exercise.py make refuses (exit 2, pointing to --force, no traceback) to write over a copy holding a
    student's edit, which stays; --force replaces it; --into a file exits with code 2 ('is a file')."""
    def make(*args):
        return subprocess.run([sys.executable, os.path.join(HERE, "exercise.py"), "make", "gae", *args],
                              capture_output=True, text=True, timeout=60)
    copy = tmp_path / "mine"
    assert make("--into", str(copy)).returncode == 0
    answer = copy / "trpo_numpy.py"
    answer.write_text(answer.read_text() + "\n# my answer\n")
    again = make("--into", str(copy))
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert answer.read_text().endswith("# my answer\n")
    assert make("--into", str(copy), "--force").returncode == 0
    assert not answer.read_text().endswith("# my answer\n")
    (tmp_path / "a-file").write_text("")
    into_a_file = make("--into", str(tmp_path / "a-file"))
    assert into_a_file.returncode == 2 and "is a file" in into_a_file.stderr


def test_exercise_mutants_fails_on_a_bug_that_survives_or_no_longer_applies(monkeypatch, capsys):
    """exercise.py mutants (run by verify) puts each bug of its list into a copy of the code: it exits 0 only
    when every bug makes a named test fail. With a caught bug, one that changes nothing (it survives), one
    whose code is nowhere in the file, one whose text occurs only in a docstring (not code), and one that
    occurs more than once, it returns 1 and prints one line per bug and a summary saying so; with the caught
    bug alone, 0."""
    import exercise
    softmax_line = "return e / e.sum(axis=-1, keepdims=True)"
    caught = exercise.Mutant("network.py", softmax_line, "return e / e.sum()",
                             ["test_categorical_helpers_match_definitions"], "softmax over the batch")
    bugs = [caught,
            exercise.Mutant("network.py", softmax_line, softmax_line + " * 1.0",
                            ["test_categorical_helpers_match_definitions"], "a change that changes nothing"),
            exercise.Mutant("network.py", "return e / e.total()", "return e",
                            ["test_categorical_helpers_match_definitions"], "code that is not there"),
            exercise.Mutant("network.py", "sum_a p_old,a (log p_old,a - log p_new,a)", "0",
                            ["test_categorical_helpers_match_definitions"], "text only in a docstring"),
            exercise.Mutant("network.py", "softmax(z)", "z", ["test_categorical_helpers_match_definitions"],
                            "text in several places")]
    monkeypatch.setattr(exercise, "MUTANTS", bugs)
    assert exercise.command_mutants(None) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    assert "caught by test_categorical_helpers_match_definitions (an assertion)" in lines[0]
    assert "SURVIVED" in lines[1]
    assert "NO LONGER APPLIES: its original code occurs 0 times" in lines[2] and "0 times" in lines[3]
    assert "NO LONGER APPLIES" in lines[4] and "0 times" not in lines[4]
    assert lines[5].startswith("5 bugs: 1 caught, 1 survived, 3 no longer apply, 0 broken")
    monkeypatch.setattr(exercise, "MUTANTS", [caught])
    assert exercise.command_mutants(None) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("1 bugs: 1 caught, 0 survived")


def test_bench_refuses_bad_input_in_one_sentence(tmp_path):
    """bench.py with --total-steps 0, or with --out naming a file: exit code 2 and one line on stderr, no
    traceback."""
    (tmp_path / "a-file").write_text("")
    for args, words in ((["--total-steps", "0"], "must be positive"),
                        (["--out", str(tmp_path / "a-file")], "is a file, not a folder")):
        result = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), *args], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------
# The value fit in a second thread gives the run of one thread
# ----------------------------------------------------------------------------

class InlineExecutor:
    """concurrent.futures' thread pool interface, running each task in this thread: at once when
    submitted, or (after_block=True) when the with-block ends."""

    def __init__(self, max_workers=None, after_block=False):
        self.after_block, self.tasks = after_block, []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for future, function, args in self.tasks:
            future.set_result(function(*args))
        return False

    def submit(self, function, *args):
        future = concurrent.futures.Future()
        if self.after_block:
            self.tasks.append((future, function, args))
        else:
            future.set_result(function(*args))
        return future


@pytest.mark.parametrize("scheme", ["single", "vine"])
def test_the_value_fit_beside_the_policy_step_gives_the_run_of_one_thread(tmp_path, monkeypatch, scheme):
    """The value fit runs in a second thread beside the policy step; run in this thread instead, before the
    step or after it (a stand-in executor), it gives bit-identical policy weights, value weights and value
    losses, for the single-path and the vine scheme."""
    # The value fit runs in a second thread while the policy step is computed. Run in turn, before
    # the step or after it, it must give the same run to the bit: it takes nothing from the step, nor
    # the step from it. Many small minibatches make the fit long enough to overlap the step.
    import functools
    vine = dict(vine_states=16, vine_horizon=20, workers=1) if scheme == "vine" else {}
    runs = {}
    for order, executor in [("threads", None), ("before", InlineExecutor),
                            ("after", functools.partial(InlineExecutor, after_block=True))]:
        if executor is not None:
            monkeypatch.setattr(engine.concurrent.futures, "ThreadPoolExecutor", executor)
        cfg = short_config(tmp_path, order, scheme=scheme, vf_epochs=20, vf_minibatch=16, **vine)
        _, theta, history = cli.train(cfg, verbose=False)
        saved, _ = cli.read_checkpoint(str(tmp_path / order / "checkpoint.npz"))
        runs[order] = (theta, saved["phi"], repr([row["value_loss"] for row in history]))
    for order in ("before", "after"):
        assert np.array_equal(runs[order][0], runs["threads"][0]), order
        assert np.array_equal(runs[order][1], runs["threads"][1]), order  # the value network too
        assert runs[order][2] == runs["threads"][2], order


@needs_fork
@pytest.mark.parametrize("scheme, env", [("single", "CartPole-v1"), ("vine", "CartPole-v1"),
                                         ("single", "Pendulum-v1"), ("vine", "Pendulum-v1")])
def test_a_run_through_the_engine_is_the_references_run(tmp_path, scheme, env):
    """A run of the command line's train (engine.py: 2 worker processes, states restored by fork, or by
    replay for young ones, the value fit in a second thread beside the step, the run's files) gives the
    reference's run (trpo_numpy.train: one process, seeded replay after the trunk, one thread): the same
    progress.csv but for its timing columns, and the same theta, to the bit; for both schemes, with discrete
    actions (CartPole) and continuous ones (Pendulum, the vine drawing K = 3 actions from pi_old). Each
    worker steps 4 environments: measured here, OpenBLAS then gives the workers' smaller policy passes the
    reference's logits to the bit (with 3 a worker, they can differ in the last bit)."""
    extra = dict(vine_states=12, vine_horizon=12, steps_per_env=32) if scheme == "vine" else {}
    if scheme == "vine" and env == "Pendulum-v1":
        extra.update(vine_actions=3, vine_proposal="pi_old")
    cfg = T.scheme_config(scheme, env=env, seed=3, num_envs=8, steps_per_env=extra.pop("steps_per_env", 64),
                          total_steps=(3 if scheme == "vine" else 4) * 8 * (32 if scheme == "vine" else 64),
                          hidden=(16, 16), workers=2, vine_restore="auto", out=str(tmp_path / "engine"), **extra)
    _, theta_engine, _ = cli.train(cfg, verbose=False, progress_bar=False)
    _, theta_reference, history = T.train(dataclasses.replace(cfg, out=""), verbose=False)
    reference_csv = run_files.ProgressCsv(str(tmp_path), history)
    reference_csv.close()

    def without_timing(path):
        return [{k: v for k, v in row.items() if k not in diagnostics.TIMING_COLUMNS}
                for row in csv.DictReader(open(path))]
    engine_rows = without_timing(tmp_path / "engine" / "progress.csv")
    assert len(engine_rows) == len(history) >= 3
    assert engine_rows == without_timing(tmp_path / "progress.csv")
    assert np.array_equal(theta_engine, theta_reference)


# ----------------------------------------------------------------------------
# trpo_numpy.py: nothing lost, nothing silent, and the project from Python
# ----------------------------------------------------------------------------

def test_a_new_run_refuses_a_folder_of_other_files_and_leaves_them_alone(tmp_path):
    """A new run writes into a new or empty folder only: a folder of someone else's files (plots, another
    tool's progress.csv) is refused in one sentence with exit code 2, and every file in it is left as it was."""
    foreign = tmp_path / "plots"
    foreign.mkdir()
    (foreign / "theory.png").write_bytes(b"a figure")
    (foreign / "progress.csv").write_text("step,reward\n1,2\n")
    result = run_cli("--env", "CartPole-v1", "--total-steps", "64", "--num-envs", "2", "--out", str(foreign))
    assert result.returncode == 2 and "is not empty" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(os.listdir(foreign)) == ["progress.csv", "theory.png"]
    assert (foreign / "theory.png").read_bytes() == b"a figure"
    assert (foreign / "progress.csv").read_text() == "step,reward\n1,2\n"


def test_runs_started_together_get_folders_of_their_own(tmp_path):
    """Without --out, each run makes a new folder, numbered -2, -3, ... if taken: eight callers at once
    get eight different folders, each created by its own call (os.mkdir is atomic), the first unnumbered."""
    base = str(tmp_path / "runs" / "single-seed0")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: run_files.new_numbered_folder(base), range(8)))
    assert len(set(folders)) == 8 and all(os.path.isdir(f) for f in folders)
    assert sorted(folders) == sorted([base] + [f"{base}-{n}" for n in range(2, 9)])


def test_an_unknown_environment_leaves_no_folder_behind(tmp_path):
    """A bad --env is refused before any output folder is made, with or without --out."""
    result = run_cli("--env", "NoSuchEnv-v0", "--out", str(tmp_path / "run"), cwd=str(tmp_path))
    assert result.returncode == 2 and "unknown environment" in result.stderr
    result = run_cli("--env", "NoSuchEnv-v0", cwd=str(tmp_path))
    assert result.returncode == 2 and os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, words", [
    (["--vine-states", "16"], "--vine-states is for --scheme vine"),
    (["--no-vine-bootstrap"], "--vine-bootstrap is for --scheme vine"),
    (["--steps-per-env", "1000000000"], "use at most 2,097,152 steps per iteration"),
    (["--scheme", "vine", "--vine-horizon", "1000000000"], "use at most 10,000"),
    (["--scheme", "vine", "--vine-actions", "2000000000"], "keep their product at most"),
    (["--scheme", "vine", "--no-normalize-advantages"], "--normalize-advantages is for the single path"),
])
def test_options_that_would_be_ignored_or_exhaust_memory_are_refused(tmp_path, args, words):
    """A vine option on a single-path run (it would be ignored), a batch or a branch too large for memory:
    one sentence, exit code 2, no traceback, before anything is built."""
    result = run_cli("--env", "CartPole-v1", "--out", str(tmp_path / "run"), *args)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_run_says_what_it_does_beyond_what_was_asked(tmp_path):
    """--total-steps that is not a whole number of batches, and more rollout states than the trunk has: each is
    said in a note on stderr before training, with the figures the run will use; then the run does exactly that
    (1,024 steps for 700 asked, batches of 512)."""
    result = run_cli("--env", "CartPole-v1", "--total-steps", "700", "--num-envs", "4", "--steps-per-env", "128",
                     "--hidden", "8", "--out", str(tmp_path / "single"))
    assert result.returncode == 0, result.stderr
    assert "note: training runs whole iterations of 512 steps: 1,024 steps in all for --total-steps 700" \
        in result.stderr
    assert "done: 1,024 env steps" in result.stdout
    result = run_cli("--scheme", "vine", "--env", "CartPole-v1", "--total-steps", "16", "--num-envs", "2",
                     "--steps-per-env", "8", "--vine-states", "100", "--vine-horizon", "5", "--hidden", "8",
                     "--out", str(tmp_path / "vine"))
    assert result.returncode == 0, result.stderr
    assert "note: --vine-states 100 is more than the trunk's 16 states" in result.stderr
    # the fork-cost probe steps CartPole past its end no more (Gymnasium warned of it)
    assert "already returned terminated" not in result.stderr


def test_a_degenerate_run_prints_no_library_warnings(tmp_path):
    """One iteration of Pendulum in which no episode ends (32 of its 200 steps): its plots have curves with
    nothing to draw, and the run says nothing of it: no NumPy or matplotlib warning on stderr."""
    result = run_cli("--env", "Pendulum-v1", "--total-steps", "64", "--num-envs", "2", "--steps-per-env", "32",
                     "--hidden", "8", "--workers", "1", "--quiet", "--out", str(tmp_path / "run"))
    assert result.returncode == 0 and (tmp_path / "run" / "theory.png").exists(), result.stderr
    assert "Warning" not in result.stderr and result.stderr.strip() == "", result.stderr


def test_train_from_python_refuses_settings_the_command_line_would(tmp_path):
    """A Config made in Python with a value argparse's choices would refuse (advantage 'MC', vine_restore
    'forks', vine_proposal 'pi') or a yes/no setting that is not a bool (normalize_advantages=1): cli.train
    raises a UserError naming the setting, before any folder is made."""
    for settings, words in ((dict(advantage="MC"), "--advantage must be one of gae, mc, got 'MC'"),
                            (dict(vine_restore="forks"), "--vine-restore must be one of auto, fork, replay"),
                            (dict(vine_proposal="pi"), "--vine-proposal must be one of uniform, pi_old"),
                            (dict(normalize_advantages=1), "normalize_advantages must be True or False, got 1")):
        with pytest.raises(cli.UserError, match=words):
            cli.train(short_config(tmp_path, "run", **settings), verbose=False)
        assert not (tmp_path / "run").exists()


def test_a_resume_with_nothing_left_to_do_says_so(tmp_path):
    """Resuming a run that has trained its --total-steps already is refused in one sentence (exit code 2) that
    says how far it got and how to go on; its files are not touched."""
    cfg = short_config(tmp_path, "run", total_steps=512)
    cli.train(cfg, verbose=False)
    checkpoint = tmp_path / "run" / "checkpoint.npz"
    before = checkpoint.read_bytes()
    result = run_cli("--resume", str(checkpoint))
    assert result.returncode == 2 and "nothing to do" in result.stderr and "512 of its --total-steps 512" \
        in result.stderr and "--total-steps" in result.stderr
    assert checkpoint.read_bytes() == before


def small_run_folder(cfg):
    """A RunFolder for cfg (short_config's CartPole networks) and a snapshot of zero weights to record."""
    run = run_files.RunFolder(cfg.out, False, dataclasses.asdict(cfg), "id", [], resuming=False,
                              sizes=([4, 16, 16, 2], [4, 16, 16, 1]), verbose=False, progress_bar=False,
                              plot_labels=dict(scheme_name="single path", solved_at=None))
    snapshot = dict(theta=np.zeros(MLP([4, 16, 16, 2]).num_params), phi=np.zeros(MLP([4, 16, 16, 1]).num_params),
                    adam_m=np.zeros(1), adam_v=np.zeros(1), adam_t=0, value_mean=0.0, value_std=1.0, rng_state={},
                    iteration=1, env_steps=512, wall_s=1.0, run_id="id", history=[], episode_returns=[])
    return run, snapshot


def test_the_policy_is_written_with_each_checkpoint(tmp_path):
    """policy.npz follows checkpoint.npz during training, not only at the end: after the iteration that writes
    a checkpoint, both hold the same weights (the snapshot's)."""
    cfg = short_config(tmp_path, "run", total_steps=512)
    run, snapshot = small_run_folder(cfg)
    theta = snapshot["theta"] = np.arange(MLP([4, 16, 16, 2]).num_params, dtype=np.float64)
    row = {k: 0.0 for k in run_files.PROGRESS_COLUMNS}
    row.update(iteration=cfg.save_every, env_steps=5120, trunk_steps=512, rollout_states=0, skipped="")
    run.record(row, snapshot)
    sizes, saved_theta, env_id = run_files.read_policy(os.path.join(cfg.out, "policy.npz"))
    assert np.array_equal(saved_theta, theta) and env_id == "CartPole-v1" and sizes == [4, 16, 16, 2]
    run.lock.close()


def test_no_progress_bar_is_drawn_into_a_pipe_and_quiet_leaves_the_log_lines(tmp_path):
    """A run whose stderr is a pipe gets no progress-bar redraws there (a bar belongs on a terminal); --quiet
    leaves only the log line of each iteration on stdout. --quiet with --eval is refused: it is for training."""
    for quiet in ([], ["--quiet"]):
        result = run_cli("--env", "CartPole-v1", "--total-steps", "1024", "--num-envs", "4", "--steps-per-env",
                         "128", "--hidden", "8", "--out", str(tmp_path / f"run{len(quiet)}"), *quiet)
        assert result.returncode == 0, result.stderr
        assert "\r" not in result.stderr and "step/s]" not in result.stderr, result.stderr
        assert sum(line.startswith("it ") for line in result.stdout.splitlines()) == 2
    result = run_cli("--eval", str(tmp_path / "run0" / "policy.npz"), "--quiet")
    assert result.returncode == 2 and "--quiet is for training" in result.stderr


def test_gif_never_replaces_a_file_and_leaves_none_half_written(tmp_path, monkeypatch):
    """--gif onto a file that exists, or onto a symlink (to a file, or dangling), or a folder named d.gif, is
    refused in one sentence (a UserError, before any episode), and the file, the link and its target are as
    they were. write_gif on a disk that fills as it writes raises UserError and leaves no file at all; into
    a name taken meanwhile it keeps that file. A name that is only '.gif' is a file name like any other:
    the GIF is written there."""
    policy = str(tmp_path / "policy.npz")
    run_files.save_policy(policy, [4, 8, 2], MLP([4, 8, 2]).init(np.random.default_rng(0)), "CartPole-v1")
    kept = tmp_path / "kept.gif"
    kept.write_bytes(b"a student's file")
    link = tmp_path / "link.gif"
    link.symlink_to(kept)
    dangling = tmp_path / "dangling.gif"
    dangling.symlink_to(tmp_path / "nowhere.gif")
    (tmp_path / "d.gif").mkdir()
    for target, words in [(kept, "exists already"), (link, "exists already"), (dangling, "exists already"),
                          (tmp_path / "d.gif", "is a folder")]:
        with pytest.raises(cli.UserError, match=f"^--gif: '{target}' {words}"):
            cli.run_evaluation(policy, 1, True, str(target))
    assert kept.read_bytes() == b"a student's file" and os.readlink(link) == str(kept)
    assert not (tmp_path / "nowhere.gif").exists()
    monkeypatch.chdir(tmp_path)
    cli.run_evaluation(policy, 1, True, ".gif")
    assert (tmp_path / ".gif").read_bytes()[:6] == b"GIF89a"
    monkeypatch.undo()

    from PIL import Image
    frames = [np.zeros((8, 8, 3), np.uint8)] * 4

    def disk_fills(image, fp, *args, **kwargs):
        open(fp, "wb").write(b"GIF89a, then")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", disk_fills)
    with pytest.raises(cli.UserError, match="No space left on device"):
        run_files.write_gif(str(tmp_path / "full.gif"), frames, fps=50)
    assert sorted(os.listdir(tmp_path)) == sorted([".gif", "d.gif", "dangling.gif", "kept.gif", "link.gif", "policy.npz"])
    monkeypatch.undo()

    def taken_meanwhile(image, fp, *args, **kwargs):
        (tmp_path / "taken.gif").write_bytes(b"taken")  # another program takes the name meanwhile
        open(fp, "wb").write(b"GIF89a")
    monkeypatch.setattr(Image.Image, "save", taken_meanwhile)
    with pytest.raises(cli.UserError, match="appeared while the animation was drawn"):
        run_files.write_gif(str(tmp_path / "taken.gif"), frames, fps=50)
    assert (tmp_path / "taken.gif").read_bytes() == b"taken"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_an_evaluation_says_episode_in_the_singular_and_checks_the_gif_folder_first(tmp_path):
    """--eval --episodes 1 prints '1 evaluation episode'; a --gif into a folder that does not exist is refused
    in one sentence before any episode is played (no traceback)."""
    cli.train(short_config(tmp_path, "run", total_steps=512), verbose=False)
    policy = str(tmp_path / "run" / "policy.npz")
    result = run_cli("--eval", policy, "--episodes", "1")
    assert result.returncode == 0 and "1 evaluation episode (" in result.stdout, result.stdout
    result = run_cli("--eval", policy, "--episodes", "1", "--gif", str(tmp_path / "missing" / "a.gif"))
    assert result.returncode == 2 and "cannot write into" in result.stderr and "Traceback" not in result.stderr


def test_the_project_from_python_trains_loads_and_acts(tmp_path):
    """The README's example for a notebook: train(Config) from Python, load the written policy, act on an
    observation. The loaded weights are the trained ones; cli.act's action is the argmax of the policy's
    logits (greedy) computed by hand; a bad value is refused by train in one sentence (UserError)."""
    import cli
    cfg = T.scheme_config("single", env="CartPole-v1", total_steps=1024, num_envs=4, steps_per_env=128,
                          hidden=(16, 16), out=str(tmp_path / "notebook"))
    net, theta, history = cli.train(cfg, verbose=False)
    loaded_net, loaded_theta, env_id = cli.load_policy(str(tmp_path / "notebook" / "policy.npz"))
    assert np.array_equal(loaded_theta, theta) and loaded_net.sizes == net.sizes and env_id == "CartPole-v1"
    env = cli.make_env(env_id)
    obs, _ = env.reset(seed=0)
    W1, b1, W2, b2, W3, b3 = [a for layer in net.unflatten(theta) for a in layer]
    logits = np.tanh(np.tanh(obs @ W1 + b1) @ W2 + b2) @ W3 + b3
    assert cli.act(loaded_net, loaded_theta, obs) == int(np.argmax(logits))
    env.close()
    with pytest.raises(run_files.UserError, match="--max-kl must be positive"):
        cli.train(T.scheme_config("single", env="CartPole-v1", max_kl=-1.0, out=str(tmp_path / "bad")))


# ----------------------------------------------------------------------------
# exercise.py: nothing lost, nothing false
# ----------------------------------------------------------------------------

def run_exercise(*args, script=None, cwd=None, timeout=120):
    """exercise.py (this project's, or `script`) run in a new process."""
    return subprocess.run([sys.executable, script or os.path.join(HERE, "exercise.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(result, *words):
    """Exit code 2 and one line on stderr holding `words`, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def test_exercise_check_refuses_a_folder_not_made_for_that_exercise(tmp_path):
    """check kl --from the copy made for gae (whose network.py holds the reference kl, which passes kl's
    tests) is refused, exit 2 in one sentence naming gae; so is a folder of the project's files that make did
    not write (no .exercise file); the copy made for kl itself is checked (its blank kl fails, exit 1)."""
    import exercise
    assert run_exercise("make", "gae", "--into", str(tmp_path / "gae")).returncode == 0
    other = run_exercise("check", "kl", "--from", str(tmp_path / "gae"))
    assert_refused(other, "made for exercise gae", "check gae --from")
    assert "Well done" not in other.stdout
    exercise.copy_project(HERE, str(tmp_path / "plain"))
    assert_refused(run_exercise("check", "kl", "--from", str(tmp_path / "plain")), ".exercise")
    assert run_exercise("make", "kl", "--into", str(tmp_path / "kl")).returncode == 0
    own = run_exercise("check", "kl", "--from", str(tmp_path / "kl"))
    assert own.returncode == 1 and "NotImplementedError" in own.stdout


def test_exercise_check_runs_the_projects_tests_not_the_students_copy_of_them(tmp_path):
    """With kl blank and the copy's test_trpo.py edited so that kl's tests pass trivially (and a conftest.py
    beside it), check still fails (exit 1): it runs this project's test_trpo.py on the copy's network.py.
    With the reference kl in the copy's network.py, it passes (exit 0, 'Well done'), the edits still there."""
    import exercise
    copy = tmp_path / "kl"
    assert run_exercise("make", "kl", "--into", str(copy)).returncode == 0
    (copy / "test_trpo.py").write_text("".join(f"def {name}():\n    pass\n\n\n"
                                               for name in exercise.BY_NAME["kl"].tests))
    (copy / "conftest.py").write_text("import pytest\n\n\n@pytest.hookimpl(tryfirst=True)\n"
                                      "def pytest_runtest_call(item):\n    item.runtest = lambda: None\n")
    blank = run_exercise("check", "kl", "--from", str(copy))
    assert blank.returncode == 1, blank.stdout[-2000:]
    assert "NotImplementedError" in blank.stdout and "Well done" not in blank.stdout
    (copy / "network.py").write_text(open(os.path.join(HERE, "network.py")).read())  # the right answer
    answer = run_exercise("check", "kl", "--from", str(copy))
    assert answer.returncode == 0 and "all tests pass. Well done." in answer.stdout, answer.stdout[-2000:]
    assert "3 passed" in answer.stdout


def looping_kl_answer(tmp_path):
    """A copy made for exercise kl whose answer writes its process id to a file, then loops forever:
    (the copy's folder, that file)."""
    import exercise
    copy = tmp_path / "kl"
    assert run_exercise("make", "kl", "--into", str(copy)).returncode == 0
    pid_file = tmp_path / "pid"
    network = copy / "network.py"
    network.write_text(exercise.replace_body(network.read_text(), "kl", f"""
        import os
        with open({str(pid_file)!r}, "w") as f:
            f.write(str(os.getpid()))
        while True:
            pass
        """))
    return copy, pid_file


def test_exercise_check_stops_an_answer_that_never_finishes(tmp_path):
    """An answer that loops forever: check --timeout 2 stops the tests after 2 s and says in one sentence that
    the answer did not finish in time, exit code 1; the process that ran the loop is gone. --timeout 0 is
    refused (exit 2)."""
    import time
    copy, pid_file = looping_kl_answer(tmp_path)
    started = time.monotonic()
    result = run_exercise("check", "kl", "--from", str(copy), "--timeout", "2", timeout=90)
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
    assert "kl: the answer did not finish in 2 s" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr and result.stdout.strip().splitlines()[-1].endswith(".")
    assert time.monotonic() - started < 60
    pid = int(pid_file.read_text())  # the loop did run
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    no_time = run_exercise("check", "kl", "--from", str(copy), "--timeout", "0")
    assert no_time.returncode == 2 and "Traceback" not in no_time.stderr
    assert "--timeout: must be a positive number of seconds" in no_time.stderr.strip().splitlines()[-1]


def test_exercise_check_fails_an_answer_that_ends_the_test_process(tmp_path):
    """An answer whose body is `import os; os._exit(0)` ends pytest with exit code 0 before it can report
    a single result: check says "not yet" (exit 1), never "Well done", and says the process ended early."""
    import exercise
    copy = tmp_path / "kl"
    assert run_exercise("make", "kl", "--into", str(copy)).returncode == 0
    network = copy / "network.py"
    network.write_text(exercise.replace_body(network.read_text(), "kl", "import os\nos._exit(0)\n"))
    result = run_exercise("check", "kl", "--from", str(copy))
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Well done" not in result.stdout and "kl: not yet" in result.stdout
    assert "ended (exit code 0) before pytest could report" in result.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals, reads /proc")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_a_signal_to_exercise_check_stops_the_tests_it_runs(tmp_path, signal_name):
    """SIGTERM (or SIGHUP, a closed terminal) to `exercise.py check` while the answer loops forever: check
    exits with 128 + the signal's number, without a traceback, and the process running the loop is gone."""
    import signal
    import time
    copy, pid_file = looping_kl_answer(tmp_path)
    check = subprocess.Popen([sys.executable, os.path.join(HERE, "exercise.py"), "check", "kl", "--from", str(copy)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    loop_pid = int(pid_file.read_text())
    check.send_signal(getattr(signal, signal_name))
    _, stderr = check.communicate(timeout=30)
    assert check.returncode == 128 + getattr(signal, signal_name), stderr
    assert "Traceback" not in stderr and "stopped: check did not finish." in stderr
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(loop_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(loop_pid, 0)


def test_exercise_py_says_in_one_sentence_what_it_cannot_do(tmp_path):
    """exercise.py's bad input and a project that has changed under it, each one sentence on stderr, no
    usage dump, no traceback: an unknown exercise (exit 2), `make --into ""` (exit 2, nothing written),
    and, in a copy of the project, `verify` with test_trpo.py missing and `make kl` once kl is renamed
    (exit 1; make writes no copy at all)."""
    import exercise
    for args, words in ((["make", "nosuch"], "invalid choice: 'nosuch'"),
                        (["make", "kl", "--into", ""], "--into needs a folder name")):
        assert_refused(run_exercise(*args, cwd=tmp_path), words)
    assert os.listdir(tmp_path) == []
    project = tmp_path / "project"
    project.mkdir()
    for name in exercise.PROJECT_FILES + ["exercise.py"]:
        (project / name).write_text(open(os.path.join(HERE, name)).read())
    network = project / "network.py"
    network.write_text(network.read_text().replace("\ndef kl(", "\ndef kl_divergence("))
    renamed = run_exercise("make", "kl", "--into", str(tmp_path / "copy"), script=str(project / "exercise.py"),
                           cwd=tmp_path)
    assert renamed.returncode == 1 and "Traceback" not in renamed.stderr, renamed.stderr
    assert "has no function kl any more" in renamed.stderr and len(renamed.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "copy").exists()
    (project / "test_trpo.py").unlink()
    missing = run_exercise("verify", script=str(project / "exercise.py"), cwd=tmp_path)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr
    assert "test_trpo.py is missing" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_exercise_make_refuses_unwritable_folders_and_the_projects_own_files(tmp_path):
    """make --into a path under a regular file (unwritable even for root), or /proc/x: exit 2, one sentence.
    --into the project itself with --force (a copy of the project, with its exercise.py, so that this test can
    never write over this one), as '.' or by its path; --into another folder holding the project's code; and
    --into a folder of files that make did not write: each refused, exit 2 in one sentence, every file as it
    was."""
    import exercise
    (tmp_path / "a-file").write_text("")
    assert_refused(run_exercise("make", "kl", "--into", str(tmp_path / "a-file" / "copy")), "cannot write")
    if sys.platform.startswith("linux"):
        assert_refused(run_exercise("make", "kl", "--into", "/proc/x"), "cannot write")
    project = tmp_path / "project"
    exercise.copy_project(HERE, str(project))
    (project / "exercise.py").write_text(open(os.path.join(HERE, "exercise.py")).read())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "network.py").write_text("# my own network\n")

    def contents():
        return {path: path.read_bytes() for folder in (project, mine) for path in sorted(folder.iterdir())}
    before = contents()
    for script, into, cwd in ((project / "exercise.py", ".", project),
                              (project / "exercise.py", str(project), tmp_path),
                              (None, str(project), None)):
        assert_refused(run_exercise("make", "kl", "--into", into, "--force", script=script and str(script),
                                    cwd=cwd), "the project's own code")
    assert_refused(run_exercise("make", "kl", "--into", str(mine), "--force"), "network.py", ".exercise")
    assert contents() == before


def test_exercise_copies_are_ignored_by_git():
    """.gitignore ignores the exercise-NAME/ folders that make writes by default (and git agrees, where this
    is a git work tree)."""
    import fnmatch
    import shutil
    with open(os.path.join(HERE, ".gitignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert any(fnmatch.fnmatch("exercise-gae/", pattern) for pattern in patterns), patterns
    if shutil.which("git") and subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=HERE,
                                              capture_output=True).returncode == 0:
        assert subprocess.run(["git", "check-ignore", "-q", "--no-index", "exercise-gae/trpo_numpy.py"],
                              cwd=HERE).returncode == 0


def test_the_notebook_runs_top_to_bottom(monkeypatch):
    """trpo_lunar_lander.ipynb, executed in a new kernel (nbclient) with the tiny budgets TRPO_NOTEBOOK_QUICK=1
    sets: every cell runs without an error; the explicit Fisher agrees with the code's product to 1e-10,
    and CG's 10 iterations with the exact solve to 1e-3; GAE with lambda = 1 equals the return-to-go minus V;
    the vine's cell prints a Q for each of the four actions and Eq. (15)'s value; the lander is shown
    as a GIF. The notebook is committed without outputs, so none can disagree with its code."""
    import nbformat
    from nbclient import NotebookClient
    path = os.path.join(HERE, "trpo_lunar_lander.ipynb")
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    monkeypatch.setenv("TRPO_NOTEBOOK_QUICK", "1")
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    fisher_error = float(printed.split("|F v - explicit F v| / |F v| = ")[1].split()[0])
    cg_error = float(printed.split("CG, 10 iterations: relative error ")[1].split()[0])
    assert fisher_error < 1e-10 and cg_error < 1e-3, (fisher_error, cg_error)
    assert all(f"  action {a}: Q = " in printed for a in range(4)) and "Eq. (15): L = " in printed
    assert "GAE with lambda = 1 equals Q - V: True" in printed
    assert any("image/gif" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs)


def test_exercise_list_follows_the_order_of_exercises_md():
    """EXERCISES.md's headings '## N. `function` (file)' are numbered 1, 2, ... and name, in order, the
    functions and files of exercise.EXERCISES; each section's make command names its exercise; and
    `exercise.py list` gives the exercises in that order."""
    import re
    import exercise
    with open(os.path.join(HERE, "EXERCISES.md")) as f:
        text = f.read()
    headings = re.findall(r"^## (\d+)\. `([\w.]+)` \(([\w.]+)\)$", text, re.MULTILINE)
    assert [int(number) for number, _, _ in headings] == list(range(1, len(headings) + 1))
    assert [(function, file) for _, function, file in headings] == \
        [(e.function, e.file) for e in exercise.EXERCISES]
    assert re.findall(r"^- Make it: `python exercise\.py make (\w+)`", text, re.MULTILINE) == \
        [e.name for e in exercise.EXERCISES]
    listed = run_exercise("list")
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [e.name for e in exercise.EXERCISES]


# ----------------------------------------------------------------------------
# bench.py: nothing lost, nothing silent
# ----------------------------------------------------------------------------

def files_under(folder):
    """{path relative to folder: its bytes} of every file under folder."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def small_scheme_config(real):
    """trpo_numpy.scheme_config, but CartPole-v1 with a batch of 4 x 64 steps and one process: a bench
    seed of --total-steps 512 trains in a moment."""
    import dataclasses

    def scheme_config(scheme="single", **given):
        return dataclasses.replace(real(scheme, **given), env="CartPole-v1", num_envs=4, steps_per_env=64,
                                   hidden=(8,), workers=1, vine_states=8, vine_horizon=10)
    return scheme_config


@pytest.fixture
def bench_module(tmp_path, monkeypatch):
    """bench.py imported into this process, run in tmp_path, with a constant for the simulator's ceiling,
    bench_results/ and plots/ (the published results) in tmp_path, and the signal handlers and unraisable
    hook it installs restored afterwards."""
    import signal
    import bench
    handlers = {s: signal.getsignal(s) for s in parallel.STOP_SIGNALS}
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # bench.main installs its own: pytest's comes back
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "raw_ceiling", lambda env_id, steps=0, seed=0: 10_000.0)
    monkeypatch.setattr(bench, "PUBLISHED_RESULTS", str(tmp_path / "bench_results"), raising=False)
    monkeypatch.setattr(bench, "PUBLISHED_PLOTS", str(tmp_path / "plots"), raising=False)
    yield bench
    for stop_signal, handler in handlers.items():
        signal.signal(stop_signal, handler)


@pytest.fixture
def fast_bench(bench_module, monkeypatch):
    """bench_module whose seeds train on CartPole-v1 with a small batch (small_scheme_config)."""
    monkeypatch.setattr(T, "scheme_config", small_scheme_config(T.scheme_config))
    monkeypatch.setattr(bench_module, "restore_cost", lambda cfg, branches=0: (1e-3, 10.0))
    return bench_module


def run_bench(bench, capsys, *args):
    """bench.main(args) in this process: (exit code, stdout, stderr)."""
    try:
        code = bench.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped bench.main")
    captured = capsys.readouterr()
    return code or 0, captured.out, captured.err


def test_bench_never_deletes_or_overwrites_what_it_did_not_make(fast_bench, tmp_path, capsys):
    """A user's run in <out>/runs/single-seed0 (with a file of their own in it), a folder <out>/single and
    files <out>/single.md, <out>/single.json of theirs: two benchmarks of seed 0 with --out leave every one
    of those bytes as they were, the second leaves every file of the first as it was, and each seed's run is
    in a folder of its own that holds its run."""
    out = tmp_path / "out"
    user_run = out / "runs" / "single-seed0"
    user_run.mkdir(parents=True)
    (user_run / "config.json").write_text('{"mine": true}')
    (user_run / "my-notes.txt").write_text("my notes")
    (out / "single").mkdir()
    (out / "single" / "single.md").write_text("my table")
    (out / "single.md").write_text("my table")
    (out / "single.json").write_text("{}")
    before = files_under(out)
    run_dirs = []
    for _ in range(2):
        earlier = files_under(out)
        code, _, err = run_bench(fast_bench, capsys, "--seeds", 0, "--total-steps", 512, "--eval-episodes", 2,
                                 "--out", out)
        assert code == 0, err
        after = files_under(out)
        assert {k: after.get(k) for k in earlier} == earlier  # nothing there before was changed or removed
        tables = sorted(set(after) - set(earlier))
        written = [os.path.join(out, k) for k in tables if k.endswith(".json") and "runs" not in k]
        assert len(written) == 1, tables
        with open(written[0]) as f:
            run_dirs += [r["run_dir"] for r in json.load(f)["results"]]
    assert files_under(out).items() >= before.items()
    assert len(set(run_dirs)) == 2 and str(user_run) not in run_dirs
    for run_dir in run_dirs:
        assert run_files.holds_a_run(run_dir) and os.path.exists(os.path.join(run_dir, "policy.npz"))


def test_bench_writes_the_published_results_only_with_publish(fast_bench, tmp_path, capsys, monkeypatch):
    """A quick benchmark with the default --out leaves bench_results/single.md, .json and
    plots/single_learning_curves.png (what README.md shows) as they were, and writes its own into a new
    folder, bench_runs/single; with --publish it replaces those three and leaves plots/trust_region.png.
    --trust-region-demo writes plots/trust_region.png only with --publish too. The docstring's usage lines
    name --publish as the command that regenerates the published results."""
    published = {"bench_results/single.md": "published", "bench_results/single.json": "{}",
                 "plots/single_learning_curves.png": "published", "plots/trust_region.png": "published"}
    for name, text in published.items():
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        (tmp_path / name).write_text(text)

    def unchanged():
        return {name for name, text in published.items() if (tmp_path / name).read_text(errors="replace") == text}

    quick = ["--seeds", 0, "--total-steps", 512, "--eval-episodes", 2]
    code, _, err = run_bench(fast_bench, capsys, *quick)
    assert code == 0, err
    assert unchanged() == set(published)
    assert (tmp_path / "bench_runs" / "single" / "single.md").read_text().startswith("Produced by")
    assert (tmp_path / "bench_runs" / "single" / "single_learning_curves.png").exists()
    code, _, err = run_bench(fast_bench, capsys, *quick, "--publish")
    assert code == 0, err
    assert unchanged() == {"plots/trust_region.png"}
    assert (tmp_path / "bench_results" / "single.md").read_text().startswith("Produced by")
    assert (tmp_path / "bench_runs" / "single-2" / "single.md").exists()  # its own copy, in a new folder

    def small_demo(seed, trust_region, total_steps=None, out=""):
        return short_config(tmp_path, "unused", seed=seed, trust_region=trust_region, max_kl=1.0,
                            total_steps=total_steps or 256, num_envs=4, steps_per_env=64, workers=1, out=out)
    monkeypatch.setattr(fast_bench, "trust_region_config", small_demo, raising=False)
    code, _, err = run_bench(fast_bench, capsys, "--trust-region-demo", "--total-steps", 256)
    assert code == 0, err
    assert "plots/trust_region.png" in unchanged()
    assert (tmp_path / "bench_runs" / "trust-region" / "trust_region.png").exists()
    code, _, err = run_bench(fast_bench, capsys, "--trust-region-demo", "--total-steps", 256, "--publish")
    assert code == 0, err
    assert not unchanged()
    usage = fast_bench.__doc__.split("Usage:")[1]
    for published_file in ("bench_results/single", "bench_results/vine", "plots/trust_region.png"):
        assert any(published_file in line and "--publish" in line for line in usage.splitlines()), published_file


@pytest.mark.parametrize("args, words", [
    (["--seeds", "-1"], "--seeds must be zero or positive"),
    (["--seeds", "0", "3", "-2"], "--seeds must be zero or positive, got -2"),
    (["--total-steps", "10"], "more environments than --total-steps 10"),
    (["--scheme", "vine", "--total-steps", "10"], "more environments than --total-steps 10"),
    (["--eval-episodes", "0"], "--eval-episodes must be positive"),
    (["--out", "/proc/x"], "cannot make the folder"),
    (["--out", "{tmp}/a-file/below-it"], "cannot make the folder"),  # fails for root too
    (["--env", "Pendulum-v1"], "Pendulum-v1 has no reward threshold; give the return"),
    (["--env", "NoSuchEnv-v0"], "unknown environment"),
    (["--target", "nan"], "--target must be a finite number"),
    (["--env", "Pendulum-v1", "--trust-region-demo"], "--trust-region-demo runs on LunarLander-v3 only"),
    (["--seeds", "0", "0"], "--seeds lists seed 0 more than once"),
    (["--trust-region-demo", "--scheme", "vine"], "--trust-region-demo trains the single path only"),
    (["--total-steps", "1024"], "--total-steps 1,024 is less than one iteration, whose batch is 16,384 steps"),
])
def test_bench_refuses_bad_input_before_training_in_one_sentence(bench_module, tmp_path, capsys, monkeypatch,
                                                                  args, words):
    """bench.py with a negative seed, fewer --total-steps than one step of every environment (for either
    scheme) or than one iteration, no evaluation episodes, an --out it cannot make (in /proc, below a regular
    file), a seed given twice, the trust-region demo of another scheme: exit code 2, one sentence on stderr,
    no traceback, and no training started."""
    def no_training(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(cli, "train", no_training)
    (tmp_path / "a-file").write_text("")
    code, _, err = run_bench(bench_module, capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_bench_refuses_a_read_only_out_and_too_few_steps_as_a_program(tmp_path):
    """As a program: bench.py --total-steps 10 and, where permissions hold (not for root), --out a folder
    it may not write in: exit code 2, one line on stderr, no traceback."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    cases = [["--total-steps", "10"]]
    if not os.access(read_only, os.W_OK):  # root may write anywhere
        cases.append(["--out", str(read_only), "--total-steps", "16384"])
    for args in cases:
        result = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), *args], capture_output=True,
                                text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    read_only.chmod(0o700)


BENCH_DRIVER = """
import dataclasses, sys
import bench, trpo_numpy as T
real = T.scheme_config
def scheme_config(scheme="single", **given):  # seed 0 trains 512 steps of CartPole, seed 1 until stopped
    cfg = real(scheme, **given)
    return dataclasses.replace(cfg, env="CartPole-v1", num_envs=4, steps_per_env=64, hidden=(8,), workers=1,
                               total_steps=512 if cfg.seed == 0 else 10 ** 9)
T.scheme_config = scheme_config
bench.raw_ceiling = lambda env_id, steps=0, seed=0: 10000.0
sys.exit(bench.main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="sends SIGINT")
def test_bench_ctrl_c_keeps_the_finished_seeds_and_says_where_in_one_line(tmp_path):
    """Ctrl-C (SIGINT) while seed 1 trains, seed 0 finished: exit code 130, no traceback, a last line saying
    seed 0 finished and naming the folder whose table holds its results; seed 1's run saved in its folder."""
    import glob
    import signal
    import time
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=HERE)
    process = subprocess.Popen([sys.executable, "-c", BENCH_DRIVER, "--seeds", "0", "1", "--eval-episodes", "2",
                                "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not glob.glob(str(out / "**" / "single-seed1*" / "progress.csv"), recursive=True):
        assert process.poll() is None and time.time() < deadline, "seed 1 never started"
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped: seed 0 finished") and "seed 1's unfinished run is in" in last, last
    folder = last.split("results are in ")[1].split(" (")[0]
    assert "| 0 |" in (tmp_path / folder / "single.md").read_text()
    with open(tmp_path / folder / "single.json") as f:
        assert [r["seed"] for r in json.load(f)["results"]] == [0]
    seed1 = last.split("unfinished run is in ")[1].rstrip(".")
    assert os.path.exists(tmp_path / seed1 / "checkpoint.npz")


@needs_fork
def test_bench_total_steps_applies_to_the_vine(fast_bench, capsys, monkeypatch):
    """bench.py --scheme vine --total-steps 512 trains each seed for 512 trunk steps (not the vine's
    default of 150 iterations), and --help says --total-steps applies to the vine."""
    real_train, totals = cli.train, []

    def train(cfg, **kwargs):
        totals.append(cfg.total_steps)
        assert cfg.total_steps == 512, "the vine's --total-steps was ignored"
        return real_train(cfg, **kwargs)
    monkeypatch.setattr(cli, "train", train)
    code, _, err = run_bench(fast_bench, capsys, "--scheme", "vine", "--seeds", 0, "--total-steps", 512,
                             "--eval-episodes", 2)
    assert code == 0, err
    assert totals == [512]
    with open(os.path.join("bench_runs", "vine", "vine.json")) as f:
        assert json.load(f)["results"][0]["total_env_steps"] == 512
    code, out, _ = run_bench(fast_bench, capsys, "--help")
    help_text = " ".join(out.split())
    assert code == 0 and "--total-steps" in help_text
    total_steps_help = help_text.split("--total-steps TOTAL_STEPS")[-1].split("--eval-episodes EVAL_EPISODES")[0]
    assert "vine" in total_steps_help and "when given" in total_steps_help


def test_bench_vine_stops_where_the_vine_does_and_never_before_the_target(bench_module):
    """bench.seed_config: a vine seed stops where the vine's defaults stop it (240 on both landers, past the
    target of 200), at a --target above that, and at the target where there is no default (Pendulum-v1)."""
    assert bench_module.seed_config("vine", 0, None, "", target=200).stop_return == 240
    assert bench_module.seed_config("vine", 0, None, "", env="LunarLanderContinuous-v3", target=200).stop_return == 240
    assert bench_module.seed_config("vine", 0, None, "", target=260).stop_return == 260
    assert bench_module.seed_config("vine", 0, None, "", env="Pendulum-v1", target=-300).stop_return == -300
    assert bench_module.seed_config("single", 0, None, "", target=200).stop_return is None


def test_bench_says_when_a_seed_did_not_reach_200(fast_bench, capsys):
    """A seed whose rolling mean never reached 200: its line says so, with the steps it trained and the
    rolling mean at the end, and never prints 'never' as a number of steps or seconds."""
    code, _, err = run_bench(fast_bench, capsys, "--seeds", 0, "--total-steps", 512, "--eval-episodes", 2)
    assert code == 0, err
    line = next(line for line in err.splitlines() if line.startswith("seed 0:") and "training" not in line)
    assert "did not reach 200 in 512 steps" in line and "rolling mean" in line and "never" not in line, line


def test_bench_seeds_default_to_0_to_9(bench_module, capsys):
    """bench.py's --seeds is 0 1 2 ... 9 by default, for either scheme, and --help says so."""
    assert bench_module.build_parser().parse_args([]).seeds == list(range(10))
    assert bench_module.build_parser().parse_args(["--scheme", "vine"]).seeds == list(range(10))
    code, out, _ = run_bench(bench_module, capsys, "--help")
    assert code == 0 and "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in " ".join(out.split())


# ----------------------------------------------------------------------------
# A review's findings: resume among other files, a stop before the first iteration, the README's example
# ----------------------------------------------------------------------------

def test_a_resume_refuses_a_folder_of_other_files(tmp_path):
    """--resume --out into a folder of someone else's files (plots, another tool's progress.csv) is refused in
    one sentence with exit code 2, and those files are left as they were."""
    cli.train(short_config(tmp_path, "run", total_steps=512), verbose=False)
    foreign = tmp_path / "plots"
    foreign.mkdir()
    (foreign / "progress.csv").write_text("step,reward\n1,2\n")
    result = run_cli("--resume", str(tmp_path / "run" / "checkpoint.npz"), "--out", str(foreign),
                     "--total-steps", "1024")
    assert result.returncode == 2 and "is not empty and holds no run" in result.stderr, result.stderr
    assert sorted(os.listdir(foreign)) == ["progress.csv"] and "1,2" in (foreign / "progress.csv").read_text()


def test_a_folder_name_the_terminal_cannot_encode_is_printed_escaped(tmp_path):
    """With PYTHONIOENCODING=ascii, a run into a folder named 'run-\u03b4' finishes (exit 0, no traceback) and
    prints the folder with a backslash escape."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "trpo_numpy.py"), *TINY_RUN, "--quiet",
                             "--out", str(tmp_path / "run-\u03b4")], capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr[-2000:]
    assert b"run-\\u03b4" in result.stdout and (tmp_path / "run-\u03b4" / "checkpoint.npz").exists()


def test_a_resume_never_replaces_a_later_point_of_its_run_and_says_when_config_json_was_edited(tmp_path):
    """A run trained to iteration 1, its checkpoint kept aside, then resumed in its folder to iteration 2:
    resuming the kept iteration-1 checkpoint with --out that folder is refused in one sentence (exit 2),
    the folder's checkpoint still at iteration 2. With config.json's max_kl edited by hand, a resume in the
    folder says in a note that the checkpoint's 0.04 is kept, and config.json says 0.04 again."""
    import shutil
    run = tmp_path / "run"
    assert run_cli(*TINY_RUN, "--total-steps", "64", "--out", str(run)).returncode == 0
    shutil.copy(run / "checkpoint.npz", tmp_path / "iteration1.npz")
    assert run_cli("--resume", str(run / "checkpoint.npz"), "--total-steps", "128").returncode == 0
    assert_refused(run_cli("--resume", str(tmp_path / "iteration1.npz"), "--out", str(run), "--total-steps", "192"),
                   "holds this run at iteration 2, later than the 1 resumed from")
    assert cli.read_checkpoint(str(run / "checkpoint.npz"))[0]["iteration"] == 2
    settings = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**settings, "max_kl": 0.5}))
    resumed = run_cli("--resume", str(run / "checkpoint.npz"), "--total-steps", "192")
    assert resumed.returncode == 0, resumed.stderr
    assert "note: config.json in" in resumed.stderr and "says max_kl 0.5, but the checkpoint 0.04" in resumed.stderr
    assert json.loads((run / "config.json").read_text())["max_kl"] == 0.04


def test_a_stop_before_the_first_iteration_leaves_a_run_to_resume(tmp_path, monkeypatch):
    """Ctrl-C while the workers start (after the folder is made): the folder holds an iteration-0 checkpoint
    that --resume accepts, not a half-made run that blocks the next one."""
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "make_sampler", interrupted)
    cfg = short_config(tmp_path, "run", total_steps=1024)
    with pytest.raises(KeyboardInterrupt):
        cli.train(cfg, verbose=False)
    saved, saved_cfg = cli.read_checkpoint(str(tmp_path / "run" / "checkpoint.npz"))
    assert saved["iteration"] == 0 and saved["env_steps"] == 0 and saved_cfg.out == cfg.out
    monkeypatch.undo()
    result = run_cli("--resume", str(tmp_path / "run" / "checkpoint.npz"))
    assert result.returncode == 0 and "done: 1,024 env steps" in result.stdout, result.stderr


def test_the_readmes_notebook_example_runs_as_written(tmp_path):
    """The README's Python block, run as a notebook runs it (no script file: python -c) in an empty folder
    with the project importable: it trains, loads the policy it wrote and acts, with exit code 0."""
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    block = block.replace("total_steps=50_000", "total_steps=4096, num_envs=4, steps_per_env=256")
    block += "\nassert action in (0, 1) and os.path.exists(os.path.join(cfg.out, 'policy.npz'))\n"
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": HERE})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pty")
def test_quiet_leaves_no_progress_bar_on_a_terminal(tmp_path):
    """On a terminal (a pty as stderr) a run draws its progress bar; with --quiet it draws none, and the log
    line of each iteration is still printed."""
    import fcntl
    import pty
    import struct
    import termios
    texts = {}
    for quiet in ([], ["--quiet"]):
        primary, secondary = pty.openpty()
        fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 wide
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "trpo_numpy.py"), "--env", "CartPole-v1", "--total-steps", "1024",
             "--num-envs", "4", "--steps-per-env", "128", "--hidden", "8", "--out", str(tmp_path / f"r{len(quiet)}"),
             *quiet], stdout=subprocess.PIPE, stderr=secondary, text=True)
        os.close(secondary)
        chunks = []

        def read_terminal(primary=primary, chunks=chunks):  # while the run lives: a pty drops what is unread
            while True:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                chunks.append(chunk)
        import threading
        reader = threading.Thread(target=read_terminal)
        reader.start()
        stdout, _ = process.communicate(timeout=120)
        reader.join(timeout=10)
        os.close(primary)
        texts[bool(quiet)] = b"".join(chunks).decode(errors="replace")
        assert process.returncode == 0 and sum(line.startswith("it ") for line in stdout.splitlines()) == 2
    assert "step/s" in texts[False] or "step]" in texts[False], texts[False]  # the bar, on a terminal
    assert "step/s" not in texts[True] and "step]" not in texts[True], texts[True]


def test_the_plots_follow_a_checkpoint_once_their_interval_has_passed(tmp_path, monkeypatch):
    """With the plots' interval passed (PLOT_EVERY_S = 0), the iteration that writes a checkpoint also
    writes the three figures; one that writes no checkpoint writes none."""
    monkeypatch.setattr(run_files.RunFolder, "PLOT_EVERY_S", 0)
    cfg = short_config(tmp_path, "run", total_steps=512, save_every=2)
    run, snapshot = small_run_folder(cfg)
    figures = ["diagnostics.png", "learning_curve.png", "theory.png"]
    for iteration in (1, 2):
        row = {k: 0.5 for k in run_files.PROGRESS_COLUMNS}
        row.update(iteration=iteration, env_steps=512 * iteration, trunk_steps=512, rollout_states=0, skipped="")
        run.history.append(row)
        run.record(row, snapshot)
        written = [name for name in figures if os.path.exists(os.path.join(cfg.out, name))]
        assert written == ([] if iteration == 1 else figures), iteration
    run.lock.close()


def test_exercise_py_says_when_pytest_is_missing_and_refuses_a_folder_of_other_files(tmp_path, monkeypatch):
    """Without pytest, check/verify/mutants say in one sentence how to install it (exit code 2) instead of
    calling a right answer wrong; make refuses a folder of someone else's files (exit code 2, nothing
    written). cli.act refuses a batch of observations instead of returning one wrong action."""
    import importlib.util
    import cli
    import exercise
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytest"
                        else real_find_spec(name, *a))
    assert exercise.main(["check", "kl", "--from", str(tmp_path)]) == 2
    monkeypatch.undo()
    own = tmp_path / "mine"
    own.mkdir()
    (own / "thesis.tex").write_text("my thesis")
    assert exercise.main(["make", "kl", "--into", str(own)]) == 2
    assert os.listdir(own) == ["thesis.tex"]
    net = MLP([4, 8, 2])
    with pytest.raises(run_files.UserError, match="one observation"):
        cli.act(net, net.init(np.random.default_rng(0)), np.zeros((3, 4)))


def test_crafted_policy_and_checkpoint_files_are_refused_in_one_sentence(tmp_path):
    """A policy.npz or checkpoint.npz of the right format whose fields are missing or of the wrong kind (no
    sizes, float sizes, string weights, 2-D weights, NaN weights; a checkpoint whose iteration is a string,
    whose Adam moments are missing, whose value std is 0, whose --num-envs is a string or whose --hidden
    holds a float) is refused with a UserError naming the file: never a traceback from deep inside. So are
    an observation of the wrong length and a NaN observation handed to cli.act."""
    cli.train(short_config(tmp_path, "run", total_steps=512), verbose=False)
    checkpoint = dict(np.load(tmp_path / "run" / "checkpoint.npz"))
    policy = dict(np.load(tmp_path / "run" / "policy.npz"))
    policies = {"no sizes": {k: v for k, v in policy.items() if k != "sizes"},
                "float sizes": {**policy, "sizes": policy["sizes"].astype(float)},
                "string weights": {**policy, "theta": policy["theta"].astype(str)},
                "2-D weights": {**policy, "theta": policy["theta"][None]},
                "NaN weights": {**policy, "theta": np.full_like(policy["theta"], np.nan)}}
    for name, fields in policies.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **fields)
        with pytest.raises(run_files.UserError, match=f"'{path}' (is damaged|holds weights that are not finite)"):
            cli.load_policy(str(path))
    meta = json.loads(str(checkpoint["meta"]))
    checkpoints = {"string iteration": {**checkpoint, "meta": json.dumps({**meta, "iteration": "3"})},
                   "no moments": {k: v for k, v in checkpoint.items() if k != "adam_m"},
                   "zero std": {**checkpoint, "meta": json.dumps({**meta, "value_std": 0.0})},
                   "string num_envs": {**checkpoint,
                                       "meta": json.dumps({**meta, "config": {**meta["config"], "num_envs": "4"}})},
                   "float hidden": {**checkpoint,
                                    "meta": json.dumps({**meta, "config": {**meta["config"], "hidden": [16.5]}})}}
    for name, fields in checkpoints.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **fields)
        with pytest.raises(run_files.UserError, match=f"'{path}' is (damaged|a checkpoint of another version)"):
            cli.read_checkpoint(str(path))
    net, theta, _ = cli.load_policy(str(tmp_path / "run" / "policy.npz"))
    with pytest.raises(run_files.UserError, match="a vector of 4 numbers, not an array of shape \\(3,\\)"):
        cli.act(net, theta, np.zeros(3))
    with pytest.raises(run_files.UserError, match="not finite"):
        cli.act(net, theta, np.array([0.0, np.nan, 0.0, 0.0]))


def test_a_continuous_run_starts_at_log_std_init_and_writes_a_gaussian_policy(tmp_path):
    """Continuous actions end to end: a short Pendulum run (workers=1) starts its Gaussian policy at
    --log-std-init, so the first step's entropy is d log sigma + d/2 (1 + log 2 pi); its policy.npz loads
    back as a Gaussian policy that cli.act drives, greedy with the mean action."""
    cfg = short_config(tmp_path, "pendulum", env="Pendulum-v1", workers=1, log_std_init=-0.7, total_steps=1024)
    net, theta, history = cli.train(cfg, verbose=False, progress_bar=False)
    assert np.isclose(history[0]["entropy"], -0.7 + 0.5 * (1 + np.log(2 * np.pi)), rtol=1e-12)
    loaded, loaded_theta, env_id = cli.load_policy(os.path.join(cfg.out, "policy.npz"))
    assert type(loaded).__name__ == "GaussianPolicy" and env_id == "Pendulum-v1"
    assert np.array_equal(loaded_theta, theta)
    obs = np.array([1.0, 0.0, 0.5])
    action = cli.act(loaded, loaded_theta, obs)
    assert action.shape == (1,) and np.array_equal(action, loaded.forward(theta, obs[None])[0][0, :1])


def test_bench_on_a_continuous_env_names_its_files_after_it_and_measures_to_its_target(bench_module, tmp_path,
                                                                                      capsys):
    """bench.py --env Pendulum-v1 --target -1000 (a Gaussian policy): its folder and files are named
    Pendulum-v1-single, its table counts steps to -1000, and its JSON records the environment, the target
    and a greedy (mean action) evaluation over the episodes asked."""
    code, out, err = run_bench(bench_module, capsys, "--env", "Pendulum-v1", "--target", -1000, "--seeds", 0,
                               "--total-steps", 8192, "--eval-episodes", 2)
    assert code == 0, err
    folder = tmp_path / "bench_runs" / "Pendulum-v1-single"
    assert (folder / "Pendulum-v1-single.md").exists() and (folder / "Pendulum-v1-single_learning_curves.png").exists()
    assert "steps to -1000" in out
    result = json.loads((folder / "Pendulum-v1-single.json").read_text())["results"][0]
    assert result["env"] == "Pendulum-v1" and result["target"] == -1000
    assert np.isfinite(result["eval_greedy_mean"]) and result["eval_greedy_mean"] < 0


def test_bench_raw_ceiling_steps_a_box_action_space():
    """bench.raw_ceiling on continuous actions (Pendulum-v1, LunarLanderContinuous-v3), whose clipped
    environment has an unbounded action space of its own, steps them and returns a positive, finite rate."""
    import bench  # imported as a module: it installs no signal handlers (main=False)
    for env_id in ("Pendulum-v1", "LunarLanderContinuous-v3"):
        assert 0 < bench.raw_ceiling(env_id, steps=200) < float("inf")
