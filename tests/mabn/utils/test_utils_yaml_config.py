"""mabn.utils.yaml_config: the yaml loader both trainers' configs use (a key twice is an error)."""
from __future__ import annotations

import io

import pytest
import yaml

from mabn.utils.yaml_config import load_yaml_unique_keys


def test_loads_like_safe_load():
    text = "a: 1\nb: [1, 2]\nc:\n  d: x\n  e: null\nbase: &base {k: 1}\nsame: *base\n"
    assert load_yaml_unique_keys(io.StringIO(text)) == yaml.safe_load(text)
    assert load_yaml_unique_keys(io.StringIO("")) is None
    with pytest.raises(yaml.constructor.ConstructorError):  # safe: no Python objects
        load_yaml_unique_keys(io.StringIO("a: !!python/object:os.system {}\n"))


@pytest.mark.parametrize("text, key, lines", [
    ("norm: bn\nlr: 0.1\nnorm: mabn\n", "norm", (1, 3)),
    ("A:\n  B: 1\n  C: 2\n  B: 3\n", "B", (2, 4)),
    ("{x: 1, x: 2}\n", "x", (1, 1)),  # in one flow mapping on one line
])
def test_a_key_twice_in_one_mapping(text, key, lines):
    with pytest.raises(yaml.YAMLError) as info:
        load_yaml_unique_keys(io.StringIO(text))
    assert str(info.value) == f"key {key!r} appears twice (lines {lines[0]} and {lines[1]}); keep one"
    seen = []

    def error(*args):
        seen.append(args)
        return ValueError("twice")

    with pytest.raises(ValueError, match="^twice$"):
        load_yaml_unique_keys(io.StringIO(text), error)
    assert seen == [(key, lines[0], lines[1], "<file>")]


def test_the_same_key_in_different_mappings_is_fine_and_unhashable_keys_are_yamls_error():
    assert load_yaml_unique_keys(io.StringIO("a: {k: 1}\nb: {k: 2}\n")) == {"a": {"k": 1}, "b": {"k": 2}}
    with pytest.raises(yaml.YAMLError, match="unhashable"):
        load_yaml_unique_keys(io.StringIO("? [1, 2]\n: x\n"))
