"""``fastflow generate --parallel`` under torchrun (2 CPU processes, gloo): the files rank 0 writes
equal a single-process run's, pixel for pixel, with the global numbering; and the mistakes a user
can make with torchrun are typed errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


def _run(args, cwd, env=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed beside this Python")
def test_data_parallel_files_equal_the_single_process_run(tmp_path):
    base = ["-m", "fastflow", "generate", "a seven", "-n", "3", "--seed", "4", "--no-progress"]
    two = _run([TORCHRUN, "--standalone", "--nproc-per-node", "2", *base, "--parallel", "data=2",
                "-o", str(tmp_path / "split.png")], tmp_path)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = _run([sys.executable, *base, "-o", str(tmp_path / "one.png")], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    split = sorted(p.name for p in tmp_path.glob("split*.png"))
    assert split == ["split-1.png", "split-2.png", "split.png"]  # three files, written once (rank 0)
    assert two.stdout.count("wrote ") == 3
    for name in split:
        a = np.asarray(Image.open(tmp_path / name))
        b = np.asarray(Image.open(tmp_path / name.replace("split", "one")))
        assert np.array_equal(a, b), name
        assert (
            Image.open(tmp_path / name).text["seed"] == Image.open(tmp_path / name.replace("split", "one")).text["seed"]
        )


def test_torchrun_without_parallel_and_parallel_without_torchrun_are_refused(tmp_path):
    base = [sys.executable, "-m", "fastflow", "generate", "a seven", "--no-progress", "-o", str(tmp_path / "x.png")]
    launched = _run(base, tmp_path, env={"WORLD_SIZE": "2", "RANK": "0"})
    assert launched.returncode != 0 and "--parallel" in launched.stderr, launched.stderr[-2000:]
    alone = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    plain = subprocess.run([*base, "--parallel", "data=2"], cwd=tmp_path, env=alone, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert plain.returncode != 0 and "torchrun" in plain.stderr, plain.stderr[-2000:]
    bad = _run([*base, "--parallel", "sideways=2"], tmp_path)
    assert bad.returncode != 0 and "name=size" in bad.stderr, bad.stderr[-2000:]
    assert not list(tmp_path.glob("x*.png"))
