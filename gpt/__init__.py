"""gpt: a Hydra-configured GPT experiment pipeline (model, data, training, generation)."""

from gpt.errors import UserError

__all__ = ["UserError"]
