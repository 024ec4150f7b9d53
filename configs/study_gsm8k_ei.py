"""The study's Expert Iteration at its scale: Llama-2-7B on GSM8K, K=96, 5 rounds, TPU pod slice.

    python launch/train.py --config=configs/study_gsm8k_ei.py --workdir=gs://bucket/runs/ei \
        --config.model_source.path=/path/to/llama-2-7b-gsm8k-sft    # or a pretrained start

Each round samples 96 solutions per GSM8K train question at temperature 1,
keeps the correct ones, and fine-tunes the start model on all kept so far,
choosing the round's checkpoint by validation maj@1. Mesh: FSDP over a
v4-64 slice; '(1,8,1)' for 8 GPUs.
"""

from rl_reason.experiments.config import ei_config
from rl_reason.models.config import llama2_7b


def get_config():
    config = ei_config()
    config.model.update(llama2_7b(remat="full", dtype="bfloat16").to_dict())
    config.mesh.shape = (1, 32, 1)
    config.model_source.kind = "hf"
    config.model_source.path = "/path/to/llama-2-7b-gsm8k-sft"
    config.data.update(task="gsm8k", num_validation=500)
    config.ei.update(
        num_rounds=5,
        num_samples=96,
        temperature=1.0,
        max_new_tokens=256,
        steps_per_round=2000,
        eval_every=250,
    )
    config.sampling.update(samples_per_call=8, batch_size=32, chunk=512, prompt_buckets=(256, 512))
    config.train.update(batch_size=128, max_length=768, remat="full")
    config.optim.update(lr=1e-5, warmup_steps=50)
    config.eval.update(num_examples=0, num_samples=96, temperature=0.7, max_new_tokens=256)
    config.checkpoint.save_interval_steps = 250
    return config
