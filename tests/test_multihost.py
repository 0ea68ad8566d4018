"""Two processes on localhost (jax.distributed, 4 CPU devices each, gloo collectives) run a forward pass, an SGD
step and an orbax save + restore onto another mesh (tests/multihost_worker.py), and match this process running the
same job on 8 devices."""
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import FIXTURE_DIR
from multihost_worker import run_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port, worker = free_port(), os.path.join(ROOT, "tests", "multihost_worker.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    multi = tmp_path / "multi"
    multi.mkdir()
    procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), str(multi), str(FIXTURE_DIR)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single = run_job(str(tmp_path / "single"), str(FIXTURE_DIR))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-4000:]
    got = dict(np.load(multi / "result.npz"))
    for key, want in single.items():
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
    assert got["loss1"] < got["loss0"]  # the step descended
    # Restored onto another mesh: the same values in the same places.
    signed, scale = got["saved"].T
    assert np.all(np.abs(got["restored"][:, 0] - signed) <= 1e-6 * scale)
