"""Launching a run as 1 process x 8 CPU devices and as 2 processes x 4 (jax.distributed on localhost)."""

import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one_and_two_processes(cmd, one_dir, two_dir, timeout=600):
    """Run ``cmd(workdir, *extra)`` once on 8 devices and as 2 coordinated processes x 4 devices.

    Asserts every process exits 0; returns nothing (read the two work directories).
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    one = subprocess.run(cmd(one_dir, "--cpu-devices", "8"), capture_output=True, text=True, timeout=timeout,
                         cwd=REPO, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    procs = [
        subprocess.Popen(cmd(two_dir, "--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}",
                             "--num-processes", "2", "--process-id", str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
