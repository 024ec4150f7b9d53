"""All metrics from one set of K samples per question.

Each sample's final answer is extracted and judged once; maj@1 (the greedy
sample, or the first sample if there is none), maj@k, rerank@k, pass@k (any
of the first k), the unbiased pass@k estimate over all K, and diversity
(distinct final answers and distinct solutions) all reuse those judgements.
"""

from __future__ import annotations

from collections.abc import Sequence

from rl_reason.evaluation import metrics
from rl_reason.parallel import distributed
from rl_reason.rewards.equivalence import DEFAULT_REL_TOL, canonical_answer, is_equivalent
from rl_reason.rewards.extraction import Mode, extract_answer
from rl_reason.rewards.latex import LatexChecker


def _judge(
    texts: Sequence[str], gold: str, mode: Mode, rel_tol: float, latex: LatexChecker | None
) -> tuple[list[str | None], list[bool]]:
    answers = [extract_answer(text, mode) for text in texts]
    keys = [canonical_answer(answer) for answer in answers]
    return keys, [is_equivalent(answer, gold, rel_tol=rel_tol, latex=latex) for answer in answers]


def evaluate(
    samples: Sequence[Sequence[str]],
    golds: Sequence[str],
    *,
    greedy: Sequence[str] | None = None,
    scores: Sequence[Sequence[float]] | None = None,
    ks: Sequence[int] | None = None,
    mode: Mode = "flexible",
    rel_tol: float = DEFAULT_REL_TOL,
    latex: LatexChecker | None = None,
) -> dict[str, float]:
    """Metrics averaged over questions; ``samples[q]`` are question q's K completions.

    ``greedy[q]`` is its greedy completion (for maj@1), ``scores[q]`` a
    scorer's score per sample (for rerank@k), ``ks`` the k values to report
    (default: 1 and K), ``latex`` the checker for LaTeX answers (default: the
    process's shared one). Every question needs the same K.
    """
    if len(samples) != len(golds) or not samples:
        raise ValueError(f"need one gold per question, got {len(samples)} and {len(golds)}")
    num_samples = len(samples[0])
    if num_samples == 0 or any(len(texts) != num_samples for texts in samples):
        raise ValueError("every question needs the same number (>= 1) of samples")
    ks = sorted(set(ks or (1, num_samples)))
    if not 1 <= ks[0] <= ks[-1] <= num_samples:
        raise ValueError(f"every k must be in [1, {num_samples}], got {ks}")

    def question_metrics(q: int) -> dict[str, float]:
        texts, gold = samples[q], golds[q]
        out: dict[str, float] = {}
        keys, correct = _judge(texts, gold, mode, rel_tol, latex)
        if greedy is not None:
            out["maj@1"] = float(_judge([greedy[q]], gold, mode, rel_tol, latex)[1][0])
        for k in ks:
            if k > 1 or greedy is None:
                out[f"maj@{k}"] = float(metrics.maj_at_k(keys[:k], correct[:k]))
            out[f"pass@{k}"] = float(metrics.pass_at_k(correct[:k]))
            out[f"pass@{k}_unbiased"] = metrics.pass_at_k_unbiased(num_samples, sum(correct), k)
            if scores is not None:
                out[f"rerank@{k}"] = float(metrics.rerank_at_k(scores[q][:k], correct[:k]))
        out["sample_accuracy"] = sum(correct) / num_samples
        out["no_answer"] = keys.count(None) / num_samples
        out["distinct_answers"] = float(metrics.distinct(keys))
        out["distinct_solutions"] = float(
            metrics.distinct([" ".join(text.split()) for text in texts])
        )
        return out

    # Judging is host work: in a multi-host run each process judges its share of
    # the questions, and the sums below run over all of them in question order.
    per_question = distributed.map_shared(
        lambda share: [question_metrics(q) for q in range(len(samples))[share]], len(samples)
    )
    totals: dict[str, float] = {}
    for values in per_question:
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return {name: total / len(samples) for name, total in sorted(totals.items())}
