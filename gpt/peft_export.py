"""A LoRA run as a PEFT adapter on the exported GPT-2 base model.

    python -m gpt.interop export-peft <LoRA checkpoint or run> <folder> [--base <exported GPT-2 folder>]

writes adapter_config.json + adapter_model.safetensors, which `peft.PeftModel.from_pretrained(base, folder)`
loads onto a transformers GPT2LMHeadModel. The base is the LoRA checkpoint's own frozen weights (which hold
any embedding rows the stage trained for new tokens), exported to <folder>/base unless --base names an
exported folder whose weights are checked to be exactly those. Our adapter keys map one to one: lora_A
(r, in) and lora_B (out, r) are the same matrices in PEFT; GPT-2's Conv1D layers need fan_in_fan_out=True,
and the scaling is lora_alpha / r in both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt.checkpoint import adapter_ranks, clean_state_dict, load_checkpoint
from gpt.errors import UserError


def adapter_config(ckpt: dict, base: Path) -> dict:
    """adapter_config.json of PEFT's LoraConfig for the checkpoint's adapters (one rank, as apply_lora makes)."""
    ranks = adapter_ranks(ckpt["model"])
    node = (ckpt.get("config") or {}).get("lora") or {}
    if "alpha" not in node:
        raise UserError(f"{ckpt['path']!r} holds LoRA adapters but its config has no lora.alpha")
    if len(set(ranks.values())) != 1:
        raise UserError(f"{ckpt['path']!r}: adapters of different ranks {sorted(set(ranks.values()))}; "
                        f"apply_lora gives every layer one rank")
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
            "r": next(iter(ranks.values())), "lora_alpha": float(node["alpha"]),
            "lora_dropout": float(node.get("dropout", 0.0)), "target_modules": sorted(ranks),
            "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out)
            "bias": "none", "use_rslora": False, "modules_to_save": None, "init_lora_weights": True,
            "inference_mode": True}


def adapter_tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    """PEFT's saved names: base_model.model.<layer>.lora_A.weight (r, in), ...lora_B.weight (out, r)."""
    sd = clean_state_dict(ckpt["model"])
    out = {}
    for layer in adapter_ranks(sd):
        for part in ("lora_A", "lora_B"):
            out[f"base_model.model.{layer}.{part}.weight"] = sd[f"{layer}.{part}"].detach().float().contiguous()
    return out


def base_checkpoint(ckpt: dict) -> dict:
    """The LoRA checkpoint without its adapters: the frozen base weights the adapters were trained on."""
    config = {k: v for k, v in (ckpt.get("config") or {}).items() if k != "lora"}
    return {**ckpt, "config": config,
            "model": {k: v for k, v in ckpt["model"].items() if not k.endswith((".lora_A", ".lora_B"))}}


def _check_base(base_ckpt: dict, folder: Path) -> None:
    """An exported folder given as --base must hold exactly the LoRA run's base weights (else the adapter
    would sit on other weights and its logits would differ from ours)."""
    from gpt.checkpoint import model_from_checkpoint
    from gpt.interop import _read_hf_weights, to_hf_state_dict

    want = to_hf_state_dict(model_from_checkpoint(base_ckpt))
    have = _read_hf_weights(folder)
    for name, t in want.items():
        if name not in have or have[name].shape != t.shape or not torch.equal(have[name].float(), t):
            raise UserError(f"--base {str(folder)!r}: weight {name!r} differs from the LoRA run's base weights "
                            f"(the stage trains new token rows, or it is another model); omit --base to export "
                            f"the run's own base to <folder>/base")


def export_peft(ckpt_path: str, out_dir: str, base: str | None = None) -> Path:
    """Write a PEFT LoRA adapter folder for a LoRA checkpoint (and its base model to <out_dir>/base without --base)."""
    from gpt.interop import _safetensors, _umask_mode, export_hf_checkpoint

    save_file = _safetensors().save_file
    ckpt = load_checkpoint(ckpt_path, prefer="best")
    if not adapter_ranks(ckpt["model"]):
        raise UserError(f"{ckpt['path']!r} holds no LoRA adapters (no lora_A/lora_B weights); export a plain "
                        f"model with `python -m gpt.interop export`")
    target = ((ckpt.get("config") or {}).get("model") or {}).get("_target_")
    if target != "gpt.model.GPT":
        raise UserError(f"{ckpt['path']!r} is a {str(target)[:40]} model; PEFT export covers language models "
                        f"(gpt.model.GPT) on GPT2LMHeadModel")
    out = Path(out_dir).expanduser()
    base_ckpt = base_checkpoint(ckpt)
    if base is None:
        base_dir = export_hf_checkpoint(base_ckpt, out / "base")
    else:
        base_dir = Path(base).expanduser()
        _check_base(base_ckpt, base_dir)
    config = adapter_config(ckpt, base_dir.resolve())
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(ckpt), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    _umask_mode(out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
