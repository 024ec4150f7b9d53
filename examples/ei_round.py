"""One Expert Iteration round from a saved run: sample K per question, keep the correct,
fine-tune on them.

    PYTHONPATH=. python examples/ei_round.py runs/tiny_sft

The launchers' EI (`configs/arith_ei.py`) runs these rounds with resumable
sampling chunks, validation-chosen checkpoints and the study's protocol.
"""

import sys

import jax
import numpy as np

import rl_reason as rr
from rl_reason.data import synthetic


def main(start: str, num_questions: int = 16, k: int = 4, steps: int = 4) -> dict:
    mesh, rules = rr.make_mesh((-1, 1, 1)), rr.DEFAULT_RULES
    run = rr.load_run(start, mesh, rules)
    questions = synthetic.generate("train", num_questions, seed=2)
    prompts = [rr.format_prompt(q["question"]) for q in questions]
    sampler = rr.Sampler(run.config, run.tokenizer, batch_size=8, prompt_buckets=(256,),
                         mesh=mesh, rules=rules)  # fmt: skip
    with rr.activation_sharding(mesh, rules):
        samples = sampler.generate(run.params, prompts, jax.random.PRNGKey(0),
                                   sampler.sampling_config(max_new_tokens=48, num_samples=k))  # fmt: skip
    rewards = rr.compose({"correctness": 1.0})(samples.texts, rr.columns_k(questions, k)).totals
    question_ids = [q for q in range(num_questions) for _ in range(k)]
    kept = rr.select_correct(question_ids, [prompts[q] for q in question_ids], samples.texts,
                             rewards, round=0)  # fmt: skip
    dataset, summary = rr.accumulate((), kept)  # D_0: the correct samples, deduplicated
    print(f"EI round 0: {len(samples.texts)} samples, {len(dataset)} kept ({summary.as_dict()})")
    model = rr.Transformer(run.config)
    tx, schedule = rr.make_optimizer(rr.OptimConfig(lr=1e-3, warmup_steps=0), steps)
    state = rr.create_train_state(model, tx, mesh, rules, seed=0, params=run.params)
    step = rr.jit_step(rr.make_sft_step(model, tx, lr_schedule=schedule), mesh, rules,
                       rr.state_shardings(model, tx, mesh, rules))  # fmt: skip
    arrays, _ = rr.sft_arrays(run.tokenizer, dataset, max_length=256)
    rows = np.arange(8) % max(len(dataset), 1)  # a batch of 8 kept solutions, repeated if fewer
    for _ in range(steps):
        state, metrics = step(state, {key: value[rows] for key, value in arrays.items()})
    print(f"fine-tuned {steps} steps on D_0: loss {float(metrics['loss']):.3f}")
    return {"kept": len(dataset), "metrics": jax.device_get(metrics)}


if __name__ == "__main__":
    main(sys.argv[1])
