"""The click classes behind every ``loratool`` command: help layout and the argument conventions
people bring from other tools.

* ``-h`` and ``--help`` (set on the app, see :mod:`loratool.cli.app`).
* ``--debug`` anywhere on the line, before or after the command name.
* Number lists the kohya way: an option declared in ``number_lists`` takes several values after
  one flag (``--weights 0.6 -0.4``, as sd-scripts' ``networks/merge_lora.py --ratios 0.6 0.4``)
  besides the repeated form (``--weights 0.6 --weights -0.4``); negative values included.
* Help: arguments by their metavar (``BASE``, ``LORA...``) without a type tag, the full first
  sentence of every command in the command list (never cut with "..."), and the command's
  examples at the end.

Nothing here knows a particular command: :func:`loratool.cli.app.command` builds one subclass of
:class:`LoratoolCommand` per command carrying its ``examples`` and ``number_lists``.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from typer.core import TyperCommand, TyperGroup

# A plain decimal number, sign and exponent allowed; "nan" / "inf" stay file names.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
# Read by :func:`loratool.cli.main` to decide whether an error shows its traceback.
state = {"debug": False}
DEBUG_HELP = "Show tracebacks for errors (accepted before or after the command)."


def strip_debug(args: list[str]) -> list[str]:
    """``args`` without ``--debug`` (up to a ``--``); records it in :data:`state`."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if arg == "--debug":
            state["debug"] = True
            continue
        out.append(arg)
    return out


def expand_number_lists(args: list[str], flags: frozenset[str]) -> list[str]:
    """``--weights 0.6 -0.4`` -> ``--weights 0.6 --weights -0.4`` for each flag in ``flags``."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + args[i:]
        flag, eq, first = arg.partition("=")
        if flag not in flags:
            out.append(arg)
            i += 1
            continue
        values = [first] if eq else []
        i += 1
        if not eq and i < len(args) and args[i] != "--":
            values.append(args[i])  # the flag's own value, whatever it looks like (click decides)
            i += 1
        while i < len(args) and _NUMBER.fullmatch(args[i]):
            values.append(args[i])
            i += 1
        if not values:
            out.append(arg)  # a flag with no value: let click say so
        for value in values:
            out += [flag, value]
    return out


class LoratoolCommand(TyperCommand):
    """One command; subclasses set :attr:`examples` and :attr:`number_lists`."""

    examples: ClassVar[tuple[str, ...]] = ()
    number_lists: ClassVar[frozenset[str]] = frozenset()

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        for param in self.get_params(ctx):
            defer_coercion(param)
        args = strip_debug(list(args))
        if self.number_lists:
            args = expand_number_lists(args, self.number_lists)
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(argument_name(param))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args: list[tuple[str, str]] = []
        opts: list[tuple[str, str]] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((argument_name(param), record[1]))
            else:
                if "--help" in param.opts:  # --debug sits just above -h, --help
                    opts.append(("--debug", DEBUG_HELP))
                opts.append(record)
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        if opts:
            with formatter.section("Options"):
                formatter.write_dl(opts)

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        if not self.examples:
            return
        formatter.write_paragraph()
        formatter.write_text("Example:" if len(self.examples) == 1 else "Examples:")
        with formatter.indentation():
            for line in self.examples:
                formatter.write(f"{'':>{formatter.current_indent}}{line}\n")


class _DeferredCoercion:
    """typer's coercion of one parameter's value, built only for a value that needs it.

    typer >= 0.2x coerces every value through a pydantic ``TypeAdapter`` it builds per parameter, unset
    ones included: importing pydantic and building a dozen adapters is most of a fresh ``loratool info``.
    An unset value is what typer makes it (None, or () for a multi-value parameter) and a string given to a
    plain ``str`` parameter is that string (typer's adapter is ``str(value)``); anything else goes to
    typer's own coercion, built on first use."""

    def __init__(self) -> None:
        self._real: Any = None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        multi = param.multiple or param.nargs == -1
        if value is None:
            return () if multi else None
        desc = param.type_descriptor
        if (type(value) is str and not multi and desc.annotation is str and desc.file_annotation is None
                and desc.parameter_info.parser is None):
            return value
        if self._real is None:
            from typer._coercion import build_runtime_param

            self._real = build_runtime_param(desc)
        return self._real.coerce(value, param=param, ctx=ctx)


def defer_coercion(param: Any) -> None:
    """Give ``param`` a :class:`_DeferredCoercion` (typer versions without per-parameter adapters: no change)."""
    if getattr(param, "_runtime_param", False) is None and hasattr(param, "type_descriptor"):
        param._runtime_param = _DeferredCoercion()


def argument_name(param: Any) -> str:
    """``BASE``, ``LORA...``: the metavar, with ``...`` when the argument takes several values."""
    name = param.metavar or param.name.upper()
    return name + "..." if param.nargs != 1 and not name.endswith("...") else name


class LoratoolGroup(TyperGroup):
    """The top-level ``loratool``: every command listed with its whole first sentence."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        for param in self.get_params(ctx):
            defer_coercion(param)
        return super().parse_args(ctx, args)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
