"""``lit-align``: the LightningCLI entry point (``lit-align fit -c configs/sft.yaml``)."""

from __future__ import annotations

import difflib
import importlib
import importlib.machinery
import inspect
import os
import re
import sys
from collections.abc import Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from jsonargparse.typing import register_type
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_align import security
from lit_align.checkpoint import CheckpointError, SafeCheckpointIO, read_checkpoint_metadata, safe_distributed_reads
from lit_align.modules.base import AlignModule
from lit_align.security import ALLOWED_IMPORTS, ImportRefused

__all__ = ["ALLOWED_IMPORTS", "AlignArgumentParser", "AlignCLI", "AllowedFromDirectory", "ImportRefused", "main", "run"]

#: commands of their own, dispatched by :func:`main` before the LightningCLI subcommands
COMMANDS = ("recipe", "generate")
DEBUG_VARIABLE = "LIT_ALIGN_DEBUG"  # set to 1 for the parser's whole message and Python tracebacks
OPTIMIZER_LR = "model.init_args.optimizer.init_args.lr"


def _debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no", "off")


# Lines of jsonargparse's nested messages that name no problem: which types were tried, the value as given.
_PARSER_NOISE = re.compile(
    r"(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value( type)?:|"
    r"Expected a <class 'NoneType'>|Expected a path but .* either not accessible or invalid)"
)


def short_parser_error(message: str, candidates: Any = ()) -> str:
    """jsonargparse's message for a bad option or config value, nested through every type it tried, as one line:
    where (``model (lit_align.SFTModule)``), then what (``Option 'lrr' is not accepted``), with the closest of
    ``candidates`` (a callable from a class path to its option names, or names) when an option is unknown."""
    keys, class_path, problems = [], None, []
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or _PARSER_NOISE.match(line):
            continue
        if key := re.fullmatch(r'Parser key "(.+?)":\s*(.*)', line):
            keys.append(key[1])
            problems += [key[2]] if key[2] else []
        elif given := re.fullmatch(r"Problem with given class_path '(.+)':", line):
            class_path = given[1]
        else:
            problems.append(line)
    if not problems:  # a form this does not know: its first line as it is
        return next((line.strip() for line in message.splitlines() if line.strip()), message)
    text = "; ".join(problems)
    unknown = re.search(
        r"Option '([\w.]+)' is not accepted|does not accept option '([\w.]+)'|unrecognized arguments: --([\w.]+)", text
    )
    if unknown:
        name = next(group for group in unknown.groups() if group)
        names = candidates(class_path) if callable(candidates) else candidates
        near = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
        if near:
            text += f" (did you mean {near[0]!r}?)"
    where = ".".join(keys) + (f" ({class_path})" if class_path else "")
    return f"{where}: {text}" if where else text


def init_options(class_path: str | None) -> list[str]:
    """The constructor options of an already imported class (and of its bases, which ``**kwargs`` reach): the names
    that an unknown option of ``class_path`` may be a typo of. Nothing is imported here."""
    module, _, name = (class_path or "").rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    if not inspect.isclass(cls):
        return []
    names: list[str] = []
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is not None and klass is not object:
            names += [p for p in inspect.signature(init).parameters if p not in ("self", "args", "kwargs")]
    return names


class AlignArgumentParser(LightningArgumentParser):
    """The parser of ``lit-align``: a bad option or config value is reported on one line, ``<command>: error: <where>:
    <what>`` (jsonargparse's nested message, through every type it tried, and the usage are printed only with
    ``LIT_ALIGN_DEBUG=1``); and a printed or saved config leaves out the optimizer's own ``lr``, which the module's
    ``lr`` replaces, so that it shows one learning rate."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if _debugging() or not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [action.dest for action in parser._actions if action.dest]
        short = short_parser_error(message, lambda class_path: init_options(class_path) if class_path else options)
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {short}\n")
        if short != message.strip():
            hint = f"{prog} --help lists the options; {DEBUG_VARIABLE}=1 shows the parser's whole message"
            sys.stderr.write(f"  ({hint})\n")
        self.exit(2)

    def dump(self, cfg: Namespace, *args: Any, **kwargs: Any) -> str:
        if isinstance(cfg, Namespace) and cfg.get(OPTIMIZER_LR) is not None:
            cfg = cfg.clone()
            del cfg[OPTIMIZER_LR]
        return super().dump(cfg, *args, **kwargs)


def _refuse_object(value: Any) -> Any:
    raise ValueError("a config names a model or tokenizer by a hub id or a local directory, not a class")


# A model and a tokenizer come from a config as a name or a path (a str); an object in their place is for Python
# callers. Registered, nn.Module and PreTrainedTokenizerBase are plain types to the parser, which then neither lists
# every nn.Module subclass imported (hundreds of lines of --model.help) nor builds one from a class_path.
# An object already built (the tokenizer linked from the model to the DataModule) passes as it is.
register_type(nn.Module, lambda module: type(module).__name__, _refuse_object, type_check=isinstance)
register_type(PreTrainedTokenizerBase, attrgetter("name_or_path"), _refuse_object, type_check=isinstance)


class AlignCLI(LightningCLI):
    """LightningCLI in subclass mode (``--model lit_align.SFTModule`` or your own subclass), with the DataModule's
    tokenizer linked to the model's so that it is set in one place. Configs, command lines and a resumed checkpoint's
    hyper-parameters may name only allow-listed classes (:data:`~lit_align.security.ALLOWED_IMPORTS`, see
    :func:`~lit_align.security.config_guard`); checkpoints load with ``weights_only`` only, verified first."""

    def __init__(self, *args, allowed_imports: Sequence[str] = (), **kwargs) -> None:
        self.allowed = security.allowed_imports(allowed_imports)
        kwargs.setdefault("parser_class", AlignArgumentParser)
        # The modules take their optimizer and schedule as arguments (--model.init_args.optimizer): no second,
        # top-level --optimizer / --lr_scheduler, which would not reach them.
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        from lit_align import __version__

        self.parser.add_argument("--version", action="version", version=f"lit-align {__version__}")
        self.parser.epilog = (
            "Also: lit-align recipe (the stages of a recipe YAML, one after another) and lit-align generate "
            "(completions from a trained policy); each has its own --help."
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.tokenizer", "data.init_args.tokenizer", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        with security.guarded(self.allowed):
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("weights_only") is False:
            raise CheckpointError("--weights_only false: lit_align loads checkpoints with weights_only=True only")

    def _parse_ckpt_path(self) -> None:
        # A resumed checkpoint's hyper-parameters name the model class and its arguments: read them from the
        # verified file (or a distributed checkpoint's meta.pt) with weights_only, never let them turn on remote
        # code, and parse them under the same guard as a config.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path == "last":  # Lightning's "last" looks only in this run's new version_N: resume the newest instead
            root = Path(self.config[subcommand].get("trainer", {}).get("default_root_dir") or Path.cwd())
            found = newest_checkpoint(root)
            if found is None:
                self.parser.error(f"--ckpt_path last: no checkpoint (*.ckpt) under {root.resolve()}")
            rank_zero_info(f"lit_align: --ckpt_path last: {found}")
            self.config[subcommand]["ckpt_path"] = path = str(found)
        if path is None or not Path(path).exists():
            return
        hparams = dict(read_checkpoint_metadata(path).get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        for name in security.CALLER_ONLY_HPARAMS:
            hparams.pop(name, None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        with security.guarded(self.allowed):
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        given = config.get(OPTIMIZER_LR)
        if given is not None and given not in (config.get("model.init_args.lr"), _default_lr(config)):
            raise ValueError(
                f"--{OPTIMIZER_LR}={given}: the learning rate is set by --model.init_args.lr (lit_align sets every "
                "optimizer's lr from it); set that instead"
            )
        # what the slow part (the model and the data) is about to load, before it starts
        model, data = config.get("model") or Namespace(), config.get("data") or Namespace()
        source = model.get("init_args.model")
        source = "'tiny' (the embedded preset)" if source == "tiny" else repr(source)
        train_data = data.get("init_args.train_data")
        train_data = f" with {train_data}" if isinstance(train_data, str) else ""
        rank_zero_info(
            f"lit_align {self.subcommand or 'run'}: loading {model.get('class_path')} with model {source}, "
            f"{data.get('class_path')}{train_data}"
        )

    def instantiate_classes(self) -> None:
        with security.guarded(self.allowed):
            try:
                super().instantiate_classes()
            except ValueError as error:
                # jsonargparse reports a class whose constructor raised as "Does not validate against any of the
                # Union subtypes", the constructor's error as its cause: raise that error itself (its own cause kept)
                cause = error.__cause__
                if cause is None or "Does not validate against any of the Union subtypes" not in str(error):
                    raise
                raise cause.with_traceback(cause.__traceback__) from cause.__cause__

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        connector = trainer.strategy
        if type(connector.checkpoint_io) is TorchCheckpointIO:  # not one the user chose
            connector.checkpoint_io = SafeCheckpointIO()
        if getattr(self, "subcommand", None) == "predict":  # predictions go to a file unless a writer is configured
            from lightning.pytorch.callbacks import BasePredictionWriter

            from lit_align.generate import PredictionsWriter

            if not any(isinstance(callback, BasePredictionWriter) for callback in trainer.callbacks):
                trainer.callbacks.append(PredictionsWriter(Path(trainer.default_root_dir) / "predictions.jsonl"))
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        with safe_distributed_reads():  # whatever strategy resumes a distributed checkpoint
            super()._run_subcommand(subcommand)


def run(args: list[str] | None = None, run: bool = True, allowed_imports: Sequence[str] = ()) -> AlignCLI:
    """Parse ``args`` (default: the command line) and, with ``run``, execute the subcommand; returns the CLI.
    ``allowed_imports`` adds allow-list entries (see :data:`~lit_align.security.ALLOWED_IMPORTS`)."""
    return AlignCLI(
        AlignModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        allowed_imports=allowed_imports,
    )


def _default_lr(config: Namespace) -> Any:
    """The default ``lr`` of the configured optimizer class (already imported by the parser), or ``None``."""
    class_path = config.get("model.init_args.optimizer.class_path") or ""
    module, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    try:
        return inspect.signature(cls).parameters["lr"].default
    except (TypeError, ValueError, KeyError):
        return None


def newest_checkpoint(root: str | Path) -> Path | None:
    """The most recently written checkpoint (a ``*.ckpt`` file, or a distributed checkpoint's ``*.ckpt``
    directory) anywhere under ``root``, the run's ``default_root_dir``: across its ``lightning_logs/version_N``
    directories, where each run writes its own. ``None`` when there is none."""
    root = Path(root)
    found = [p for p in root.rglob("*.ckpt") if not any(d.suffix == ".ckpt" for d in p.relative_to(root).parents)]
    found = [p for p in found if p.exists()]  # not a dangling link
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)), default=None)


class AllowedFromDirectory:
    """An import finder that finds, in ``directory``, only the top-level packages named in ``names``: the user's own
    allow-list entries (``LIT_ALIGN_ALLOWED_IMPORTS=my_pkg``), so that ``--model my_pkg.MySFT`` works from the
    directory that holds ``my_pkg`` as it does under ``python -m``. Placed after the normal finders: it shadows no
    installed or standard module, and no other file of the directory becomes importable. What a config may name is
    still decided by the allow-list (:mod:`lit_align.security`) alone."""

    def __init__(self, names: Sequence[str], directory: str | Path) -> None:
        self.names, self.directory = frozenset(names), str(directory)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if path is not None or fullname not in self.names:  # submodules follow their package's own __path__
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [self.directory])


def user_packages(allowed: Sequence[str]) -> list[str]:
    """The top-level package names of the allow-list entries the user added (not lit_align's own)."""
    own = {entry.split(".")[0] for entry in ALLOWED_IMPORTS}
    return sorted({entry.split(".")[0] for entry in allowed} - own)


def main(argv: Sequence[str] | None = None) -> Any:
    """The ``lit-align`` console script: ``lit-align recipe ...`` and ``lit-align generate ...`` go to
    :mod:`lit_align.recipe` and :mod:`lit_align.generate`, anything else to the LightningCLI (:func:`run`). A bad
    option, config value or model source (:class:`~lit_align.models.ModelLoadError`) is reported in one line
    (``LIT_ALIGN_DEBUG=1`` for the whole message and traceback), exit status 2."""
    import torch.distributed as dist

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        return importlib.import_module(f"lit_align.{args[0]}").main(args[1:])
    names = user_packages(security.allowed_imports())
    if names and not any(isinstance(f, AllowedFromDirectory) for f in sys.meta_path):
        sys.meta_path.append(AllowedFromDirectory(names, Path.cwd()))
    try:
        run(None if argv is None else args)  # None: LightningCLI reads sys.argv itself
    except (ValueError, OSError, CheckpointError) as error:
        if _debugging() or _raised_while_running(error):
            raise
        lines = str(error).strip().splitlines() or [type(error).__name__]
        prog = f"lit-align {args[0]}" if args and not args[0].startswith("-") else "lit-align"
        sys.stderr.write(f"{prog}: error: {lines[0]}\n")
        rest = " and the rest of the message" if len(lines) > 1 else ""
        sys.stderr.write(f"  ({DEBUG_VARIABLE}=1 shows the traceback{rest})\n")
        raise SystemExit(2) from None
    if dist.is_available() and dist.is_initialized():  # leave together: a rank exiting first can abort the others
        dist.barrier()
        dist.destroy_process_group()


def _raised_while_running(error: BaseException) -> bool:
    """Whether ``error`` came from the subcommand itself (training, testing), not from reading the config and
    building its objects: a training error keeps its traceback."""
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code is AlignCLI._run_subcommand.__code__:
            return True
        frame = frame.tb_next
    return False


if __name__ == "__main__":
    main()
