"""rl_reason: teaching language models to reason with reinforcement learning, in JAX.

`import rl_reason as rr` gives research code its public surface (`rl_reason.api`:
rr.load_run, rr.Sampler, rr.make_ppo_update, rr.save_run, ...), imported on first
use so that `import rl_reason` stays cheap.
"""

import importlib
import importlib.util


def __getattr__(name: str):
    # A submodule (`from rl_reason import checkpointing`) is the import system's to load.
    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    api = importlib.import_module(f"{__name__}.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *importlib.import_module(f"{__name__}.api").__all__])
