"""What the RL stages (grpo, ppo) share: prompts in the chat template, answers sampled with the KV cache,
their log-probabilities under the sampling distribution, the clipped policy surrogate, and the buffer
that serves a rollout as minibatches over several epochs, one minibatch per trainer step, so the shared
loop (gpt.trainer.Trainer) runs the optimisation unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt.chat import END, prompt_ids
from gpt.encoding import lm_batch
from gpt.errors import UserError
from gpt.engine import Sampling, complete
from gpt.jsonl import read_prompts, split_val
from gpt.parallel import gathered


@torch.no_grad()
def sample_answers(model, prompts: list[list[int]], max_new_tokens: int, end_id: int, temperature: float = 1.0,
                   top_k: int | None = None, generator: torch.Generator | None = None) -> list[list[int]]:
    """One batch of KV-cache sampling (the decode engine, one group) -> each prompt's answer ids, up to and
    including its first end id. A model sharded with FSDP decodes on its gathered weights (each rank its own
    prompts, for as many steps as its rows need)."""
    with gathered(model) as plain:
        rows = complete(plain, prompts, Sampling(max_new_tokens, temperature, top_k, stop_ids=(end_id,),
                                                 generator=generator))
    return [r.new + ([r.stop_token] if r.stop_token is not None else []) for r in rows]


def answer_text(tok, ids: list[int], end_id: int) -> str:
    return tok.decode([t for t in ids if t != end_id])


def sequences(prompts: list[list[int]], answers: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + answer per row -> x, y (B, T) with y = -1 outside the answer (right-padded)."""
    return lm_batch([(p + a, [False] * len(p) + [True] * len(a)) for p, a in zip(prompts, answers)], device)


def logprobs_of(logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits (B, T, V), targets y (B, T) -> log p(y_t) (B, T) float32 under the sampling distribution
    softmax(logits / temperature) (temperature <= 0 or 1: the plain softmax); 0 where y == -1.

    The RL stages sample rollouts at `temperature`, so the ratio pi / pi_rollout and the KL must use the
    same tempered distribution: scoring samples drawn at T != 1 with the untempered policy makes the
    ratio's denominator a distribution the samples never came from."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y >= 0)


def masked_mean(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (v * mask).sum() / mask.sum().clamp(min=1)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float):
    """Per-token PPO surrogate min(rho A, clip(rho) A) and whether the clip was active."""
    ratio = torch.exp(logp - old_logp)
    s1, s2 = ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv
    return torch.minimum(s1, s2), (s2 < s1)


class PromptSet:
    """{"prompt", "answer"} JSONL encoded with the chat template, split into train / val."""

    def __init__(self, tok, data: str, val_data: str | None, val_fraction: float, seed: int, block_size: int,
                 max_new_tokens: int, need_answer: bool):
        train = read_prompts(data)
        val = read_prompts(val_data) if val_data else None
        self.train, self.val = split_val(train, val, val_fraction, seed, str(data))
        if need_answer:
            for name, rows in ((data, self.train), (val_data or data, self.val)):
                if any(r["answer"] is None for r in rows):
                    raise UserError(f"{name}: every record needs an 'answer' for the exact-match reward")
        for r in self.train + self.val:
            r["ids"] = prompt_ids(tok, r["prompt"])
        longest = max(len(r["ids"]) for r in self.train + self.val)
        if longest + max_new_tokens > block_size:
            raise UserError(f"{data}: a prompt of {longest} tokens + stage.max_new_tokens={max_new_tokens} exceeds the "
                            f"model's block_size={block_size}; lower stage.max_new_tokens or shorten the prompts")


class RolloutBuffer:
    """Minibatches over a rollout for `epochs` passes; `next()` returns None when it is used up."""

    def __init__(self, data: dict, minibatch: int, epochs: int, generator: torch.Generator):
        n = data["x"].size(0)
        self.data = data
        self.order = [perm[i: i + minibatch] for _ in range(epochs)
                      for perm in [torch.randperm(n, generator=generator)] for i in range(0, n, minibatch)]

    @classmethod
    def restored(cls, data: dict, order: list) -> "RolloutBuffer":
        """The rest of a rollout saved in a checkpoint (gpt.stages.common.RolloutObjective.state_dict)."""
        if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()) \
                or not isinstance(order, list) or not all(torch.is_tensor(i) for i in order):
            raise UserError("the checkpoint's saved rollout is not tensors; resume from a last.pt written by "
                            "finetune.py")
        buffer = cls.__new__(cls)
        buffer.data, buffer.order = data, list(order)
        return buffer

    def next(self) -> dict | None:
        if not self.order:
            return None
        idx = self.order.pop(0)
        return {k: v[idx] for k, v in self.data.items()}


def end_id(tok) -> int:
    return tok.special_id(END)
