"""Read a config: defaults, then a yaml file, then ``KEY VALUE`` pairs from the command line.

Stricter than yacs' ``merge_from_file``: an unknown key anywhere is a one-line
:class:`~mabn.utils.errors.UserError` that names the closest valid key, a key written twice in one
yaml mapping is an error (yaml would silently keep the last one), and a value of the wrong type
names the key. A key or a model of maskrcnn-benchmark that this project does not build is refused
in one line that says what is built (:mod:`det.config.support`); the model check runs when the
config file has a ``MODEL`` section (a file of solver settings only is merged as it is). Config
files are found relative to the working directory first, then relative to the repository's ``configs/det`` (so ``configs/e2e_...yaml`` works from the repository root and
from ``det/``, where ``det/configs`` links to ``../configs/det``).
"""
from __future__ import annotations

import ast
import difflib
import os
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence

import yaml
from yacs.config import CfgNode as CN

from det.config.defaults import get_default_config
from det.config.support import RENAMED_KEYS, check_architecture, unsupported_key
from mabn.utils.errors import UserError
from mabn.utils.yaml_config import load_yaml_unique_keys

__all__ = ["CONFIG_ROOT", "all_keys", "load_config", "resolve_config_file"]

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs" / "det"
"""The repository's detection configs (``configs/det``)."""


def _duplicate_key(key: Any, first: int, second: int, source: str) -> UserError:
    return UserError(f"config key {key!r} appears twice in one mapping (lines {first} and {second} of {source}); "
                     f"keep one")


def all_keys(node: CN, prefix: str = "") -> List[str]:
    """Every leaf key of ``node`` as a dotted name (``MODEL.RPN.NMS_THRESH``)."""
    keys = []
    for name, value in node.items():
        dotted = f"{prefix}{name}"
        keys.extend(all_keys(value, dotted + ".") if isinstance(value, CN) else [dotted])
    return keys


def _sections(node: CN, prefix: str = "") -> List[str]:
    """Every section of ``node`` as a dotted name (``MODEL.RPN``)."""
    names = []
    for name, value in node.items():
        if isinstance(value, CN):
            names += [f"{prefix}{name}"] + _sections(value, f"{prefix}{name}.")
    return names


def _unknown_key_error(key: str, valid: Iterable[str], where: str) -> UserError:
    refused = unsupported_key(key, where)
    if refused is not None:
        return refused
    if key in RENAMED_KEYS:
        return UserError(f"unknown config key {key} in {where}; maskrcnn-benchmark renamed it {RENAMED_KEYS[key]}")
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    # Prefer a key with the same last component (a key put in the wrong section).
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    suggestion = (difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0) or close or [""])[0]
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    return UserError(f"unknown config key {key} in {where}{hint}")


def _check_keys(data: Any, defaults: CN, prefix: str, where: str, valid: List[str], sections: List[str]) -> None:
    if not isinstance(data, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or 'the top level'} must be a mapping of keys, "
                        f"got {type(data).__name__}")
    for name, value in data.items():
        dotted = f"{prefix}{name}"
        if not isinstance(name, str) or name not in defaults:
            raise _unknown_key_error(dotted, sections if isinstance(value, dict) else valid, where)
        if isinstance(defaults[name], CN):
            _check_keys(value, defaults[name], dotted + ".", where, valid, sections)


def _widen_file_ints(data: dict, defaults: CN) -> None:
    """An int in ``data`` where the default is a float becomes that float (yacs would refuse
    ``WEIGHT_DECAY_BIAS: 0``); ``data`` has passed :func:`_check_keys`."""
    for name, value in data.items():
        default = defaults[name]
        if isinstance(default, CN):
            _widen_file_ints(value, default)
        elif isinstance(default, float) and type(value) is int:
            data[name] = float(value)


def _widen_opt_ints(opts: List[Any], config: CN) -> None:
    """The same for ``KEY VALUE`` pairs: ``SOLVER.WEIGHT_DECAY_BIAS 0`` gives 0.0."""
    for position in range(1, len(opts), 2):
        default: Any = config
        for part in opts[position - 1].split("."):
            default = default[part]
        if isinstance(default, float) and isinstance(opts[position], str):
            try:
                value = ast.literal_eval(opts[position])
            except (ValueError, SyntaxError):
                continue
            if type(value) is int:
                opts[position] = float(value)


def resolve_config_file(config_file: str) -> Path:
    """``config_file`` as given if it exists, else relative to ``configs/det``; a ``configs/``
    prefix is accepted there (the published command lines say ``configs/e2e_...yaml``)."""
    given = Path(config_file).expanduser()
    if given.is_file():
        return given
    if not given.is_absolute():
        parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
        for candidate in (CONFIG_ROOT / given, CONFIG_ROOT.joinpath(*parts) if parts else None):
            if candidate is not None and candidate.is_file():
                return candidate
    raise UserError(f"--config-file {config_file}: no such file (looked in {os.getcwd()} and {CONFIG_ROOT})")


def _merge(config: CN, other: CN, where: str) -> None:
    try:
        config.merge_from_other_cfg(other)
    except ValueError as exc:  # yacs' type check: names the key and both types
        raise UserError(f"{where}: {str(exc).splitlines()[0]}") from None


def load_config(config_file: Optional[str] = None, opts: Sequence[str] = (), freeze: bool = True) -> CN:
    """The defaults, merged with ``config_file`` (if given) and then with ``opts``
    (``["KEY", "VALUE", ...]`` as on the command line; values parsed as Python literals)."""
    config = get_default_config()
    valid = all_keys(config)
    describes_model = False
    if config_file:
        path = resolve_config_file(config_file)
        try:
            with open(path, "r") as stream:
                data = load_yaml_unique_keys(stream, _duplicate_key)
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid yaml ({str(exc).splitlines()[0]})") from None
        data = data or {}
        _check_keys(data, config, "", str(path), valid, _sections(config))
        _widen_file_ints(data, config)
        _merge(config, CN(data), str(path))
        describes_model = "MODEL" in data
    opts = list(opts)
    if len(opts) % 2:
        raise UserError(f"command-line options must be KEY VALUE pairs; {opts[-1]!r} has no value")
    for key in opts[0::2]:
        if key not in valid:
            raise _unknown_key_error(key, valid, "the command-line options")
    _widen_opt_ints(opts, config)
    try:
        config.merge_from_list(opts)
    except ValueError as exc:  # yacs' type check: names the key and both types
        raise UserError(f"the command-line options: {str(exc).splitlines()[0]}") from None
    if describes_model:
        check_architecture(config, f"{path} with the command-line options" if opts else str(path))
    if freeze:
        config.freeze()
    return config
