"""``brainrecon import brainguard``: released BrainGuard (two-branch) and WeADL (16-token) files.

The files here are built from a small reference of the released classes (``kunzhan/BrainGuard``
``trainmodel/models.py``: ``BrainGuardModule`` with attributes ``ridge = RidgeRegression(V, h)`` and
``backbone = BrainNetwork(...)``; ``IoanaGabor/bachelor-thesis`` ``ai-server/vbd/reconstruction_service/model.py``
for WeADL), written here from their definitions — parameter names, shapes and forward pass — never
from brainrecon's own modules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from brainrecon.decoders import load_decoder
from brainrecon.decoders.brainguard import BrainGuardDecoder
from brainrecon.decoders.brainguard.official import OfficialFileError
from brainrecon.errors import BrainreconError

pytestmark = pytest.mark.usefixtures("one_thread")

NSD_V = {1: 15724, 2: 14278, 5: 13039, 7: 12682}


# ---------------------------------------------------------------------------- the released classes
class RidgeRegression(nn.Module):
    def __init__(self, input_size, out_features):
        super().__init__()
        self.linear = nn.Linear(input_size, out_features)

    def forward(self, x):
        return self.linear(x)


def _projector(latent, width):
    return nn.Sequential(nn.LayerNorm(latent), nn.GELU(), nn.Linear(latent, width), nn.LayerNorm(width), nn.GELU(),
                         nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, latent))


class BrainNetwork(nn.Module):
    """The released backbone: ``mlp`` (Linear, LayerNorm, GELU, Dropout) with residuals, heads,
    projectors; ``text=False`` is the WeADL fork (no text branch, projector width h)."""

    def __init__(self, out_dim_image, out_dim_text, latent_size, h, n_blocks, projector_width, text=True):
        super().__init__()
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(h, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(0.15))
                                  for _ in range(n_blocks)])
        self.head_image = nn.Linear(h, out_dim_image, bias=True)
        if text:
            self.head_text = nn.Linear(h, out_dim_text, bias=True)
        self.n_blocks, self.latent_size, self.text = n_blocks, latent_size, text
        self.projector_image = _projector(latent_size, projector_width)
        if text:
            self.projector_text = _projector(latent_size, projector_width)

    def forward(self, x):
        residual = x
        for k in range(self.n_blocks):
            x = self.mlp[k](x)
            x += residual
            residual = x
        x = x.reshape(len(x), -1)
        image = self.projector_image(self.head_image(x).reshape(len(x), -1, self.latent_size))
        if not self.text:
            return image
        return image, self.projector_text(self.head_text(x).reshape(len(x), -1, self.latent_size))


class BrainGuardModule(nn.Module):
    def forward(self, x):
        return x


def released_module(n_voxels, *, h=8, n_blocks=2, image_tokens=257, text_tokens=77, dim=768, projector_width=None,
                    text=True, seed=0):
    torch.manual_seed(seed)
    module = BrainGuardModule()
    module.ridge = RidgeRegression(n_voxels, h)
    module.backbone = BrainNetwork(image_tokens * dim, text_tokens * dim, dim, h, n_blocks, projector_width or h,
                                   text=text)
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a swapped weight/bias would show
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return module.eval()


def reference_forward(module, x):
    with torch.no_grad():
        out = module.backbone(module.ridge(x))
    return torch.cat(out, dim=1) if isinstance(out, tuple) else out


def predict_raw(decoder, x):
    s = decoder.subjects_[0]
    with torch.no_grad():
        return decoder.models_[s].eval()(x)


@pytest.fixture(scope="module")
def brainguard_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bg") / "client1_best.pth"
    module = released_module(NSD_V[1], h=8, n_blocks=2, projector_width=12)
    torch.save(module.state_dict(), path)
    return path, module


@pytest.fixture(scope="module")
def weadl_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weadl") / "model.pth"
    module = released_module(NSD_V[2], h=16, n_blocks=4, image_tokens=16, text=False, seed=1)
    torch.save(module.state_dict(), path)
    return path, module


# ---------------------------------------------------------------------------- conversion
def test_brainguard_file_imports_exactly(brainguard_file):
    path, module = brainguard_file
    decoder, report = BrainGuardDecoder.from_official(path, output_report=True)
    assert report.layout == "brainguard" and decoder.subjects_ == [1] and report.subject_inferred
    assert decoder.target == "clip" and decoder.target_options is None and decoder.branches == [257, 77]
    assert decoder.hidden == 8 and decoder.n_blocks == 2 and decoder.projector_hidden == 12
    assert decoder.target_shape_ == (334, 768)
    assert report.n_tensors == len(module.state_dict()) == 2 + 2 * 4 + 4 + 24
    x = torch.randn(5, NSD_V[1])
    ref = reference_forward(module, x)
    assert ref.shape == (5, 334, 768)
    torch.testing.assert_close(predict_raw(decoder, x), ref, rtol=0, atol=1e-5)
    assert any("subject 1 (inferred from the voxel count)" in line for line in report.lines())
    # The released tensor order is kept: tensor k here is tensor k of the released module.
    released = [tuple(p.shape) for p in module.parameters()]
    ours = [tuple(p.shape) for p in decoder.models_[1].parameters()]
    assert ours == released


def test_weadl_file_imports_exactly(weadl_file):
    path, module = weadl_file
    decoder, report = BrainGuardDecoder.from_official(path, subject=2, output_report=True)
    assert report.layout == "weadl" and not report.subject_inferred
    assert decoder.target == "ipadapter" and decoder.branches is None and decoder.projector_hidden is None
    x = torch.randn(4, NSD_V[2])
    torch.testing.assert_close(predict_raw(decoder, x), reference_forward(module, x), rtol=0, atol=1e-5)
    assert any("no negative tokens given" in line for line in report.lines())


def test_save_load_is_identical(brainguard_file, tmp_path):
    path, _ = brainguard_file
    decoder = BrainGuardDecoder.from_official(path)
    decoder.save(tmp_path / "dec")
    again = load_decoder(tmp_path / "dec")
    assert again.imported_["layout"] == "brainguard" and again.imported_["file"] == "client1_best.pth"
    for (k, a), (k2, b) in zip(decoder.models_[1].state_dict().items(), again.models_[1].state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(3, NSD_V[1])
    assert torch.equal(predict_raw(decoder, x), predict_raw(again, x))


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def test_unknown_missing_and_misshapen_keys_are_named(brainguard_file, tmp_path):
    _, module = brainguard_file
    state = module.state_dict()
    bad = dict(state, **{"backbone.extra.weight": torch.zeros(2)})
    torch.save(bad, tmp_path / "unknown.pth")
    with pytest.raises(OfficialFileError) as exc:
        BrainGuardDecoder.from_official(tmp_path / "unknown.pth")
    assert "unknown key(s) backbone.extra.weight" in _one_line(exc)

    missing = {k: v for k, v in state.items() if k != "backbone.projector_text.5.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(OfficialFileError) as exc:
        BrainGuardDecoder.from_official(tmp_path / "missing.pth")
    assert "missing key(s) backbone.projector_text.5.bias" in _one_line(exc)

    wrong = dict(state, **{"backbone.mlp.1.1.weight": torch.zeros(9)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(OfficialFileError) as exc:
        BrainGuardDecoder.from_official(tmp_path / "wrong.pth")
    assert "blocks.1.norm.weight (9,) (expected (8,))" in _one_line(exc)


def test_layout_and_subject_are_checked(brainguard_file, weadl_file, tmp_path):
    with pytest.raises(OfficialFileError, match="it is the 'brainguard' layout, not 'weadl'") as exc:
        BrainGuardDecoder.from_official(brainguard_file[0], layout="weadl")
    _one_line(exc)
    with pytest.raises(OfficialFileError, match=r"reads 15724 voxels .* subject 2 has 14278") as exc:
        BrainGuardDecoder.from_official(brainguard_file[0], subject=2)
    _one_line(exc)
    odd = released_module(999, h=4, n_blocks=1, image_tokens=16, text=False)
    torch.save(odd.state_dict(), tmp_path / "odd.pth")
    with pytest.raises(OfficialFileError, match="999 voxels .* matches no subject .* pass subject=N"):
        BrainGuardDecoder.from_official(tmp_path / "odd.pth")


class _NotWeights:
    pass


def test_a_pickle_that_needs_a_class_is_refused_by_name(brainguard_file, tmp_path):
    torch.save({"model": brainguard_file[1].state_dict(), "args": _NotWeights()}, tmp_path / "pickle.pth")
    with pytest.raises(OfficialFileError) as exc:
        BrainGuardDecoder.from_official(tmp_path / "pickle.pth")
    text = _one_line(exc)
    assert "_NotWeights" in text and "weights_only=True" in text and "\x1b[" not in text


def test_negative_tokens_are_read_and_kept(weadl_file, tmp_path):
    neg = torch.randn(1, 16, 768)
    torch.save(neg, tmp_path / "unconditional_embeddings.pt")
    decoder = BrainGuardDecoder.from_official(weadl_file[0], negative_tokens=tmp_path / "unconditional_embeddings.pt")
    np.testing.assert_array_equal(decoder.negative_tokens_, neg[0].numpy())
    decoder.save(tmp_path / "dec")
    again = load_decoder(tmp_path / "dec")
    np.testing.assert_array_equal(again.for_subject(2).negative_tokens_, neg[0].numpy())
    torch.save(torch.randn(1, 4, 768), tmp_path / "bad.pt")
    with pytest.raises(OfficialFileError, match=re.escape("(1, 16, 768)")):
        BrainGuardDecoder.from_official(weadl_file[0], negative_tokens=tmp_path / "bad.pt")
    with pytest.raises(BrainreconError, match="Versatile Diffusion"):
        BrainGuardDecoder.from_official(brainguard_file_path(tmp_path), negative_tokens=tmp_path / "unconditional_embeddings.pt")


def brainguard_file_path(tmp_path):
    module = released_module(NSD_V[7], h=4, n_blocks=1)
    torch.save(module.state_dict(), tmp_path / "client7_best.pth")
    return tmp_path / "client7_best.pth"


# ---------------------------------------------------------------------------- end to end (WeADL)
SMALL = "synthetic:n_train=60,n_test=6,image_size=32,surface_size=32"
SYNTH_V1 = 1600  # the synthetic data's subject 1 (brainrecon.data.synthetic.DEFAULT_VOXELS)


@pytest.mark.slow
def test_weadl_import_predicts_reconstructs_evaluates_and_continues(tiny_weights, tmp_path):
    """import (CLI, with data) -> predictions -> reconstruct with the deployed negative tokens
    (recipe settings, tiny weights) -> evaluate -> fit --init-from continues training."""
    from typer.testing import CliRunner

    from brainrecon.cli import app
    from brainrecon.generate import IPAdapterGenerator
    from brainrecon.runs import Run
    from brainrecon.workflows.evaluate import evaluate_run
    from brainrecon.workflows.reconstruct import reconstruct_run

    tokens, width = 4, 32  # the tiny IP-Adapter's token shape (16 x 768 at full size)
    module = released_module(SYNTH_V1, h=16, n_blocks=2, image_tokens=tokens, dim=width, text=False, seed=3)
    torch.save(module.state_dict(), tmp_path / "model.pth")
    negative = torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(9))
    torch.save(negative, tmp_path / "unconditional_embeddings.pt")
    runner = CliRunner()
    result = runner.invoke(app, ["import", "brainguard", "--checkpoint", str(tmp_path / "model.pth"),
                                 "--out", str(tmp_path / "imported"), "--negative-tokens",
                                 str(tmp_path / "unconditional_embeddings.pt"), "--ipadapter-dir",
                                 str(tiny_weights["ipadapter"]), "--data", SMALL, "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "subject 1 (inferred from the voxel count), 1600 voxels" in result.output
    run = Run.open(tmp_path / "runs" / "weadl-official-subj01")
    assert run.info["imported_from"] == "model.pth"
    # predictions are the released forward pass on the data's voxels (identity standardisation)
    from brainrecon.data import load_dataset

    voxels = torch.from_numpy(np.array(load_dataset(SMALL).test.voxels(1)))
    np.testing.assert_allclose(run.predictions(), reference_forward(module, voxels).numpy(), rtol=0, atol=1e-5)

    generator = IPAdapterGenerator(tiny_weights["sd"], ipadapter_dir=tiny_weights["ipadapter"], device="cpu")
    run = reconstruct_run(run, recipe="weadl", steps=2, generator=generator, progress=False)
    settings = json.loads((run.path / "reconstructions" / "generation.json").read_text())
    assert settings["recipe"] == "weadl" and settings["guidance_scale"] == 7.5 and settings["steps"] == 2
    assert settings["negative_tokens"].startswith("unconditional_embeddings.pt")
    # the negative branch is the deployed tensor: the same images as generating with it directly
    direct = generator.generate(run.predictions()[:2], seeds=run.test_ids()[:2], uncond=negative[0].numpy(),
                                steps=2, progress=False)
    np.testing.assert_array_equal(run.reconstructions()[:2], direct)
    report = evaluate_run(run, metrics=["PixCorr", "SSIM"], device="cpu", progress=False)
    assert np.isfinite(report["PixCorr"])
    # predict (from the run's saved decoder) and push (staged, no network) take the imported run
    from brainrecon import workflows
    from brainrecon.publish import push

    out = workflows.predict(run.path, out=tmp_path / "pred.npy")
    np.testing.assert_array_equal(np.load(out), run.predictions())
    staged = Path(push(run, "lab/weadl-subj01", dry_run=tmp_path / "push"))
    assert any(p.name == "subject-1.safetensors" for p in staged.rglob("*"))

    # continue federated training from the published weights: sizes and target come from the import
    result = runner.invoke(app, ["fit", "--decoder", "brainguard", "--data", SMALL, "--subjects", "1",
                                 "--init-from", str(tmp_path / "imported"), "--rounds", "1", "--no-evaluate",
                                 "--param", "batch_size=20", "--param", "progress=false",
                                 "--param", "validation_fraction=0", "--param", "dfl_num_pre_loss=1",
                                 "--out", str(tmp_path / "continued")])
    assert result.exit_code == 0, result.output
    assert "from init_from: target='ipadapter'" in result.output
    cont = Run.open(next((tmp_path / "continued").iterdir()))
    assert cont.info["params"]["hidden"] == 16 and cont.info["params"]["init_from"] == str(tmp_path / "imported")
    assert cont.predictions().shape == (6, tokens, width)
