"""Every command in README.md's ```bash blocks names an existing script or module, and every
``--flag`` it passes appears in that script's ``--help`` (launcher flags in the launcher's).

The parser is tested on a made-up README first, so the check itself can fail.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHONS = re.compile(r"^python(3(\.\d+)?)?$")
LAUNCHER_MODULES = ("torch.distributed.launch", "torch.distributed.run")
IGNORED = {"git", "export", "mkdir", "ls", "cat", "echo", "rm", "cp", "mv", "tensorboard", "nvidia-smi", "conda",
           "deactivate", "wget", "curl", "unzip", "tar", "ln", "sudo", "apt-get", "watch", "tail", "head", "du"}
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "2>&1", "&>"}


@dataclass
class Check:
    """One thing to verify: ``target`` (a script path or ``-m module``) with its flags, or a path that must exist."""

    line: str
    cwd: Path
    target: Optional[Tuple[str, str]] = None          # ("script", path) or ("module", name)
    flags: List[str] = field(default_factory=list)
    launcher: Optional[Tuple[str, str]] = None
    launcher_flags: List[str] = field(default_factory=list)
    paths: List[str] = field(default_factory=list)


def bash_blocks(markdown: str) -> List[str]:
    return re.findall(r"^```(?:bash|sh|shell)[^\n]*\n(.*?)^```", markdown, flags=re.S | re.M)


def _logical_lines(block: str) -> List[str]:
    return [line for line in re.sub(r"\\\n", " ", block).splitlines() if line.strip()]


def _split(line: str) -> List[List[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    commands, current, tokens = [], [], list(lexer)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in OPERATORS:
            commands.append(current)
            current = []
        elif token in REDIRECTS or re.fullmatch(r"\d?[<>]+&?\d?", token):
            index += 1  # the redirection's target
        else:
            current.append(token)
        index += 1
    commands.append(current)
    return [c for c in commands if c]


def _flags(tokens: List[str]) -> List[str]:
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--") and len(t) > 2]


def _python_check(argv: List[str], line: str, cwd: Path) -> Optional[Check]:
    """``python [-u] (-m module | script.py) args``, launchers included."""
    rest = argv[1:]
    while rest and rest[0].startswith("-") and rest[0] != "-m":
        rest = rest[1:]
    if not rest:
        return None
    if rest[0] == "-m":
        module, args = rest[1], rest[2:]
        if module == "pip":
            return _pip_check(args, line, cwd)
        if module in LAUNCHER_MODULES:
            return _launched(("module", module), args, line, cwd)
        return Check(line, cwd, ("module", module), _flags(args))
    return Check(line, cwd, ("script", rest[0]), _flags(rest[1:]))


def _launched(launcher: Tuple[str, str], args: List[str], line: str, cwd: Path) -> Check:
    """torchrun / torch.distributed.launch: launcher flags, then the script (or ``-m module``) and its flags."""
    for index, token in enumerate(args):
        if token in ("-m", "--module") and index + 1 < len(args):
            return Check(line, cwd, ("module", args[index + 1]), _flags(args[index + 2:]), launcher,
                         _flags(args[:index]))
        if token.endswith(".py"):
            return Check(line, cwd, ("script", token), _flags(args[index + 1:]), launcher, _flags(args[:index]))
    return Check(line, cwd, None, [], launcher, _flags(args))


def _pip_check(args: List[str], line: str, cwd: Path) -> Check:
    paths = []
    for flag, value in zip(args, args[1:]):
        if flag in ("-r", "--requirement", "-e", "--editable", "-c", "--constraint"):
            paths.append(re.sub(r"\[.*\]$", "", value))
    return Check(line, cwd, paths=paths)


def checks_for(markdown: str, root: Path = REPO) -> List[Check]:
    """What to verify for every command of every bash block (``cd`` carries over within a block)."""
    checks = []
    for block in bash_blocks(markdown):
        cwd = root
        for line in _logical_lines(block):
            for argv in _split(line):
                while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                    argv = argv[1:]  # VAR=value prefixes
                if not argv:
                    continue
                program = argv[0]
                if program == "cd" and len(argv) > 1:
                    target = (cwd / argv[1]).resolve()
                    cwd = target if target.is_dir() else cwd  # a fresh clone's folder is the repository
                elif PYTHONS.match(program):
                    check = _python_check(argv, line, cwd)
                    if check is not None:
                        checks.append(check)
                elif program == "torchrun":
                    checks.append(_launched(("module", "torch.distributed.run"), argv[1:], line, cwd))
                elif program in ("pip", "pip3"):
                    checks.append(_pip_check(argv[1:], line, cwd))
                elif program == "pytest":
                    checks.append(Check(line, cwd, ("module", "pytest"), _flags(argv[1:])))
                elif program in ("source", ".", "bash", "sh") and len(argv) > 1:
                    checks.append(Check(line, cwd, paths=[argv[1]]))
                elif program.startswith("./") or program.endswith((".py", ".sh")):
                    checks.append(Check(line, cwd, paths=[program]))
                elif program not in IGNORED:
                    checks.append(Check(line, cwd, paths=[]))
    return checks


@lru_cache(maxsize=None)
def help_text(kind: str, name: str, cwd: str) -> Tuple[int, str]:
    command = [sys.executable, name, "--help"] if kind == "script" else [sys.executable, "-m", name, "--help"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=240)
    return result.returncode, result.stdout + result.stderr


def _has_flag(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def problems(check: Check) -> List[str]:
    """What is wrong with one command (empty: fine)."""
    found = []
    for path in check.paths:
        if not path.startswith("$") and not (check.cwd / path).exists():
            found.append(f"{check.line!r}: {path} does not exist (from {check.cwd})")
    for target, flags in ((check.launcher, check.launcher_flags), (check.target, check.flags)):
        if target is None:
            continue
        kind, name = target
        if kind == "script" and not (check.cwd / name).is_file():
            found.append(f"{check.line!r}: script {name} does not exist (from {check.cwd})")
            continue
        status, text = help_text(kind, name, str(check.cwd))
        if status != 0:
            found.append(f"{check.line!r}: `{name} --help` failed (exit {status}): {text.strip().splitlines()[-1:]}")
            continue
        found += [f"{check.line!r}: {name} has no flag {flag}" for flag in flags if not _has_flag(text, flag)]
    return found


FAKE_README = """
# x
```bash
pip install -e ".[all]" && python -m pytest -q --timeout 300     # tests
cd cls
python3 -m torch.distributed.launch --nproc_per_node=8 train.py --gpu_num=8 --save LOGDIR \\
    --no_such_flag 3
torchrun --nproc_per_node=2 cls/train.py --norm mabn
python -m benchmarks.bench --definitely-not-a-flag
python scripts/missing_script.py --help
```
"""


def test_parser_finds_targets_flags_and_cd():
    checks = checks_for(FAKE_README)
    assert [c.target for c in checks] == [None, ("module", "pytest"), ("script", "train.py"), ("script", "cls/train.py"),
                                          ("module", "benchmarks.bench"), ("script", "scripts/missing_script.py")]
    assert checks[0].paths == ["."] and checks[1].flags == ["--timeout"]
    launch = checks[2]
    assert launch.cwd == REPO / "cls" and launch.launcher == ("module", "torch.distributed.launch")
    assert launch.launcher_flags == ["--nproc_per_node"] and launch.flags == ["--gpu_num", "--save", "--no_such_flag"]
    assert checks[3].cwd == REPO / "cls"  # cd carries over within the block


def test_checker_reports_unknown_flags_and_missing_scripts():
    checks = checks_for(FAKE_README)
    launch_problems = problems(checks[2])
    assert launch_problems == [f"{checks[2].line!r}: train.py has no flag --no_such_flag"]
    assert any("does not exist" in p for p in problems(checks[5]))
    assert problems(checks[3])[0].startswith(repr(checks[3].line)) and "cls/train.py does not exist" in problems(checks[3])[0]


def test_every_readme_command_exists_with_its_flags():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    checks = checks_for(readme)
    assert [c for c in checks if c.target is not None], "README.md has no python command in a ```bash block"
    found = [problem for check in checks for problem in problems(check)]
    assert not found, "\n".join(found)
