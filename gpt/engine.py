"""The decode engine: KV-cache decoding for everything that generates (infer.py, evaluate.py, serve.py, the RL
rollouts; gpt.generate's functions are thin wrappers over it), and the sampling rules it applies.

Rows join and leave between decode steps (continuous batching). The engine keeps one preallocated KV cache of
`max_rows` slots; the active rows fill slots 0 .. n-1. A joining row's prompt is prefilled straight into a free
slot (its first token sampled from that prefill); every later step feeds each row its newest token at that
row's own position (a ragged cache, gpt.model.KVCache.rows; the plain single-position path when all rows sit
at the same position), samples each row with its own settings, and frees the slots of rows that finished (a
stop token, a stop check, max_tokens) or were cancelled.

The context-window rule: the model has learned absolute positions, so it must see at most the last block_size
tokens, at positions 0 .. block_size-1, exactly what an uncached forward over that window sees. A row whose
cache already holds block_size positions is therefore re-prefilled from its last block_size tokens before its
next token: cached and uncached generation give the same tokens.

Rows added together (one `add` call) form a group that shares one sampling call per step, with one generator:
a static batch. torch.multinomial's draws depend on the shape of the batch it samples, so a group's finished
rows keep their slot, and decode their stop token, until its last row finishes, exactly as a static batch does;
a seeded batch then draws the same tokens however the engine schedules it. A request of its own (serve.py) is
a group of one and leaves as soon as it finishes. Groups with equal settings share the step's top-k over the
vocabulary (one call for all their rows), each drawing from its own generator what it would draw alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpt import native
from gpt.model import GPT


# ------------------------------------------------------------------------------------------------ sampling

TOPK_CHUNK = 64  # the chunk width of the two-stage top-k (`topk`)
NATIVE_TOPK = 128  # the largest k for gpt.native's top-k: it inserts each hit into a sorted list (k = 200 at V 50,304:
#                    0.2 ms against the two-stage 0.3; k = 500: 0.96 against 0.49), and top-p's k can grow to V


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) of a (B, V) float tensor (values sorted descending, their indices), found on a
    CPU in two stages when V is large: the maximum of every chunk of TOPK_CHUNK entries, the k chunks with the
    largest maxima, then the top k of those chunks' entries (and of the last, partial chunk's). Exact: an entry
    outside the k chosen chunks is at most each of their k maxima, so it can only tie with the k-th value. The
    values equal torch.topk's; among exactly equal values the indices may differ (torch.topk's choice among
    ties is unspecified as well). On the 2-core test CPU, V 50,304 and k 50: ~2x faster at 1 row, ~1.6x at 16
    (torch.topk's single pass over V dominates a decode step's sampling). Where gpt.native's kernels are loaded
    (models loaded for inference on a CPU), a float32 row takes their one-pass top-k instead for k up to NATIVE_TOPK
    (~5x faster again at 1 row and k 50; the same values, the lower index first among equal ones), unless it holds
    a NaN."""
    B, V = x.shape
    kernels = native.loaded()
    if kernels is not None and x.dtype == torch.float32 and x.device.type == "cpu" and 0 < k <= min(V, NATIVE_TOPK):
        vals, idx, finite = kernels.topk(x.contiguous(), k)
        if finite:
            return vals, idx
    n = V // TOPK_CHUNK
    if x.device.type != "cpu" or n < 8 * k:  # few chunks (or a GPU, whose topk is one fast kernel): one pass
        return torch.topk(x, k, dim=-1)
    full = n * TOPK_CHUNK
    chunks = x[:, :full].view(B, n, TOPK_CHUNK)
    best = torch.topk(chunks.amax(dim=-1), k, dim=-1).indices  # (B, k) chunk numbers
    cand = chunks.gather(1, best[..., None].expand(B, k, TOPK_CHUNK)).view(B, k * TOPK_CHUNK)
    if full < V:  # the last, partial chunk: every entry is a candidate
        cand = torch.cat([cand, x[:, full:]], dim=1)
    vals, j = torch.topk(cand, k, dim=-1)
    if full == V:
        return vals, best.gather(1, j // TOPK_CHUNK) * TOPK_CHUNK + j % TOPK_CHUNK
    in_chunks = j < k * TOPK_CHUNK
    jc = j.clamp(max=k * TOPK_CHUNK - 1)
    idx = best.gather(1, jc // TOPK_CHUNK) * TOPK_CHUNK + jc % TOPK_CHUNK
    return vals, torch.where(in_chunks, idx, j - k * TOPK_CHUNK + full)

def _top_p_filter(vals: torch.Tensor, top_p: float, lse: torch.Tensor | None = None) -> torch.Tensor:
    """vals (B, k) sorted descending -> the same with -inf where a token falls outside the nucleus: a token
    is dropped once the mass of the tokens before it already reaches top_p (the first is always kept).
    Probabilities are softmax(vals), or exp(vals - lse) when vals are the head of a longer row whose
    logsumexp is lse."""
    probs = torch.softmax(vals, dim=-1) if lse is None else (vals - lse).exp()
    drop = probs.cumsum(dim=-1) - probs >= top_p
    return vals.masked_fill(drop, float("-inf"))


def _nucleus(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 logits (B, V) -> (vals, idx, lse): the k largest logits (B, k), descending, for a k whose
    prefix of every row holds at least top_p of the softmax mass (so every token of the nucleus), and the
    logsumexp (B, 1) of each full row; found with topk of growing k instead of a full sort of V (the nucleus
    of a peaked distribution is a few dozen tokens)."""
    V = logits.size(-1)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    k = min(64, V)
    while True:
        vals, idx = topk(logits, k)
        if k == V or bool(((vals - lse).exp().sum(dim=-1) >= top_p).all()):
            return vals, idx, lse
        k = min(4 * k, V)


Generators = list[tuple[torch.Generator | None, int]]  # (generator, rows) runs that split a batch's rows, in order


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | Generators | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 means greedy (argmax).

    The filters and the softmax run in float32 whatever the logits' dtype; top-k and top-p use `topk` (no full
    sort of the vocabulary). generator may be a list of (generator, n) runs: the first n rows draw
    from the first generator, and so on, exactly what each run draws when sampled alone (the filters are
    row by row), so groups with equal settings share one top-k over the vocabulary.
    """
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    use_p = top_p is not None and top_p < 1.0
    if top_k is not None and 0 < top_k < logits.size(-1):
        vals, idx = topk(logits, top_k)  # sorted, descending
        vals = vals / temperature  # the same values as topk of logits / temperature (temperature > 0)
    elif use_p:
        vals, idx, lse = _nucleus(logits / temperature, top_p)
        vals = _top_p_filter(vals, top_p, lse)  # probabilities over the whole vocabulary
        use_p = False
    else:
        vals, idx = logits / temperature, None
    if use_p:  # after top-k: probabilities over the top_k tokens
        vals = _top_p_filter(vals, top_p)
    probs = torch.softmax(vals, dim=-1)
    if isinstance(generator, list) or probs.device.type == "cpu":
        # torch.multinomial(p, 1, generator=g) on a CPU is argmax(p / q) with q = empty_like(p).exponential_(
        # generator=g) (its one-sample path): each run draws its own q exactly as multinomial would on its rows,
        # then one division and one argmax serve the whole batch (a multinomial call cost ~20-70 us, even alone)
        if bool(torch.isnan(probs).any()):  # multinomial's own check (a softmax is never negative or inf)
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        q, start = [], 0
        for gen, n in generator if isinstance(generator, list) else [(generator, probs.size(0))]:
            q.append(torch.empty_like(probs[start:start + n]).exponential_(generator=gen))
            start += n
        choice = (probs / (q[0] if len(q) == 1 else torch.cat(q))).argmax(dim=-1)
    else:  # a GPU's multinomial draws otherwise
        choice = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return choice if idx is None else idx.gather(-1, choice[:, None]).squeeze(-1)


def _shared(s: Sampling, vocab: int) -> tuple | None:
    """The settings under which groups may share one sampling call (None: sample alone). A nucleus without
    top-k is searched with a k that depends on every row of the call, and the softmax over a wider row may
    round differently: such a group samples alone, so it draws what it draws alone."""
    nucleus = s.top_p is not None and s.top_p < 1.0 and s.temperature > 0
    if nucleus and not (s.top_k is not None and 0 < s.top_k < vocab):
        return None
    return (s.temperature, s.top_k, s.top_p)


def last_logits(model: GPT, idx: torch.Tensor, cache=None, pad: torch.Tensor | None = None) -> torch.Tensor:
    """idx (B, T) -> logits (B, V) of the last position only: the output layer (the largest matmul of a
    decode step, and (T, V) for a prompt) runs on one row per sequence."""
    h = model.hidden_states(idx, cache, pad)
    return model.lm_head(h[:, -1])


# ------------------------------------------------------------------------------------------------ rows

@dataclass
class Sampling:
    """How a row samples. temperature 0 is greedy. stop_ids: tokens that end the row (not part of its
    text). stop: an optional check on the row's new ids after each token, True ends the row (stop strings:
    see `text_stop`). generator: the row's random stream, shared by the rows added with it (None: torch's
    global one, unless seed gives the group a generator of its own)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None
    generator: torch.Generator | None = None
    stop: Callable[[list[int]], bool] | None = None


def text_stop(decode: Callable[[list[int]], str], stops: list[str]) -> Callable[[list[int]], bool]:
    """A Sampling.stop check: True once the decoded new ids contain any of `stops` (the engine stays
    token-level; the caller cuts the text at the stop string)."""
    stops = [s for s in stops if s]
    longest = max((len(s) for s in stops), default=0)

    def check(new: list[int]) -> bool:
        # a new occurrence ends in the newest token, and a character takes at most 4 (byte-level) tokens
        tail = decode(new[-4 * longest:])
        return any(s in tail for s in stops)

    return check


class Row:
    """One sequence being decoded: its prompt, settings, new ids and how it ended.

    new: the ids generated before the row ended (without the stop token, which is `stop_token`).
    finish_reason: None while decoding, then "stop" (a stop token or check), "length" (max_tokens),
    "cancelled" or "error" (`error` holds the exception)."""

    def __init__(self, prompt: list[int], sampling: Sampling, group: _Group):
        self.prompt, self.sampling, self.group = list(prompt), sampling, group
        self.seq = list(prompt)  # every token fed or to feed: prompt + sampled ids (+ a finished row's stop ids)
        self.new: list[int] = []
        self.stop_token: int | None = None
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.slot: int | None = None
        self.cached: int | None = None  # positions of seq in the slot's cache; None: nothing valid there
        self.data = None  # the caller's own handle (serve.py: the request's Job)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, error: Exception | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error


class _Group:
    """Rows added together: one sampling call per step over all of them (see the module docstring)."""

    def __init__(self, sampling: Sampling, generator: torch.Generator | None):
        self.sampling, self.generator = sampling, generator
        self.rows: list[Row] = []
        self.last: torch.Tensor | None = None  # the step's tokens of every row (a finished row: its stop id)

    @property
    def done(self) -> bool:
        return all(r.done for r in self.rows)


class DecodeEngine:
    """KV-cache decoding of up to `max_rows` rows at once; rows join (`add`) and leave between steps.

    use_cache=False computes every step from scratch over each row's window (the reference path, nanoGPT's
    algorithm). sample: the sampling function, called as sample(logits (B, V), temperature, top_k, top_p,
    generator) -> (B,) ids once per step for each set of groups with equal settings, generator then being the
    list of (generator, rows) runs of those groups, or a lone group's generator (default sample_next; callers
    pass their own to script or fault it in tests). The model runs in its own dtype; callers wrap `step` in autocast if they want it.
    """

    def __init__(self, model: GPT, max_rows: int, use_cache: bool = True, sample: Callable | None = None):
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows} must be >= 1")
        self.model, self.max_rows = model.eval(), max_rows
        self.block, self.vocab = model.config.block_size, model.config.vocab_size
        self.device = model.transformer.wte.weight.device
        self.cache = model.new_cache(max_rows, self.block) if use_cache else None
        if self.cache is not None and max_rows > 1:  # rows at different positions read beyond their own
            self.cache.zero_()                       # length (masked): those values must be finite
        self.sample = sample or sample_next
        # joining prompts share the decode step's forward unless a layer's rows depend on each other (a dynamic
        # int8 matmul: one activation scale per call, so a prompt's values would change its batch-mates' logits)
        self.pack = self.cache is not None and all(getattr(m, "rows_independent", True) for m in model.modules())
        self.active: list[Row] = []  # active[i].slot == i
        self.groups: list[_Group] = []  # running
        self.waiting: list[_Group] = []  # added, joining at the next step with room for them
        self.steps = 0

    def add(self, prompts: list[list[int]], sampling: Sampling) -> list[Row]:
        """Queue prompts as one group (they join together at the next step with room for all of them)."""
        if not prompts or len(prompts) > self.max_rows:
            raise ValueError(f"{len(prompts)} prompts: a group holds 1 to max_rows={self.max_rows}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt: every row needs at least one token to start from")
        if sampling.max_tokens < 1:
            raise ValueError(f"max_tokens={sampling.max_tokens} must be >= 1")
        gen = sampling.generator
        if gen is None and sampling.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
        group = _Group(sampling, gen)
        group.rows = [Row(p, sampling, group) for p in prompts]
        self.waiting.append(group)
        return group.rows

    def cancel(self, row: Row) -> None:
        """End a row (its client went away); its slot is freed before the next step's forward."""
        row.finish("cancelled")

    @property
    def idle(self) -> bool:
        return not self.active and not self.waiting

    def clear(self, error: Exception) -> list[Row]:
        """End every active and waiting row with `error` (the model itself failed) -> those rows."""
        rows = [r for g in self.groups + self.waiting for r in g.rows if not r.done]
        for r in rows:
            r.finish("error", error)
        self.active, self.groups, self.waiting = [], [], []
        return rows

    # -------------------------------------------------------------------------------------- one step

    @torch.no_grad()
    def step(self) -> list[tuple[Row, int]]:
        """Admit waiting groups that fit, decode one token for every active row -> (row, token) for each row
        that sampled a token of its own this step (a row that just stopped reports its stop token)."""
        self._release()
        self._admit()
        if not self.active:
            return []
        self.steps += 1
        logits = self._logits()
        events = []
        for groups in self._batches():
            events += self._sample(groups, logits)
        self._release()
        return events

    def _batches(self) -> list[list[_Group]]:
        """The running groups, those with equal settings and a generator of their own together: one sampling call
        each (a top-k over the vocabulary for all their rows at once, each group drawing from its own generator)."""
        batches: dict = {}
        for group in self.groups:
            # a group drawing from torch's global generator keeps its own call, in order: sharing would change
            # which group takes which draws of that one stream
            key = _shared(group.sampling, self.vocab) if group.generator is not None else None
            batches.setdefault(id(group) if key is None else key, []).append(group)
        return list(batches.values())

    def _admit(self) -> None:
        """Move waiting groups into free slots, in order; a group whose rows were all cancelled is dropped."""
        while self.waiting:
            group = self.waiting[0]
            if group.done:
                self.waiting.pop(0)
                continue
            if len(group.rows) > self.max_rows - len(self.active):
                return
            self.waiting.pop(0)
            for r in group.rows:
                r.slot, r.cached = len(self.active), None
                self.active.append(r)
            self.groups.append(group)

    def _release(self) -> None:
        """Free the slots of finished groups: the last active row moves into each freed slot (its cached
        positions copied), so the active rows stay in slots 0 .. n-1."""
        finished = [g for g in self.groups if g.done]
        for group in finished:
            self.groups.remove(group)
            for r in group.rows:
                last = self.active.pop()
                if last is not r:
                    self._move(last, r.slot)
                    self.active[r.slot] = last
                r.slot = None

    def _move(self, row: Row, slot: int) -> None:
        if self.cache is not None and row.cached:
            n, src = row.cached, row.slot
            self.cache.k[:, slot, :, :n] = self.cache.k[:, src, :, :n]
            self.cache.v[:, slot, :, :n] = self.cache.v[:, src, :, :n]
        row.slot = slot

    def _window(self, row: Row) -> list[int]:
        """The last block_size tokens of the row: what the model sees (positions 0 .. len - 1)."""
        return row.seq[-self.block:]

    def _logits(self) -> torch.Tensor:
        """Logits (n, V) of every active row's newest token, row i in slot i.

        Rows new to their slot, and rows whose cache is full (the context-window rule), are (re)filled with
        their whole window, the others take a one-token decode step. The rows to fill first move to the last
        slots, grouped by window length, so that the decode step runs over slots 0 .. d-1 and each fill over
        neighbouring slots of one length, straight into the cache, with no padding anywhere. With a cache, the
        decode step and the fills are one packed forward (GPT.packed_last_hidden): shared matmuls, attention
        part by part, each row attending over its own positions only."""
        if self.cache is None:  # from scratch over each row's window, every step
            fill = list(self.active)
        else:
            fill = [r for r in self.active if r.cached is None or r.cached >= self.block]
        d = len(self.active) - len(fill)
        self._arrange(fill, d)
        parts = []  # (idx, cache view): the decode step's rows, then one part per run of equal window lengths
        if d:
            rows = self.active[:d]
            idx = torch.tensor([[r.seq[-1]] for r in rows], dtype=torch.long, device=self.device)
            parts.append((idx, self.cache.rows(0, d, [r.cached for r in rows])))
            for r in rows:
                r.cached += 1
        i = d
        while i < len(self.active):
            width = len(self._window(self.active[i]))
            j = i
            while j < len(self.active) and len(self._window(self.active[j])) == width:
                j += 1
            rows = self.active[i:j]
            idx = torch.tensor([self._window(r) for r in rows], dtype=torch.long, device=self.device)
            parts.append((idx, None if self.cache is None else self.cache.rows(i, j, [0] * (j - i))))
            for r in rows:
                r.cached = width
            i = j
        if len(parts) > 1 and self.pack:
            # rows joining a running batch are prefilled in the decode step's own forward: its matmuls read the
            # weights once for all of them (a forward of their own read them again for each run)
            return self.model.lm_head(self.model.packed_last_hidden(parts))
        logits = [last_logits(self.model, idx, view) for idx, view in parts]
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def _arrange(self, fill: list[Row], d: int) -> None:
        """Put the rows of `fill` in slots d .. n-1, sorted by window length; the other rows move from there
        into the slots the fill rows leave (their cached positions copied; a fill row's cache is rewritten)."""
        if not fill:
            return
        fill_ids = {id(r) for r in fill}
        holes = [i for i in range(d) if id(self.active[i]) in fill_ids]
        movers = [i for i in range(d, len(self.active)) if id(self.active[i]) not in fill_ids]
        for hole, src in zip(holes, movers):
            row = self.active[src]
            self._move(row, hole)
            self.active[hole] = row
        for i, r in enumerate(sorted(fill, key=lambda r: len(self._window(r)))):
            self.active[d + i], r.slot = r, d + i

    def _sample(self, groups: list[_Group], logits: torch.Tensor) -> list[tuple[Row, int]]:
        """One sampling call for the rows of groups with equal settings, each group drawing from its own
        generator; if it fails, each group samples alone, so that one group's failure (its settings, a NaN
        in its logits) fails no other."""
        s = groups[0].sampling
        if len({id(g.generator) for g in groups}) == len(groups):
            # in slot order (the order of draws from generators of their own changes nothing; groups added with
            # one generator object keep their order), so that a call over every active row, each group in
            # neighbouring slots, samples the logits as they are
            groups = sorted(groups, key=lambda g: g.rows[0].slot)
        slots = [r.slot for g in groups for r in g.rows]
        mine = logits if slots == list(range(logits.size(0))) else logits[torch.tensor(slots, device=logits.device)]
        if len(groups) > 1:
            # a failed call may have drawn for the groups before the failing one: they draw again alone
            states = _rng_states(groups, logits.device)
            try:
                nxt = self.sample(mine, s.temperature, s.top_k, s.top_p, [(g.generator, len(g.rows)) for g in groups])
            except Exception:
                nxt = None
                _restore(states, logits.device)
            if nxt is not None:
                events, start = [], 0
                for g in groups:
                    events += self._take(g, nxt[start:start + len(g.rows)])
                    start += len(g.rows)
                return events
            mine = list(mine.split([len(g.rows) for g in groups]))
        else:
            mine = [mine]
        events = []
        for g, lg in zip(groups, mine):
            try:
                nxt = self.sample(lg, s.temperature, s.top_k, s.top_p, g.generator)
            except Exception as e:  # one group's settings must not fail the others
                for r in g.rows:
                    r.finish("error", e)
                g.last = None
                continue
            events += self._take(g, nxt)
        return events

    def _take(self, group: _Group, nxt: torch.Tensor) -> list[tuple[Row, int]]:
        """The group's sampled ids (its rows, in order) -> events; rows that already finished take their stop id."""
        s, rows = group.sampling, group.rows
        done = [r.done for r in rows]
        if s.stop_ids and any(done):
            nxt = nxt.masked_fill(torch.tensor(done, device=nxt.device), s.stop_ids[0])
        group.last = nxt
        events = []
        for r, t in zip(rows, nxt.tolist()):
            r.seq.append(t)  # fed at the next step (a finished row of a running group: its stop id)
            if r.done:
                continue
            events.append((r, t))
            if t in s.stop_ids:
                r.stop_token = t
                r.finish("stop")
                continue
            r.new.append(t)
            if s.stop is not None and s.stop(r.new):
                r.finish("stop")
            elif len(r.new) >= s.max_tokens:
                r.finish("length")
        return events


def _rng_states(groups: list[_Group], device: torch.device) -> list[tuple[torch.Generator | None, torch.Tensor]]:
    """The state of every generator the groups draw from (None: torch's global one on `device`)."""
    gens = {id(g.generator): g.generator for g in groups}
    def default() -> torch.Tensor:  # the generator of the logits' own GPU, not of the current device
        return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()

    return [(gen, default() if gen is None else gen.get_state()) for gen in gens.values()]


def _restore(states: list[tuple[torch.Generator | None, torch.Tensor]], device: torch.device) -> None:
    for gen, state in states:
        if gen is not None:
            gen.set_state(state)
        elif device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)


def complete(model: GPT, prompts: list[list[int]], sampling: Sampling, use_cache: bool = True,
             sample: Callable | None = None) -> list[Row]:
    """Decode the prompts as one group to the end -> their rows (row.new: the new ids, without the stop
    token). A row whose sampling failed raises its error."""
    if not prompts:
        return []
    if sampling.max_tokens <= 0:  # nothing to generate: finished rows with no new ids
        rows = [Row(p, sampling, None) for p in prompts]
        for r in rows:
            r.finish("length")
        return rows
    engine = DecodeEngine(model, len(prompts), use_cache, sample)
    rows = engine.add(prompts, sampling)
    while not rows[0].group.done:
        engine.step()
    for r in rows:
        if r.error is not None:
            raise r.error
    return rows
