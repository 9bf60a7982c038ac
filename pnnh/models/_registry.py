"""Model registry in the style of timm's ``_registry.py``.

A model family module registers its entry points (one per depth or size) in a loop with
:func:`register_builder`; :func:`register_model` records a single function (a decorator for your
own models). :func:`create_model` builds one by name and :func:`list_models` lists names by
glob pattern. Each entry point is a function ``fn(**kwargs) -> nn.Module``.

Every registered model records a small info dict (family, depth, layout) so the
CLI can list and the depth study can group models without building them.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from ..errors import ConfigError, ModelNotFoundError, PnnhError
from .layers import cifar_depth_is_bottleneck

__all__ = ["register_model", "register_builder", "register_resolver", "register_cifar_depths", "create_model", "list_models", "model_info",
           "ModelInfo", "is_model", "is_factory_spec", "load_factory", "model_label", "model_slug"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # e.g. "plain", "resnet", "pnnh", "vit"
    depth: int | None = None
    layout: str | None = None  # "cifar" | "imagenet" | "vit"
    fn: Callable[..., nn.Module] | None = field(default=None, compare=False, repr=False)
    doc: str = ""


_MODELS: dict[str, ModelInfo] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, family: str | None = None,
                   depth: int | None = None, layout: str | None = None, name: str | None = None):
    """Register ``fn`` under its function name (or ``name``).

    Usable bare (``@register_model``) or with metadata
    (``@register_model(family="resnet", depth=56, layout="cifar")``).
    """

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _MODELS:
            raise RuntimeError(f"model {key!r} registered twice")
        doc = (f.__doc__ or "").strip().splitlines()[0] if f.__doc__ else ""
        _MODELS[key] = ModelInfo(key, family or "other", depth, layout, f, doc)
        return f

    return wrap(fn) if fn is not None else wrap



def register_builder(namespace: dict, name: str, builder: Callable[..., nn.Module], doc: str, *,
                     family: str, depth: int | None, layout: str | None, fixed: tuple[str, ...] = ()) -> None:
    """Register ``builder`` as the entry point ``name`` (documented by ``doc``) and bind it in
    ``namespace`` (a module's ``globals()``): how a family registers its depths in a loop.

    ``fixed`` names the builder arguments the name itself defines (``plain``, ``bottleneck`` ...);
    they, the depth (``d``, ``depth``) and the ``layers``/``layout`` are refused as options, so a
    model recorded as ``name`` is always the network that name says.
    """
    refused = {"d", "depth", "layers", "layout", *fixed}

    def fn(**kwargs):
        given = sorted(refused & set(kwargs))
        if given:
            raise ConfigError(f"{name} fixes {', '.join(given)} in its name; pick the registered model that has "
                              f"the architecture you want (`pnnh models`)")
        return builder(**kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    namespace[name] = register_model(fn, family=family, depth=depth, layout=layout)


_RESOLVERS: list[Callable[[str], bool]] = []


def register_resolver(fn: Callable[[str], bool]) -> Callable[[str], bool]:
    """Add ``fn(name) -> bool``: called for a name not registered, it registers that name (e.g. any
    valid depth of a family, ``resnet14``) and returns True, or returns False."""
    _RESOLVERS.append(fn)
    return fn


_RESOLVED: dict[str, ModelInfo] = {}  # built by name on request; not listed by list_models


def _resolve(name: str) -> bool:
    if name in _MODELS or name in _RESOLVED:
        return True
    for r in _RESOLVERS:
        if r(name) and name in _MODELS:
            _RESOLVED[name] = _MODELS.pop(name)
            return True
    return False


def register_cifar_depths(families: tuple[str, ...], add: Callable[[str, str, int, bool], None]) -> None:
    """Let ``<family><depth>`` build at every valid CIFAR-layout depth (``resnet14``, ``pnnh26``), not
    only the registered ones: the first request for such a name calls ``add(name, family, depth,
    bottleneck)``, which registers it (a 6n+2 depth gets basic blocks, else a 9n+2 depth bottlenecks)."""
    pattern = re.compile(rf"({'|'.join(families)})(\d+)")

    def resolve(name: str) -> bool:
        m = pattern.fullmatch(name)
        bottleneck = cifar_depth_is_bottleneck(int(m[2])) if m else None
        if bottleneck is None:
            return False
        add(name, m[1], int(m[2]), bottleneck)
        return True

    register_resolver(resolve)


def is_model(name: str) -> bool:
    return _resolve(name)


def list_models(pattern: str | None = None, family: str | None = None) -> list[str]:
    """Sorted registered names matching a glob ``pattern`` (``*`` by default).

    Names sort naturally, so ``resnet20`` comes before ``resnet110``.
    """

    def natural(s: str):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]

    names = [n for n, i in _MODELS.items() if family is None or i.family == family]
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return sorted(names, key=natural)


def model_info(name: str) -> ModelInfo:
    if not _resolve(name):
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelNotFoundError(
            f"unknown model {name!r}.{hint} Run `pnnh models` to list all {len(_MODELS)} registered models."
        )
    return _MODELS.get(name) or _RESOLVED[name]


def _options(kwargs: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return text if len(text) <= 120 else text[:120] + "..."


def is_factory_spec(name: str) -> bool:
    """Whether ``name`` names a user factory: ``path/to/file.py:factory`` or ``package.module:factory``
    (and is not a registered model)."""
    if not isinstance(name, str) or name in _MODELS or name.count(":") != 1:
        return False
    where, fn = name.split(":")
    return bool(where) and where not in _MODELS and fn.isidentifier()


_LOADED: dict[Path, Any] = {}  # model files already executed, by resolved path


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable that ``spec`` (``path/to/file.py:factory`` or ``package.module:factory``) names.

    A ``.py`` path (or one with a ``/``) is executed as a module once per process; anything else is
    imported. Raises :class:`ConfigError` naming what is missing.
    """
    if not is_factory_spec(spec):
        raise ConfigError(f"model {spec!r} is neither a registered name nor 'path/to/file.py:factory' / "
                          "'package.module:factory'")
    where, fn_name = spec.split(":")
    if where.endswith(".py") or "/" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"model file not found: {where}")
        module = _LOADED.get(path)
        if module is None:
            mod_name = "pnnh_user_" + re.sub(r"\W", "_", path.stem)
            loader = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[mod_name] = module  # dataclasses and pickling look their module up here
            loader.loader.exec_module(module)
            _LOADED[path] = module
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise ConfigError(f"cannot import {where!r} for model {spec!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"{where} has no callable {fn_name!r}" + (f"; it defines {', '.join(found)}" if found else ""))
    return fn


def model_label(model: Any) -> str:
    """A short string naming a model given as a name, a factory or a module (for configs, logs, files)."""
    if isinstance(model, str):
        return model
    if isinstance(model, nn.Module):
        return getattr(model, "pnnh_name", None) or f"{type(model).__module__}.{type(model).__qualname__}"
    return f"{getattr(model, '__module__', '?')}:{getattr(model, '__qualname__', type(model).__name__)}"


def model_slug(model: Any) -> str:
    """:func:`model_label` made safe as one directory name (``models/net.py:build`` -> ``net-build``)."""
    label = model_label(model)
    if isinstance(model, str) and is_factory_spec(model):
        where, fn = model.split(":")
        label = f"{Path(where).stem if where.endswith('.py') else where}-{fn}"
    return re.sub(r"[^\w.+-]", "_", label)


def _call_factory(fn: Callable[..., nn.Module], label: str, standard: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    """``fn(**standard, **kwargs)``, passing the standard arguments (num_classes, in_chans, img_size)
    only where ``fn`` takes them; a user option it does not take is a :class:`ConfigError`."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    args = {k: v for k, v in standard.items() if takes_any or k in params}
    try:
        model = fn(**args, **kwargs)
    except TypeError as e:
        msg = str(e)
        if "unexpected keyword argument" in msg or "got an unexpected" in msg or "missing" in msg:
            raise ConfigError(f"model {label!r} does not take those options: {msg}") from None
        raise
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {label!r} returned {type(model).__name__}, not an nn.Module")
    return model


def create_model(name: str | Callable[..., nn.Module], num_classes: int = 10, in_chans: int = 1,
                 **kwargs: Any) -> nn.Module:
    """Build a registered model, or the user's own.

    Args:
        name: registered name, e.g. ``"resnet56"``, ``"plain110"``, ``"pnnh56"``; or a user factory
            as ``"path/to/file.py:factory"``, ``"package.module:factory"`` or the callable itself. A
            factory receives ``num_classes``, ``in_chans`` and ``img_size`` where its signature
            takes them, and every other option as given.
        num_classes: classifier outputs (10 for Fashion-MNIST / CIFAR-10).
        in_chans: input channels (1 for Fashion-MNIST, 3 for CIFAR / ImageNet).
        **kwargs: family options (``width``, ``init``, ``img_size`` ...). An option the
            family does not take raises :class:`~pnnh.errors.ConfigError`.
    """
    if callable(name) or is_factory_spec(name):
        fn = name if callable(name) else load_factory(name)
        standard = {"num_classes": num_classes, "in_chans": in_chans}
        if "img_size" in kwargs:
            standard["img_size"] = kwargs.pop("img_size")
        model = _call_factory(fn, model_label(name), standard, kwargs)
        label = model_label(name)
        if isinstance(name, str):  # a spec a checkpoint can name again; a callable's label cannot rebuild it
            model.pnnh_name = label
            model.pnnh_kwargs = dict(num_classes=num_classes, in_chans=in_chans, **kwargs)
        return model
    info = model_info(name)
    try:
        model = info.fn(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except PnnhError:  # already says what is wrong
        raise
    except TypeError as e:  # unknown kwarg -> a clear config error, not a traceback
        msg = str(e)
        if "unexpected keyword argument" in msg or "got an unexpected" in msg:
            raise ConfigError(f"model {name!r} does not take that option: {msg}") from None
        if "multiple values for" in msg:
            raise ConfigError(f"model {name!r} fixes that option in its name: {msg}") from None
        if not kwargs:
            raise
        raise ConfigError(f"model {name!r} cannot be built with {_options(kwargs)}: {msg}") from None
    except ValueError as e:  # e.g. a torch layer refusing a value no family check caught
        if not kwargs:
            raise
        raise ConfigError(f"model {name!r} cannot be built with {_options(kwargs)}: {e}") from None
    except (MemoryError, RuntimeError) as e:  # the allocator refusing a model too large for this machine
        if not isinstance(e, MemoryError) and "alloc" not in str(e) and "out of memory" not in str(e):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model {name!r} with {_options(kwargs) or 'its defaults'} does not fit in memory: "
                          f"{first}") from None
    model.pnnh_name = name
    model.pnnh_kwargs = dict(num_classes=num_classes, in_chans=in_chans, **kwargs)
    return model
