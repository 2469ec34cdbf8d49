"""A module the agent vendors beside agent.py."""


def double(x: int) -> int:
    return 2 * x
