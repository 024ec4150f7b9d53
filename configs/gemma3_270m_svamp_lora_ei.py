"""Expert Iteration with LoRA from the LoRA SFT start of Gemma 3 270M, on SVAMP.

    RL_REASON_DATA_DIR=../shared/data python launch/train.py \
        --config=configs/gemma3_270m_svamp_lora_ei.py --workdir=runs/gemma3_svamp_lora_ei \
        --config.model_source.path=runs/gemma3_svamp_lora_sft

configs/gemma3_270m_svamp_ei.py's split and protocol (700 train / 300 held out,
the last 50 train questions validate, K=4 at temperature 0.7, early stopping
on validation maj@1) from the zero-shot SFT start (configs/
gemma3_270m_svamp_lora_sft.py), so every round samples zero-shot. Each round
trains fresh rank-16 adapters on the merged start (the study's restart from
the start model): checkpoints hold the adapters, never the 270M base. The start
is measured first on the 300 held-out questions (the x = 0 point). Sized for
about two hours on a 2-core CPU; rerun the same command to resume.
"""

from configs import gemma3_270m_svamp_ei


def get_config():
    config = gemma3_270m_svamp_ei.get_config()
    config.model_source.kind = "run"
    config.model_source.path = "runs/gemma3_svamp_lora_sft"
    config.lora.update(rank=16, alpha=32.0)
    config.ei.update(num_rounds=3, first_round_shots=0, steps_per_round=40, eval_every=20)
    config.sampling.update(prompt_buckets=(128,))
    config.train.update(batch_size=16, num_microbatches=2, max_length=192, remat="")
    config.optim.update(lr=2e-4, warmup_steps=5, schedule="constant")
    config.eval.update(num_examples=0)  # all 300 held-out questions
    return config
