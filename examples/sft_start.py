"""An SFT start from scratch, saved as a run every other script loads.

    PYTHONPATH=. python examples/sft_start.py runs/tiny_sft

A tiny Llama trained for a few hundred steps on the built-in synthetic
arithmetic task's reference solutions, then `save_run`: the run directory
(`rr.RUN_DIRECTORY`) that `load_run`, `launch/evaluate.py` and
`--config.model_source.path` read.
"""

import sys

import jax

import rl_reason as rr
from rl_reason.data import synthetic
from rl_reason.data.tokenizer import train_tokenizer


def main(workdir: str, steps: int = 300, seed: int = 0) -> dict:
    examples = synthetic.generate("train", 256, seed=seed)
    prompts = [rr.format_prompt(ex["question"]) for ex in examples]
    solutions = [rr.format_completion(ex["answer"]) for ex in examples]
    tokenizer = train_tokenizer(prompts + solutions, vocab_size=300)
    mesh = rr.make_mesh((-1, 1, 1))
    model = rr.Transformer(rr.tiny_llama(vocab_size=len(tokenizer)))
    tx, schedule = rr.make_optimizer(rr.OptimConfig(lr=3e-3, warmup_steps=10), steps)
    state = rr.create_train_state(model, tx, mesh, rr.DEFAULT_RULES, seed=seed)
    step = rr.jit_step(
        rr.make_sft_step(model, tx, lr_schedule=schedule),
        mesh,
        rr.DEFAULT_RULES,
        rr.state_shardings(model, tx, mesh, rr.DEFAULT_RULES),
    )
    pairs = rr.encode_pairs(tokenizer, prompts, solutions)
    batch, _ = rr.pack_pairs(pairs, max_length=256, pad_id=rr.pad_id(tokenizer))
    for i in range(steps):
        rows = jax.tree.map(
            lambda x: x[(i * 32) % 256 :][:32], batch
        )  # {tokens, input_mask, loss_mask}
        state, metrics = step(state, rows)
    print(f"SFT: loss {float(metrics['loss']):.3f} after {steps} steps")
    rr.save_run(workdir, state.params, model.config, tokenizer, step=steps)
    return {"metrics": jax.device_get(metrics), "params": jax.device_get(state.params)}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_sft")
