"""A fork server for the tests' stock commands: torch and nnU-Net imported once, each command a fork.

Every ``nnUNetv2_train`` / ``nnUNetv2_predict`` / ``nnunet-stseg`` process of the test suite spends
5-7 s of its 2-core CPU time importing torch and nnU-Net before it does anything (about 120 such
processes per run). This server imports them once per test worker; each command is then a fork of
it that runs the console script as a fresh interpreter would (``runpy`` on the script file with
the command's arguments, environment, working directory, standard streams and session), so the
stock entry points, argument parsers, trainer lookup and our package's import (never preloaded
here: each command imports nnunet_stseg and the trainers itself, as a user's process does) are
exercised unchanged. What a fork does not give, and where it matters:

- import-time reads of the environment in the preloaded modules: nnU-Net 2.8 reads its folders
  lazily; ``nnunetv2.configuration.default_num_processes`` is read at import (the server starts
  with the tests' ``nnUNet_def_n_proc``, and a command with another value is run as a real
  process); torch's thread count is set from the command's ``OMP_NUM_THREADS``;
- a command that asks for a ``preexec_fn`` (a Python callable for the child) or a non-script
  program runs as a real process.

One deliberate difference, the same in the test process itself (``conftest.py``):
:func:`sample_fewer_foreground_intensities`.

``STSEG_TEST_FORKSERVER=0`` runs every command as a real process (``tests/conftest.py`` installs
the server otherwise); docs/testing.md (item 6) says why.

Protocol (one Unix-socket connection per command): the client sends one JSON line (argv, env,
cwd, new_session) with its stdin/stdout/stderr descriptors attached; the server answers
``{"pid": N}`` once the fork has its session and streams. The client then asks ``w`` (wait) or
``p`` (poll); the answer is ``{"status": waitstatus, "maxrss_kb": K}`` once the fork has exited
(it is reaped then, not before: a zombie until waited for, as a real child), else for a poll
``{"running": true}``.
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys

PRELOAD = ("torch", "numpy", "SimpleITK", "scipy.ndimage", "skimage.measure", "nnunetv2.run.run_training",
           "nnunetv2.inference.predict_from_raw_data", "nnunetv2.experiment_planning.plan_and_preprocess_api",
           "nnunetv2.evaluation.evaluate_predictions", "nnunetv2.training.nnUNetTrainer.nnUNetTrainer")
SCRIPTS = ("nnUNetv2_", "nnunet-stseg")
"""Console scripts (name prefixes) of the virtual environment that run in a fork."""


FINGERPRINT_SAMPLES = 1e6


def sample_fewer_foreground_intensities() -> None:
    """nnU-Net's dataset fingerprint draws 1e8 foreground intensities per channel (with
    replacement, so as many for 8 tiny test images as for a thousand CT volumes) and takes their
    percentiles: 134 s for eight 32 x 32 RGB photos on the busy 2-core machine, 13 s with 1e6
    draws. The tests' datasets, a few thousand foreground voxels each, draw
    :data:`FINGERPRINT_SAMPLES`; planning is otherwise nnU-Net's. Idempotent."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    init = DatasetFingerprintExtractor.__init__
    if getattr(init, "fewer_samples", False):
        return

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.num_foreground_voxels_for_intensitystats = FINGERPRINT_SAMPLES

    __init__.fewer_samples = True
    DatasetFingerprintExtractor.__init__ = __init__


# ----------------------------------------------------------------------------------------------
# the server
# ----------------------------------------------------------------------------------------------
def _preload() -> None:
    import importlib
    import pkgutil
    import warnings

    with warnings.catch_warnings():  # the imports' warnings are the server's; the filters are restored
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            importlib.import_module(name)
        import nnunetv2.training.nnUNetTrainer as trainers  # nnU-Net's trainer lookup imports every variant

        for info in pkgutil.walk_packages(trainers.__path__, trainers.__name__ + "."):
            try:
                importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 - an optional dependency of one variant: the lookup skips it too
                pass
    sample_fewer_foreground_intensities()


def _run_command(request: dict, fds: list[int], started: int) -> None:
    """In the fork: become the command (session, streams), say so on ``started`` (as a real
    ``Popen`` returns once its child has exec'd), set its directory, environment and arguments and
    run its console script as ``__main__``; never returns."""
    import atexit
    import runpy
    import signal
    import traceback

    code = 1
    try:
        if request["new_session"]:
            os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        os.write(started, b"1")
        os.close(started)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        env = request["env"]
        sys.stdin = open(0, "r", closefd=False)  # noqa: SIM115 - the process's own streams
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stdout.reconfigure(write_through=bool(env.get("PYTHONUNBUFFERED")))
        sys.stderr.reconfigure(write_through=True)
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(env)
        script = request["argv"][0]
        extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(script)] + extra + request["base_path"]
        sys.argv = list(request["argv"])
        import torch

        threads = env.get("OMP_NUM_THREADS")
        torch.set_num_threads(int(threads) if threads and threads.isdigit() else len(os.sched_getaffinity(0)))
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - what the interpreter would do: the excepthook, exit 1
            sys.excepthook(*sys.exc_info())
            code = 1
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def serve(path: str) -> None:
    """Preload, listen on the Unix socket ``path`` and fork one child per request until stdin
    closes (the test worker ended). A child's exit is reported when its client asks (``w``: wait,
    ``p``: poll); until then it stays a zombie, as a real child does until its parent waits."""
    _preload()
    base_path = [p for p in sys.path[1:] if p not in os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    waiting: dict[int, socket.socket] = {}  # pid -> connection of a client blocked in wait()
    orphans: set[int] = set()  # children whose client went away: reaped when they exit

    def report(pid: int, conn: socket.socket) -> bool:
        """Send the child's exit status if it has exited (then it is reaped); whether it had."""
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done == 0:
            return False
        try:
            conn.sendall(json.dumps({"status": status, "maxrss_kb": usage.ru_maxrss}).encode() + b"\n")
        except OSError:
            pass
        selector.unregister(conn)
        conn.close()
        return True

    print("ready", flush=True)
    while True:
        for key, _ in selector.select(timeout=0.02):
            if key.data == "stdin":
                if not sys.stdin.readline():
                    return
            elif key.data == "accept":
                conn, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                request = json.loads(message.decode())
                request["base_path"] = base_path
                started, started_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    conn.close()
                    os.close(started)
                    _run_command(request, fds, started_w)
                os.close(started_w)
                os.read(started, 1)  # the child has its session and streams (or died: b"")
                os.close(started)
                for fd in fds:
                    os.close(fd)
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                selector.register(conn, selectors.EVENT_READ, pid)
            else:
                pid, conn = key.data, key.fileobj
                ask = conn.recv(1)
                if ask == b"w":
                    waiting[pid] = conn
                elif ask == b"p":
                    if not report(pid, conn):
                        conn.sendall(b'{"running": true}\n')
                else:  # the client went away without waiting
                    selector.unregister(conn)
                    conn.close()
                    orphans.add(pid)
        for pid, conn in list(waiting.items()):
            if report(pid, conn):
                del waiting[pid]
        for pid in list(orphans):
            if os.wait4(pid, os.WNOHANG)[0] != 0:
                orphans.discard(pid)


# ----------------------------------------------------------------------------------------------
# the client: a Popen whose child is a fork of the server
# ----------------------------------------------------------------------------------------------
class ForkServer:
    """The server process of this test worker (started on first use) and the requests to it."""

    def __init__(self, folder: str, n_proc: str = "1"):
        self.path = os.path.join(folder, f"forkserver-{os.getpid()}.sock")
        self.n_proc = n_proc  # nnU-Net's default_num_processes in the server (read at import)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "nnUNet_def_n_proc": self.n_proc}
        self.process = _REAL_POPEN([sys.executable, __file__, self.path], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, env=env, text=True, start_new_session=True)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the fork server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(timeout=30)
            self.process = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    def takes(self, args, kwargs: dict) -> bool:
        """Whether a ``Popen(args, **kwargs)`` is a console script of this environment that a fork
        can run (see the module docstring)."""
        if kwargs.get("shell") or kwargs.get("preexec_fn") is not None or kwargs.get("executable"):
            return False
        if isinstance(args, (str, bytes)) or not args:
            return False
        program = os.fspath(args[0])
        if os.path.dirname(program) != os.path.dirname(sys.executable) or \
                not os.path.basename(program).startswith(SCRIPTS):
            return False
        env = kwargs.get("env")
        return (os.environ if env is None else env).get("nnUNet_def_n_proc") == self.n_proc

    def connect(self, argv: list[str], env: dict, cwd: str, fds: list[int], new_session: bool):
        """Ask for a fork running ``argv``; returns the connection, its reader and the pid."""
        if self.process is None:
            self.start()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        request = {"argv": argv, "env": env, "cwd": cwd, "new_session": new_session}
        socket.send_fds(conn, [json.dumps(request).encode()], fds)
        reader = conn.makefile("r")
        return conn, reader, json.loads(reader.readline())["pid"]


_REAL_POPEN = subprocess.Popen
_REAL_WAIT4 = os.wait4
SERVER: ForkServer | None = None
_FORKED: dict = {}  # pid -> ForkedPopen, while the fork runs


class ForkedPopen(_REAL_POPEN):
    """``subprocess.Popen`` that runs what :data:`SERVER` takes in a fork of it, everything else as
    the real class does: pid, signals, pipes, wait, poll and timeouts behave as for a real child
    (the server reports the exit status and the peak RSS)."""

    _forked = False
    _status: int | None = None
    maxrss_kb: int | None = None

    def __init__(self, *args, **kwargs):
        call_args = args[0] if args else kwargs.get("args")
        self._forked = SERVER is not None and SERVER.takes(call_args, kwargs)
        super().__init__(*args, **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest):
        if not self._forked:
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                                          creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread,
                                          errwrite, *rest)
        start_new_session = rest[-2]  # (..., restore_signals, gid, gids, uid, umask, start_new_session, process_group)
        fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1, errwrite if errwrite != -1 else 2]
        self._conn, self._reader, self.pid = SERVER.connect(
            [os.fspath(a) for a in args], dict(os.environ if env is None else env), os.fspath(cwd or os.getcwd()),
            fds, bool(start_new_session))
        _FORKED[self.pid] = self
        self._child_created = True
        devnull = getattr(self, "_devnull", None)
        for child_end, parent_end in ((p2cread, p2cwrite), (c2pwrite, c2pread), (errwrite, errread)):
            if child_end != -1 and parent_end != -1 and child_end != devnull:
                os.close(child_end)
        if devnull is not None:
            os.close(devnull)
        self._closed_child_pipe_fds = True

    def _try_wait(self, wait_flags):
        if not self._forked:
            return super()._try_wait(wait_flags)
        if self._status is not None:  # already waited for (e.g. through os.wait4)
            return self.pid, self._status
        self._conn.sendall(b"p" if wait_flags & os.WNOHANG else b"w")
        line = self._reader.readline()
        answer = json.loads(line) if line else {"status": 255 << 8, "maxrss_kb": None}  # the server went away
        if answer.get("running"):
            return 0, 0
        _FORKED.pop(self.pid, None)
        self._conn.close()
        self.maxrss_kb, self._status = answer["maxrss_kb"], answer["status"]
        return self.pid, self._status

    def _internal_poll(self, _deadstate=None, *args, **kwargs):
        if not self._forked:
            return super()._internal_poll(_deadstate, *args, **kwargs)
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None:
                    pid, status = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(status)
            finally:
                self._waitpid_lock.release()
        return self.returncode


def wait4(pid: int, options: int):
    """``os.wait4`` that also waits for a fork of the server (``pipeline.run_measured`` reads the
    child's peak RSS this way)."""
    proc = _FORKED.get(pid)
    if proc is None:
        return _REAL_WAIT4(pid, options)
    pid, status = proc._try_wait(options)
    return pid, status, resource_usage(proc.maxrss_kb or 0)


class resource_usage:  # noqa: N801 - stands for os.wait4's struct_rusage
    def __init__(self, maxrss_kb: int):
        self.ru_maxrss = maxrss_kb


def install(folder: str) -> ForkServer:
    """Route the console scripts of this environment through a fork server (started on first use)."""
    global SERVER
    SERVER = ForkServer(folder)
    subprocess.Popen = ForkedPopen
    os.wait4 = wait4
    return SERVER


def uninstall() -> None:
    global SERVER
    if SERVER is not None:
        SERVER.stop()
    SERVER = None
    subprocess.Popen = _REAL_POPEN
    os.wait4 = _REAL_WAIT4


if __name__ == "__main__":
    serve(sys.argv[1])
