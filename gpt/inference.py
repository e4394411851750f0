"""infer.py's logic: rebuild tokenizer and model from a checkpoint alone, sample, stream to stdout."""

from __future__ import annotations

import sys

import torch
from omegaconf import DictConfig

from gpt.checkpoint import load_checkpoint, model_from_checkpoint
from gpt.errors import UserError
from gpt.generate import generate_tokens
from gpt.tokenizer import from_identity
from gpt.trainer import Precision


def load_for_inference(path: str, device: str = "cpu", quantize: str | None = None):
    """-> (model, tokenizer, checkpoint dict) from a checkpoint file or run folder (best.pt preferred).

    quantize="int8" quantizes the Linear layers at load time (CPU); int8 checkpoints load as int8.
    """
    from gpt.quantize import model_from_quantized, quantize_int8

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but CUDA is not available here; use device=cpu")
    if quantize not in (None, "none", "int8"):
        raise UserError(f"quantize={quantize!r} is not supported; use quantize=int8 or leave it unset")
    ckpt = load_checkpoint(path, prefer="best", map_location="cpu" if quantize == "int8" else device)
    int8 = quantize == "int8" or bool(ckpt.get("quantized"))
    if int8 and not device.startswith("cpu"):
        raise UserError(f"int8 models run on the CPU only (torch.ao dynamic quantization); use device=cpu")
    tokenizer = from_identity(ckpt["tokenizer"])
    if ckpt.get("quantized"):
        model = model_from_quantized(ckpt)
    else:
        model = model_from_checkpoint(ckpt, device)
        if quantize == "int8":
            model = quantize_int8(model)
    return model, tokenizer, ckpt


def is_quantized(model) -> bool:
    return not isinstance(model.lm_head, torch.nn.Linear)


def encode_prompt(tokenizer, prompt: str, block_size: int, out=sys.stderr) -> list[int]:
    ids = tokenizer.encode(prompt)
    if not ids:  # an empty prompt starts from end-of-text (BPE) or a newline (char)
        ids = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n")
    if len(ids) > block_size:
        print(f"note: prompt has {len(ids)} tokens, more than block_size={block_size}; "
              f"the model sees only its last {block_size} tokens", file=out)
    return ids


def stream_samples(cfg: DictConfig, out=sys.stdout) -> list[str]:
    """Generate cfg.num_samples continuations of cfg.prompt (one batch) and print each, prompt included;
    a single sample is streamed token by token."""
    for key in ("max_new_tokens", "num_samples"):
        if int(cfg[key]) < 0 or (key == "num_samples" and int(cfg[key]) < 1):
            raise UserError(f"{key}={cfg[key]} must be a positive integer")
    if cfg.top_p is not None and not 0.0 < float(cfg.top_p) <= 1.0:
        raise UserError(f"top_p={cfg.top_p} must be in (0, 1]")
    model, tok, ckpt = load_for_inference(cfg.ckpt, cfg.device, cfg.get("quantize"))
    prompt = str(cfg.prompt)
    if ckpt.get("labels"):  # a classifier (finetune.py stage=classify): label probabilities, most likely first
        from gpt.stages.classify import label_probabilities

        probs = label_probabilities(model, tok, prompt).tolist()
        lines = [f"{name}\t{p:.4f}" for p, name in sorted(zip(probs, ckpt["labels"]), reverse=True)]
        out.write("\n".join(lines) + "\n")
        out.flush()
        return lines
    eot_id = tok.eot_id
    if cfg.get("chat"):  # the fine-tuning chat template; print only the answer, stop at its end token
        from gpt.chat import END, SPECIAL, prompt_ids

        if not all(t in tok.special for t in SPECIAL):
            raise UserError(f"chat=true needs a chat-tuned checkpoint (finetune.py stage=sft); {cfg.ckpt!r} has no "
                            f"chat template tokens")
        ids, prompt, eot_id = prompt_ids(tok, prompt), "", tok.special_id(END)
        if len(ids) > model.config.block_size:
            print(f"note: chat prompt has {len(ids)} tokens, more than block_size={model.config.block_size}; "
                  f"the model sees only its last {model.config.block_size} tokens", file=sys.stderr)
    else:
        ids = encode_prompt(tok, prompt, model.config.block_size)
    # int8 kernels take float32 activations: no autocast for a quantized model
    precision = Precision(cfg.device, None if is_quantized(model) else cfg.get("autocast_dtype"))
    g = torch.Generator(device=cfg.device).manual_seed(int(cfg.seed))
    n = int(cfg.num_samples)
    sampling = dict(temperature=float(cfg.temperature), top_k=cfg.top_k, top_p=cfg.top_p, eot_id=eot_id,
                    generator=g, use_cache=bool(cfg.use_cache))
    idx = torch.tensor([ids] * n, dtype=torch.long, device=cfg.device)
    if n > 1:  # all samples as one batch; each printed in full when done
        with precision.autocast():
            steps = list(generate_tokens(model, idx, int(cfg.max_new_tokens), **sampling))
        rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(n)]
        texts = []
        for i, row in enumerate(rows):
            row = row[: row.index(eot_id)] if eot_id in row else row
            texts.append(prompt + tok.decode(row))
            out.write(("\n" + "-" * 40 + "\n" if i else "") + texts[-1] + "\n")
        out.flush()
        return texts
    out.write(prompt)  # one sample: stream it token by token
    out.flush()
    new: list[int] = []
    shown = ""
    with precision.autocast():
        for nxt in generate_tokens(model, idx, int(cfg.max_new_tokens), **sampling):
            t = int(nxt[0])
            if t == eot_id:
                break
            new.append(t)
            text = tok.decode(new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                out.write(text[len(shown):])
                out.flush()
                shown = text
    text = tok.decode(new)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return [prompt + text]
