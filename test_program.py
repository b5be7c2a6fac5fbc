"""test_program.py: the program around the algorithm, checked as a user meets it.

The command line and its answer to bad input (exit code 2, one sentence, no traceback), the help text,
output folders, checkpoints and resuming, Ctrl-C and SIGTERM, worker and branch processes that are
killed or hang, evaluation and its GIF, the plots' tick labels, the input checks of bench.py and
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
import json
import os
import subprocess
import sys

import numpy as np
import pytest

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
    (["--env", "Pendulum-v1"], "Discrete"),
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
])
def test_bad_input_is_one_sentence_and_exit_code_2(tmp_path, args, words):
    """Each bad command line (an unknown or non-Discrete environment; a number that is negative, zero, out of
    range, infinite, NaN or not a number; a size too large, or a setting that cannot learn or would take
    minutes) exits with code 2 and one line on stderr that names the problem, with no traceback."""
    result = run_cli("--total-steps", "64", "--out", str(tmp_path / "x"), *args)  # the last value given wins
    assert result.returncode == 2, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_explains_every_flag():
    """--help names a flag for every field of Config, and mentions delta, gamma and lambda."""
    text = run_cli("--help").stdout
    for f in __import__("dataclasses").fields(T.Config):
        assert "--" + f.name.replace("_", "-") in text
    for symbol in ("delta", "gamma", "lambda"):
        assert symbol in text


def test_a_vine_run_by_default_stops_once_solved_or_after_its_iteration_budget():
    """scheme_config: the vine stops at LunarLander-v3's reward threshold 200 (CartPole-v1's 475) and runs
    VINE_ITERATIONS batches; values given explicitly win; the single-path scheme is the plain Config, with no
    stop return."""
    vine = T.scheme_config("vine")
    assert vine.stop_return == 200  # LunarLander-v3's reward threshold
    assert vine.total_steps == T.VINE_ITERATIONS * vine.batch_size
    assert T.scheme_config("vine", env="CartPole-v1").stop_return == 475
    given = T.scheme_config("vine", total_steps=5000, stop_return=100.0, num_envs=3)
    assert (given.total_steps, given.stop_return, given.num_envs) == (5000, 100.0, 3)
    single = T.scheme_config("single")
    assert single == T.Config() and single.stop_return is None


def test_the_command_line_gives_the_vine_its_defaults(tmp_path):
    """A --scheme vine run from the command line saves in config.json the values given on the command line and
    the vine's own defaults for the rest (its max_kl, and CartPole's stop return 475)."""
    result = run_cli("--scheme", "vine", "--env", "CartPole-v1", "--total-steps", "32", "--num-envs", "2",
                     "--steps-per-env", "8", "--vine-states", "4", "--vine-horizon", "5", "--hidden", "8",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["total_steps"], saved["num_envs"], saved["hidden"]) == (32, 2, [8])  # as given
    assert saved["max_kl"] == T.SCHEME_DEFAULTS["vine"]["max_kl"] and saved["stop_return"] == 475  # the vine's own


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
    T.train(cfg, verbose=False)
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
    """write_npz_atomically with np.savez failing half way (a full disk, simulated): a UserError that says so
    and that the last good copy is kept, no temporary file left behind, and the previous checkpoint byte for
    byte intact and loadable."""
    path = str(tmp_path / "checkpoint.npz")
    run_files.write_npz_atomically(path, format=run_files.CHECKPOINT_FORMAT, theta=np.arange(5.0))
    before = open(path, "rb").read()

    def crash_half_way(f, **arrays):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", crash_half_way)
    with pytest.raises(run_files.UserError, match="cannot write .* No space left on device; the last good"):
        run_files.write_npz_atomically(path, format=run_files.CHECKPOINT_FORMAT, theta=np.zeros(5))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # no half-written temporary file left behind
    assert open(path, "rb").read() == before  # the last good checkpoint is untouched
    assert np.array_equal(np.load(path)["theta"], np.arange(5.0))


def test_resume_continues_the_counters_and_the_csv(tmp_path):
    """The checkpoint holds the run's config; resuming the finished 4-iteration run with a larger total_steps
    runs iterations 5 and 6: iteration, env_steps, wall time and episode count carry on, and progress.csv
    gains rows 5 and 6 after the first four."""
    cfg = short_config(tmp_path, "run", total_steps=2048, save_every=1)  # 4 iterations of 512 steps
    T.train(cfg, verbose=False)
    data, saved_cfg = T.read_checkpoint(str(tmp_path / "run" / "checkpoint.npz"))
    assert saved_cfg == cfg
    longer = T.dataclasses.replace(saved_cfg, total_steps=3072)
    _, theta, history = T.train(longer, verbose=False, resume=data)
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
    _, theta, _ = T.train(cfg, verbose=False)
    data, saved_cfg = T.read_checkpoint(str(tmp_path / "run" / "checkpoint.npz"))
    assert np.array_equal(data["theta"], theta)
    # Resuming with nothing left to do changes nothing and keeps the weights.
    _, theta_again, history = T.train(saved_cfg, verbose=False, resume=data)
    assert np.array_equal(theta_again, theta) and len(history) == 2


def bad_files(tmp_path):
    """A checkpoint, and the damaged or wrong files a user might hand over instead."""
    T.train(short_config(tmp_path, "run", total_steps=512), verbose=False)
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
        (["--eval", str(good), "--gif", str(tmp_path)], "--gif needs a file name ending in .gif"),
        (["--eval", str(good), "--seed", "3"], "--seed is for training"),
        (["--greedy", "--total-steps", "64", "--out", str(tmp_path / "new")], "--greedy goes with --eval"),
    ]
    for args, words in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, args
    same = run_cli("--resume", str(good), "--scheme", "single")  # a setting given again, unchanged: fine
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
    saved, _ = T.read_checkpoint(str(out / "checkpoint.npz"))
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
@pytest.mark.parametrize("signal_name, scheme", [("SIGINT", "single"), ("SIGTERM", "single"), ("SIGINT", "vine")])
def test_a_signal_stops_cleanly_with_a_loadable_checkpoint(tmp_path, signal_name, scheme):
    """SIGINT or SIGTERM after three iterations (single path; and SIGINT on the vine): the run stops within
    10 s with exit code 130, no traceback and the --resume command; its checkpoint loads (iteration >= 3
    although --save-every is 1000), policy.npz has the same shape, and within 10 s no process of its session
    is left."""
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
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=30)
    assert time.time() - sent < 10, "it must stop promptly, not an iteration later"
    assert process.returncode == 130 and "Traceback" not in stderr
    assert f"--resume {out / 'checkpoint.npz'}" in stderr
    data, cfg = T.read_checkpoint(str(out / "checkpoint.npz"))  # written although --save-every is 1000
    assert data["iteration"] >= 3
    assert np.load(out / "policy.npz")["theta"].shape == data["theta"].shape
    while processes_in_session(process.pid) and time.time() - sent < 10:
        time.sleep(0.1)  # the workers see their pipe close and exit by themselves, within moments
    assert processes_in_session(process.pid) == [], "a worker process was left behind"


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
    T.train(short_config(tmp_path, "run"), verbose=False)
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
            monkeypatch.setattr(T.concurrent.futures, "ThreadPoolExecutor", executor)
        cfg = short_config(tmp_path, order, scheme=scheme, vf_epochs=20, vf_minibatch=16, **vine)
        _, theta, history = T.train(cfg, verbose=False)
        saved, _ = T.read_checkpoint(str(tmp_path / order / "checkpoint.npz"))
        runs[order] = (theta, saved["phi"], repr([row["value_loss"] for row in history]))
    for order in ("before", "after"):
        assert np.array_equal(runs[order][0], runs["threads"][0]), order
        assert np.array_equal(runs[order][1], runs["threads"][1]), order  # the value network too
        assert runs[order][2] == runs["threads"][2], order
