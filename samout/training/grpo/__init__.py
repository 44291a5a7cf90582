"""GRPO (Shao et al. 2024): reinforcement learning with verifiable rewards, `--objective grpo`.

    rollout.py     G completions per prompt: one prefill, the state forked G ways
    loss.py        group-normalised advantages and the clipped-ratio loss (grpo, dr_grpo)
    rewards.py     built-in verifiable rewards and `module:function` reward loading
    objective.py   the objective the Trainer runs (rollouts, cached over --grpo-iterations)
"""
