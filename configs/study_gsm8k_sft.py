"""The study's SFT start at its scale: Llama-2-7B fine-tuned on GSM8K's reference solutions.

    python launch/train.py --config=configs/study_gsm8k_sft.py --workdir=gs://bucket/runs/sft \
        --config.model_source.path=/path/to/llama-2-7b-hf

Zero-shot prompt -> reference solution, the loss on the solution only, three
epochs over the GSM8K train questions less the 500 that configs/study_gsm8k_ei.py
validates on (held out here too, so the EI run that starts from this model
selects its checkpoints on questions SFT never saw). Then

    python launch/train.py --config=configs/study_gsm8k_ei.py --workdir=gs://bucket/runs/ei \
        --config.model_source.kind=run --config.model_source.path=gs://bucket/runs/sft

Mesh: FSDP over a v4-64 slice; '(1,8,1)' for 8 GPUs.
"""

from rl_reason.experiments.config import sft_config
from rl_reason.models.config import llama2_7b

TRAIN_QUESTIONS = 7473 - 500  # GSM8K train less the EI run's validation questions
BATCH = 128
EPOCHS = 3


def get_config():
    config = sft_config("gsm8k")
    # What model_source loads (its own config is what trains); the plan reads it.
    config.model.update(llama2_7b(remat="full", dtype="bfloat16").to_dict())
    config.mesh.shape = (1, 32, 1)
    config.model_source.kind = "hf"
    config.model_source.path = "/path/to/llama-2-7b-hf"
    config.data.update(num_validation=500)
    config.train.update(
        num_steps=-(-EPOCHS * TRAIN_QUESTIONS // BATCH),
        batch_size=BATCH,
        max_length=512,
        remat="full",
        log_every=10,
        eval_every=50,
    )
    config.optim.update(lr=1e-5, warmup_steps=20, schedule="cosine")
    config.checkpoint.save_interval_steps = 50
    return config
