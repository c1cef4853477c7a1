"""Helpers of the tests that run ``train.py``: its options for a tiny run, and running it as a
subprocess (a user's launch, torchrun, srun), in this process (errors and short runs, which need no fresh
interpreter: about 4 s less each) or in a forked copy of this process (runs that a fault or a signal
must kill or stop, but that need no fresh interpreter either: about 5 s less each).

Every run uses a ResNet-18 at 48 px crops on a 40-image synthetic set (conftest.py's
``data_root``), single-threaded, so a two-step task trains in seconds on a CPU.
"""
import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO_ROOT, "train.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def train_args(data_root: str, out: Path, *extra: str, task: str = "15-5", name: str = "run") -> List[str]:
    """Options of a tiny run writing checkpoints and logs under ``out``."""
    return [
        "--dataset", "synthetic", "--data_root", data_root, "--task", task, "--name", name,
        "--backbone", "resnet18", "--norm_act", "iabn_sync", "--crop_size", "48",
        "--batch_size", "4", "--epochs", "1", "--lr", "0.01", "--num_workers", "0",
        "--checkpoint_dir", str(out / "checkpoints"), "--logdir", str(out / "logs"),
        "--device", "cpu", "--print_interval", "1", "--no-visualize", *extra,
    ]


def default_workers(args: List[str]) -> List[str]:
    """``args`` without ``--num_workers``: the default data-loader workers, as a user runs."""
    index = args.index("--num_workers")
    return args[:index] + args[index + 2:]


def _env(extra: Optional[Dict[str, str]] = None) -> dict:
    env = dict(os.environ)
    env.update(extra or {})
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def command(args: List[str], nproc: int = 1, script: str = TRAIN) -> List[str]:
    if nproc == 1:
        return [sys.executable, script, *args]
    return [*TORCHRUN, "--nproc_per_node", str(nproc), script, *args]


def run_train(args: List[str], nproc: int = 1, check: bool = True, timeout: float = 600,
              env: Optional[Dict[str, str]] = None, launcher: Optional[List[str]] = None,
              preexec_fn: Optional[Callable[[], None]] = None, script: str = TRAIN) -> subprocess.CompletedProcess:
    """Run ``train.py`` (under torchrun when ``nproc`` > 1, or ``script`` under ``launcher``) to
    completion, with ``env`` added to the environment."""
    cmd = [*launcher, script, *args] if launcher else command(args, nproc)
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(env), capture_output=True,
                            text=True, timeout=timeout, preexec_fn=preexec_fn)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_train_in_process(args: List[str], check: bool = True) -> subprocess.CompletedProcess:
    """``train.py``'s entry function in this process, its exit code and output captured as
    ``run_train`` does (``check``: fail unless it succeeded). The root logger is restored afterwards."""
    sys.path.insert(0, REPO_ROOT)
    try:
        import train
    finally:
        sys.path.remove(REPO_ROOT)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = train.cli(args)
            except SystemExit as exit_info:  # --help
                code = exit_info.code
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    result = subprocess.CompletedProcess([TRAIN, *args], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"train.py failed ({code}):\n{result.stdout}\n{result.stderr}")
    return result


class ForkedTrain:
    """``train.py``'s entry function in a forked copy of this process (``start_forked``): a process
    of its own, which a fault, a signal or a file-size limit can kill or stop, without the
    interpreter start and the torch import of a new one (about 5 s less each). What it
    prints goes to temporary files; ``pid``, ``poll``, ``wait``, ``send_signal`` and
    ``communicate`` work as ``subprocess.Popen``'s."""

    def __init__(self, pid: int, out, err) -> None:
        self.pid = pid
        self.returncode: Optional[int] = None
        self._out, self._err = out, err

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([TRAIN], timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: Optional[float] = None) -> Tuple[str, Optional[str]]:
        """Wait for the process to end; what it printed (stdout, stderr; stderr None when merged)."""
        self.wait(timeout)
        return _read(self._out), (None if self._err is None else _read(self._err))


def _read(handle) -> str:
    handle.seek(0)
    return handle.read().decode("utf-8", errors="replace")


def start_forked(args: List[str], env: Optional[Dict[str, str]] = None,
                 preexec_fn: Optional[Callable[[], None]] = None, start_new_session: bool = False,
                 merge_output: bool = False, unset: Tuple[str, ...] = ()) -> ForkedTrain:
    """Start ``train.py``'s entry function on ``args`` in a forked copy of this process, as
    ``run_train`` starts ``python train.py`` (see ``start_forked_function`` for ``env``, ``unset``,
    ``preexec_fn``, ``start_new_session`` and ``merge_output``)."""
    sys.path.insert(0, REPO_ROOT)
    try:
        import train
    finally:
        sys.path.remove(REPO_ROOT)
    import segmentation.engine.run  # noqa: F401 (imported once here rather than in every child)
    import torch._dynamo  # noqa: F401 (the optimizer imports it: 2-3 s in every child otherwise)

    return start_forked_function(lambda: train.cli(list(args)), env=env, preexec_fn=preexec_fn,
                                 start_new_session=start_new_session, merge_output=merge_output, unset=unset)


def start_forked_function(function: Callable[[], Optional[int]], env: Optional[Dict[str, str]] = None,
                          preexec_fn: Optional[Callable[[], None]] = None, start_new_session: bool = False,
                          merge_output: bool = False, unset: Tuple[str, ...] = ()) -> ForkedTrain:
    """Run ``function`` in a forked copy of this process as the main code of a new one: ``env``
    added to the environment (the variables of ``unset`` removed), the repository as the working
    directory, ``preexec_fn`` run first, the signal handlers of a new interpreter, stdout and stderr
    to files of their own (one file with ``merge_output``); its return value (None: 0), a
    ``SystemExit``'s code or 1 after an uncaught exception (its traceback printed) is the exit code."""
    out = tempfile.TemporaryFile()
    err = None if merge_output else tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return ForkedTrain(pid, out, err)
    code = 1
    try:  # the child: never returns, whatever happens
        os.dup2(out.fileno(), 1)
        os.dup2((err or out).fileno(), 2)
        # Python's own streams: stdout buffered, stderr line-buffered.
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)
        if start_new_session:
            os.setsid()
        # The signal handling of a new interpreter, not the test process's (pytest's, a test's).
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGALRM", "SIGCHLD"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for key in unset:
            os.environ.pop(key, None)
        os.environ.update(env or {})
        os.environ["OMP_NUM_THREADS"] = "1"
        os.chdir(REPO_ROOT)
        if preexec_fn is not None:
            preexec_fn()
        try:
            code = function()
        except SystemExit as exit_info:  # as the interpreter turns it into an exit code
            code = exit_info.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        code = 0 if code is None else code
    except BaseException:  # noqa: B902 (an uncaught exception: its traceback, exit code 1)
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: B902
                pass
        os._exit(code)


def run_forked_ranks(function: Callable[[], Optional[int]], nprocs: int, timeout: float = 180) -> List[str]:
    """Run ``function`` in ``nprocs`` forked copies of this process with the variables torchrun sets
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), as
    ``torchrun --nproc_per_node nprocs`` runs a script whose main code is ``function``: for tests of
    what the processes compute together (gloo), not of the launch. Returns each process's output;
    fails unless every process exited with 0."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return _run_all(lambda rank: start_forked_function(function, merge_output=True, env=dict(
        RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))), nprocs, timeout, "process")


def _run_all(start: Callable[[int], ForkedTrain], count: int, timeout: float, what: str,
             check: bool = True) -> List[str]:
    """Start ``start(rank)`` for each of ``count`` ranks and wait for them all: their outputs;
    ``check``: fail unless every one exited with 0 (what is still running at the end is killed)."""
    processes: List[ForkedTrain] = []
    try:
        for rank in range(count):
            processes.append(start(rank))
        outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    finally:
        _end(processes)
    for process, output in zip(processes, outputs):
        if check and process.returncode != 0:
            raise AssertionError(f"{what} failed ({process.returncode}):\n{output}")
    return outputs


def _end(processes: List[ForkedTrain]) -> None:
    """Kill (with every process below it) and reap each of ``processes`` that still runs."""
    for process in processes:
        if process.poll() is None:
            for pid in [*_descendants(process.pid), process.pid]:
                _kill(pid)
            process.wait()


def run_train_forked(args: List[str], check: bool = True, timeout: float = 600,
                     env: Optional[Dict[str, str]] = None,
                     preexec_fn: Optional[Callable[[], None]] = None) -> subprocess.CompletedProcess:
    """``run_train`` (one process) in a forked copy of this process (``start_forked``): for runs
    that must be a process of their own (killed, stopped by a signal, limited) but need no new
    interpreter. The result's ``returncode`` is negative for a signal, as ``subprocess``'s."""
    process = start_forked(args, env=env, preexec_fn=preexec_fn)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        _end([process])
    result = subprocess.CompletedProcess([TRAIN, *args], process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_srun_like(args: List[str], ntasks: int, timeout: float = 600, fork: bool = False,
                  env: Optional[Dict[str, str]] = None, check: bool = True) -> List[str]:
    """Start ``ntasks`` plain ``train.py`` processes with the variables srun sets (and ``env``);
    their outputs. ``check``: fail unless every process exits with 0.

    ``fork``: ``train.py``'s entry function in forked copies of this process (``start_forked``), for
    tests of what the processes compute together rather than of how they are launched."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def srun_variables(rank: int) -> Dict[str, str]:
        return dict(env or {}, SLURM_PROCID=str(rank), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(rank),
                    SLURM_NODELIST="localhost", SLURM_JOB_ID="4242", MASTER_PORT=str(port))

    if fork:
        return _run_all(lambda rank: start_forked(args, env=srun_variables(rank), merge_output=True,
                                                  unset=("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")),
                        ntasks, timeout, "task", check)
    processes = []
    for rank in range(ntasks):
        variables = {key: value for key, value in _env().items()
                     if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        variables.update(srun_variables(rank))
        processes.append(subprocess.Popen(command(args), cwd=REPO_ROOT, env=variables, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    for process, output in zip(processes, outputs):
        if check and process.returncode != 0:
            raise AssertionError(f"task failed ({process.returncode}):\n{output}")
    return outputs


def run_until(args: List[str], condition: Callable[[], bool], sig: int = signal.SIGKILL,
              nproc: int = 1, timeout: float = 600,
              targets: Optional[Callable[[int], List[int]]] = None, script: str = TRAIN,
              fork: bool = False) -> Tuple[int, str]:
    """Start ``train.py`` (or ``script``); once ``condition()`` holds, send ``sig`` (SIGKILL: to every process
    below the launched one, then to it; other signals: to the launched process, or to the
    processes ``targets(launched pid)`` names, e.g. ``every_process``).

    ``fork``: ``train.py``'s entry function in a forked copy of this process (``start_forked``; one
    process, ``train.py`` only) instead of a new interpreter.

    Returns the exit code and the output; fails if the run ended before the condition was met.
    """
    if fork:
        if nproc != 1 or script != TRAIN:
            raise ValueError("fork=True starts train.py's entry function in one process")
        process = start_forked(args, start_new_session=True, merge_output=True)
    else:
        process = subprocess.Popen(command(args, nproc, script), cwd=REPO_ROOT, env=_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            if process.poll() is not None:
                output = process.communicate()[0] if fork else process.stdout.read()
                raise AssertionError(f"run ended ({process.returncode}) before it could be stopped:\n{output}")
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the stop condition")
            time.sleep(0.05)
        if sig == signal.SIGKILL:
            # torchrun starts each worker in a session of its own: kill them by id, then torchrun.
            for pid in [*_descendants(process.pid), process.pid]:
                _kill(pid)
        elif targets is not None:
            for pid in targets(process.pid):
                _signal(pid, sig)
        else:
            process.send_signal(sig)
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            for pid in [*_descendants(process.pid), process.pid]:
                _kill(pid)
            process.wait()
    return process.returncode, output


def every_process(pid: int) -> List[int]:
    """``pid`` and every process below it, data-loader workers included: whom Slurm signals."""
    return [pid, *_descendants(pid)]


def launcher_and_loader_workers(pid: int) -> List[int]:
    """A torchrun ``pid`` and the data-loader workers of its processes, not the processes."""
    ranks = _descendants(pid, depth=1)
    return [pid, *(worker for rank in ranks for worker in _descendants(rank, depth=1))]


def _descendants(pid: int, depth: Optional[int] = None) -> List[int]:
    """Ids of the processes below ``pid`` (read from /proc), ``depth`` levels deep (all by
    default), deepest last."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    # Fields after the parenthesised command name: state, ppid, ...
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier, level = [], [pid], 0
    while frontier and (depth is None or level < depth):
        children = [child for child, parent in parents.items() if parent in frontier]
        found.extend(children)
        frontier = children
        level += 1
    return found


def _kill(pid: int) -> None:
    _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def run_checkpoints(out: Path, setting: str = "synthetic-15-5", name: str = "run") -> Path:
    """The checkpoint folder of run ``name`` of ``setting`` (``<dataset>-<task>[-ov]``) written under ``out``."""
    return out / "checkpoints" / setting / name


def run_logs(out: Path, setting: str = "synthetic-15-5", name: str = "run") -> Path:
    """The log folder of run ``name`` of ``setting`` written under ``out``."""
    return out / "logs" / setting / name


def printed(result: subprocess.CompletedProcess) -> str:
    """What a run printed: its standard output, then its standard error."""
    return result.stdout + result.stderr


def model_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model_state"]


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"tensors differ: {different[:5]}"
