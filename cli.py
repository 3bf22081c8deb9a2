"""Every field of an entry point's config dataclass is a --flag; there is no second list to keep in sync."""

import argparse
import dataclasses
import sys


def add_fields(parser, cls, prefix=""):
    """A --{prefix}{field} flag for every field of cls, each defaulting to None (not given)."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + prefix + f.name
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"default {default}")
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else
                                                               f.type.__name__, str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=f"default {default!r}")


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
    """rules: (field, ok, what it must be); a ValueError naming the flag of the first broken one.

    >>> check_fields(Config(lr=-1.0), [("lr", False, "must be > 0")])
    ValueError: --lr -1.0: must be > 0
    """
    for name, ok, rule in rules:
        if not ok:
            raise ValueError(f"--{prefix}{name} {getattr(config, name)!r}: {rule}")


def with_defaults(config, overrides: dict, given: set):
    """Replace the fields not given on the command line by `overrides` (e.g. the demo's values)."""
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if k not in given})
