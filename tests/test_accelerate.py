"""Data-parallel describer training under Hugging Face accelerate: 2 CPU processes (gloo) train what one process
trains with the same global batch (tests/accelerate_train.py, the tiny Llama)."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "accelerate_train.py"
ACCELERATE = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], out: Path) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU processes, one thread each
    done = subprocess.run(command + [str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.skipif(not Path(ACCELERATE).exists(), reason="the accelerate command is not installed")
def test_two_processes_train_what_one_process_trains(tmp_path):
    one = _run([sys.executable, str(SCRIPT)], tmp_path / "one.pt")
    # --multi_gpu is accelerate's torchrun launcher; without CUDA its processes talk over gloo
    launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    two = _run([*launch, str(SCRIPT)], tmp_path / "two.pt")
    assert (one["processes"], two["processes"]) == (1, 2)
    # the same losses (the batch's mean over both shards) and the same trained weights, to float32 rounding
    assert torch.allclose(torch.tensor(one["loss"]), torch.tensor(two["loss"]), rtol=1e-4, atol=1e-5)
    assert one["val"] == pytest.approx(two["val"], rel=1e-4, nan_ok=True)
    for name, weight in one["projector"].items():
        torch.testing.assert_close(two["projector"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    assert one["loss"][0] != one["loss"][-1]
