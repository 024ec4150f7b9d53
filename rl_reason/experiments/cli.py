"""What the launchers share on the command line: the config flag and errors that name their cause.

    from rl_reason.experiments import cli

    cli.define_config_flag("config", default_config_file, "Experiment config file.")

defines `--config` (an ml_collections config file, overridable key by key as
`--config.optim.lr=3e-4`) and `--print_config`, which prints every key of the
config, with any overrides applied, its type and its value, then exits 0.
An override naming a key the config does not have stops the program before
anything else happens, with exit code 2 and a few lines naming the key and
the closest keys the config has (ml_collections would raise a 49-line
traceback at import time).

`run_reporting_errors` prints the errors a user can act on as one paragraph
(a missing or misplaced model source among them: `sources.check_model_source`).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, Callable

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_flags_lib
from ml_collections.config_flags import config_path

# Flags defined here belong to the launcher that calls in, so its --help lists them.
flags.disclaim_key_flags()

USAGE_ERROR = 2  # the exit code of a command-line mistake, as argparse uses


def define_config_flag(
    name: str,
    default: str,
    help_string: str,
    *,
    flag_values: flags.FlagValues = flags.FLAGS,
    argv: Sequence[str] | None = None,
) -> flags.FlagHolder:
    """Defines --<name> (a config file, locked) and --print_config; returns the config's holder.

    Call it at import time where `config_flags.DEFINE_config_file` would be
    called. Unknown override keys in `argv` (sys.argv by default) are reported
    here, before ml_collections sees them, and end the program with exit code 2.
    """
    given_argv = argv
    argv = list(sys.argv if argv is None else argv)
    exit_on_unknown_keys(name, default, argv)
    holder = config_flags.DEFINE_config_file(
        name,
        default,
        f"{help_string} Override any key as --{name}.KEY=VALUE; --print_config lists them.",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=given_argv,  # None: ml_collections reads sys.argv when it parses
    )
    flags.DEFINE_bool(
        "print_config",
        False,
        f"Print every key of --{name} (overrides applied) with its type and value, then exit.",
        flag_values=flag_values,
    )

    def print_and_exit(values: dict) -> bool:
        if values["print_config"]:
            source = f"--{name}={_config_argument(name, default, argv)}"
            try:
                print(format_config(values[name], source), flush=True)
            except BrokenPipeError:  # piped into head: not an error
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        return True

    flags.register_multi_flags_validator(
        ["print_config", name], print_and_exit, flag_values=flag_values
    )
    return holder


def config_keys(config: ml_collections.ConfigDict) -> dict[str, tuple[type, object]]:
    """Every leaf key of `config` as a dotted path -> (its type, its value), sorted."""
    out = {}

    def walk(c, prefix):
        for key in c.keys():
            value = c[key]
            path = f"{prefix}{key}"
            if isinstance(value, ml_collections.ConfigDict) and len(value):
                walk(value, path + ".")
            else:
                out[path] = (c.get_type(key), value)

    walk(config, "")
    return out


def format_config(config: ml_collections.ConfigDict, source: str = "") -> str:
    """One line per key: dotted path, type, value (what --print_config prints)."""
    keys = config_keys(config)
    width = max(map(len, keys), default=0)
    type_width = max((len(t.__name__) for t, _ in keys.values()), default=0)
    of = f" of {source}" if source else ""
    lines = [f"# {len(keys)} config keys{of}; override as --config.KEY=VALUE"]
    for key, (kind, value) in keys.items():
        if isinstance(value, ml_collections.ConfigDict):  # an empty section; its repr is YAML
            value = value.to_dict()
        lines.append(f"{key:<{width}}  {kind.__name__:<{type_width}}  {value!r}")
    return "\n".join(lines)


def suggest_keys(key: str, keys: Sequence[str], n: int = 3) -> list[str]:
    """The keys closest to a mistyped `key`, best first (at most n, maybe none).

    Whole paths and last components count equally, so `lr` finds `optim.lr`
    and `optim.lrr` finds it rather than `optim.b1`.
    """
    ratio = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()
    leaf = key.rsplit(".", 1)[-1]
    scores = {k: (ratio(key, k) + ratio(leaf, k.rsplit(".", 1)[-1])) / 2 for k in keys}
    ranked = sorted(scores, key=lambda k: -scores[k])
    if not ranked or scores[ranked[0]] < 0.6:
        return []
    best = scores[ranked[0]]
    return [k for k in ranked[:n] if scores[k] >= max(0.6, best - 0.1)]


def unknown_override_keys(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> list[str]:
    """The override paths (e.g. "optim.lrr") that `config` has no field for."""
    unknown = []
    for path in overrides:
        try:
            config_path.get_type(path, config)
        except (KeyError, AttributeError, IndexError):
            unknown.append(path)
        except Exception:  # a malformed path; ml_collections reports it in its own words
            pass
    return unknown


def exit_on_unknown_keys(name: str, default: str, argv: Sequence[str]) -> None:
    """Loads the config `argv` names (or `default`); exits with code 2 on unknown override keys."""
    overrides = _override_paths(name, argv)
    if not overrides:
        return
    config_file = _config_argument(name, default, argv)
    try:
        parser = config_flags_lib.ConfigFileFlagParser(name=name, lock_config=False)
        config = parser.parse(config_file)
    except Exception:  # a missing or broken config file: ml_collections reports it
        return
    if not isinstance(config, ml_collections.ConfigDict):
        return
    unknown = unknown_override_keys(config, overrides)
    if not unknown:
        return
    keys = list(config_keys(config))
    prog = os.path.basename(argv[0]) if argv else "program"
    relative = os.path.relpath(config_file)
    config_file = config_file if relative.startswith("..") else relative
    lines = []
    for path in unknown:
        suggestions = suggest_keys(path, keys)
        hint = f" Did you mean {' or '.join(suggestions)}?" if suggestions else ""
        lines.append(f"{prog}: unknown config key {path} (--{name}.{path}) in {config_file}.{hint}")
    lines.append(f"{prog}: --print_config lists every key with its type and default.")
    print("\n".join(lines), file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _override_paths(name: str, argv: Sequence[str]) -> list[str]:
    """The config paths overridden in argv, as ml_collections finds them (flag files expanded)."""
    try:
        argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
    except Exception:  # an unreadable --flagfile: absl reports it
        pass
    prefix = re.compile(rf"-{{1,2}}(no)?{re.escape(name)}\.")
    paths = {}
    for arg in argv[1:]:
        if arg == "--":
            break
        if prefix.match(arg):
            paths[arg.split("=", 1)[0].split(".", 1)[1]] = None
    return list(paths)


def _config_argument(name: str, default: str, argv: Sequence[str]) -> str:
    """The config file argv gives (the last --<name>=... or --<name> ...), else `default`."""
    value = default
    for i, arg in enumerate(argv):
        match = re.match(rf"^-{{1,2}}{re.escape(name)}(=(.*))?$", arg)
        if match:
            if match.group(1) is not None:
                value = match.group(2)
            elif i + 1 < len(argv):
                value = argv[i + 1]
    return value


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can act on from one paragraph (no traceback): a config, model
    source, checkpoint, non-finite step, workdir or multi-host start-up problem."""
    from rl_reason import checkpointing, workdir_lock
    from rl_reason.data.tokenizer import IncompleteTokenizerError
    from rl_reason.experiments import runs
    from rl_reason.experiments.config import InvalidConfigError
    from rl_reason.experiments.sources import ModelSourceError
    from rl_reason.models.safetensors_io import CheckpointFormatError
    from rl_reason.parallel.distributed import DistributedStartupError

    return (
        InvalidConfigError,
        runs.ResumeConfigError,
        runs.NonFiniteStepError,
        checkpointing.CheckpointError,
        ModelSourceError,
        CheckpointFormatError,
        workdir_lock.WorkdirLockedError,
        workdir_lock.WorkdirStorageError,
        IncompleteTokenizerError,
        DistributedStartupError,
    )


def run_reporting_errors(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), with the errors a user can act on printed as one paragraph.

    A run stopped by a preemption signal after saving exits with status 75
    (rerun to resume); a `user_errors()` problem exits with status 1 and its
    message, no traceback, and so does a study stage that failed with one in a
    worker process (a stage's bug prints the worker's traceback first).
    Anything else is a bug and keeps its traceback.
    """
    from rl_reason import checkpointing
    from rl_reason.experiments.study_workers import StageFailedError

    try:
        return fn(*args)
    except checkpointing.Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(checkpointing.PREEMPTED_EXIT_CODE)
    except StageFailedError as e:
        if e.details:
            print(e.details, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def __getattr__(name: str) -> Any:
    """`cli.ModelSourceNotFoundError` and `cli.check_model_source`, from before they moved to
    `experiments/sources.py` (imported on first use: flags load before JAX)."""
    if name in ("ModelSourceNotFoundError", "check_model_source", "MODEL_SOURCE_KINDS"):
        from rl_reason.experiments import sources

        return getattr(sources, {"ModelSourceNotFoundError": "ModelSourceError"}.get(name, name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
