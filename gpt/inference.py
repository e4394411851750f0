"""infer.py's logic: rebuild tokenizer and model from a checkpoint alone, sample, stream to stdout; with
interactive=true, a conversation in the terminal (`interactive`)."""

from __future__ import annotations

import logging
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from gpt.checkpoint import load_checkpoint, model_from_checkpoint
from gpt.errors import UserError
from gpt.engine import DecodeEngine, Sampling, complete
from gpt import native
from gpt.heads import Classifier
from gpt.model import CausalSelfAttention, OutputHead
from gpt.precision import DTYPES, cpu_has_fast_bf16
from gpt.tokenizer import from_identity

log = logging.getLogger(__name__)


def dtype_option(cfg: DictConfig) -> str:
    """The weights dtype asked for by an inference config (infer.yaml, serve.yaml, evaluate.yaml)."""
    return str(cfg.get("dtype", "auto"))


def resolve_dtype(dtype: str | torch.dtype | None, device: str = "cpu", int8: bool = False) -> torch.dtype:
    """dtype option -> the weights dtype for inference on `device`.

    auto: bfloat16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or
    AMX), else float32. int8 models keep float32 activations (auto or float32 only).
    """
    if isinstance(dtype, torch.dtype):
        dtype = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
    dtype = "auto" if dtype is None else str(dtype)
    if dtype not in ("auto", *DTYPES):
        raise UserError(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16")
    if int8:
        if dtype not in ("auto", "float32"):
            raise UserError(f"dtype={dtype} does not apply to an int8 model (float32 activations); "
                            f"use dtype=auto or dtype=float32 with quantize=int8")
        return torch.float32
    if dtype != "auto":
        return DTYPES[dtype]
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if kind == "cpu" and cpu_has_fast_bf16() else torch.float32


def _needs_autograd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    return (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)) and torch.is_grad_enabled()


_TRANSIENT = ("_packed", "_native")  # what kernel-backed layers hold that is not state


def _drop_kernel_state(m: nn.Module) -> None:
    """Forget a layer's kernel state (a oneDNN tensor, the kernel module): before it changes kind, or goes plain."""
    for name in _TRANSIENT:
        m.__dict__.pop(name, None)


class _Rebuilt:
    """deepcopy / pickle of a kernel-backed Linear: the attributes in _TRANSIENT (the kernel module, oneDNN's opaque
    tensor with no storage) are not state; `_setup()` makes them again on load."""

    def __getstate__(self):
        state = super().__getstate__().copy()
        for name in _TRANSIENT:  # every kind's: a layer swapped from another kind may still hold that one's
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._setup()


class PackedLinear(_Rebuilt, nn.Linear):
    """An nn.Linear (same parameters, state_dict and weight tying) whose CPU forward without autograd
    multiplies by a copy of its weight prepacked once in oneDNN's blocked layout. At batch 1 a bf16 matmul
    with the prepacked weight is 1.5-4x faster than F.linear on the plain one (the (V, C) output layer
    most), with the same results. Anything else (another dtype or device, autograd, weights changed in
    place since packing) takes F.linear. Calls of at most `native.max_rows` rows (a batch-1 decode step) take
    gpt.native's kernel where it runs here: it streams the plain weight ~2x faster than oneDNN at one row."""

    _packed: torch.Tensor | None = None
    _native = None  # gpt.native's module, when its kernel agrees with F.linear here
    _native_rows = _native_cap = 0

    def _scored(self) -> torch.Tensor:
        """The weight rows the layer multiplies by: all of them (PackedOutputHead: without the padding rows)."""
        return self.weight

    def pack(self) -> bool:
        """Prepack the weight; False (and plain F.linear from then on) where oneDNN cannot or disagrees."""
        self._packed = None
        w = self._scored().detach()
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            x = torch.randn(2, w.size(1), generator=torch.Generator().manual_seed(0)).to(w.dtype).to(w.device)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        except (RuntimeError, AttributeError, NotImplementedError) as e:
            log.info("no prepacked weights for %s Linear layers: %s", w.dtype, e)
            return False
        want = F.linear(x, self._scored(), self.bias)
        if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
            return False
        self._packed, self._packed_dtype, self._packed_version = packed, w.dtype, self.weight._version
        self._native, self._native_rows = None, native.max_rows(w.size(0))
        self._native_cap = self._native_rows * w.size(1)  # the most elements of an input the kernel takes
        bf16 = w.dtype == torch.bfloat16  # (a packed layer cast to another dtype since keeps oneDNN alone)
        kernels = native.kernels() if self._native_rows and bf16 and w.is_contiguous() else None
        if kernels is not None:
            try:
                got = kernels.linear_bf16(x, w, self.bias)
            except RuntimeError:  # a bias the kernel does not take
                got = None
            if got is not None and got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=2e-2,
                                                                             atol=2e-2):
                self._native = kernels
        return True

    def _setup(self) -> None:
        self.pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # lean: a decode step makes 25 of these calls
        p, w, b = self._packed, self.weight, self.bias
        if (p is not None and x.dtype == self._packed_dtype and x.is_cpu and w._version == self._packed_version
                and w.dtype == self._packed_dtype and not _needs_autograd(x, w, b)):
            if self._native is not None and x.numel() <= self._native_cap and x.shape[-1] == self.in_features:
                return native.by_rows(self._native.linear_bf16, x, self._scored(), b)
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), p, b, "none", [], "")
        return F.linear(x, self._scored(), b)


class PackedOutputHead(PackedLinear, OutputHead):
    """A padded output layer (gpt.model.OutputHead, model.vocab_multiple) prepacked: its first vocab_size rows only,
    so the logits stay (..., V)."""

    def _scored(self) -> torch.Tensor:
        return self.weight[: self.vocab_size]


class NativeLinear(_Rebuilt, nn.Linear):
    """An nn.Linear of a float32 CPU model (same parameters, state_dict and weight tying) whose calls of at most
    `native.F32_ROWS` rows without autograd or autocast (decode steps, a continuous batch's rows) take gpt.native's
    float32 kernel where it runs here: it reads each weight row once for all the rows, 2-5x faster than torch's
    matmul at 1-16 rows on an AMD EPYC (the (V, C) output layer included). In a call of at most 16 rows every output
    element is one float32 dot product summed in one order whatever the number of rows, so within such calls a
    row's values do not depend on its batch-mates; a bigger call (a prompt's prefill, or a decode step packed with
    one: DecodeEngine) takes F.linear, whose sums may differ from the kernel's in the last bit, as torch's own do
    between calls of different sizes. Anything else (another dtype or device, autograd, autocast) takes F.linear."""

    _native = None  # gpt.native's module, when its kernel agrees with F.linear here
    _native_rows = _native_cap = 0  # the most rows, and elements of an input, the kernel takes

    def _scored(self) -> torch.Tensor:
        """The weight rows the layer multiplies by: all of them (NativeOutputHead: without the padding rows)."""
        return self.weight

    def attach(self) -> bool:
        """Take the kernel for the calls it serves; False (plain F.linear) where it cannot run or disagrees."""
        self._native, self._native_cap = None, 0
        w = self._scored().detach()
        kernels = native.kernels() if w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous() else None
        if kernels is None:
            return False
        x = torch.randn(3, w.size(1), generator=torch.Generator().manual_seed(0))  # torch's global stream untouched
        try:
            got, want = kernels.linear_f32(x, w, self.bias), F.linear(x, w, self.bias)
        except RuntimeError:  # a bias the kernel does not take (another dtype or layout)
            return False
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            return False
        self._native, self._native_rows = kernels, native.F32_ROWS
        self._native_cap = native.F32_ROWS * w.size(1)
        return True

    def _setup(self) -> None:
        self.attach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # lean: a decode step makes 25 of these calls
        w, b, k = self._scored(), self.bias, self._native
        if (k is not None and x.dtype == torch.float32 and w.dtype == torch.float32 and x.is_cpu and w.is_cpu
                and x.numel() <= self._native_cap and x.shape[-1] == self.in_features and w.is_contiguous()
                and (b is None or (b.dtype == torch.float32 and b.is_contiguous()))
                and not torch.is_autocast_enabled("cpu") and not _needs_autograd(x, w, b)):
            return native.by_rows(k.linear_f32, x, w, b)
        return F.linear(x, w, b)


class NativeOutputHead(NativeLinear, OutputHead):
    """A padded output layer (gpt.model.OutputHead) with the native kernel: its first vocab_size rows only."""

    def _scored(self) -> torch.Tensor:
        return self.weight[: self.vocab_size]


_PLAIN = {NativeLinear: nn.Linear, NativeOutputHead: OutputHead, PackedLinear: nn.Linear,
          PackedOutputHead: OutputHead}


def _swap_linears(model: nn.Module, dtype: torch.dtype, linear: type, head: type, setup: str) -> int:
    """Turn every CPU nn.Linear of `dtype` into `linear` (a padded output layer into `head`: the same parameters, by
    class), keeping those whose `setup` method answers True (the others go back to their class) -> how many."""
    n = 0
    for m in model.modules():
        plain = _PLAIN.get(type(m), type(m))  # a layer swapped before (and cast since) counts as its plain class
        if plain in (nn.Linear, OutputHead) and m.weight.device.type == "cpu" and m.weight.dtype == dtype:
            _drop_kernel_state(m)
            m.__class__ = head if plain is OutputHead else linear
            if getattr(m, setup)():
                n += 1
            else:
                _drop_kernel_state(m)
                m.__class__ = plain
    return n


def native_linears(model: nn.Module) -> int:
    """Turn every float32 CPU nn.Linear of the model into a NativeLinear (a padded output layer into a
    NativeOutputHead) where gpt.native's kernels run here -> how many."""
    return _swap_linears(model, torch.float32, NativeLinear, NativeOutputHead, "attach")


def pack_linears(model: nn.Module) -> int:
    """Turn every nn.Linear of a bf16 CPU model into a PackedLinear (a padded output layer into a PackedOutputHead);
    -> how many were packed."""
    if not torch.backends.mkldnn.is_available():
        return 0
    return _swap_linears(model, torch.bfloat16, PackedLinear, PackedOutputHead, "pack")


def load_for_inference(path: str, device: str = "cpu", quantize: str | None = None,
                       dtype: str | torch.dtype | None = "auto"):
    """-> (model, tokenizer, checkpoint dict) from a checkpoint file or run folder (best.pt preferred).

    The model is ready for inference: eval mode, no gradients, weights cast once to `dtype` (see
    resolve_dtype; auto: bfloat16 where the hardware has it), run without autocast. On a CPU, bf16 Linear
    weights are also prepacked for oneDNN (PackedLinear), and float32 Linear layers take gpt.native's few-row kernel
    for decode steps (NativeLinear). float32 is the checkpoint's exact float32 model.
    quantize="int8" quantizes the Linear layers at load time (CPU); int8 checkpoints load as int8.
    """
    from gpt.quantize import model_from_quantized, quantize_int8

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but CUDA is not available here; use device=cpu")
    if quantize not in (None, "none", "int8"):
        raise UserError(f"quantize={quantize!r} is not supported; use quantize=int8 or leave it unset")
    resolve_dtype(dtype, device)  # a bad value fails before the checkpoint is read
    ckpt = load_checkpoint(path, prefer="best", map_location="cpu" if quantize == "int8" else device)
    int8 = quantize == "int8" or bool(ckpt.get("quantized"))
    if int8 and not device.startswith("cpu"):
        raise UserError(f"int8 models run on the CPU only (int8 CPU kernels); use device=cpu")
    dt = resolve_dtype(dtype, device, int8)
    tokenizer = from_identity(ckpt["tokenizer"])
    if ckpt.get("quantized"):
        model = model_from_quantized(ckpt)
    else:
        model = model_from_checkpoint(ckpt, device)
        if quantize == "int8":
            model = quantize_int8(model)
        elif dt != torch.float32:
            model = model.to(dt)
            if torch.device(device).type == "cpu":
                pack_linears(model)
        elif torch.device(device).type == "cpu":
            native_linears(model)
    model.eval().requires_grad_(False)
    if torch.device(device).type == "cpu" or quantize == "int8" or ckpt.get("quantized"):
        native_attention(model)
    return model, tokenizer, ckpt


def native_attention(model: nn.Module) -> int:
    """Let the model's attention layers take gpt.native's fused kernel for one-token decode steps over a KV cache
    (see CausalSelfAttention.native_decode) where the kernels run here -> how many layers will."""
    if native.kernels() is None or getattr(getattr(model, "config", None), "pos", "learned") == "rope":
        return 0
    layers = [m for m in model.modules() if isinstance(m, CausalSelfAttention) and m.native_fits()]
    for m in layers:
        m.native_decode = True
    return len(layers)


def is_quantized(model) -> bool:
    return not isinstance(model.lm_head, torch.nn.Linear)


def encode_prompt(tokenizer, prompt: str, block_size: int, note: bool = True) -> list[int]:
    """Prompt ids as the model saw its training text; a note on stderr when cropped (unless `note` is False)."""
    ids = tokenizer.encode(prompt)
    if tokenizer.bos_id is not None:  # a stage=completion model: its documents start with <|bos|>
        ids = [tokenizer.bos_id] + ids
    elif not ids:  # an empty prompt starts from end-of-text (BPE) or a newline (char)
        ids = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n")
    if len(ids) > block_size and note:
        print(f"note: prompt has {len(ids)} tokens, more than block_size={block_size}; "
              f"the model sees only its last {block_size} tokens", file=sys.stderr)
    return ids


def stream_samples(cfg: DictConfig, out=None) -> list[str]:
    """Generate cfg.num_samples continuations of cfg.prompt (one batch) and print each (to `out`, default the
    sys.stdout of the moment), prompt included; a single sample is streamed token by token."""
    out = out or sys.stdout
    for key in ("max_new_tokens", "num_samples"):
        if int(cfg[key]) < 0 or (key == "num_samples" and int(cfg[key]) < 1):
            raise UserError(f"{key}={cfg[key]} must be a positive integer")
    if cfg.top_p is not None and not 0.0 < float(cfg.top_p) <= 1.0:
        raise UserError(f"top_p={cfg.top_p} must be in (0, 1]")
    model, tok, ckpt = load_for_inference(cfg.ckpt, cfg.device, cfg.get("quantize"), dtype_option(cfg))
    if cfg.get("interactive"):  # a terminal conversation; prompt and num_samples do not apply
        interactive(cfg, model, tok, sys.stdin, out)
        return []
    prompt = str(cfg.prompt)
    if isinstance(model, Classifier):  # finetune.py stage=classify: label probabilities, most likely first
        from gpt.scoring import label_probabilities

        probs = label_probabilities(model, tok, prompt).tolist()
        lines = [f"{name}\t{p:.4f}" for p, name in sorted(zip(probs, ckpt["labels"]), reverse=True)]
        out.write("\n".join(lines) + "\n")
        out.flush()
        return lines
    from gpt.chat import SPECIAL, ChatText, answer_stop_ids, prompt_ids

    chat, shown = bool(cfg.get("chat")), tok  # shown: the answer's text (a chat's without the template's tokens)
    if chat:  # the fine-tuning chat template; print only the answer, stop at its end token
        if not all(t in tok.special for t in SPECIAL):
            raise UserError(f"chat=true needs a chat-tuned checkpoint (finetune.py stage=sft); {cfg.ckpt!r} has no "
                            f"chat template tokens")
        ids, prompt, shown = prompt_ids(tok, prompt), "", ChatText(tok)
        if len(ids) > model.config.block_size:
            print(f"note: chat prompt has {len(ids)} tokens, more than block_size={model.config.block_size}; "
                  f"the model sees only its last {model.config.block_size} tokens", file=sys.stderr)
    else:
        ids = encode_prompt(tok, prompt, model.config.block_size)
    g = torch.Generator(device=cfg.device).manual_seed(int(cfg.seed))
    n = int(cfg.num_samples)
    sampling = Sampling(int(cfg.max_new_tokens), float(cfg.temperature), cfg.top_k, cfg.top_p,
                        stop_ids=answer_stop_ids(tok, chat), generator=g)
    if n > 1:  # all samples as one batch; each printed in full when done
        rows = complete(model, [ids] * n, sampling, bool(cfg.use_cache))
        texts = []
        for i, row in enumerate(rows):
            texts.append(prompt + shown.decode(row.new))
            out.write(("\n" + "-" * 40 + "\n" if i else "") + texts[-1] + "\n")
        out.flush()
        return texts
    out.write(prompt)  # one sample: stream it token by token
    out.flush()
    text, _ = stream_answer(model, shown, ids, sampling, bool(cfg.use_cache), out)
    out.write("\n")
    out.flush()
    return [prompt + text]


def stream_answer(model, tok, ids: list[int], sampling: Sampling, use_cache: bool = True,
                  out=None) -> tuple[str, list[int]]:
    """Decode one row from prompt `ids`, writing its text to `out` (default sys.stdout) as it grows; -> (the
    new text, its ids without the stop token)."""
    out = out or sys.stdout
    shown, new = "", []
    if sampling.max_tokens > 0:
        engine = DecodeEngine(model, 1, use_cache)
        row = engine.add([ids], sampling)[0]
        while not row.done:
            engine.step()
            text = tok.decode(row.new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                out.write(text[len(shown):])
                out.flush()
                shown = text
        if row.error is not None:
            raise row.error
        new = row.new
    text = tok.decode(new)
    out.write(text[len(shown):])
    out.flush()
    return text, list(new)


def _read_line(inp, out, prompt: str) -> str | None:
    """One typed line without its line break; None at the end of input (Ctrl-D) or on Ctrl-C."""
    try:
        if inp is sys.stdin:  # input(): line editing and history when readline is loaded
            return input(prompt)
        out.write(prompt)
        out.flush()
        line = inp.readline()
        return line.removesuffix("\n") if line else None
    except (EOFError, KeyboardInterrupt):
        return None


def interactive(cfg: DictConfig, model, tok, inp=None, out=None) -> list[dict] | str:
    """infer.py interactive=true: a conversation in the terminal, the way nanochat's chat_cli works.

    A chat model (finetune.py stage=sft) answers each typed line; its prompt is the whole conversation so far
    in the chat template (cropped to the last block_size tokens), and the answer stops at <|end|>. The
    conversation is kept as token ids, each answer as generated and closed by <|end|>, as nanochat does: an
    answer is never re-encoded from its text (a special token in it would not come back as itself). A base
    model continues text instead: each typed line joins the text so far (its line break included) and the
    model continues the whole of it. Answers stream as they are generated with the config's sampling
    settings (one seeded generator for the session). An empty line is ignored; Ctrl-D (end of input) ends
    the session; Ctrl-C stops an answer (the turn is dropped) or, at the prompt, ends the session.
    -> the conversation (chat: messages) or the text (base model)."""
    from gpt.chat import END, SPECIAL, ChatText, answer_stop_ids, encode_chat

    inp, out = inp or sys.stdin, out or sys.stdout  # those of the moment, not of import time
    if isinstance(model, Classifier):
        raise UserError(f"interactive=true needs a language model; {cfg.ckpt!r} is a classifier (stage=classify): "
                        "drop interactive=true to get its label probabilities")
    if int(cfg.num_samples) != 1:
        raise UserError(f"interactive=true answers each turn once; num_samples={cfg.num_samples} does not apply "
                        "(leave it at 1)")
    chat = all(t in getattr(tok, "special", []) for t in SPECIAL)
    if cfg.get("chat") and not chat:
        raise UserError(f"chat=true needs a chat-tuned checkpoint (finetune.py stage=sft); {cfg.ckpt!r} has no "
                        f"chat template tokens")
    shown = ChatText(tok) if chat else tok  # the answer's text (a chat's without the template's tokens)
    block = model.config.block_size
    sampling = Sampling(int(cfg.max_new_tokens), float(cfg.temperature), cfg.top_k, cfg.top_p,
                        stop_ids=answer_stop_ids(tok, chat),
                        generator=torch.Generator(device=cfg.device).manual_seed(int(cfg.seed)))
    print("chat: type a message and press Enter; Ctrl-D ends" if chat else
          "base model: the text you type is continued; Ctrl-D ends", file=sys.stderr)
    messages: list[dict] = []
    conversation: list[int] = []  # chat: the template's ids of every finished turn
    text, cropped = "", False
    while True:
        line = _read_line(inp, out, "> ")
        if line is None:
            out.write("\n")
            out.flush()
            return messages if chat else text
        if not line.strip():
            continue
        if chat:
            ids = conversation + encode_chat(tok, [{"role": "user", "content": line}], generation_prompt=True)[0]
        else:
            turn = text + line + "\n"
            ids = encode_prompt(tok, turn, block, note=False)
        if len(ids) > block and not cropped:  # said once: from here on the oldest turns fall out of view
            cropped = True
            print(f"note: the conversation is longer than block_size={block} tokens; the model sees only its "
                  f"last {block}", file=sys.stderr)
        try:
            answer, new = stream_answer(model, shown, ids[-block:], sampling, bool(cfg.use_cache), out)
        except KeyboardInterrupt:
            answer = None
        out.write("\n")
        out.flush()
        if answer is None:
            continue
        if chat:
            conversation = ids + new + [tok.special_id(END)]  # closed by <|end|> (also after end-of-text or a cut)
            messages += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
        else:
            text = turn + answer
