"""The commands in the documentation run as written.

Two checks:

* **Runnable blocks.** A fenced code block preceded by the line ``<!-- runnable -->`` in README.md,
  training.md or dataset_prep.md is executed on the CPU, blocks in document order (later blocks may use
  what earlier ones wrote): ``bash`` blocks with ``bash -euo pipefail``, ``python`` blocks with the
  interpreter running the tests. They run in the repository root with this interpreter's folder first on
  ``PATH`` (so ``python`` is the project's), and the scratch folder ``/tmp/franca-quickstart`` the blocks
  write to is replaced by a fresh temporary folder. Every block must exit with status 0.
* **Every other command.** Blocks that are shown but too heavy to run here (``make demo``, real training,
  SLURM) are checked statically: each ``python -m MODULE`` / ``python SCRIPT.py`` / ``torchrun … -m MODULE``
  line uses only options that the module's own ``--help`` lists, ``make`` targets exist in the Makefile,
  files under ``configs/`` and ``scripts/`` exist, training overrides ``key=value`` are valid config keys
  for the given config file, RASA overrides are valid RASA keys, and ``torch.hub.load`` calls name an entry
  point of ``hubconf.py`` with arguments it accepts. Python blocks must at least compile.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "training.md", "dataset_prep.md")
RUNNABLE_MARKER = "<!-- runnable -->"
SCRATCH = "/tmp/franca-quickstart"
BLOCK_TIMEOUT_S = 300

_FENCE = re.compile(r"^\s*```(\w*)\s*$")


@dataclass(frozen=True)
class CodeBlock:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    runnable: bool

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def code_blocks(doc: str) -> list[CodeBlock]:
    """The fenced code blocks of ``doc``, each flagged runnable when the marker is on the line before it."""
    lines = (REPO / doc).read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, lang = i, match.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{doc}:{start + 1}: code block is never closed")
        runnable = start > 0 and lines[start - 1].strip() == RUNNABLE_MARKER
        blocks.append(CodeBlock(doc, start + 1, lang, "\n".join(lines[start + 1 : end]), runnable))
        i = end + 1
    return blocks


def all_blocks() -> list[CodeBlock]:
    return [block for doc in DOCS for block in code_blocks(doc)]


# ----------------------------------------------------------------------------------------- runnable blocks
def test_readme_has_runnable_blocks():
    runnable = [b for b in code_blocks("README.md") if b.runnable]
    assert {b.lang for b in runnable} >= {"bash", "python"}, "README.md should mark a bash and a python block runnable"
    for block in all_blocks():
        if block.runnable:
            assert block.lang in ("bash", "python"), f"{block.where}: runnable blocks must be bash or python"


def test_runnable_blocks_exit_zero(tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    scratch = tmp_path / "franca-quickstart"
    runnable = [b for b in all_blocks() if b.runnable]
    assert runnable
    for block in runnable:
        source = block.text.replace(SCRATCH, str(scratch))
        if block.lang == "bash":
            command = ["bash", "-euo", "pipefail", "-c", source]
        else:
            command = [sys.executable, "-c", source]
        result = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, check=False
        )
        output = (result.stdout + result.stderr)[-4000:]
        assert result.returncode == 0, f"{block.where}: {block.lang} block exited {result.returncode}:\n{output}"


# ------------------------------------------------------------------------------------ static command checks
def _logical_lines(text: str) -> list[str]:
    """Shell lines with continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _commands(line: str) -> list[list[str]]:
    """Simple commands of a shell line (split at ``&&``, ``;``, ``|``), leading ``VAR=value`` words dropped."""
    commands = []
    for part in re.split(r"&&|;|\|", line):
        words = shlex.split(part)
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            commands.append(words)
    return commands


_HELP_CACHE: dict[str, str] = {}


def _help_text(target: str) -> str:
    """``--help`` output of a module (``franca.eval.knn``) or a script path, run in this process."""
    if target not in _HELP_CACHE:
        argv, buffer, code = sys.argv, io.StringIO(), None
        try:
            sys.argv = [target, "--help"]
            with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported by its package
                if target.endswith(".py"):
                    runpy.run_path(str(REPO / target), run_name="__main__")
                else:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code
        finally:
            sys.argv = argv
        assert code in (0, None) and "usage" in buffer.getvalue(), f"{target} --help failed (exit {code})"
        _HELP_CACHE[target] = buffer.getvalue()
    return _HELP_CACHE[target]


def _torchrun_help() -> str:
    if "torchrun" not in _HELP_CACHE:
        from torch.distributed.run import get_args_parser

        _HELP_CACHE["torchrun"] = get_args_parser().format_help()
    return _HELP_CACHE["torchrun"]


def _check_options(words: list[str], help_text: str, where: str) -> None:
    for word in words:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text), (
                f"{where}: option {option} is not accepted (not in --help)"
            )


def _overrides(words: list[str]) -> list[str]:
    """The ``key=value`` words that are not option values."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
            continue
        if word.startswith("--"):
            skip = "=" not in word
            continue
        if re.match(r"^[A-Za-z_][\w.]*=", word):
            out.append(word)
    return out


def _option_value(words: list[str], option: str) -> str | None:
    for i, word in enumerate(words):
        if word == option and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


def _check_python_command(words: list[str], where: str) -> None:
    """``python -m MOD …`` or ``python path.py …`` (``words`` starts after ``python``)."""
    if words[0] == "-c":
        return
    if words[0] == "-m":
        target, rest = words[1], words[2:]
    else:
        target, rest = words[0], words[1:]
        assert (REPO / target).is_file(), f"{where}: script {target} does not exist"
    _check_options(rest, _help_text(target), where)
    try:
        if target in ("franca.train.train", "franca.run.train"):
            from franca.utils.config import load_config_file

            config = _option_value(rest, "--config-file")
            load_config_file(str(REPO / config) if config and (REPO / config).exists() else config, _overrides(rest))
        if target == "rasa.train":
            from rasa.train import load_rasa_config

            load_rasa_config(_option_value(rest, "--config"), _overrides(rest))
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise AssertionError(f"{where}: {error}") from error


def _make_targets() -> set[str]:
    makefile = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.MULTILINE))


def _check_shell_command(words: list[str], where: str) -> None:
    program = words[0]
    if program in ("python", "python3"):
        _check_python_command(words[1:], where)
    elif program == "torchrun":
        assert "-m" in words, f"{where}: torchrun lines use -m MODULE"
        m = words.index("-m")
        _check_options(words[1:m], _torchrun_help(), where)
        _check_python_command(words[m:], where)
    elif program == "make":
        for target in (w for w in words[1:] if "=" not in w and not w.startswith("-")):
            assert target in _make_targets(), f"{where}: make target {target} does not exist"
    elif program in ("sbatch", "bash"):
        script = next((w for w in words[1:] if w.endswith((".sh", ".sbatch"))), None)
        assert script is not None, f"{where}: no script named"
        assert (REPO / script).is_file(), f"{where}: {script} does not exist"
        overrides = _overrides(words[words.index(script) + 1 :])
        if overrides and script.startswith("scripts/slurm/"):
            from franca.utils.config import load_config_file

            config = re.search(r"^CONFIG=(\S+)", (REPO / script).read_text(), flags=re.MULTILINE)
            assert config, f"{where}: {script} sets no CONFIG"
            try:
                load_config_file(config.group(1), overrides)
            except (ValueError, KeyError, FileNotFoundError) as error:
                raise AssertionError(f"{where}: {error}") from error
    for word in words:
        if re.match(r"^(configs|scripts)/[\w./-]+$", word):
            assert (REPO / word).exists(), f"{where}: {word} does not exist"


def _bash_blocks() -> list[CodeBlock]:
    return [b for b in all_blocks() if b.lang in ("bash", "sh", "shell")]


@pytest.mark.parametrize("block", _bash_blocks(), ids=lambda b: b.where)
def test_documented_shell_commands_are_valid(block):
    for line in _logical_lines(block.text):
        for words in _commands(line):
            _check_shell_command(words, f"{block.where} `{' '.join(words)[:80]}`")


def _hub_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Attribute)
        and node.func.value.attr == "hub"
    ]


@pytest.mark.parametrize("block", [b for b in all_blocks() if b.lang == "python"], ids=lambda b: b.where)
def test_documented_python_is_valid(block):
    tree = ast.parse(block.text, filename=block.where)
    import hubconf
    from franca.hub.backbones import HUB_BACKBONE_CONFIG, Weights, release_name
    from franca.hub.release_caveats import RELEASE_CAVEATS

    accepted = {"source", "pretrained", "weights", "img_size", "use_rasa_head", "local_state_dict"}
    accepted |= {"RASA_local_state_dict", "drop_path_rate", *HUB_BACKBONE_CONFIG}
    for call in _hub_calls(tree):
        entry = ast.literal_eval(call.args[1])
        assert entry in hubconf.__all__, f"{block.where}: hub entry point {entry!r} is not in hubconf.py"
        weights, given = Weights.IN21K, {}
        for keyword in call.keywords:
            assert keyword.arg in accepted, f"{block.where}: hub argument {keyword.arg!r} is not accepted"
            given[keyword.arg] = keyword.value
            if keyword.arg == "weights":
                value = ast.literal_eval(keyword.value).lower()
                matches = [w for w in Weights if value in (w.name.lower(), w.value.lower())]
                assert matches, f"{block.where}: unknown weights {value!r}"
                weights = matches[0]
        # A documented call must not ask the hub to download a withdrawn or incomplete release.
        arch = next(
            a for a in ("vit_base", "vit_large", "vit_giant2") if release_name(a, 14, weights).startswith(entry)
        )
        pretrained = "pretrained" not in given or ast.literal_eval(given["pretrained"])
        rasa = "use_rasa_head" in given and ast.literal_eval(given["use_rasa_head"])
        downloads = (pretrained and "local_state_dict" not in given) or (rasa and "RASA_local_state_dict" not in given)
        assert not (downloads and (arch, weights.name) in RELEASE_CAVEATS), (
            f"{block.where}: {entry} weights={weights.name!r} would download a withdrawn or incomplete release"
        )


def _anchors(doc: Path) -> set[str]:
    """GitHub-style anchors of the headings of ``doc`` (lower case, punctuation dropped, spaces to hyphens)."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", doc.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    text = (REPO / doc).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = REPO / path if path else REPO / doc
        assert file.exists(), f"{doc}: link to {target}: {path} does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{doc}: link to {target}: no heading with anchor #{anchor}"
