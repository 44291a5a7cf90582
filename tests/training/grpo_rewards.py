"""A user reward for the GRPO tests (`--reward tests.training.grpo_rewards:odd_first_token`): it
varies between the completions of a tiny random model, so advantages are not all zero."""


def odd_first_token(completions, completion_ids, **kwargs):
    return [float(ids[0] % 2) for ids in completion_ids]
