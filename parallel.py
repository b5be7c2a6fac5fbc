"""parallel.py: running work in other processes. A reader of the TRPO paper can skip this file.

What is here, none of it about TRPO (it runs whatever functions it is given and
imports nothing from trpo_numpy.py):

* `set_up_process`: the one call a program makes first: `pin_blas_threads` and
  `keep_freed_memory` (settings that make NumPy's small matrix products fast when
  several processes share two cores) and, in the main program, `stop_on_signals`.
* `WorkerProcesses`: long-lived worker processes, started with "spawn", each owning
  an object (an environment sampler, say) whose methods the main process calls;
  `InThisProcess` does the same in this process, for one worker.
* `ForkPool`: runs functions in forked copies of the calling process, at most a
  given number at a time, and collects their results. A fork copies the process
  exactly, simulator included: that is how the vine restores a simulator state.
* `stop_on_signals`: Ctrl-C, SIGTERM and SIGHUP stop a run, even if their KeyboardInterrupt is
  lost in library code (`raise_if_stop_requested`); `signals_held` and
  `ignore_stop_signals` keep a second Ctrl-C from cutting the final save short;
  `ProcessFailed`: a worker or forked child died or hung.

What is not here: sampling, the algorithm, files on disk (see trpo_numpy.py and
run_files.py).
"""

import contextlib
import ctypes
import os
import pickle
import select
import signal
import sys
import time
import traceback


def set_up_process(main):
    """What every process of ours does before it imports NumPy: one BLAS thread, freed memory kept.
    main=True (the program itself, not a worker) also notes a stop signal (Ctrl-C, SIGTERM, SIGHUP) from
    now on, for the program to act on once it is ready (stop_on_signals(interrupt=False)), and prints
    any character (print_any_character)."""
    pin_blas_threads()
    keep_freed_memory()
    if main:
        stop_on_signals(interrupt=False)
        print_any_character()


def print_any_character():
    """A path or an id that the terminal's encoding cannot show (PYTHONIOENCODING=ascii and a folder
    named in Greek) is printed with backslash escapes, rather than ending the program in an error."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def pin_blas_threads():
    """Let BLAS use one thread per process. Must run before NumPy is first imported.

    The matrices here are tiny (a few thousand rows, 64 columns): BLAS threads only add
    overhead, and several processes each spawning threads on 2 cores ran 12x slower."""
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS at once.

    Every NumPy expression on a 4096 x 64 batch allocates a 2 MB temporary. By default
    glibc hands such blocks back to the OS when freed and page-faults them in again on the
    next allocation: measured here, `h @ W + b` took 1.7 ms instead of 0.75 ms. Raising the
    trim and mmap thresholds (mallopt) removes that cost. Elsewhere than glibc, do nothing."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_TRIM_THRESHOLD, 256 * 2 ** 20)
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)
    except (OSError, AttributeError):
        pass


# Ctrl-C, SIGTERM (kill, a cluster's time limit) and, where there is one, SIGHUP (the terminal closed)
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
_stop_requested = 0  # the first stop signal noted once stop_on_signals is in place
_unraisablehook_before = sys.__unraisablehook__  # the hook _drop_lost_interrupt hands every other error to


def _note_stop(signum, frame):
    global _stop_requested
    _stop_requested = _stop_requested or signum
    if signum == getattr(signal, "SIGHUP", None):
        _stop_writing_to_a_closed_terminal()


def exit_code_of_stop():
    """The exit code of a program stopped by a signal, by the shell's convention: 128 + the signal's
    number (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP); 130 if none was noted (a KeyboardInterrupt
    of Python's own)."""
    return 128 + (_stop_requested or signal.SIGINT)


def _stop(signum, frame):
    _note_stop(signum, frame)
    raise KeyboardInterrupt


_terminal_fds = []  # which of stdout and stderr were a terminal when stop_on_signals was set up


def _stop_writing_to_a_closed_terminal():
    """After SIGHUP, every write to the closed terminal fails (EIO), and a failed write in the final save's
    messages, or Python's flush of stdout at exit, would end the program before it has saved. So what
    went to the terminal goes to /dev/null from now on; output redirected to a file still goes there."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in _terminal_fds:
        os.dup2(devnull, fd)
    os.close(devnull)


def stop_on_signals(interrupt=True):
    """Ctrl-C, SIGTERM (kill, a cluster's time limit) and SIGHUP (a closed terminal) stop a run: each
    raises KeyboardInterrupt, and is remembered. Remembered because Python raises the interrupt in whatever code runs at that
    moment, and some code discards the errors of what it calls (the initialisation of some compiled
    modules, during an import; a __del__ or a weakref callback, whose error Python prints as a
    traceback and drops, which _drop_lost_interrupt keeps quiet): raise_if_stop_requested() then stops
    the run at its next check.
    With interrupt=False they are only remembered: for the start of a program, still importing,
    where an interrupt would end in a traceback."""
    global _unraisablehook_before
    _terminal_fds[:] = [fd for fd in (1, 2) if os.isatty(fd)]
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _stop if interrupt else _note_stop)
    if sys.unraisablehook is not _drop_lost_interrupt:
        _unraisablehook_before, sys.unraisablehook = sys.unraisablehook, _drop_lost_interrupt


def _drop_lost_interrupt(unraisable):
    """Python's hook for an error it cannot raise (one in a __del__ or a weakref callback): it prints a
    traceback and goes on. A KeyboardInterrupt raised there once a stop signal has been noted (the
    one our handler raised) is dropped quietly, because it is remembered and raise_if_stop_requested()
    stops the run; any other error goes to the hook that was there before (Python's prints it)."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt) and _stop_requested:
        return
    _unraisablehook_before(unraisable)


def raise_if_stop_requested():
    """Raise KeyboardInterrupt if a stop signal came (see stop_on_signals), even one that was lost."""
    if _stop_requested:
        raise KeyboardInterrupt


class ProcessFailed(RuntimeError):
    """A worker or forked child died, hung, or failed: its share of the work is lost."""


def ignore_stop_signals():
    """From now on the stop signals do nothing (the program is already stopping, or is a worker)."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


@contextlib.contextmanager
def signals_held():
    """Hold the stop signals while the block runs (the final save, starting a worker); one that
    arrives meanwhile is delivered as the block ends. (ForkPool.submit holds them around fork itself,
    and lets only the parent deliver them.)

    Two holds, because either alone leaks: the signals are blocked, so a process started in the
    block inherits them blocked (a Ctrl-C is the main process's to handle); and their Python
    handlers are swapped for one that only notes them, because library code may unblock them in
    the middle of the block (multiprocessing does, around starting its resource tracker)."""
    noted = []
    handlers = {}
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for stop_signal in STOP_SIGNALS:
            handlers[stop_signal] = signal.signal(stop_signal, lambda signum, frame: noted.append(signum))
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # again: the block may have unblocked them
        for stop_signal, handler in handlers.items():
            signal.signal(stop_signal, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one still pending goes to its own handler
        if noted:
            signal.raise_signal(noted[0])  # one noted in the block, to the program's handler, now it is done


# ----------------------------------------------------------------------------
# Spawned workers that each own an object
# ----------------------------------------------------------------------------

def _exit_on_sigterm(signum, frame):
    raise SystemExit(1)


def _worker_main(connection, make_object, args):
    """Body of a worker process: build make_object(*args), then answer (method, args) calls
    with the method's result, until the main process closes the pipe."""
    ignore_stop_signals()  # Ctrl-C and a closed terminal are the main process's to handle
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # stopped mid-call: still run the cleanup below
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held while this process started
    owned = make_object(*args)
    try:
        while True:
            method, call_args = connection.recv()
            connection.send(getattr(owned, method)(*call_args))
    except (EOFError, OSError):  # the main process closed the pipe or is gone: stop quietly
        pass
    finally:
        if hasattr(owned, "close"):
            owned.close()
        # Exiting now: a SIGTERM from here on (the main process stopping a worker it thinks busy)
        # ends the process at once, instead of raising SystemExit in interpreter shutdown, which
        # Python reports with a traceback.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class WorkerProcesses:
    """One process per entry of `args_per_worker`, each owning `make_object(*args)`.

    `call(method, args_per_worker)` runs that method in every worker at once, worker w
    with the arguments args_per_worker[w], and returns their results in worker order. `make_object` must be a module-level function (spawn
    pickles it by name). Workers are started with "spawn": a fresh interpreter that
    inherits no other worker's pipe, so a worker whose main process dies sees
    end-of-file and exits, and none is left behind.
    """

    def __init__(self, make_object, args_per_worker):
        import multiprocessing
        from multiprocessing import resource_tracker
        context = multiprocessing.get_context("spawn")
        # Start multiprocessing's resource tracker now, not during the first process.start(): it
        # unblocks SIGINT and SIGTERM after starting, and the workers must inherit them blocked.
        resource_tracker.ensure_running()
        self.connections, self.processes = [], []
        self.busy = False  # a call was sent and its results are not all back
        for args in args_per_worker:
            parent, child = context.Pipe()
            process = context.Process(target=_worker_main, args=(child, make_object, args), daemon=True)
            with signals_held():  # the new process inherits the held signals: a Ctrl-C now is the main's
                process.start()
            child.close()  # the worker holds that end now; if it dies, recv() here sees EOF, not a hang
            self.connections.append(parent)
            self.processes.append(process)

    def call(self, method, args_per_worker):
        """owned.method(*args) in every worker, each with its own args, in parallel; the list of results."""
        self.busy = True
        try:
            for connection, args in zip(self.connections, args_per_worker):
                connection.send((method, args))
            results = [connection.recv() for connection in self.connections]
        except (EOFError, OSError):  # a pipe closed, or broken: its worker is gone
            raise ProcessFailed(self._which_died()) from None
        self.busy = False
        return results

    def _which_died(self):
        """A sentence on the worker that died: killed by a signal, or failed with its error printed above."""
        for process in self.processes:
            process.join(timeout=1)
            if process.exitcode is not None:
                how = (f"was killed by signal {-process.exitcode}" if process.exitcode < 0 else
                       f"failed with exit code {process.exitcode} (its error is printed above)")
                return f"worker process {process.pid} {how}"
        return "a worker process closed its pipe"

    def close(self):
        """Close the pipes (each idle worker then stops by itself); stop a worker interrupted in the
        middle of a call (Ctrl-C) at once with SIGTERM, and any other still running after 2 s."""
        for connection in self.connections:
            connection.close()
        for process in self.processes:
            process.join(timeout=0 if self.busy else 2)
            if process.is_alive():
                process.terminate()
                process.join()


class InThisProcess:
    """WorkerProcesses' interface, with every object in this process and the calls run in turn.

    For --workers 1, and wherever other processes are not wanted: the same code path,
    without spawning anything."""

    def __init__(self, make_object, args_per_worker):
        self.objects = [make_object(*args) for args in args_per_worker]

    def call(self, method, args_per_worker):
        return [getattr(owned, method)(*args) for owned, args in zip(self.objects, args_per_worker)]

    def close(self):
        for owned in self.objects:
            if hasattr(owned, "close"):
                owned.close()


# ----------------------------------------------------------------------------
# Forked copies of this process
# ----------------------------------------------------------------------------

class ForkPool:
    """Runs functions in forked copies of this process, at most `max_children` at a time.

    os.fork() copies the whole process, the simulator included, exactly (copy-on-write:
    a few ms, however long the episode has been): the child carries on from the very
    state the parent was in. That is how the vine restores a LunarLander state, which
    Box2D cannot save (copy.deepcopy gives an env whose bodies are gone). Each child
    sends its result back through a pipe and exits; results are collected by key.
    A child that dies is reported, and one that hangs for `timeout` seconds is stopped.
    """

    def __init__(self, max_children, timeout=120.0):
        self.max_children, self.timeout = max_children, timeout
        self.running = {}  # read end of the child's pipe -> (pid, key, bytes received so far)
        self.exiting = []  # children that sent their result and are still tearing themselves down
        self.results = {}

    def submit(self, key, function):
        """Fork; the child runs function() and sends back what it returns."""
        while len(self.running) >= self.max_children:
            self._collect_some()
        self._reap(block=False)
        read_end, write_end = os.pipe()
        # A Ctrl-C arriving during os.fork() is raised inside one of Python's at-fork hooks
        # (logging registers one), which swallow exceptions: the interrupt would be lost.
        # So signals wait, blocked, until fork has returned.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = None
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if pid == 0:  # the child: compute, send, and leave without running any of the parent's cleanup
            status = 1
            try:
                ignore_stop_signals()  # the parent stops its children itself
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                os.close(read_end)
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(pickle.dumps(function()))
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        os.close(write_end)
        self.running[read_end] = (pid, key, bytearray())

    def fork_overhead(self, work, repeats=10):
        """(seconds of work() here, extra seconds when it runs in a forked child): the fork, the
        copy-on-write page faults work causes in the child, collecting its result, its exit.
        Each is the fastest of `repeats` tries, which other processes on the machine slow least."""
        def fastest(function):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                function()
                times.append(time.perf_counter() - start)
            return min(times)

        def in_a_child():
            self.submit("fork_overhead", work)
            self.gather()
        here = fastest(work)
        return here, max(fastest(in_a_child) - here, 0.0)

    def _collect_some(self):
        """Read from whichever children have written; reap those that finished."""
        ready, _, _ = select.select(list(self.running), [], [], self.timeout)
        if not ready:
            self.close()
            raise ProcessFailed(f"no branch process answered for {self.timeout:.0f} s; all were stopped")
        for read_end in ready:
            pid, key, received = self.running[read_end]
            chunk = os.read(read_end, 1 << 16)
            if chunk:
                received.extend(chunk)
                continue
            os.close(read_end)  # end of file: the child has sent everything, or died
            del self.running[read_end]
            try:
                self.results[key] = pickle.loads(bytes(received))
            except Exception:  # nothing, or half a result: find out why, and stop
                code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                self.close()
                how = f"was killed by signal {-code}" if code < 0 else f"failed with exit code {code}"
                raise ProcessFailed(f"branch process {pid} {how}; its result is lost, so the iteration is too")
            # Its exit (tearing down a copy of this process) takes a while: reap it later, not now.
            self.exiting.append(pid)

    def _reap(self, block):
        """Collect the exit status of children that have sent their results (without waiting if not block)."""
        still_exiting = []
        for pid in self.exiting:
            done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
            if not done:
                still_exiting.append(pid)
        self.exiting = still_exiting

    def gather(self):
        """Wait for every child; return {key: result} of all submitted since the last gather."""
        while self.running:
            self._collect_some()
        self._reap(block=True)
        results, self.results = self.results, {}
        return results

    def close(self):
        """Kill and reap every child still running (Ctrl-C, an error): none is left behind."""
        for read_end, (pid, _, _) in self.running.items():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            os.close(read_end)
        self.running.clear()
        self._reap(block=True)
