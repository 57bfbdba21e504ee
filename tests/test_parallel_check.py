"""The user-facing mesh self-test, `python -m fcn_jax.check`."""

import json
import subprocess
import sys

import pytest

from fcn_jax import check

SMALL = ["--set", "model.img_size=[32,64]", "--set", "model.patch_size=[4,4]", "--set", "model.embed_dim=64",
         "--set", "model.depth=1", "--set", "model.mlp_ratio=2.0"]
LISTED = ["1,1,1,1", "8,1,1,1", "1,8,1,1", "1,1,2,4", "1,2,2,2", "2,2,2,1", "2,1,2,2"]
#: test_parallel.py covers each mesh's numerics; here two hybrids run always, the rest are marked slow.
FAST_LISTED = {"1,2,2,2", "2,2,2,1"}


def _run_inprocess(capsys, *args):
    rc = check.main(["--experiment", "afno_backbone", "--json", *SMALL, *args])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    return rc, json.loads(out)


@pytest.mark.parametrize("mesh", [pytest.param(m, marks=() if m in FAST_LISTED else pytest.mark.slow) for m in LISTED])
def test_listed_meshes_pass(mesh, capsys):
    rc, report = _run_inprocess(capsys, "--mesh", mesh)
    assert rc == 0, report
    assert set(report) >= {"mesh", "forward_max_rel_err", "grad_max_rel_err", "collectives"}
    assert report["mesh"] == [int(v) for v in mesh.split(",")]
    assert report["forward_max_rel_err"] < 1e-5 and report["grad_max_rel_err"] < 1e-5
    assert set(report["collectives"]) == {"all-to-all", "all-gather", "all-reduce", "reduce-scatter",
                                          "collective-permute"}
    d, c, h, w = report["mesh"]
    assert report["collectives"]["all-to-all"] == 4 * ((h > 1) + (w > 1))  # depth 1
    assert report["collectives"]["all-gather"] == 2 * (c > 1)


def test_invalid_mesh_exits_2_with_valid_sizes(capsys):
    rc = check.main(["--experiment", "afno_backbone", "--mesh", "1,1,4,2", "--json"])
    assert rc == 2
    captured = capsys.readouterr()
    assert "valid height sizes: [1, 2, 3, 5, 6, 9, 10" in json.loads(captured.out)["error"]
    assert "height=4" in captured.err


def test_tolerance_failure_exits_1(capsys):
    rc, report = _run_inprocess(capsys, "--mesh", "1,2,2,2", "--tolerance", "0")
    assert rc == 1 and report["passed"] is False
    assert 0 < report["forward_max_rel_err"] < 1e-5  # a real, tiny float32 reordering error


def test_command_line_with_emulated_devices():
    proc = subprocess.run(
        [sys.executable, "-m", "fcn_jax.check", "--experiment", "afno_backbone", "--mesh", "-1,1,2,2",
         "--cpu-devices", "8", *SMALL],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mesh data=2 channel=1 height=2 width=2 on 8 cpu devices" in proc.stdout
    assert "PASSED" in proc.stdout
