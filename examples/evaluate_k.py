"""maj@1, maj@K and pass@K of a saved run on held-out questions.

    PYTHONPATH=. python examples/evaluate_k.py runs/tiny_sft

maj@1 from the greedy answer, maj@K from the vote of K samples at temperature
0.7, pass@K when any of them is right (`rr.evaluate`); `launch/evaluate.py`
does the same over a whole test set, resumable, with rerank@K by an ORM.
"""

import sys

import jax

import rl_reason as rr
from rl_reason.data import synthetic


def main(start: str, num_questions: int = 16, k: int = 4) -> dict:
    mesh, rules = rr.make_mesh((-1, 1, 1)), rr.DEFAULT_RULES
    run = rr.load_run(start, mesh, rules)
    questions = synthetic.generate("test", num_questions, seed=3)
    prompts = [rr.format_prompt(q["question"]) for q in questions]
    sampler = rr.Sampler(run.config, run.tokenizer, batch_size=8, prompt_buckets=(256,),
                         mesh=mesh, rules=rules)  # fmt: skip
    config = sampler.sampling_config(max_new_tokens=48, temperature=0.7, num_samples=k + 1,
                                     greedy_first=True)  # fmt: skip # row 0: the greedy answer
    with rr.activation_sharding(mesh, rules):
        groups = sampler.generate(
            run.params, prompts, jax.random.PRNGKey(0), config
        ).texts_per_prompt()
    metrics = rr.evaluate([g[1:] for g in groups], [q["final_answer"] for q in questions],
                          greedy=[g[0] for g in groups])  # fmt: skip
    print(
        ", ".join(
            f"{name} {100 * metrics[name]:.1f}" for name in ("maj@1", f"maj@{k}", f"pass@{k}")
        )
    )
    return metrics


if __name__ == "__main__":
    main(sys.argv[1])
