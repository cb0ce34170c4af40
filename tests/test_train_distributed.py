"""Two gloo ranks under torchrun train exactly like one process on the joined batch; the official
launch flags start the processes through torchrun."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_two_ranks_match_one_process_on_the_joined_batch(tmp_path):
    out = tmp_path / "ranks.pt"
    proc = _torchrun([str(HERE / "dist_train_worker.py"), str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)

    import dist_train_worker as worker
    from nvae_fast.train.runtime import Runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): same summation order
    try:
        expected = worker.run(0, 1, worker.make_trainer(Runtime(torch.device("cpu"))))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), atol=1e-5, rtol=1e-5)
    for kind in ("grads", "buffers"):
        assert got[kind].keys() == expected[kind].keys()
        for name, value in expected[kind].items():
            # fp32 sums in another order: errors scale with the tensor's magnitude (bias gradients
            # of about 20 sum terms of either sign, so an element near 0 can be off by 5e-5).
            scale = max(1.0, value.abs().max().item())
            torch.testing.assert_close(got[kind][name], value, atol=1e-5 * scale, rtol=1e-5, msg=f"{kind} {name}")


def test_official_launch_flags_run_two_processes_writing_once_from_rank_zero(tmp_path):
    from train_fixtures import write_mnist

    write_mnist(tmp_path, n_train=32, n_test=8)
    with socket.socket() as s:  # a free port for the rendezvous (official default: 6020)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "nvae_fast", "train", "--preset", "tiny_mnist", "--data", str(tmp_path), "--root",
         str(tmp_path / "runs"), "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "4", "--num_iw_samples",
         "2", "--num_samples", "4", "--num_process_per_node", "2", "--master_address", "127.0.0.1",
         "--device", "cpu"],   # gloo ranks on the CPU: a one-GPU machine has no cuda:1 for rank 1
        cwd=tmp_path, env={**_env(), "MASTER_PORT": str(port)}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "eval-tiny_mnist"
    log = (run / "log.txt").read_text()
    assert log.count("final test") == 1 and "2 process(es)" in log
    assert proc.stdout.count("test bits/dim") == 1
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and len(state["rng"]) == 2  # 32 images / (2 ranks x 4)
    assert (run / "samples.png").is_file() and (run / "final_eval.json").is_file()
