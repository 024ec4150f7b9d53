"""rl_reason: teaching language models to reason with reinforcement learning, in JAX."""
