"""The study's PPO at its scale: Llama-2-7B (SFT on GSM8K) on GSM8K, for a TPU pod slice.

    python launch/train.py --config=configs/study_gsm8k_ppo.py --workdir=gs://bucket/runs/ppo \
        --config.model_source.path=/path/to/llama-2-7b-gsm8k-sft    # a Hugging Face directory

Havrilla et al. 2024: sparse +1 reward, KL coefficient 0.05 in the reward,
gamma 1, lambda 0.95, clip 0.2, 4 PPO epochs, temperature 1, 256 new tokens.
The mesh is FSDP over a v4-64 slice (32 chips); for one box of 8 GPUs use
--config.mesh.shape='(1,8,1)'. `model` gives the shape the source will have,
so tests/test_study_configs.py can plan its memory without the weights.

The same run with another objective: `--config=configs/study_gsm8k_ppo.py:dapo`
(or grpo, gspo, cispo, reinforce_pp; `config.OBJECTIVES`): the group baseline
replaces the critic, the sizes stay.
"""

from rl_reason.experiments.config import rl_config, with_objective
from rl_reason.models.config import llama2_7b


def get_config(objective: str = "ppo"):
    config = rl_config("ppo")
    config.model.update(llama2_7b(remat="full", dtype="bfloat16").to_dict())
    config.mesh.shape = (1, 32, 1)
    config.model_source.kind = "hf"
    config.model_source.path = "/path/to/llama-2-7b-gsm8k-sft"
    config.data.task = "gsm8k"
    config.rl.update(
        num_iterations=200,
        prompts_per_iteration=128,
        num_samples=4,
        temperature=1.0,
        max_new_tokens=256,
        eval_every=20,
        kl_coef=0.05,
        kl_estimator="k1",
    )
    config.sampling.update(batch_size=128, prompt_buckets=(256, 512))
    config.ppo.update(num_epochs=4, num_minibatches=8, num_microbatches=2, vf_coef=0.5)
    config.eval.update(num_examples=0, num_samples=96, temperature=0.7, max_new_tokens=256)
    config.optim.update(lr=1e-6)
    config.checkpoint.save_interval_steps = 10
    return config if objective == "ppo" else with_objective(config, objective)
