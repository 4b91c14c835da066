"""Config files in yaml that refuse a key given twice in one mapping (yaml itself keeps the last
one silently). ``yaml`` is imported inside the function, so ``import mabn`` needs torch alone."""
from __future__ import annotations

from typing import IO, Any, Callable, Optional

__all__ = ["DuplicateKeyError", "load_yaml_unique_keys"]

DuplicateKeyError = Callable[[Any, int, int, str], Exception]
"""``(key, first line, second line, source name) -> the exception to raise``; lines count from 1."""


def load_yaml_unique_keys(stream: IO, duplicate_error: Optional[DuplicateKeyError] = None) -> Any:
    """``yaml.safe_load(stream)``, except that a key written twice in one mapping raises
    ``duplicate_error(key, first_line, second_line, source_name)``. By default that is a yaml
    ``ConstructorError`` (a ``yaml.YAMLError``) saying ``key 'K' appears twice (lines A and B);
    keep one``. An unhashable key is left to yaml, which reports it."""
    import yaml

    def default_error(key: Any, first: int, second: int, source: str) -> Exception:
        return yaml.constructor.ConstructorError(
            None, None, f"key {key!r} appears twice (lines {first} and {second}); keep one", None)

    make_error = duplicate_error or default_error

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            lines = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = lines.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise make_error(key, first, line, node.start_mark.name)
                lines[key] = line
            return super().construct_mapping(node, deep)

    return yaml.load(stream, Loader=UniqueKeyLoader)
