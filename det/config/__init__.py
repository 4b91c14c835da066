"""The yacs configuration of the detector: maskrcnn-benchmark's keys, defaults and files."""
from det.config.defaults import DATA_ROOT_ENV, get_default_config
from det.config.loader import CONFIG_ROOT, all_keys, load_config, resolve_config_file

__all__ = ["CONFIG_ROOT", "DATA_ROOT_ENV", "all_keys", "get_default_config", "load_config", "resolve_config_file"]
