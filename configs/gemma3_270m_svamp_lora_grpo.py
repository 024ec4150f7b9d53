"""GRPO with LoRA from the LoRA SFT start of Gemma 3 270M, on SVAMP.

    RL_REASON_DATA_DIR=../shared/data python launch/train.py \
        --config=configs/gemma3_270m_svamp_lora_grpo.py --workdir=runs/gemma3_svamp_lora_grpo \
        --config.model_source.path=runs/gemma3_svamp_lora_sft

Each iteration: 8 SVAMP train questions (700 train / 300 held out, as EI's
split), 8 samples each at temperature 0.7 (GRPO's group), 128 new tokens after
the zero-shot prompt; the correctness reward; group advantages, the k3 KL to
the reference as a loss term. Rank-16 adapters on the merged start: the
reference is that start itself (the adapters switched off), so memory holds
one copy of the 270M model plus the adapters' Adam moments. The start and
every `rl.eval_every` iterations are measured on all 300 held-out questions
(greedy maj@1, K=4 maj@4 and pass@4). Sized for about two hours on a 2-core
CPU; rerun the same command to resume.
"""

from configs import gemma3_270m_svamp_lora_sft
from rl_reason.experiments.config import rl_config, with_objective


def get_config():
    config = with_objective(rl_config("grpo"), "grpo")
    config.mesh.shape = (1, 1, 1)  # the 262k vocabulary: one device
    config.model_source.kind = "run"
    config.model_source.path = "runs/gemma3_svamp_lora_sft"
    sft = gemma3_270m_svamp_lora_sft.get_config()
    config.data.update(task="svamp", svamp_train_tenths=7, num_validation=0)
    config.lora.update(sft.lora.to_dict())
    config.rl.update(
        num_iterations=40,
        prompts_per_iteration=8,
        num_samples=8,
        temperature=0.7,
        max_new_tokens=128,
        eval_every=20,
    )
    config.sampling.update(batch_size=16, prompt_buckets=(128,))
    config.ppo.update(num_epochs=1, num_minibatches=2, num_microbatches=2, chunk_size=16)
    config.eval.update(
        task="svamp", num_examples=0, num_samples=4, temperature=0.7, max_new_tokens=128
    )
    config.optim.update(lr=2e-5, warmup_steps=0, schedule="constant", weight_decay=0.0)
    config.checkpoint.update(save_interval_steps=2, max_to_keep=2)
    return config
