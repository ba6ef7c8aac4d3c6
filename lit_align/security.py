"""What a config, a command line or a checkpoint's hyper-parameters may make lit_align import and build: allowed
classes only, never code (see :func:`config_guard`)."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

# What a config may name as a class_path. Entries are dotted prefixes: a class defined under one may be used (its own
# module and qualified name are checked, not only the dotted path the config wrote); anything callable that is not a
# class must be an entry exactly. Nothing else is imported, let alone instantiated. Extend it for your own code with
# LIT_ALIGN_ALLOWED_IMPORTS="my_pkg,my_pkg.rewards.make_reward" or ``run(..., allowed_imports=[...])``.
ALLOWED_IMPORTS = (
    "lit_align.",
    "torch.optim.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.strategies.",
    "lightning.pytorch.plugins.",
    "lightning.pytorch.profilers.",
    "lightning.pytorch.accelerators.",
    "lightning.fabric.plugins.",
    "datetime.timedelta",
)


class ImportRefused(ValueError):
    """A config named something to import that is not on the allow-list, or a class spec where data belongs."""


def allowed_imports(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The allow-list: :data:`ALLOWED_IMPORTS`, ``extra`` and ``LIT_ALIGN_ALLOWED_IMPORTS`` (comma-separated)."""
    from_env = [p.strip() for p in os.environ.get("LIT_ALIGN_ALLOWED_IMPORTS", "").split(",") if p.strip()]
    entries = (*ALLOWED_IMPORTS, *extra, *from_env)
    for entry in entries:
        if not all(part.isidentifier() for part in entry.rstrip(".").split(".")):
            raise ValueError(f"allow-list entry {entry!r} is not a dotted import path")
    return entries


def is_allowed(name: str, allowed: Sequence[str]) -> bool:
    """Whether the dotted ``name`` lies under an allow-list entry (or is one)."""
    return any(name == entry.rstrip(".") or name.startswith(entry.rstrip(".") + ".") for entry in allowed)


def object_refusal(name: str, obj: Any, allowed: Sequence[str]) -> str | None:
    """Why the object a config's ``name`` resolved to may not be used (``None`` if it may). jsonargparse resolves
    ``a.b.c`` through attributes, so ``lit_align.cli.os.popen`` reaches ``os.popen``: what counts is the object's own
    module and qualified name. Classes must lie under an entry; anything else callable must be an entry exactly."""
    where = f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', None)}"
    if inspect.isclass(obj):
        return None if is_allowed(where, allowed) else f"{name} is {where}, which is not on the allow-list"
    if any(where == entry for entry in allowed):
        return None
    return f"{name} is {type(obj).__name__} {where}, not a class; only classes (or callables named exactly) may be used"


def _class_spec(value: Any) -> str | None:
    """The ``class_path`` of a class spec (a mapping that has one) anywhere inside a data value, or ``None``."""
    if isinstance(value, Mapping) or hasattr(value, "items") and hasattr(value, "keys"):
        items = dict(value.items())
        if "class_path" in items:
            return repr(items["class_path"])
        values = items.values()
    elif isinstance(value, (list, tuple)):
        values = value
    else:
        return None
    return next((spec for spec in map(_class_spec, values) if spec is not None), None)


@contextmanager
def config_guard(allowed: Sequence[str]) -> Iterator[list[str]]:
    """Within the block, jsonargparse (which reads configs, command lines and checkpoint hyper-parameters) may only
    import and instantiate allowed classes, and refuses class specs inside data-valued arguments (``Any``, rows of
    ``train_data``, ``templates``, ``generate_kwargs``: a spec there would otherwise be built too). Three locks:
    the dotted path is checked before anything is imported; the object it resolves to is checked after; and
    jsonargparse's own import-path policy is switched to enforcing (deny everything, allow the list). Refusals are
    collected in the yielded list, so that one swallowed by a union type still stops the run."""
    import jsonargparse._common as common
    import jsonargparse._typehints as typehints
    import jsonargparse._util as util

    original, original_any, refused = util.import_object, typehints.adapt_classes_any, []

    def guarded(name, *args, **kwargs):
        check = kwargs.get("check_path", args[0] if args else True)  # False: a path from code (a type annotation)
        if check and isinstance(name, str) and "." in name and not is_allowed(name, allowed):
            refused.append(f"refusing to import {name}")
            raise ImportRefused(f"{name!r} is not on lit_align's import allow-list")
        try:
            obj = original(name, *args, **kwargs)
        except common.ImportDenied as denied:  # jsonargparse's own policy found it first (through another path)
            refused.append(f"refusing to import {name}")
            raise ImportRefused(str(denied)) from None
        problem = object_refusal(name, obj, allowed) if check else None
        if problem is not None:
            refused.append(f"refusing to import {name} ({problem})")
            raise ImportRefused(problem)
        return obj

    def no_specs_in_data(val, typehint, *args, **kwargs):
        spec = _class_spec(val)
        if spec is not None:
            refused.append(f"refusing a class spec (class_path: {spec}) inside a data-valued argument")
            raise ImportRefused("class specs are not accepted inside data-valued arguments")
        return original_any(val, typehint, *args, **kwargs)

    # Every jsonargparse module that imported the function by name holds its own reference: patch them all.
    patched = [m for name, m in list(sys.modules.items()) if name.startswith("jsonargparse") and m is not None
               and getattr(m, "import_object", None) is original]  # fmt: skip
    settings = dict(common.parsing_settings)
    for module in patched:
        module.import_object = guarded
    typehints.adapt_classes_any = no_specs_in_data
    common.parsing_settings["instantiate_subclass_spec_in_any"] = False
    common.parsing_settings["validate_subclass_spec_in_any"] = True  # so mapping values reach no_specs_in_data
    common.set_import_path_verdicts(["*"], [entry.rstrip(".") for entry in allowed])
    try:
        yield refused
    finally:
        for module in patched:
            module.import_object = original
        typehints.adapt_classes_any = original_any
        common.parsing_settings.clear()
        common.parsing_settings.update(settings)


def refusal_message(reasons: list[str]) -> str:
    """The error message for the refusals a :func:`config_guard` collected."""
    return (
        f"{'; '.join(dict.fromkeys(reasons))}. Configs may only name classes defined under "
        f"{', '.join(ALLOWED_IMPORTS)}, and never inside data. To allow your own code, set "
        "LIT_ALIGN_ALLOWED_IMPORTS=your_package (comma-separated prefixes)."
    )


@contextmanager
def guarded(allowed: Sequence[str] | None = None) -> Iterator[None]:
    """:func:`config_guard` for a whole operation (parsing a config, loading a checkpoint's hyper-parameters): any
    refusal, even one that jsonargparse turned into a parse error or swallowed while matching a union type, ends in
    an :class:`ImportRefused` naming it. ``allowed``: the allow-list (default :func:`allowed_imports`)."""
    with config_guard(allowed_imports() if allowed is None else allowed) as refused:
        try:
            yield
        except (SystemExit, Exception):  # jsonargparse reports a refusal as whatever error it was parsing
            if refused:
                raise ImportRefused(refusal_message(refused)) from None
            raise
    if refused:
        raise ImportRefused(refusal_message(refused))


#: hyper-parameters a checkpoint never decides: running a model's own code is the caller's choice alone
CALLER_ONLY_HPARAMS = ("trust_remote_code",)
