"""Library messages speak of function parameters; the command line adds the flag.

Below the application layer (docs/architecture.md, layers 0-3) an error or warning never names a
command-line flag: it says ``pass overwrite=True``, lists ``parameters=("overwrite",)``, and the
CLI ends the red line with `` (command line: --overwrite)``, the flag of the command that ran. A
whole command the user is told to run, quoted in backticks (`` `brainrecon prepare-nsd --subject
N --out DIR` ``, `` `huggingface-cli download ... --local-dir DIR` ``), may keep its flags.
"""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.errors import BrainreconError
from test_architecture import LAYER_OF, PACKAGE

runner = CliRunner()
SMALL = "synthetic:n_train=120,n_test=12,image_size=32,surface_size=32"

#: A flag: ``--name`` not inside a word (``models--openai--clip`` is a cache folder, not a flag).
FLAG = re.compile(r"(?<![\w-])--[a-z]")
#: A whole command in backticks, of a program the user runs: its flags belong to that command.
QUOTED_COMMAND = re.compile(r"`(?:brainrecon|huggingface-cli|accelerate|torchrun|pip|python)\b[^`]*`")
APPLICATION_LAYER = 4


# ---------------------------------------------------------------------------- the static rule
def _library_modules() -> list[Path]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        unit = "brainrecon" if parts == ("__init__",) else parts[0]
        if LAYER_OF[unit] < APPLICATION_LAYER:
            out.append(path)
    return out


class _Messages:
    """The text of every message a module raises or warns: string constants and f-string parts,
    following names to their assignments (in the function, then the module) and calls to the
    module's own functions and methods to what they return, and a function's parameters to the
    arguments its callers in the module give them (``fix`` strings handed to a helper that raises)."""

    def __init__(self, tree: ast.Module):
        self.functions: dict[str, list[ast.FunctionDef]] = {}
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions.setdefault(node.name, []).append(node)
        self.module_names = self._assignments(tree.body)
        self.calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]

    @staticmethod
    def _assignments(body) -> dict[str, list[ast.expr]]:
        found: dict[str, list[ast.expr]] = {}
        for node in (n for stmt in body for n in ast.walk(stmt)):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        found.setdefault(target.id, []).append(node.value)
        return found

    def _function_of(self, node: ast.AST):
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return None

    def texts(self, node: ast.AST, seen: frozenset = frozenset()) -> list[str]:
        """Each message text in ``node``; a part that is not a string constant reads ``{}``."""
        if node in seen or len(seen) > 12:
            return []
        seen = seen | {node}
        if isinstance(node, ast.Constant):
            return [node.value] if isinstance(node.value, str) else []
        if isinstance(node, ast.JoinedStr):
            whole, parts = "", []
            for value in node.values:
                if isinstance(value, ast.Constant):
                    whole += value.value
                    continue
                inner = self.texts(value.value, seen)
                if len(inner) == 1 and self._is_text(value.value):
                    whole += inner[0]  # a string constant or template: part of the sentence
                else:
                    whole += "{}"
                    parts += inner
            return [whole, *parts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self.texts(node.left, seen), self.texts(node.right, seen)
            if len(left) == 1 and len(right) == 1:
                return [left[0] + right[0]]
            return left + right
        if isinstance(node, ast.Name):
            return self._name_texts(node, seen)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
                and not node.args):  # TEMPLATE.format(n="N"): the template's text
            return self.texts(node.func.value, seen)
        out: list[str] = []
        if isinstance(node, ast.Call):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            for function in self.functions.get(callee, []):
                for ret in ast.walk(function):
                    if isinstance(ret, ast.Return) and ret.value is not None:
                        out += self.texts(ret.value, seen)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.keyword) and child.arg == "parameters":
                continue
            out += self.texts(child, seen)
        return out

    def _is_text(self, node: ast.AST, depth: int = 0) -> bool:
        """Whether ``node`` is a string built from literals (not, say, a path that holds one)."""
        if depth > 6:
            return False
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str)
        if isinstance(node, ast.JoinedStr):
            return True
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self._is_text(node.left, depth + 1) and self._is_text(node.right, depth + 1)
        if isinstance(node, ast.Name):
            values = self._values_of(node)
            return bool(values) and all(self._is_text(v, depth + 1) for v in values)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            return self._is_text(node.func.value, depth + 1)
        return False

    def _values_of(self, node: ast.Name) -> list[ast.expr]:
        function = self._function_of(node)
        while function is not None:
            local = self._assignments(function.body).get(node.id)
            if local:
                return local
            function = self._function_of(function)
        return self.module_names.get(node.id, [])

    def _name_texts(self, node: ast.Name, seen: frozenset) -> list[str]:
        function = self._function_of(node)
        while function is not None:
            local = self._assignments(function.body).get(node.id)
            if local:
                return [t for value in local for t in self.texts(value, seen)]
            arguments = function.args
            names = [a.arg for a in (*arguments.posonlyargs, *arguments.args)]
            if node.id in names or node.id in [a.arg for a in arguments.kwonlyargs]:
                return self._argument_texts(function, node.id, seen)
            function = self._function_of(function)
        return [t for value in self.module_names.get(node.id, []) for t in self.texts(value, seen)]

    def _argument_texts(self, function, parameter: str, seen: frozenset) -> list[str]:
        """What the module's calls of ``function`` pass as ``parameter``."""
        positional = [a.arg for a in (*function.args.posonlyargs, *function.args.args)]
        offset = 1 if positional[:1] in (["self"], ["cls"]) else 0
        out = []
        for call in self.calls:
            callee = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", None)
            if callee != function.name:
                continue
            for keyword in call.keywords:
                if keyword.arg == parameter:
                    out += self.texts(keyword.value, seen)
            if parameter in positional:
                index = positional.index(parameter) - (offset if isinstance(call.func, ast.Attribute) else 0)
                if 0 <= index < len(call.args):
                    out += self.texts(call.args[index], seen)
        return out


def _is_message(node: ast.AST) -> ast.AST | None:
    """The message expression of a raise, a warning, or an exception or warning built to be raised."""
    if isinstance(node, ast.Raise):
        return node.exc
    if isinstance(node, ast.Call):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name == "warn" or name.endswith(("Error", "Exception", "Warning")):
            return node
    return None


def flag_messages(paths) -> list[str]:
    """``file:line: text`` of every raised or warned message that names a flag outside a quoted command."""
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        messages = _Messages(tree)
        shown = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path.name
        for node in ast.walk(tree):
            expr = _is_message(node)
            if expr is None:
                continue
            for text in messages.texts(expr):
                if FLAG.search(QUOTED_COMMAND.sub("", text)):
                    found.append(f"{shown}:{node.lineno}: {text.strip()[:160]!r}")
                    break
    return sorted(set(found), key=lambda s: (s.split(":")[0], int(s.split(":")[1])))


def test_library_messages_name_parameters_not_flags():
    wrong = flag_messages(_library_modules())
    assert not wrong, ("messages below the application layer naming a command-line flag (say `pass name=value`, "
                       "list the name in parameters=(...); the CLI adds the flag):\n" + "\n".join(wrong))


def test_the_static_rule_finds_flags_however_the_message_is_built(tmp_path):
    """The rule's reach: f-strings, names, helpers returning messages or errors, parameters
    given by callers, warnings; a quoted command and a cache folder name pass."""
    module = tmp_path / "sample.py"
    module.write_text('''
import warnings
from brainrecon.errors import BrainreconError, DataError
HINT = "pass --data DIR"
OK = "run `brainrecon prepare-nsd --subject 1 --out DIR` first"

def plain(x):
    raise DataError(f"bad {x}; pass --overwrite")

def by_name():
    raise DataError(f"missing; {HINT}")

def built_up(x):
    message = f"bad {x}"
    message += "; choose another --out"
    raise BrainreconError(message)

def _error(what):
    return BrainreconError(f"{what} not found; pass --weights-dir")

def via_helper():
    raise _error("weights")

def _load(name, fix):
    raise BrainreconError(f"cannot load {name}. {fix}")

def via_argument():
    _load("vae", "To fix: pass --vae DIR")

def warned():
    warnings.warn("pass --resume to continue", UserWarning)

def quoted():
    raise DataError(f"no subject; {OK}")

def cache_folder():
    raise DataError("looked in models--openai--clip-vit; pass weights_dir", parameters=("weights_dir",))
''')
    lines = flag_messages([module])
    where = sorted(int(line.split(":")[1]) for line in lines)
    assert where == [8, 11, 16, 19, 22, 25, 31], lines  # quoted() and cache_folder() pass


def test_layers_below_the_application_are_all_scanned():
    scanned = {p.relative_to(PACKAGE).parts[0] for p in _library_modules()}
    assert {"decoders", "data", "eval", "targets", "generate", "runs.py", "io.py", "hub.py"} <= scanned
    assert not scanned & {"workflows", "federation", "cli", "demo.py", "publish.py"}


# ---------------------------------------------------------------------------- the command line adds the flag
def _flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    return _flat(result.output.split("error:")[-1])


def _h5(path: Path, nan: bool = False) -> Path:
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        g = f.create_group("subj01")
        X = rng.normal(size=(30, 20)).astype(np.float32)
        if nan:
            X[2, 3] = np.nan
        g["train_voxels"] = X
        g["test_voxels"] = rng.normal(size=(4, 20)).astype(np.float32)
        g["train_images"] = rng.integers(0, 255, (30, 8, 8, 3), dtype=np.uint8)
        g["test_images"] = rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    return path


def test_fit_adds_the_flag_of_a_parameter_spelled_differently(tmp_path):
    """nan_policy (the data layer's parameter) is --nan-policy on the command line."""
    result = runner.invoke(app, ["fit", "--decoder", "ridge", "--data", str(_h5(tmp_path / "d.h5", nan=True)),
                                 "--out", str(tmp_path / "r"), "--param", 'target_options={"size": 4}',
                                 "--no-evaluate"])
    line = _error_line(result)
    assert "pass nan_policy='zero' to replace them with 0." in line
    assert line.endswith("(command line: --nan-policy)"), line


def test_fit_adds_a_decoders_own_option():
    """NeuroPictor's init_from is fit's --init-from (a decoder option, not one of fit's own)."""
    result = runner.invoke(app, ["fit", "--decoder", "neuropictor", "--data", SMALL, "--stage", "cfg",
                                 "--subjects", "1", "--out", "unused", "--no-evaluate"])
    line = _error_line(result)
    assert "pass init_from=<saved decoder of stage 'pretrain' or 'finetune'>" in line
    assert line.endswith("(command line: --init-from)"), line


def test_fit_adds_every_flag_an_error_names(tmp_path):
    result = runner.invoke(app, ["fit", "--decoder", "brainguard", "--data", SMALL, "--subjects", "1", "2",
                                 "--out", str(tmp_path), "--resume", "--no-evaluate"])
    line = _error_line(result)
    assert "resume=True needs checkpoint_dir" in line
    assert line.endswith("(command line: --resume, --checkpoint-dir)"), line


def test_prepare_nsd_adds_its_flags(tmp_path):
    args = ["prepare-nsd", "--nsd-root", str(tmp_path / "nsd"), "--subject", "4", "--out", str(tmp_path / "out")]
    line = _error_line(runner.invoke(app, [*args, "--sessions", "31"]))
    assert "sessions=31 asks for sessions up to 31" in line and "Use sessions=30 or sessions='all'." in line
    assert line.endswith("(command line: --sessions)"), line
    line = _error_line(runner.invoke(app, [*args, "--format", "brain-diffuser", "--zscore", "session"]))
    assert "zscore='session' is only available with format='brainrecon'" in line
    assert line.endswith("(command line: --format, --zscore)"), line


def test_evaluate_adds_the_flag_of_the_datas_location(tmp_path):
    """Run.dataset's source (the data layer's) is evaluate's --data."""
    data = _h5(tmp_path / "d.h5")
    fitted = runner.invoke(app, ["fit", "--decoder", "ridge", "--data", str(data), "--out", str(tmp_path / "r"),
                                 "--param", 'target_options={"size": 4}', "--no-evaluate"])
    assert fitted.exit_code == 0, fitted.output
    data.unlink()
    result = runner.invoke(app, ["evaluate", str(tmp_path / "r" / "ridge-subj01-pixels"), "-m", "PixCorr"])
    line = _error_line(result)
    assert "pass its new location as source" in line
    assert line.endswith("(command line: --data)"), line


def test_a_parameter_only_param_sets_and_a_warning_get_their_flags(monkeypatch):
    """A decoder parameter without an option of its own is `--param name=...`; a warning that
    names parameters gets the same note; a parameter the command cannot set gets none."""
    from brainrecon import workflows
    from brainrecon.runs import BrokenRunWarning

    def fake_fit(*args, **kwargs):
        warnings.warn(BrokenRunWarning("pass resume=True to continue it instead.", parameters=("resume",)),
                      stacklevel=2)
        raise BrainreconError("Pass encoder_eps=1e-06, or use another vc_roi.", parameters=("encoder_eps", "vc_roi"))

    monkeypatch.setattr(workflows, "fit", fake_fit)
    result = runner.invoke(app, ["fit", "--decoder", "ridge"])
    assert "pass resume=True to continue it instead. (command line: --resume)" in _flat(result.output)
    # vc_roi is prepare-surfaces' --vc-roi, which `fit` does not have: no other command's flag
    assert _error_line(result).endswith("Pass encoder_eps=1e-06, or use another vc_roi. "
                                        "(command line: --param encoder_eps=...)")


def test_an_error_from_python_reads_without_flags(tmp_path):
    from brainrecon.data.nsd import resolve_sessions

    with pytest.raises(BrainreconError) as caught:
        resolve_sessions(4, 31, None)
    assert "--" not in str(caught.value) and caught.value.parameters == ("sessions",)
