"""The public surface for research code: load, sample, reward, update, save.

    import rl_reason as rr

    run = rr.load_run("runs/sft", mesh, rr.DEFAULT_RULES)      # config, params, tokenizer
    sampler = rr.Sampler(run.config, run.tokenizer, mesh=mesh)  # the task's stop strings
    samples = sampler.generate(params, prompts, rng, sampler.sampling_config(num_samples=4))
    rewards = rr.compose({"correctness": 1.0})(samples.texts, rr.columns_k(examples, 4))
    ...
    rr.save_run("runs/mine", state.params, run.config, run.tokenizer, step=3)

Every name here is the one the launchers' loops use (no second copy for
research code): pure steps over pytrees (`make_sft_step`, `make_ppo_update`),
jitted with their shardings by `jit_step`; scoring that comes jitted and
sharded (`make_score`); registries by name (`ADVANTAGE_ESTIMATORS`,
`POLICY_LOSSES`, `rewards_registry`). The run directory `save_run` writes and
`load_run` reads is `RUN_DIRECTORY`. docs/research.md has complete scripts
(examples/*.py, run by tests/test_examples.py).
"""

from rl_reason.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    EstimatorSettings,
    estimator_names,
    gae,
    group_advantages,
    rollout_advantages,
    whiten,
)
from rl_reason.algorithms.expert_iteration import accumulate, select_correct, sft_arrays
from rl_reason.algorithms.grpo import dr_grpo_ppo_config, group_token_advantages, grpo_ppo_config
from rl_reason.algorithms.logprobs import SharedPrompts, token_logprobs
from rl_reason.algorithms.optimizer import OptimConfig, make_optimizer
from rl_reason.algorithms.policy_losses import POLICY_LOSSES, register_policy_loss
from rl_reason.algorithms.ppo import (
    ActorCritic,
    PPOBatch,
    PPOConfig,
    create_ppo_state,
    make_ppo_update,
    make_score,
    ppo_state_shardings,
)
from rl_reason.algorithms.sft import make_sft_step
from rl_reason.algorithms.train_state import (
    TrainState,
    create_train_state,
    jit_step,
    state_shardings,
)
from rl_reason.checkpointing import Checkpointer
from rl_reason.data.sft import encode_pairs, pack_pairs, pad_id
from rl_reason.data.templates import STOP_SEQUENCES, format_completion, format_prompt
from rl_reason.evaluation.evaluate import evaluate
from rl_reason.experiments.rollout import collect, columns_k
from rl_reason.experiments.sources import RUN_DIRECTORY, LoadedModel, load_model, load_run, save_run
from rl_reason.models.config import ModelConfig, tiny_llama
from rl_reason.models.lora import LoraConfig, LoraModel, export_peft, import_peft, lora_optimizer
from rl_reason.models.transformer import Transformer
from rl_reason.parallel.mesh import make_mesh
from rl_reason.parallel.sharding import DEFAULT_RULES, activation_sharding, shard_batch
from rl_reason.rewards import registry as rewards_registry
from rl_reason.rewards.compose import compose
from rl_reason.sampling.engine import PromptTooLongError, Sampler

__all__ = [
    # runs and models
    "RUN_DIRECTORY",
    "LoadedModel",
    "load_model",
    "load_run",
    "save_run",
    "Checkpointer",
    "ModelConfig",
    "Transformer",
    "tiny_llama",
    # LoRA
    "LoraConfig",
    "LoraModel",
    "lora_optimizer",
    "export_peft",
    "import_peft",
    # meshes
    "make_mesh",
    "DEFAULT_RULES",
    "shard_batch",
    "activation_sharding",
    # data and prompts
    "format_prompt",
    "format_completion",
    "STOP_SEQUENCES",
    "encode_pairs",
    "pack_pairs",
    "pad_id",
    "columns_k",
    # sampling and rewards
    "Sampler",
    "PromptTooLongError",
    "collect",
    "compose",
    "rewards_registry",
    "evaluate",
    # advantages, losses, scoring, updates
    "ADVANTAGE_ESTIMATORS",
    "EstimatorSettings",
    "estimator_names",
    "gae",
    "group_advantages",
    "group_token_advantages",
    "rollout_advantages",
    "whiten",
    "POLICY_LOSSES",
    "register_policy_loss",
    "PPOConfig",
    "grpo_ppo_config",
    "dr_grpo_ppo_config",
    "ActorCritic",
    "PPOBatch",
    "make_score",
    "make_ppo_update",
    "SharedPrompts",
    "create_ppo_state",
    "ppo_state_shardings",
    "token_logprobs",
    # SFT and Expert Iteration
    "make_sft_step",
    "select_correct",
    "accumulate",
    "sft_arrays",
    # optimizers and states
    "OptimConfig",
    "make_optimizer",
    "TrainState",
    "create_train_state",
    "state_shardings",
    "jit_step",
]
