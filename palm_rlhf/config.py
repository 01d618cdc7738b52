"""Settings: one dataclass per component, whose defaults are the ones the scripts run with.

A trainer takes its config (`PPOConfig`, `GRPOConfig`, `DPOConfig`, ...) and a script's config
extends it, so `--help`, the script and a notebook share one default per setting. Each field is a
`setting(default, help, ...)`: its help text (the script's `--help`) and its valid range, checked
once, where the config is made (`check_settings`, from each config's `__post_init__`), so that a
script, a notebook and `accelerate launch` refuse the same values with the same message, before any
model is loaded. `parse_config` reads a config from the command line and turns a refused value into
one line on stderr and exit status 2, as argparse does for a value of the wrong type.
"""
import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path


class SettingError(ValueError):
    """A setting outside its range, or two settings that do not fit together: `name value: why`."""

    def __init__(self, name: str, value, reason: str):
        self.name, self.value, self.reason = name, value, reason
        super().__init__(f"{name} {value!r}: {reason}")


def setting(default, help: str, *, at_least=None, above=None, at_most=None, choices=None, label=None):
    """A config field: its default, its help text, and the range `check_settings` holds it to (None is
    always allowed where the type admits it: "none" disables). `label`: what a choice is called in
    the error ("KL estimator"; by default the field's name)."""
    rules = dict(at_least=at_least, above=above, at_most=at_most, choices=choices, label=label)
    return dataclasses.field(default=default, metadata=dict(help=help, **{k: v for k, v in rules.items() if v is not None}))


def check_settings(config) -> None:
    """Raises SettingError for the first field outside its range."""
    for field in dataclasses.fields(config):
        value, rules = getattr(config, field.name), field.metadata
        if value is None or isinstance(value, (bool, tuple)):
            continue
        if "choices" in rules and value not in rules["choices"]:
            label = rules.get("label", field.name)
            raise SettingError(field.name, value, f"unknown {label} {value!r}; choose one of {', '.join(map(str, rules['choices']))}")
        if "at_least" in rules and value < rules["at_least"]:
            raise SettingError(field.name, value, f"must be >= {rules['at_least']}")
        if "above" in rules and not value > rules["above"]:
            raise SettingError(field.name, value, f"must be > {rules['above']}")
        if "at_most" in rules and value > rules["at_most"]:
            raise SettingError(field.name, value, f"must be <= {rules['at_most']}")


def require(condition: bool, name: str, value, reason: str) -> None:
    """A relation between settings (e.g. a minibatch no larger than the batch it is cut from)."""
    if not condition:
        raise SettingError(name, value, reason)


def with_settings(config, settings: dict, where: str):
    """`config` with `settings` (keyword arguments of a trainer) replaced and checked again; an unknown
    name is a TypeError that lists the config's fields."""
    names = {field.name for field in dataclasses.fields(config)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}; its settings ({type(config).__name__}) are "
                        + ", ".join(sorted(names)))
    return dataclasses.replace(config, **settings) if settings else config


# ---------------------------------------------------------------------------------------------------
# the command line


def parse_config(config_class, argv=None):
    """An instance of the dataclass `config_class` from command-line arguments.

    Every field becomes `--name` (underscores stay underscores) with its default and its help text;
    bools become `--name/--no-name`; `Optional[T]` fields also accept `none`. argparse reports unknown
    arguments and values of the wrong type; a value the config refuses (SettingError) ends the same
    way, in one line naming the flag: `train_ppo.py: --iterations -1: must be >= 1`.
    """
    parser = argparse.ArgumentParser(description=(config_class.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        options = dict(default=default, help=field.metadata.get("help", " "))
        if default is dataclasses.MISSING:
            options = dict(required=True, help=options["help"])
        if hints[field.name] is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = _argument_parser(hints[field.name], field.name)
        parser.add_argument(f"--{field.name}", **options)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return config_class(**vars(parser.parse_args(argv)))
    except SettingError as error:
        raise SystemExit(f"{Path(sys.argv[0]).name}: --{error.name} {as_typed(argv, error)}: {error.reason}") from None


def as_typed(argv: list, error: SettingError) -> str:
    """The value of the refused flag as the command line wrote it ("-1", not the parsed -1.0)."""
    flag = f"--{error.name}"
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
    return str(error.value)


def _argument_parser(field_type, name):
    """A function from a command-line string to `field_type` (int, float, str, or Optional of one)."""
    if typing.get_origin(field_type) is tuple:  # "0.9,0.95"
        element = typing.get_args(field_type)[0]

        def parse_tuple(text):
            return tuple(element(part) for part in text.split(","))

        parse_tuple.__name__ = f"comma-separated {element.__name__}s"
        return parse_tuple
    arguments = [t for t in typing.get_args(field_type) if t is not type(None)]
    is_union = typing.get_origin(field_type) in (typing.Union, types.UnionType)
    is_optional = is_union and len(arguments) == 1
    base_type = arguments[0] if is_optional else field_type
    if base_type not in (int, float, str):
        raise TypeError(f"config field {name!r}: type {field_type} is not supported on the command line")

    def parse(text):
        if is_optional and text.lower() == "none":
            return None
        return base_type(text)

    parse.__name__ = base_type.__name__  # argparse names the type in its error message
    return parse
