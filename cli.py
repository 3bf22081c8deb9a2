"""Every field of an entry point's config dataclass is a --flag; there is no second list to keep in sync.

A setting is written once, as a field: its name, its default, its allowed values (a Literal type)
and its help (the comment after it), which --help shows and check_fields enforces:

    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"   # how the loss averages
"""

import argparse
import dataclasses
import functools
import inspect
import io
import sys
import tokenize
import typing


def choices(cls, name) -> tuple | None:
    """The values a Literal field of cls allows, or None for a field of any value of its type."""
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    return typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None


@functools.cache
def comments(cls) -> dict:
    """Each field's trailing comment in the source of cls and of the classes it extends: its help."""
    found = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        line_name = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_name:
                line_name[tok.start[0]] = tok.string
            elif tok.type == tokenize.COMMENT and tok.start[0] in line_name:
                found[line_name[tok.start[0]]] = tok.string.lstrip("# ").strip()
    return found


def add_fields(parser, cls, prefix=""):
    """A --{prefix}{field} flag for every field of cls, each defaulting to None (not given)."""
    helps = comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + prefix + f.name
        text = (f"{helps[f.name]} (default {default!r})" if f.name in helps else f"default {default!r}").replace("%", "%%")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif choices(cls, f.name):
            parser.add_argument(flag, dest=f.name, choices=choices(cls, f.name), default=None, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else
                                                               f.type.__name__, str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=text)


def parse_prefixed(cls, argv, prefix):
    """Take the flags --{prefix}{field} of cls out of argv (None: sys.argv[1:]): (cls with the
    values given, the names of the fields given, the rest of argv)."""
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    add_fields(parser, cls, prefix)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    return cls(**given), sorted(given), rest


def parse_config(cls, argv=None, doc=None):
    """Parse --field value flags into `cls`. Returns (config, names of the flags given).

    Booleans take --flag / --no-flag. The set of given names lets an entry point fill the
    remaining fields with other defaults (the CPU demo's rather than the paper's).
    """
    # No abbreviations: --n_sample must not quietly mean --n_samples.
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    add_fields(parser, cls)
    args = vars(parser.parse_args(argv))
    given = {k for k, v in args.items() if v is not None}
    return cls(**{k: args[k] for k in given}), given


def check_fields(config, rules, prefix=""):
    """Every Literal field of config holds one of its values, then rules: (field, ok, what it must
    be); a ValueError naming the flag of the first broken one (a config built in Python, not
    parsed from flags, is checked the same way).

    >>> @dataclasses.dataclass
    ... class Config:
    ...     lr: float = 1e-3
    >>> check_fields(Config(lr=-1.0), [("lr", False, "must be > 0")])
    Traceback (most recent call last):
    ValueError: --lr -1.0: must be > 0
    """
    for f in dataclasses.fields(config):
        allowed = choices(type(config), f.name)
        if allowed and getattr(config, f.name) not in allowed:
            raise ValueError(f"--{prefix}{f.name} {getattr(config, f.name)!r}: must be one of {', '.join(allowed)}")
    for name, ok, rule in rules:
        if not ok:
            raise ValueError(f"--{prefix}{name} {getattr(config, name)!r}: {rule}")


def with_defaults(config, overrides: dict, given: set):
    """Replace the fields not given on the command line by `overrides` (e.g. the demo's values)."""
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if k not in given})
