"""The config surface of diffusers' schedulers (its ``ConfigMixin``, ``register_to_config`` and
``BaseOutput``), for :mod:`fastddpm.schedulers`.

A scheduler's constructor arguments are its config: read-only (:class:`FrozenDict`), written to and read from
``scheduler_config.json`` in diffusers' format (both ways), and loadable by another scheduler class, which
then takes its own defaults for the arguments recorded under ``_use_default_values`` (diffusers' rule).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CONFIG_NAME = "scheduler_config.json"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose schedulers these follow (written to the config)

# Keyword arguments of diffusers' from_pretrained that concern downloading, not the scheduler.
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision",
               "use_auth_token", "resume_download", "user_agent", "_from_pipeline", "_commit_hash")


class FrozenDict(OrderedDict):
    """A read-only ordered dict whose keys are also attributes (``config.num_train_timesteps``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._frozen = True

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no key {name!r}") from None

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise TypeError(f"{type(self).__name__} is read-only; build a new scheduler with "
                            f"from_config(config, {name}=...)")
        super().__setattr__(name, value)

    def _read_only(self, *args, **kwargs):
        if getattr(self, "_frozen", False):
            raise TypeError(f"{type(self).__name__} is read-only; build a new scheduler with "
                            f"from_config(config, key=value)")

    def __setitem__(self, key, value):
        self._read_only()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._read_only()
        super().__delitem__(key)

    def pop(self, *args, **kwargs):
        self._read_only()
        return super().pop(*args, **kwargs)

    def popitem(self, *args, **kwargs):
        self._read_only()
        return super().popitem(*args, **kwargs)

    def setdefault(self, *args, **kwargs):
        self._read_only()
        return super().setdefault(*args, **kwargs)

    def update(self, *args, **kwargs):
        self._read_only()
        return super().update(*args, **kwargs)

    def clear(self):
        self._read_only()
        super().clear()

    def __reduce__(self):  # copy/deepcopy/pickle rebuild through __init__
        return type(self), (list(self.items()),)


class BaseOutput(OrderedDict):
    """As diffusers' BaseOutput (subclass it as a dataclass): an ordered dict of the fields that are not None,
    whose values are also read by attribute (``out.prev_sample``) and by position (``out[0]``,
    ``out.to_tuple()``). Keys cannot be removed."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def _no_removal(self, *args, **kwargs):
        raise TypeError(f"a {type(self).__name__}'s fields cannot be removed or replaced in bulk")

    __delitem__ = setdefault = pop = popitem = update = clear = _no_removal

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def __setattr__(self, name, value) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __reduce__(self):  # copy/pickle rebuild through the dataclass's __init__
        rebuild, _, *rest = super().__reduce__()
        return (rebuild, tuple(getattr(self, f.name) for f in fields(self)), *rest)

    def to_tuple(self) -> tuple:
        return tuple(self[k] for k in self.keys())


def json_value(value):
    """value as JSON holds it (arrays and tensors as lists, paths as strings)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def register_to_config(init):
    """Wrap a scheduler's ``__init__`` as diffusers' ``@register_to_config`` does: before it runs, ``config``
    holds every argument (defaults filled in) and, under ``_use_default_values``, the names of those left at
    their defaults, which another class's ``from_config`` then replaces by its own defaults (diffusers'
    rule)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        passed = set(bound.arguments)
        bound.apply_defaults()
        config = {name: json_value(value) for name, value in list(bound.arguments.items())[1:]}
        defaults = [name for name in config if name not in passed]
        if defaults:
            config["_use_default_values"] = defaults
        self._internal_dict = FrozenDict(config)
        init(self, *args, **kwargs)

    return wrapper


class ConfigMixin:
    """diffusers' ConfigMixin surface: ``config``, ``register_to_config``, ``from_config``, ``load_config``,
    ``from_pretrained``, ``save_config`` / ``save_pretrained``, JSON, and config values read as attributes
    (with diffusers' FutureWarning). The subclass's ``__init__`` is wrapped in :func:`register_to_config`."""

    config_name = CONFIG_NAME
    _deprecated_kwargs: list[str] = []  # constructor arguments diffusers deprecates (none for these classes)

    @property
    def config(self) -> FrozenDict:
        """The constructor arguments, read-only, by key or attribute
        (``scheduler.config.prediction_type``)."""
        return self._internal_dict

    def register_to_config(self, **kwargs) -> None:
        """Change config values after construction, as diffusers' ``register_to_config``."""
        changed = {k: json_value(v) for k, v in kwargs.items()}
        self._internal_dict = FrozenDict({**self._internal_dict, **changed})

    def __getattr__(self, name):
        # diffusers still lets config values be read as attributes, with a FutureWarning:
        # scheduler.num_train_timesteps
        config = self.__dict__.get("_internal_dict")
        if config is not None and name in config:
            cls = type(self).__name__
            warnings.warn(f"Accessing config attribute `{name}` directly via '{cls}' object attribute is "
                          f"deprecated. Please access '{name}' over '{cls}'s config object instead, e.g. "
                          f"'scheduler.config.{name}'.", FutureWarning, stacklevel=2)
            return config[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def _init_keys(cls) -> list[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """An instance from a config dict (ours or diffusers', of this or another scheduler class); keyword
        arguments override config values. Keys this class does not take are ignored (and, with
        ``return_unused_kwargs``, returned with the unused keyword arguments)."""
        if config is None:
            config = kwargs.pop("pretrained_model_name_or_path", None)
        if config is None:
            raise ValueError("from_config needs a config dict as its first argument")
        if not isinstance(config, dict):
            config, kwargs = cls.load_config(config, return_unused_kwargs=True, **kwargs)
        defaults = set(config.get("_use_default_values", ()))  # diffusers: keys it filled with its defaults
        known = cls._init_keys()
        init, ignored = {}, {}
        for key, value in config.items():
            if key.startswith("_") or key in defaults:
                continue
            (init if key in known else ignored)[key] = value
        unused = {}
        for key, value in kwargs.items():
            (init if key in known else unused)[key] = value
        if ignored:
            logger.info("%s ignores config keys it does not take: %s", cls.__name__, sorted(ignored))
        instance = cls(**init)
        if return_unused_kwargs:
            return instance, {**ignored, **unused}
        if unused:
            logger.warning("%s.from_config: unused keyword arguments %s", cls.__name__, sorted(unused))
        return instance

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, return_unused_kwargs: bool = False, subfolder=None,
                    **kwargs):
        """The config dict of a ``scheduler_config.json``: a file, a folder holding it (or ``subfolder`` of a
        folder), or — when huggingface_hub is installed — a Hub repository id."""
        path = os.fspath(pretrained_model_name_or_path)
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        if os.path.isfile(path):
            config_file = path
        elif os.path.isdir(path):
            config_file = os.path.join(path, subfolder or "", cls.config_name)
            if not os.path.isfile(config_file):
                raise OSError(f"no {cls.config_name} in {os.path.join(path, subfolder or '')}")
        else:
            if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
                raise OSError(f"{path} is neither a file nor a folder")
            try:
                from huggingface_hub import hf_hub_download
            except ImportError:
                raise OSError(f"{path!r} is neither a file nor a folder (install huggingface_hub to load "
                              f"from the Hub)") from None
            hub = {k: v for k, v in hub.items() if not k.startswith("_") and k not in ("use_auth_token",)}
            config_file = hf_hub_download(path, cls.config_name, subfolder=subfolder, **hub)
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError)
            raise ValueError(f"{config_file} is not valid UTF-8 JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} does not hold a JSON object")
        return (config, kwargs) if return_unused_kwargs else config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False,
                        **kwargs):
        """Load a ``scheduler_config.json`` written by :meth:`save_config` or by diffusers."""
        config, kwargs = cls.load_config(pretrained_model_name_or_path, return_unused_kwargs=True,
                                         subfolder=subfolder, **kwargs)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self) -> str:
        # as diffusers: the file holds every argument, without _use_default_values
        config = {k: json_value(v) for k, v in self.config.items() if k != "_use_default_values"}
        config["_class_name"] = type(self).__name__
        config["_diffusers_version"] = DIFFUSERS_VERSION
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``scheduler_config.json`` (diffusers' format, readable by diffusers) into
        ``save_directory``."""
        if push_to_hub:
            raise NotImplementedError("push_to_hub is not supported; upload the folder with huggingface_hub")
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_config needs a folder")
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, self.config_name))

    save_pretrained = save_config

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"
