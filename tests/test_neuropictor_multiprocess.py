"""Several processes (torch.distributed on CPU, gloo) train NeuroPictor exactly as one process
accumulating the same global batch; a run resumed on another number of processes continues it.

Launchers: ``accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
--dynamo_backend no`` (the command the README gives; on CPU its torchrun workers join one gloo group)
and plain ``torchrun``. ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's
simple launcher; several CPU processes only through mpirun, and ``--cpu`` with ``--multi_gpu`` is
refused): brainrecon says so and trains in one process with the same global batch.

Tolerance: averaging two per-sample gradients across processes and accumulating two halves are
the same float operations, but each process sums in its own order (its BLAS kernels depend on the
memory alignment a process happens to get): gradients, losses and parameters agree to
``tests/numerics.f32_atol`` with ``K = 1024``, the longest reduction of this tiny model (a weight
gradient summed over the 32 × 32 positions of its largest feature map). Every launch runs on
127.0.0.1 in its own process group, bounded by a timeout and killed (the whole group) in ``finally``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from numerics import f32_atol

# The longest float32 sum in the tiny model's forward and backward passes (see the docstring).
REDUCTION = 1024

WORKER = r'''
import json, sys
import torch
torch.set_num_threads(1)
from safetensors.torch import save_file
from accelerate import PartialState
from brainrecon.data.synthetic import make_synthetic
from brainrecon.decoders.neuropictor import NeuroPictorDecoder

out, kw = sys.argv[1], json.loads(sys.argv[2])
grads, real_step = [], torch.optim.AdamW.step

def recording_step(self, *args, **kwargs):
    grads.append(torch.cat([p.grad.detach().flatten() for g in self.param_groups for p in g["params"]]))
    return real_step(self, *args, **kwargs)

torch.optim.AdamW.step = recording_step
ds = make_synthetic(seed=0, subjects=(1,), n_train=8, n_test=2, image_size=32, surface_size=16)
decoder = NeuroPictorDecoder(**kw).fit(ds.train)
if PartialState().is_main_process:
    tensors = {"param." + k: v.detach().contiguous() for k, v in decoder.net_.state_dict().items()}
    plan = decoder.training_plan_
    save_file({**tensors, "grads": torch.stack(grads), "losses": torch.tensor(decoder.losses_),
               "grad_accum": torch.tensor(plan["grad_accum"]), "plan_processes": torch.tensor(plan["processes"]),
               "processes": torch.tensor(PartialState().num_processes)}, out)
'''

TINY = {"surface_size": 16, "patch_size": 4, "encoder_dim": 32, "encoder_depth": 2, "encoder_heads": 4,
        "semantic_hidden": 8, "image_size": 32, "stage": "pretrain", "base_model": "tiny", "lr": 1e-3,
        "batch_size": 1, "global_batch": 2, "progress": False, "device": "cpu",
        "gradient_checkpointing": False, "seed": 1}


# The workers run one thread each; the same here keeps the float reductions alike.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH_TIMEOUT = 300
SYNTHETIC = "synthetic:n_train=8,n_test=2,image_size=32,surface_size=16,seed=0"


def _accelerate(port: int, n: int = 2) -> list[str]:
    """The README's several-CPU-processes command (accelerate's CLI through this interpreter)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", "1", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port)]


def _torchrun(port: int, n: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
            "127.0.0.1", "--master_port", str(port)]


def _launch(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group on loopback; the whole group is killed at the end."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        out, err = "", f"timed out after {LAUNCH_TIMEOUT} s: {' '.join(cmd)}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers the launcher left behind, if any
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _train_two_processes(tmp_path, launcher="accelerate", **kw):
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "two.safetensors"
    start = _accelerate if launcher == "accelerate" else _torchrun
    done = _launch([*start(_free_port()), str(script), str(out), json.dumps({**TINY, **kw})], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out))


def _cli_fit(tmp_path, launch: list[str], name: str, **kw) -> subprocess.CompletedProcess:
    """``<launch> -m brainrecon.cli fit --decoder neuropictor ...`` with TINY's values."""
    params = {**TINY, **kw}
    named = {"stage": "--stage", "batch_size": "--batch-size", "device": "--device", "seed": "--seed",
             "checkpoint_dir": "--checkpoint-dir"}
    args = ["-m", "brainrecon.cli", "fit", "--decoder", "neuropictor", "--data", SYNTHETIC, "--subjects", "1",
            "--out", str(tmp_path / "runs"), "--name", name, "--no-evaluate"]
    for key, value in params.items():
        if key == "resume":
            args += ["--resume"] if value else []
        elif key in named:
            args += [named[key], str(value)]
        else:
            args += ["--param", f"{key}={json.dumps(value)}"]
    done = _launch([*launch, *args], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _saved_run(tmp_path, name: str) -> dict:
    from brainrecon.decoders import load_decoder

    decoder = load_decoder(tmp_path / "runs" / name / "decoder")
    out = {"param." + k: v.detach() for k, v in decoder.net_.state_dict().items()}
    return {**out, "losses": torch.tensor(decoder.losses_[-1:]), "plan": decoder.training_plan_}


def _train_here(monkeypatch, data=None, **kw):
    """The same training in this process (one process, gradient accumulation)."""
    from brainrecon.data import load_dataset
    from brainrecon.data.synthetic import make_synthetic
    from brainrecon.decoders.neuropictor import NeuroPictorDecoder

    grads, real_step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads.append(torch.cat([p.grad.detach().flatten() for g in self.param_groups for p in g["params"]]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    if data is None:
        ds = make_synthetic(seed=0, subjects=(1,), n_train=8, n_test=2, image_size=32, surface_size=16)
    else:  # as `brainrecon fit --data DATA --subjects 1` reads it
        ds = load_dataset(data, subjects=[1])
        kw = {"subjects": [1], **kw}
    decoder = NeuroPictorDecoder(**{**TINY, **kw}).fit(ds.train)
    out = {"param." + k: v.detach() for k, v in decoder.net_.state_dict().items()}
    return {**out, "grads": torch.stack(grads) if grads else torch.zeros(0), "losses": torch.tensor(decoder.losses_),
            "grad_accum": torch.tensor(decoder.training_plan_["grad_accum"])}


def _close(b, a):
    torch.testing.assert_close(b, a, rtol=0, atol=f32_atol(a, REDUCTION))


def _same_parameters(a, b):
    _close(b["losses"], a["losses"])
    for key in a:
        if key.startswith("param."):
            _close(b[key], a[key])


def _need_gloo():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_processes_equal_one_process_accumulating(tmp_path, monkeypatch, launcher):
    _need_gloo()
    two = _train_two_processes(tmp_path, launcher, steps=3, checkpoint_dir=str(tmp_path / "ckpt"),
                               checkpoint_every=1)
    one = _train_here(monkeypatch, steps=3)
    assert (int(two["processes"]), int(two["plan_processes"]), int(two["grad_accum"])) == (2, 2, 1)
    assert int(one["grad_accum"]) == 2
    _close(two["grads"], one["grads"])
    _same_parameters(one, two)

    # Resume the two-process run from its step-2 checkpoint in one process: same global batch.
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    shutil.copytree(tmp_path / "ckpt" / "step_00000002", resume_dir / "step_00000002")
    resumed = _train_here(monkeypatch, steps=3, checkpoint_dir=str(resume_dir), resume=True)
    _same_parameters(one, resumed)


def test_accelerate_launch_cli_fit_two_processes_and_resume_one_process_run(tmp_path, monkeypatch):
    """The user's command: `accelerate launch --multi_gpu ... -m brainrecon.cli fit --decoder neuropictor`."""
    _need_gloo()
    one = _train_here(monkeypatch, data=SYNTHETIC, steps=3, checkpoint_dir=str(tmp_path / "ckpt1"),
                      checkpoint_every=1)
    assert int(one["grad_accum"]) == 2

    _cli_fit(tmp_path, _accelerate(_free_port()), "two", steps=3)
    two = _saved_run(tmp_path, "two")
    assert (two["plan"]["processes"], two["plan"]["grad_accum"], two["plan"]["global_batch"]) == (2, 1, 2)
    _same_parameters({**one, "losses": one["losses"][-1:]}, two)

    # A one-process run (grad_accum 2) resumed from its step-2 checkpoint on two processes
    # (grad_accum 1): same global batch, same parameters as the uninterrupted run.
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    shutil.copytree(tmp_path / "ckpt1" / "step_00000002", resume_dir / "step_00000002")
    _cli_fit(tmp_path, _accelerate(_free_port()), "resumed", steps=3, checkpoint_dir=str(resume_dir), resume=True)
    resumed = _saved_run(tmp_path, "resumed")
    assert (resumed["plan"]["processes"], resumed["plan"]["grad_accum"]) == (2, 1)
    _same_parameters({**one, "losses": one["losses"][-1:]}, resumed)


def test_accelerate_launch_cpu_flag_runs_one_process_and_says_so(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: warned, same global batch."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port())]
    done = _cli_fit(tmp_path, launch, "cpu-flag", steps=1)
    assert "starts one process" in done.stderr and "--multi_gpu" in done.stderr
    plan = _saved_run(tmp_path, "cpu-flag")["plan"]
    assert (plan["processes"], plan["grad_accum"], plan["global_batch"]) == (1, 2, 2)


def test_single_process_cpu_launch_is_detected_from_the_launcher_environment(monkeypatch):
    from brainrecon.decoders.neuropictor.decoder import single_process_cpu_launch

    for key in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE",
                "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert not single_process_cpu_launch()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert not single_process_cpu_launch()  # `accelerate launch --cpu` with one process
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert single_process_cpu_launch()  # ... with --num_processes 2: still one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not single_process_cpu_launch()  # really several (torchrun, mpirun)
