"""Publish fitted decoders on the Hugging Face hub, and load them back by ``hf://`` address.

``brainrecon push RUN REPO_ID`` uploads what another researcher needs to use and judge a run:
the saved decoder, ``run.json``, the test ids, ``metrics.json`` with ``per_image.csv``, the
grid and a generated model card (``README.md``). ``--dry-run DIR`` writes exactly that folder
and uploads nothing.

``hf://owner/name`` or ``hf://owner/name@revision`` is accepted wherever a run or a saved
decoder is (``load_decoder``, ``Run.open``, ``brainrecon predict`` …); :mod:`brainrecon.hub`
resolves it through the Hugging Face cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from brainrecon.errors import BrainreconError
from brainrecon.hub import HF_PREFIX, is_hub_address, resolve_hub_address

__all__ = ["HF_PREFIX", "is_hub_address", "model_card", "push", "resolve_hub_address", "stage"]

# What a published run holds (predictions and reconstructions stay local: large, and
# re-creatable from the decoder).
# metrics-<variant>.json / per_image-<variant>.csv: the reports of other evaluation variants, when present.
_FILES = ("run.json", "test_ids.npy", "metrics.json", "per_image.csv", "metrics-braindiffuser.json",
          "per_image-braindiffuser.csv", "grid.png")

_NSD = ("Natural Scenes Dataset (Allen et al., Nature Neuroscience 2022).")


def _fmt_score(metric: str, report) -> str:
    from brainrecon.eval.report import PERCENT_METRICS

    value = report[metric]
    lo, hi = report.intervals.get(metric, (float("nan"), float("nan")))
    k, unit = (100, " %") if metric in PERCENT_METRICS else (1, "")
    interval = "" if lo != lo else f" [{k * lo:.4g}, {k * hi:.4g}]{unit}"
    return f"{k * value:.4g}{unit}{interval}"


def model_card(run, repo_id: str | None = None) -> str:
    """A model card for ``run``: what it is, how it was made, how it scored, what to cite."""
    from brainrecon import __version__
    from brainrecon.eval.report import ALL_METRICS, EvalReport

    info = run.info
    repo = repo_id or "OWNER/NAME"
    decoder = str(info.get("decoder", "?"))
    params = info.get("params") or {}
    lines = [
        "---",
        "library_name: brainrecon",
        "tags:",
        "- brain-decoding",
        "- fmri",
        f"- {decoder}",
    ]
    if info.get("ids_are_nsd"):
        lines.append("- natural-scenes-dataset")
    lines += ["---", "", f"# {info.get('name', run.path.name)}", ""]
    lines.append(f"A **{decoder}** decoder fitted with brainrecon {info.get('brainrecon_version', __version__)}: "
                 f"it maps subject {info.get('subject')}'s fMRI responses to "
                 + ("images." if info.get("predicts") == "images" else f"the `{info.get('target')}` target space."))
    lines += ["", "```python", "from brainrecon.decoders import load_decoder", "",
              f'decoder = load_decoder("hf://{repo}")', "```", "",
              f"or `brainrecon predict hf://{repo} --data DIR --out pred.npy`.", "", "## How it was made", ""]
    lines.append(f"- decoder: `{decoder}`" + (f", recipe `{info['recipe']}`" if info.get("recipe") else ""))
    lines.append(f"- data: {info.get('data_name', '?')} (fingerprint `{info.get('fingerprint', '?')}`), "
                 f"subject {info.get('subject')}, {info.get('n_test', '?')} test images "
                 f"(ids in `test_ids.npy`)")
    prov = info.get("provenance") or {}
    if prov.get("command"):
        import shlex

        cmd = prov["command"]
        lines.append(f"- command: `{shlex.join(map(str, cmd)) if isinstance(cmd, list) else cmd}`")
    if params:
        lines += ["", "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | `{json.dumps(v, default=str)}` |" for k, v in sorted(params.items())]
    lines += ["", "## Scores", ""]
    metrics_path = run.path / "metrics.json"
    if metrics_path.is_file():
        report = EvalReport.from_json(metrics_path.read_text(encoding="utf-8"))
        lines.append(f"Variant `{report.variant}`, {report.n_images} test images; mean and 95 % bootstrap "
                     "interval over images (per-image scores in `per_image.csv`).")
        lines += ["", "| metric | score |", "|---|---|"]
        lines += [f"| {m} | {_fmt_score(m, report)} |" for m in ALL_METRICS if m in report]
        for m in report.unavailable:
            lines.append(f"| {m} | not computed (reason in `metrics.json`) |")
    else:
        lines.append("Not evaluated (`brainrecon evaluate RUN`).")
    lines += ["", "## Cite", ""]
    cls_citation = ""
    try:
        from brainrecon.decoders import get_decoder_class

        cls_citation = get_decoder_class(decoder).citation
    except BrainreconError:
        pass
    lines.append(f"- {cls_citation or 'the method of decoder ' + repr(decoder)}")
    if info.get("ids_are_nsd"):
        lines.append(f"- {_NSD}")
    lines.append("- brainrecon " + str(info.get("brainrecon_version", __version__)))
    return "\n".join(lines) + "\n"


def stage(run, directory, *, overwrite: bool = False, repo_id: str | None = None) -> Path:
    """Write the folder :func:`push` uploads into ``directory`` (refusing a non-empty one unless
    ``overwrite``)."""
    from brainrecon.io import atomic_directory

    directory = Path(directory)
    if directory.exists():
        if any(directory.iterdir()) and not overwrite:
            raise BrainreconError(f"{directory} is not empty; choose another --dry-run folder or remove it.")
        shutil.rmtree(directory)
    if not (run.path / "decoder" / "brainrecon.json").is_file():
        raise BrainreconError(f"Run {run.name!r} ({run.path}) has no saved decoder to publish.")
    with atomic_directory(directory) as tmp:
        shutil.copytree(run.path / "decoder", tmp / "decoder")
        for name in _FILES:
            if (run.path / name).is_file():
                shutil.copy2(run.path / name, tmp / name)
        (tmp / "README.md").write_text(model_card(run, repo_id), encoding="utf-8")
    return directory


def push(run, repo_id: str, *, private: bool = False, dry_run=None, revision: str | None = None) -> str:
    """Upload ``run`` to the hub repository ``repo_id`` (created if needed); with ``dry_run`` a
    folder, only write the folder. Returns the repository URL, or the folder's path."""
    import tempfile

    from brainrecon.runs import Run

    run = run if isinstance(run, Run) else Run.open(run)
    if repo_id.count("/") != 1:
        raise BrainreconError(f"REPO_ID must be owner/name, got {repo_id!r}.")
    if dry_run is not None:
        return str(stage(run, dry_run, repo_id=repo_id))
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="brainrecon-push-") as tmp:
        folder = stage(run, Path(tmp) / "upload", repo_id=repo_id)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                              commit_message=f"brainrecon: {run.name}")
        except Exception as exc:  # noqa: BLE001 - authentication, network, permissions
            raise BrainreconError(
                f"could not push to {repo_id}: {type(exc).__name__}: {exc}. Log in with `huggingface-cli login` "
                "(or set HF_TOKEN), and check the repository name."
            ) from exc
    return str(url)
