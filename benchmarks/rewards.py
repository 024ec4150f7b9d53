"""Answer checking: hostile LaTeX per call, worker restarts, and completions per second.

    RL_REASON_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/rewards.py [--completions N]

1. Hostile LaTeX: the wall time of one ``is_equivalent`` call per input (the
   structural check refuses it), and of the same input sent straight to a
   worker (what it costs without that check: the time limit, then a restart).
2. Restart: how long a replacement worker takes to start and warm up, and
   what the next check pays for it in the pool (nothing while another worker
   is ready).
3. Throughput of the sparse ``correctness`` reward (extraction + judgement):
   GSM8K-shaped completions -- the real GSM8K train solutions, 16 per
   question in the forms models write (``####``, "The answer is", boxed,
   ``$``, ``.00``, wrong answers, no answer) -- and a LaTeX-heavy mix of
   MATH-style answers (tests/answer_pairs.py) written in varied forms.
4. The answer-pair table scored by math-verify alone, for comparison.

Only the public API is used (``is_equivalent``, ``Correctness``,
``LatexChecker``), so the same script measures an older checkout.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

from rl_reason.data import sources
from rl_reason.rewards.equivalence import is_equivalent
from rl_reason.rewards.functions import Correctness
from rl_reason.rewards.latex import LatexChecker

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from answer_pairs import ISSUE_14, PAIRS  # noqa: E402

HOSTILE = {
    "10^{10^{10}}": "10^{10^{10}}",
    "\\boxed{9^{9^{9^{9}}}}": "\\boxed{9^{9^{9^{9}}}}",
    "2^{2^{2^{2^{2^{2}}}}}": "2^{2^{2^{2^{2^{2}}}}}",
    "brace nest, 601 chars": "{" * 300 + "1" + "}" * 300,
    "(x+y+z+1)^{60}": "(x+y+z+1)^{60}",
    "(x+1)^{12}(y+1)^{12}(z+1)^{12}(w+1)^{12} (passes the check)": (
        "(x+1)^{12}(y+1)^{12}(z+1)^{12}(w+1)^{12}"
    ),
}


def _checker(timeout: float, workers: int = 2, spares: int = 1) -> LatexChecker:
    try:
        return LatexChecker(timeout=timeout, workers=workers, spares=spares)
    except TypeError:  # a checkout from before the pool: one worker
        return LatexChecker(timeout=timeout)


def _start(checker: LatexChecker) -> None:
    if hasattr(checker, "start"):
        checker.start()
    else:
        checker.equivalent("1", "1")


def _stats(checker: LatexChecker) -> tuple[int, float]:
    stats = getattr(checker, "stats", None)
    return (stats.checks, stats.seconds) if stats is not None else (0, 0.0)


def hostile_table(checker: LatexChecker, bare: LatexChecker) -> None:
    """``checker`` answers is_equivalent; ``bare`` takes the inputs straight, without the check."""
    print("\n| input | is_equivalent | next check | straight to a worker |")
    print("|---|---|---|---|")
    for name, text in HOSTILE.items():
        begin = time.perf_counter()
        is_equivalent(text, "1", latex=checker)
        guarded = time.perf_counter() - begin
        begin = time.perf_counter()
        checker.equivalent("\\sqrt{4}", "2")
        after = time.perf_counter() - begin
        begin = time.perf_counter()
        bare.equivalent(text, "1")
        direct = time.perf_counter() - begin
        print(f"| `{name}` | {guarded * 1e3:.2f} ms | {after * 1e3:.1f} ms | {direct:.3f} s |")


def restart_cost(timeout: float) -> None:
    with _checker(timeout, workers=1, spares=0) as one:
        begin = time.perf_counter()
        _start(one)
        cold = time.perf_counter() - begin
        one.equivalent("(x+y+z+1)^{60}", "1")  # overruns: killed, a replacement starts
        one.timeout = 30.0  # let the next check wait for the replacement, and time that
        begin = time.perf_counter()
        one.equivalent("\\sqrt{4}", "2")
        after_kill = time.perf_counter() - begin
    print(f"\none worker, no spare: start + warm-up {cold:.2f} s; the check right after an overrun")
    print(f"waits for the replacement: {after_kill:.2f} s. In the default pool (2 workers + 1 spare)")
    print("another worker takes it at once: the 'next check' column above.")


def gsm8k_completions(rows: list[dict], k: int, rng: random.Random) -> tuple[list, list]:
    completions, golds = [], []
    for row in rows:
        body = row["answer"].rsplit("####", 1)[0]
        gold = row["final_answer"]
        wrong = str(int(gold) + rng.choice([-10, -1, 1, 2, 100])) if gold.lstrip("-").isdigit() else "0"
        forms = [
            f"{body}#### {gold}", f"{body}The answer is {gold}.", f"{body}\\boxed{{{gold}}}",
            f"{body}The answer is ${gold}.", f"{body}#### {gold}.00", f"{body}#### {wrong}",
            f"{body}The answer is {wrong}.", f"{body}", f"{body}#### ${int(gold):,}"
            if gold.lstrip("-").isdigit() else f"{body}#### {gold}",
        ]  # fmt: skip
        for _ in range(k):
            completions.append(rng.choice(forms))
            golds.append(gold)
    return completions, golds


_COSMETIC = [
    lambda s: s, lambda s: f"${s}$", lambda s: s.replace(",", ", "), lambda s: f" {s} ",
    lambda s: s.replace("\\frac", "\\dfrac"), lambda s: s.replace("(", "\\left(").replace(")", "\\right)"),
    lambda s: f"\\boxed{{{s}}}", lambda s: s + ".", lambda s: s.replace("=", " = "),
]  # fmt: skip


def _new_digits(text: str, rng: random.Random) -> str:
    return "".join(rng.choice("123456789") if c.isdigit() and rng.random() < 0.5 else c for c in text)


def latex_completions(n: int, rng: random.Random) -> tuple[list, list]:
    """Table answers in varied forms; half with digits changed (mostly wrong, all distinct)."""
    rows = ISSUE_14 + PAIRS
    refused = [text for name, text in HOSTILE.items() if "passes" not in name]
    completions, golds = [], []
    for _ in range(n):
        predicted, gold, _, _ = rng.choice(rows)
        if rng.random() < 0.5:
            predicted = _new_digits(predicted, rng)
        for _ in range(2):
            predicted = rng.choice(_COSMETIC)(predicted)
        if rng.random() < 0.01:
            predicted = rng.choice(refused)
        completions.append(f"Some working.\nThe final answer is $\\boxed{{{predicted}}}$")
        golds.append(gold)
    return completions, golds


def throughput(
    name: str, completions: list, golds: list, checker: LatexChecker, processes: int = 1
) -> None:
    try:
        reward = Correctness(latex=checker, processes=processes)
    except TypeError:  # a checkout from before ``processes``
        if processes > 1:
            return
        reward = Correctness(latex=checker)
    checks, seconds = _stats(checker)
    begin = time.perf_counter()
    scores = reward(completions, {"final_answer": golds})
    elapsed = time.perf_counter() - begin
    checks_after, seconds_after = _stats(checker)
    print(
        f"| {name} | {len(completions)} | {elapsed:.2f} s | {len(completions) / elapsed:,.0f} |"
        f" {checks_after - checks} | {seconds_after - seconds:.2f} s |"
        f" {sum(scores) / len(scores):.3f} |"
    )


def math_verify_table() -> None:
    from math_verify import parse, verify

    rows = ISSUE_14 + PAIRS
    right = 0
    for predicted, gold, equal, _ in rows:
        try:
            g, p = parse(f"${gold}$"), parse(f"${predicted}$")
            verdict = bool(verify(g, p))
        except Exception:  # noqa: BLE001
            verdict = False
        right += verdict == equal
    print(f"\nmath-verify alone on the {len(rows)} pairs: {right} right, {len(rows) - right} wrong")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--completions", type=int, default=100_000)
    parser.add_argument("--latex-completions", type=int, default=20_000)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--sections", default="hostile,restart,gsm8k,latex,table")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    rng = random.Random(0)
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")

    if "hostile" in sections:
        with _checker(args.timeout) as checker, _checker(args.timeout) as bare:
            _start(checker)
            _start(bare)
            hostile_table(checker, bare)
    if "restart" in sections:
        restart_cost(args.timeout)

    data = sources.locate_data_dir()
    print("\n| completions | n | time | completions/s | LaTeX checks | LaTeX time | mean reward |")
    print("|---|---|---|---|---|---|---|")
    with _checker(args.timeout) as checker:
        _start(checker)
        if data is not None and "gsm8k" in sections:
            rows = sources.read_gsm8k(data, "train")
            completions, golds = gsm8k_completions(rows, 16, rng)
            n = args.completions
            for processes in (1, 2, 2):  # the second run of 2 finds its processes started
                name = f"GSM8K-shaped, K=16, {processes} process{'es' if processes > 1 else ''}"
                throughput(name, completions[:n], golds[:n], checker, processes)
        elif data is None:
            print("(GSM8K not found: set RL_REASON_DATA_DIR)")
        if "latex" in sections:
            completions, golds = latex_completions(args.latex_completions, random.Random(1))
            throughput("LaTeX-heavy MATH mix (2 LaTeX workers)", completions, golds, checker)
    if "table" in sections:
        math_verify_table()


if __name__ == "__main__":
    main()
