"""Several processes (torch.distributed on CPU, gloo) train NeuroPictor exactly as one process
accumulating the same global batch; a run resumed on another number of processes continues it.

Tolerance: gradients and parameters agree to 1e-6 absolute (they were bit-identical when written:
averaging two per-sample gradients across processes and accumulating two halves are the same
float operations).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch

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
               "grad_accum": torch.tensor(plan["grad_accum"]),
               "processes": torch.tensor(PartialState().num_processes)}, out)
'''

TINY = {"surface_size": 16, "patch_size": 4, "encoder_dim": 32, "encoder_depth": 2, "encoder_heads": 4,
        "semantic_hidden": 8, "image_size": 32, "stage": "pretrain", "base_model": "tiny", "lr": 1e-3,
        "batch_size": 1, "global_batch": 2, "progress": False, "device": "cpu",
        "gradient_checkpointing": False, "seed": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    # The workers run one thread each; the same here keeps the float reductions alike.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_processes(tmp_path, **kw):
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "two.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(out), json.dumps({**TINY, **kw})]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out))


def _train_here(monkeypatch, **kw):
    """The same training in this process (one process, gradient accumulation)."""
    from brainrecon.data.synthetic import make_synthetic
    from brainrecon.decoders.neuropictor import NeuroPictorDecoder

    grads, real_step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads.append(torch.cat([p.grad.detach().flatten() for g in self.param_groups for p in g["params"]]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    ds = make_synthetic(seed=0, subjects=(1,), n_train=8, n_test=2, image_size=32, surface_size=16)
    decoder = NeuroPictorDecoder(**{**TINY, **kw}).fit(ds.train)
    out = {"param." + k: v.detach() for k, v in decoder.net_.state_dict().items()}
    return {**out, "grads": torch.stack(grads) if grads else torch.zeros(0), "losses": torch.tensor(decoder.losses_),
            "grad_accum": torch.tensor(decoder.training_plan_["grad_accum"])}


def _same_parameters(a, b):
    torch.testing.assert_close(b["losses"], a["losses"], rtol=0, atol=1e-6)
    for key in a:
        if key.startswith("param."):
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_two_processes_equal_one_process_accumulating(tmp_path, monkeypatch):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    two = _train_two_processes(tmp_path, steps=3, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1)
    one = _train_here(monkeypatch, steps=3)
    assert (int(two["processes"]), int(two["grad_accum"])) == (2, 1)
    assert int(one["grad_accum"]) == 2
    torch.testing.assert_close(two["grads"], one["grads"], rtol=0, atol=1e-6)
    _same_parameters(one, two)

    # Resume the two-process run from its step-2 checkpoint in one process: same global batch.
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    shutil.copytree(tmp_path / "ckpt" / "step_00000002", resume_dir / "step_00000002")
    resumed = _train_here(monkeypatch, steps=3, checkpoint_dir=str(resume_dir), resume=True)
    _same_parameters(one, resumed)
