"""Regenerate the reference pages of docs/ from the code: ``python docs/generate.py``.

- ``docs/cli.md``: every command and option, from the typer app (``typer ... utils docs``);
- ``docs/decoders.md``: every registered decoder with its summary, documentation, parameters
  and defaults, and its named recipes with their sources and values.

``tests/test_docs.py`` fails when a page is out of date, naming this command.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def cli_page() -> str:
    out = DOCS / ".cli.md.tmp"
    subprocess.run([sys.executable, "-m", "typer", "brainrecon.cli", "utils", "docs", "--name", "brainrecon",
                    "--title", "Command-line reference", "--output", str(out)],
                   check=True, capture_output=True, text=True)
    text = out.read_text(encoding="utf-8")
    out.unlink()
    return text


def _builtin_decoders() -> list[str]:
    from brainrecon.decoders import DECODERS

    return sorted(DECODERS.builtin_paths)


def decoders_page() -> str:
    from brainrecon.decoders import get_decoder_class
    from brainrecon.decoders import recipes_for

    lines = ["# Decoders", "",
             "Generated from the decoder registry by `python docs/generate.py`. Every decoder has `fit`, "
             "`predict`, `save` and `load`; parameters are given to `brainrecon fit` as `--param name=value` "
             "(the most used ones also as options) and recipes as `--recipe NAME`.", ""]
    for name in _builtin_decoders():
        cls = get_decoder_class(name)
        lines += [f"## {name}", "", f"*{cls.summary}* Predicts: {cls.predicts}; "
                  f"{'several subjects at once' if cls.multi_subject else 'one subject per fit'}.", ""]
        doc = inspect.cleandoc(cls.__doc__ or "")
        if doc:
            lines += ["```text", doc, "```", ""]
        lines += ["| parameter | default |", "|---|---|"]
        lines += [f"| `{k}` | `{v!r}` |" for k, v in cls.default_params().items()]
        lines.append("")
        for recipe in recipes_for(name).values():
            lines += [f"### Recipe `{recipe.name}`", "", f"{recipe.summary}".strip(), "",
                      f"Source: {recipe.source}", "", "| parameter | value | note |", "|---|---|---|"]
            for k, v in recipe.values.items():
                note = recipe.notes.get(k, "").replace("|", "\\|")
                lines.append(f"| `{k}` | `{v!r}` | {note} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


PAGES = {"cli.md": cli_page, "decoders.md": decoders_page}


def main() -> int:
    for name, make in PAGES.items():
        (DOCS / name).write_text(make(), encoding="utf-8")
        print(f"wrote docs/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
