"""Data parallelism for the loop: DDP (every rank holds the whole model) or FSDP2 (`fully_shard`: each rank holds
1/world of every weight, gradient and optimizer state; the weights of a block are gathered for its forward and
backward), chosen by hardware.data_parallel under torchrun or a submitit job.

What differs between the two is written here once: wrapping, the gradient sync of accumulated micro-steps,
gathering the full state for the single-file checkpoint (rank 0 writes it), restoring from one on any number of
processes. Checkpoints stay the one self-describing file infer.py, evaluate.py, serve.py and finetune.py load,
in torch's own format (optimizer state keyed by position) whatever the run's parallelism. Under FSDP rank 0
samples from a plain copy of the model (the decode engine calls the model's parts directly, which a sharded
model cannot serve), loaded with the gathered weights at each evaluation; code that decodes on every rank (RL
rollouts, a stage's exact-match evaluation) does so on a plain module holding the gathered weights (`gathered`).
"""

from __future__ import annotations

import contextlib
import copy
import weakref

import torch
import torch.nn as nn

# a sharded model -> a copy of it on the meta device (no memory): `gathered` fills it with the whole weights
_PLAIN: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()



def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device, made without a second copy of its
    weights in memory (deepcopy is handed meta stand-ins for them; tied weights stay one parameter)."""
    memo = {}
    for p in model.parameters():
        memo.setdefault(id(p), nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
    for b in model.buffers():
        memo.setdefault(id(b), torch.empty_like(b, device="meta"))
    return copy.deepcopy(model, memo)


def shard(model: nn.Module, block_type: type, mixed_precision: bool, reshard_after_forward: bool = True,
          cpu_offload: bool = False) -> nn.Module:
    """fully_shard each module of `block_type` (a Transformer block), then the root (embeddings, final norm,
    output layer; the tied embedding and output weights stay one parameter), in place. Build the optimizer after
    this: sharding replaces the parameters. On a GPU with `mixed_precision`: bf16 weights and compute, float32
    gradient reduction."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    import torch.distributed as dist

    _PLAIN[model] = meta_copy(model)  # its structure (LoRA layers, heads), before sharding
    with torch.no_grad():  # every rank starts from rank 0's weights (each rank's own seed initialised its copy;
        for tensor in model.state_dict().values():  # DDP broadcasts at wrap time, fully_shard does not)
            dist.broadcast(tensor, src=0)
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    kept = param_settings(model)
    for module in model.modules():
        if isinstance(module, block_type):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    restore_param_settings(model, kept)
    return model


def param_settings(model: nn.Module) -> dict:
    """name -> (attributes, gradient hooks) of each parameter that has any: LoRA's trainable new rows of the
    embedding are a Parameter marked `no_weight_decay` whose hook zeroes the old rows' gradient (gpt.lora)."""
    out = {}
    for name, p in model.named_parameters():
        attrs, hooks = dict(vars(p)), list((p._backward_hooks or {}).values())
        if attrs or hooks:
            out[name] = (attrs, hooks)
    return out


def restore_param_settings(model: nn.Module, kept: dict) -> None:
    """Give the sharded parameters the settings `param_settings` read before sharding (fully_shard replaces every
    Parameter): the attributes on the sharded Parameter (gpt.optim reads them when the optimizer is built), the
    gradient hooks on the whole Parameter each forward runs with (FSDP reduces that one's gradient; a hook on the
    shard would never run), registered once per such tensor from a pre-hook of the module that holds it."""
    params = dict(model.named_parameters())
    for name, (attrs, hooks) in kept.items():
        for key, value in attrs.items():
            setattr(params[name], key, value)
        if not hooks:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)

        def register(module, args, attr=attr, hooks=hooks):
            weight = getattr(module, attr)  # under FSDP's forward: the whole Parameter, kept across steps
            if weight.requires_grad and not getattr(weight, "_settings_hooked", False):
                for hook in hooks:
                    weight.register_hook(hook)
                weight._settings_hooked = True

        owner.register_forward_pre_hook(register)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """`with gathered(model) as plain:` a plain module holding `model`'s whole weights on this rank, for code that
    calls a model's parts directly (the decode engine: `hidden_states`, `lm_head`, a KV cache), which a sharded
    model cannot serve; without FSDP, `model` itself. Under FSDP the weights are gathered once on entry (a
    collective every rank calls at the same point) and freed on exit: the decode inside runs no collective, so
    ranks whose rows finish after different numbers of steps cannot deadlock, and FSDP's own forward state is
    not touched. Memory: one whole float copy of the weights per rank while inside."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    plain = _PLAIN[model]
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # whole on every rank
    plain.load_state_dict(state, assign=True)
    del state
    plain.train(model.training)
    try:
        yield plain
    finally:
        plain.to("meta")  # frees the gathered copy


def call(model: nn.Module, fn, *args, **kwargs):
    """fn(module, *args, **kwargs) run as the forward of `model` (a plain, DDP-wrapped or FSDP-sharded model):
    for a head's method (Classifier.classify, a reward score) that is not the module's forward. DDP synchronises
    gradients and FSDP gathers the root's weights (embeddings, final norm, heads) only around a call of the model
    itself, so the function runs inside one, with the inner module's forward shadowed by it for that call."""
    inner = getattr(model, "module", model)  # DDP wraps the module; FSDP2 is the module itself
    head = getattr(inner, "_orig_mod", inner)  # under torch.compile the function runs uncompiled, never recompiled
    own = inner.__dict__.get("forward")  # torch.compile's module keeps its compiled forward here: put it back
    inner.forward = lambda *a, **k: fn(head, *a, **k)  # an instance attribute shadows the class's forward
    try:
        return model(*args, **kwargs)
    finally:
        if own is None:
            del inner.forward
        else:
            inner.forward = own


def micro_step(model: nn.Module, last: bool):
    """The context of one micro-batch's forward and backward: gradients are reduced across ranks on the last
    micro-step of an optimizer step only."""
    if is_sharded(model):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def full_tensor(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (under FSDP clip_grad_norm_ returns a DTensor of the global norm)."""
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


def full_model_state(model: nn.Module) -> dict:
    """The whole model state on the CPU of rank 0 (other ranks: an empty dict); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) whole, on the CPU of rank 0 (other ranks get empty dicts); a collective
    every rank must call. The optimizer state is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    return model_state, (positional(model, optimizer, optim_state) if optim_state else {})


def _order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: torch's own state dicts number parameters this way."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def positional(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A full optimizer state keyed by parameter name (torch.distributed.checkpoint's) keyed by position instead,
    as optimizer.state_dict() keys it: the checkpoint file has one format whatever the run's parallelism."""
    order = {n: i for i, n in enumerate(_order(model, optimizer))}
    return {"state": {order[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[n] for n in g["params"]]} for g in state["param_groups"]]}


def by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """The reverse of `positional`."""
    order = _order(model, optimizer)
    return {"state": {order[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Put a whole model and optimizer state (a checkpoint file of any run of the script) into a sharded model:
    each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, by_name(model, optimizer, optim_state), options=options)
