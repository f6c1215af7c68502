"""The test suite's fork server (``tests/forkserver.py``) behaves like real child processes: exit
codes, pipes, a zombie until waited for, ``os.wait4``, and real processes where it cannot fork."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import forkserver

SCRIPTS = Path(sys.executable).parent


def _env(server) -> dict:
    return {**os.environ, "nnUNet_def_n_proc": server.n_proc}


@pytest.fixture
def server(stock_commands_forked):
    if stock_commands_forked is None:
        pytest.skip("STSEG_TEST_FORKSERVER=0: the stock commands run as real processes")
    return stock_commands_forked


def test_a_console_script_runs_forked_with_its_output_and_exit_code(server):
    ok = subprocess.run([str(SCRIPTS / "nnunet-stseg"), "env", "--dir"], capture_output=True, text=True, env=_env(server))
    assert ok.returncode == 0 and ok.stdout.strip().endswith("ext") and ok.stderr == ""
    proc = subprocess.Popen([str(SCRIPTS / "nnUNetv2_predict"), "-i", "nowhere"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(server))
    out, _ = proc.communicate(timeout=120)
    assert isinstance(proc, forkserver.ForkedPopen) and proc._forked
    assert proc.returncode == 2 and "the following arguments are required: -o, -d, -c" in out


def test_an_exited_fork_stays_a_zombie_until_waited_for_and_wait4_reports_it(server):
    proc = subprocess.Popen([str(SCRIPTS / "nnunet-stseg"), "plan"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=_env(server))
    assert proc._forked and os.getpgid(proc.pid) == proc.pid  # its own session and process group
    time.sleep(3)  # argparse refuses `plan` without -d at once
    os.killpg(proc.pid, signal.SIGKILL)  # a real child that exited is a zombie until waited for: no error
    pid, status, usage = os.wait4(proc.pid, 0)
    assert pid == proc.pid and os.waitstatus_to_exitcode(status) == 2 and usage.ru_maxrss > 0


def test_a_killed_fork_reports_the_signal(server):
    proc = subprocess.Popen([str(SCRIPTS / "nnunet-stseg"), "demo", "--help"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, env=_env(server))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode in (-signal.SIGKILL, 0)  # killed, or finished before the signal landed
    assert proc.poll() == proc.returncode


def test_what_a_fork_cannot_do_runs_as_a_real_process(server):
    real = subprocess.Popen([str(SCRIPTS / "nnunet-stseg"), "env"], stdout=subprocess.DEVNULL, preexec_fn=os.getpid,
                            env=_env(server))
    assert not real._forked and real.wait(timeout=120) == 0
    other = subprocess.Popen([sys.executable, "-c", "pass"])
    assert not other._forked and other.wait(timeout=120) == 0
    env = {**os.environ, "nnUNet_def_n_proc": str(int(server.n_proc) + 1)}  # nnU-Net reads it at import
    assert not server.takes([str(SCRIPTS / "nnUNetv2_train")], {"env": env})
    assert server.takes([str(SCRIPTS / "nnUNetv2_train")], {"env": {**env, "nnUNet_def_n_proc": server.n_proc}})
