"""Stand-ins for study stages, run by `study_workers`' processes in tests/test_study_workers.py.

`run_stage(kind, config, directory)` does what `config.act` says, and leaves
`<directory>/fake.json`: its process, the CPUs it may use, when it began and ended,
and how it ended, so the tests can check the order, the pinning and the signals.
"""

from __future__ import annotations

import json
import os
import time

from rl_reason import checkpointing
from rl_reason.experiments.config import InvalidConfigError


def run_stage(kind, config, directory):
    os.makedirs(directory, exist_ok=True)
    record = {"pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0)), "began": time.time()}

    def leave(how: str) -> None:
        record.update(ended=time.time(), how=how)
        with open(os.path.join(directory, "fake.json"), "w") as f:
            json.dump(record, f)

    act = config.act
    if act == "sleep":
        time.sleep(config.seconds)
    elif act == "meet":  # runs until `config.partner` has begun too: the two ran at once
        partner = os.path.join(os.path.dirname(directory), config.partner)
        deadline = time.time() + 120
        while not os.path.exists(partner):
            if time.time() > deadline:
                raise TimeoutError(f"{config.partner} never ran beside this stage")
            time.sleep(0.02)
    elif act == "wait_for_signal":  # a run's loop: save and stop when its guard says so
        with checkpointing.PreemptionGuard() as guard:
            for step in range(2000):
                if guard.should_stop(step):
                    leave("preempted")
                    raise checkpointing.Preempted(step, directory)
                time.sleep(0.01)
    elif act == "fail":
        time.sleep(config.seconds)
        leave("failed")
        raise ValueError("a bug in the stage")
    elif act == "config_error":
        raise InvalidConfigError(["train.lr must be positive."])
    elif act == "die":
        os._exit(3)
    leave("done")
    return {"kind": kind, "buckets": type(config.buckets).__name__, "seconds": config.seconds}
