"""How much memory a training step needs on one device, estimated before the first step.

    parameters   every weight, in its storage dtype (fp32 under autocast)
    gradients    the trainable weights', fp32
    optimizer    its state: AdamW 2 fp32 moments per trainable weight, SGD with momentum 1, Muon 1, Adafactor a
                 row and a column per matrix; an optimizer made of others (gpt.optim.MuonAdamW) the sum of theirs
    activations  what the forward pass keeps for the backward pass, per micro-batch (formula below)
    overhead     autocast's low-precision weight copies, DDP's gradient buckets

Activations of one pre-LN block per token, with a the autocast dtype's bytes (2 for bf16, 4 for float32): the
two layer norms keep their float32 input (2 x 4C), and a x 14C for the tensors the matmuls, attention and GELU
keep (c_attn's input C, q/k/v 3C, the attention output C, c_fc's input C, GELU's input 4C, c_proj's input 4C,
the attention's c_proj input C); eager attention adds its (T, T) probabilities per head. The architecture
options change the terms: F (mlp_hidden) for 4C, SwiGLU keeps 4F, grouped-query attention smaller k and v
(SDPA), rotary the rotated q and k (SDPA), RMSNorm its float32 output, QK-norm its norms' copies (up to 15%
over). The output
layer keeps its weight's gradient (fused: computed in forward) or the float32 logits (unfused). tests/test_memory.py checks the formula against the bytes
torch's saved-tensor hooks see on CPU. On a GPU the real peak also holds the CUDA context, the caching
allocator's slack and temporaries, so a device that the estimate fills beyond about 90% will not do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GiB = 2**30


@dataclass
class MemoryEstimate:
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    shards: int = 1

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.overhead

    def line(self) -> str:
        parts = ", ".join(f"{name} {value / GiB:.2f}" for name, value in (
            ("parameters", self.parameters), ("gradients", self.gradients), ("optimizer", self.optimizer),
            ("activations", self.activations), ("overhead", self.overhead)))
        return f"memory per device (estimate, GiB): {parts}; total {self.total / GiB:.2f}"


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The state `optimizer` will hold once it has stepped, from its type and its parameters' shapes."""
    if hasattr(optimizer, "optimizers"):  # a composite (gpt.optim.MuonAdamW): each part holds its own state
        return sum(optimizer_state_bytes(part) for part in optimizer.optimizers)
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            n = p.numel() * 4  # moments are float32 (the parameters are)
            if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                total += 2 * n
            elif isinstance(optimizer, torch.optim.SGD):
                total += n if group.get("momentum", 0) else 0
            elif hasattr(torch.optim, "Muon") and isinstance(optimizer, torch.optim.Muon):
                total += n  # one momentum buffer
            elif hasattr(torch.optim, "Adafactor") and isinstance(optimizer, torch.optim.Adafactor):
                total += 4 * (p.shape[0] + p.shape[1]) if p.dim() == 2 else n
            else:  # an optimizer this module does not know: counted like Adam, the common worst case
                total += 2 * n
    return total


def block_activation_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype | None) -> int:
    """What one block's forward keeps for backward (see the module docstring; the architecture options' terms
    were measured with saved-tensor hooks, tests/test_memory.py)."""
    a = 4 if dtype is None else torch.empty(0, dtype=dtype).element_size()
    C, H = config.n_embd, config.n_head
    D = C // H
    F, Hkv = config.mlp_hidden, config.n_kv_head  # GPTConfig fills both in (4C / n_head when null)
    eager = config.attn_impl == "eager"
    tokens = batch_size * seq_len
    # c_attn's input C, q/k/v (eager attention keeps full-size q, k, v whatever n_kv_head), the attention output
    # C, c_fc's input C; the MLP: GELU/ReLU^2 keep their input and c_proj's (2F), SwiGLU its gate/up (2F), the
    # activation's output and c_proj's input (4F)
    qkv = 3 * C if eager else C + 2 * Hkv * D
    mlp = 4 * F if config.mlp == "swiglu" else 2 * F
    block = tokens * (8 * C + a * (3 * C + qkv + mlp) + 16)  # + the layer norms' statistics (2 x 2 floats per token)
    if config.norm == "rmsnorm":  # RMSNorm also keeps its float32 normalised output
        block += tokens * 2 * 4 * C
    if config.pos == "rope" and not eager:  # rotated q and k, kept by SDPA
        block += tokens * a * 3 * C
    if config.qk_norm:  # each norm's float32 input and output over q's and k's channels
        block += tokens * 4 * (C + Hkv * D) * (5 if config.norm == "rmsnorm" else 3) // 2
    if eager:  # its (T, T) attention probabilities per head
        block += batch_size * H * seq_len * seq_len * a
    else:  # scaled_dot_product_attention's log-sum-exp, a float per head and token
        block += tokens * 4 * H
    return block


def _rows(config) -> int:
    """The output layer's rows: the padded vocabulary (model.vocab_multiple), which its matmuls compute."""
    return getattr(config, "padded_vocab_size", config.vocab_size)


def saved_activation_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype | None,
                           checkpointing: bool = False) -> int:
    """The tensors one micro-batch's forward pass keeps for backward: every block's activations, or with
    activation checkpointing each block's input only (4C per token)."""
    C, L, V = config.n_embd, config.n_layer, _rows(config)
    tokens = batch_size * seq_len
    blocks = L * tokens * 4 * C if checkpointing else L * block_activation_bytes(config, batch_size, seq_len, dtype)
    # the embeddings' output and the last norm's input, the targets; the fused output layer builds its weight
    # gradient (V, C) in forward and keeps it, the unfused one keeps the (tokens, V) logits in float32
    head = tokens * (8 * C + 16) + (V * C * 4 if config.loss_chunk_size else tokens * 4 * V)
    if config.norm == "rmsnorm":  # the final RMSNorm's float32 normalised output
        head += tokens * 4 * C
    return blocks + head


def activation_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype | None,
                     checkpointing: bool = False) -> int:
    """The peak: the saved tensors, the fused output layer's chunk of logits on top of them, and with activation
    checkpointing the one block whose activations backward rebuilds at a time."""
    a = 4 if dtype is None else torch.empty(0, dtype=dtype).element_size()
    chunk = min(batch_size * seq_len, config.loss_chunk_size) * _rows(config) * a if config.loss_chunk_size else 0
    rebuilt = block_activation_bytes(config, batch_size, seq_len, dtype) if checkpointing else 0
    return saved_activation_bytes(config, batch_size, seq_len, dtype, checkpointing) + chunk + rebuilt


def autocast_copy_bytes(model: torch.nn.Module, dtype: torch.dtype | None) -> int:
    """Under autocast each Linear layer's weight is cast once per forward and the copy kept for backward; the
    fused output layer (loss_chunk_size > 0) casts its weight itself and keeps no copy."""
    if dtype is None:
        return 0
    a = torch.empty(0, dtype=dtype).element_size()
    fused_head = getattr(getattr(model, "config", None), "loss_chunk_size", 0)
    head = getattr(model, "lm_head", None)
    return sum(m.weight.numel() * a for m in model.modules()
               if isinstance(m, torch.nn.Linear) and not (fused_head and m is head))


def estimate(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_size: int, seq_len: int,
             dtype: torch.dtype | None, shards: int = 1, ddp: bool = False,
             checkpointing: bool | None = None) -> MemoryEstimate:
    """The memory of one training step of `model` (micro-batch `batch_size` x `seq_len`, autocast `dtype` or None
    for float32) on each of `shards` devices that split parameters, gradients and optimizer state (FSDP), or
    one device (with `ddp`, DDP's gradient buckets on top)."""
    params = list(model.parameters())
    unique = {id(p): p for p in params}.values()  # tied weights count once
    param_bytes = sum(p.numel() * p.element_size() for p in unique)
    trainable = sum(p.numel() * 4 for p in unique if p.requires_grad)
    overhead = autocast_copy_bytes(model, dtype)
    config = getattr(model, "config", None)
    if ddp:
        overhead += trainable
    if checkpointing is None:  # the model's own setting (model.activation_checkpointing)
        checkpointing = bool(getattr(config, "activation_checkpointing", False))
    acts = activation_bytes(config, batch_size, seq_len, dtype, checkpointing) if config is not None else 0
    return MemoryEstimate(param_bytes // shards, trainable // shards, optimizer_state_bytes(optimizer) // shards,
                          acts, overhead, shards)


def device_memory(device: str) -> int | None:
    """Total memory of a CUDA device in bytes; None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def table(batch_size: int = 8, seq_len: int = 1024, vocab_size: int = 50257, gpus: int = 8,
          vocab_multiple: int = 64) -> str:
    """A markdown table of the estimate per device for the conf/model sizes (AdamW, bf16 autocast, micro-batch
    `batch_size` x `seq_len`, GPT-2's vocabulary padded as the presets do: 50304 rows): one device (or DDP), with
    activation checkpointing, FSDP over `gpus`, and both."""
    from gpt.model import GPT

    sizes = {"nano": (4, 4, 256), "gpt2_small": (12, 12, 768), "gpt2_medium": (24, 16, 1024),
             "gpt2_large": (36, 20, 1280), "gpt2_xl": (48, 25, 1600)}
    rows = [f"| model | parameters | 1 GPU / DDP | + activation checkpointing | FSDP x{gpus} | FSDP x{gpus} + "
            f"activation checkpointing |", "|---|---|---|---|---|---|"]
    for name, (layers, heads, width) in sizes.items():
        with torch.device("meta"):
            model = GPT(vocab_size=vocab_size, block_size=seq_len, n_layer=layers, n_head=heads, n_embd=width,
                        vocab_multiple=vocab_multiple)
            optimizer = torch.optim.AdamW(model.parameters())
        cells = [estimate(model, optimizer, batch_size, seq_len, torch.bfloat16, shards=n, checkpointing=c).total / GiB
                 for n, c in ((1, False), (1, True), (gpus, False), (gpus, True))]
        params = sum({id(p): p.numel() for p in model.parameters()}.values())
        rows.append(f"| {name} | {params / 1e6:,.0f}M | " + " | ".join(f"{c:,.1f} GiB" for c in cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Memory per device of a training step, by model size (estimate).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    print(table(args.batch_size, args.seq_len, gpus=args.gpus))
