"""The decode engine (gpt.engine): rows that join and leave a running batch, each at its own position in the
KV cache, give exactly the tokens they give alone (float32); a short request overtakes a long one; a cancelled
row frees its slot at once; the context-window refill rule equals uncached generation."""

import pytest
import torch

from gpt.engine import DecodeEngine, Sampling, complete, text_stop
from gpt.generate import generate, left_pad
from gpt.model import GPT

V, BLOCK = 48, 32


def tiny(seed: int = 0, attn_impl: str = "sdpa") -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, attn_impl=attn_impl).eval()


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model: GPT, prompt: list[int], sampling: Sampling, use_cache: bool = True) -> list[int]:
    return complete(model, [prompt], sampling, use_cache)[0].new


def run_to_end(engine: DecodeEngine, rows) -> int:
    while not all(r.done for r in rows):
        engine.step()
    return engine.steps


def test_a_ragged_cache_step_equals_each_row_alone():
    """Rows at different positions, one new token each: the same logits as each row's own cache."""
    m = tiny(1)
    seqs = [ids(n, 10 + n) for n in (3, 9, 6)]
    with torch.no_grad():
        want = []
        for s in seqs:
            cache = m.new_cache(1)
            m(torch.tensor([s[:-1]]), cache=cache)
            want.append(m(torch.tensor([s[-1:]]), cache=cache)[0][0, -1])
        big = m.new_cache(3).zero_()  # ragged rows read (masked) positions beyond their own length
        for i, s in enumerate(seqs):
            m(torch.tensor([s[:-1]]), cache=big.rows(i, i + 1, [0]))
        view = big.rows(0, 3, [len(s) - 1 for s in seqs])
        assert view.lens is not None  # the ragged path, not the uniform one
        got = m(torch.tensor([[s[-1]] for s in seqs]), cache=view)[0][:, -1]
        assert view.lens.tolist() == [len(s) for s in seqs]
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("sampled", [False, True])
def test_rows_that_join_mid_flight_give_exactly_their_tokens_alone(attn_impl, sampled):
    """Four requests with their own seeds and lengths join a running batch at different steps (one while
    another has run past block_size); each gives the tokens it gives alone, and alone is the library's
    generate()."""
    m = tiny(2, attn_impl)
    specs = [(ids(5, 1), 40, 11), (ids(17, 2), 12, 12), (ids(1, 3), 25, 13), (ids(30, 4), 9, 14)]
    joins = {0: [0], 3: [1, 2], 20: [3]}  # step -> requests that join before it

    def sampling(n, seed):
        return Sampling(n, temperature=0.9 if sampled else 0.0, top_k=20 if sampled else None, seed=seed)

    engine = DecodeEngine(m, max_rows=3)
    rows, most = {}, 0
    for step in range(200):
        for i in joins.get(step, []):
            prompt, n, seed = specs[i]
            rows[i] = engine.add([prompt], sampling(n, seed))[0]
        if len(rows) == len(specs) and all(r.done for r in rows.values()):
            break
        engine.step()
        most = max(most, len(engine.active))
    assert most == 3  # requests 0, 1, 2 decoded together, each at positions of its own
    for i, (prompt, n, seed) in enumerate(specs):
        want = alone(m, prompt, sampling(n, seed))
        assert rows[i].new == want and len(want) == n and rows[i].finish_reason == "length"
        g = torch.Generator().manual_seed(seed)
        lib = generate(m, torch.tensor([prompt]), n, generator=g, **({"temperature": 0.9, "top_k": 20} if sampled
                                                                     else {"temperature": 0.0}))
        assert lib[0, len(prompt):].tolist() == want


def test_a_short_request_arriving_during_a_long_one_finishes_first():
    m = tiny(3)
    engine = DecodeEngine(m, max_rows=4)
    long = engine.add([ids(4, 5)], Sampling(256, temperature=0.0))[0]
    for _ in range(10):
        engine.step()
    short = engine.add([ids(6, 6)], Sampling(8, temperature=0.0))[0]
    finished = {}
    while not long.done:
        engine.step()
        for name, r in (("short", short), ("long", long)):
            if r.done and name not in finished:
                finished[name] = engine.steps
    assert list(finished) == ["short", "long"]
    assert finished["short"] == 10 + 8  # joined at the next step, one token per step from then on
    assert finished["long"] == 256 and len(long.new) == 256 and len(short.new) == 8


def test_a_cancelled_row_frees_its_slot_within_one_step():
    m = tiny(4)
    engine = DecodeEngine(m, max_rows=1)
    a = engine.add([ids(3, 7)], Sampling(100, temperature=0.0))[0]
    b = engine.add([ids(3, 8)], Sampling(5, temperature=0.0))[0]
    for _ in range(4):
        engine.step()
    assert len(a.new) == 4 and b.new == [] and b.slot is None  # one slot: b waits
    engine.cancel(a)
    events = engine.step()  # a leaves before this step's forward, b takes its slot
    assert [r for r, _ in events] == [b] and len(a.new) == 4 and a.finish_reason == "cancelled"
    assert a.slot is None and b.slot == 0 and engine.active == [b]
    run_to_end(engine, [b])
    assert b.new == alone(m, ids(3, 8), Sampling(5, temperature=0.0))


def test_a_cancelled_waiting_row_never_takes_a_step():
    m = tiny(4)
    engine = DecodeEngine(m, max_rows=2)
    a, b = (engine.add([ids(3, s)], Sampling(3, temperature=0.0))[0] for s in (1, 2))
    engine.cancel(a)
    run_to_end(engine, [b])
    assert a.new == [] and a.slot is None and len(b.new) == 3


@pytest.mark.parametrize("prompt_len", [BLOCK - 2, BLOCK, BLOCK + 5])
def test_the_refill_rule_equals_uncached_generation(prompt_len):
    """A prompt near (or past) block_size, generation well past it: every token after the cache fills is
    decoded from the re-prefilled last block_size tokens, which is what a forward without cache sees."""
    m = tiny(5)
    prompt = ids(prompt_len, 9)
    greedy = Sampling(20, temperature=0.0)
    cached = alone(m, prompt, greedy)
    assert cached == alone(m, prompt, greedy, use_cache=False)
    seq = list(prompt)  # the reference, by hand: argmax over the last block_size tokens, no cache
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(m(torch.tensor([seq[-BLOCK:]]))[0][0, -1].argmax()))
    assert cached == seq[prompt_len:]
    sampled = Sampling(20, temperature=1.0, top_k=10, seed=3)
    assert alone(m, prompt, sampled) == alone(m, prompt, sampled, use_cache=False)


def test_the_refill_rule_holds_for_a_row_in_a_ragged_batch():
    """One row outgrows block_size while its batch-mate is far from it: each still equals its lone run."""
    m = tiny(6)
    engine = DecodeEngine(m, max_rows=2)
    near = engine.add([ids(BLOCK - 3, 1)], Sampling(15, temperature=0.0))[0]
    engine.step()
    short = engine.add([ids(2, 2)], Sampling(15, temperature=0.0))[0]
    run_to_end(engine, [near, short])
    assert near.new == alone(m, ids(BLOCK - 3, 1), Sampling(15, temperature=0.0), use_cache=False)
    assert short.new == alone(m, ids(2, 2), Sampling(15, temperature=0.0))


def test_stop_ids_and_stop_checks_end_a_row_and_free_its_slot():
    m = tiny(7)

    def sampling(**kw):
        return Sampling(12, temperature=1.0, seed=5, **kw)

    free = alone(m, ids(4, 3), sampling())
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # a stop token first sampled at step k
    engine = DecodeEngine(m, max_rows=2)
    stopped = engine.add([ids(4, 3)], sampling(stop_ids=(free[k],)))[0]
    checked = engine.add([ids(4, 3)], sampling(stop=lambda new: len(new) == 5))[0]
    other = engine.add([ids(5, 4)], sampling())[0]  # waits for a free slot
    run_to_end(engine, [stopped, checked, other])
    assert stopped.new == free[:k] and stopped.stop_token == free[k] and stopped.finish_reason == "stop"
    assert checked.new == free[:5] and checked.finish_reason == "stop"
    assert other.new == alone(m, ids(5, 4), sampling())
    assert engine.steps == 12 + min(k + 1, 5)  # `other` joined as soon as the first row left


def test_text_stop_sees_a_stop_string_across_tokens():
    decode = lambda new: "".join(chr(97 + t) for t in new)  # noqa: E731
    check = text_stop(decode, ["cd", ""])
    assert not check([0, 1, 2]) and check([0, 1, 2, 3]) and check([5] * 50 + [2, 3])


def test_a_group_shares_one_generator_like_a_static_batch():
    """Rows added together draw from one generator in one sampling call per step over all of them, a
    finished row keeping its place (its stop id): the tokens of a hand-written static batch, each row's
    logits from an uncached forward over its own window."""
    from gpt.engine import sample_next

    m = tiny(8)
    prompts, n = [ids(3, 1), ids(7, 2), ids(BLOCK - 1, 3)], 12
    free = complete(m, prompts, Sampling(n, temperature=1.0, generator=torch.Generator().manual_seed(4)))
    stop = free[0].new[4]  # row 0 stops at its 5th token at the latest; the others go on
    rows = complete(m, prompts, Sampling(n, temperature=1.0, stop_ids=(stop,),
                                         generator=torch.Generator().manual_seed(4)))
    g, seqs, done = torch.Generator().manual_seed(4), [list(p) for p in prompts], [False] * 3
    want = [[] for _ in prompts]
    with torch.no_grad():
        for _ in range(n):
            logits = torch.cat([m(torch.tensor([s[-BLOCK:]]))[0][:, -1] for s in seqs])
            nxt = sample_next(logits, 1.0, None, None, g).tolist()
            for i, t in enumerate(nxt):
                t = stop if done[i] else t
                seqs[i].append(t)
                if not done[i]:
                    done[i] = t == stop
                    if not done[i]:
                        want[i].append(t)
            if all(done):
                break
    assert [r.new for r in rows] == want and len(want[0]) <= 4 and rows[0].finish_reason == "stop"
    assert max(len(w) for w in want) > len(want[0])  # the others went on after row 0 stopped


def test_a_group_whose_sampling_fails_leaves_alone():
    m = tiny(9)

    def sample(logits, temperature, *rest):
        if temperature == 0.5:
            raise RuntimeError("nan")
        from gpt.engine import sample_next

        return sample_next(logits, temperature, *rest)

    engine = DecodeEngine(m, max_rows=2, sample=sample)
    bad = engine.add([ids(3, 1)], Sampling(6, temperature=0.5))[0]
    good = engine.add([ids(3, 2)], Sampling(6, temperature=0.0))[0]
    run_to_end(engine, [bad, good])
    assert bad.finish_reason == "error" and "nan" in str(bad.error) and bad.new == []
    assert good.new == alone(m, ids(3, 2), Sampling(6, temperature=0.0))


def test_requests_with_equal_settings_share_one_sampling_call_and_draw_their_tokens_alone():
    """Three one-row requests with equal settings and seeds of their own: one sampling call per step over all
    three (one top-k over the vocabulary), each row drawing from its own generator, so each gives the tokens
    it gives alone; a nucleus without top-k samples alone (its k depends on the rows of the call)."""
    from gpt.engine import sample_next

    m = tiny(11)
    calls = []

    def sample(logits, *rest):
        calls.append(logits.size(0))
        return sample_next(logits, *rest)

    def sampling(seed, **kw):
        return Sampling(10, **{"temperature": 0.9, "top_k": 20, **kw}, seed=seed)

    engine = DecodeEngine(m, max_rows=4, sample=sample)
    rows = [engine.add([ids(3 + i, i)], sampling(i))[0] for i in range(3)]
    nucleus = engine.add([ids(4, 9)], sampling(9, top_k=None, top_p=0.9))[0]
    run_to_end(engine, rows + [nucleus])
    assert calls.count(3) == 10 and calls.count(1) == 10 and len(calls) == 20
    for i, r in enumerate(rows):
        assert r.new == alone(m, ids(3 + i, i), sampling(i))
    assert nucleus.new == alone(m, ids(4, 9), sampling(9, top_k=None, top_p=0.9))
    # requests without a generator of their own draw from torch's global one: each keeps its own call, in order
    calls.clear()
    engine = DecodeEngine(m, max_rows=4, sample=sample)
    unseeded = [engine.add([ids(3 + i, i)], Sampling(10, temperature=0.9, top_k=20))[0] for i in range(2)]
    run_to_end(engine, unseeded)
    assert calls == [1] * 20


def test_groups_added_with_one_generator_draw_in_their_own_order_whatever_other_groups_do():
    """Two groups given the same generator object share a sampling call with a third group of its own seed: the
    shared stream's draws go to them in the order they were added, so their tokens do not depend on how long the
    third group runs (its end moves rows between slots)."""
    m = tiny(13)
    out = []
    for other in (2, 8):
        engine = DecodeEngine(m, max_rows=4)
        # slots by prompt length: x 0, y 1, z 2; when x ends, z moves into slot 0, before y
        x = engine.add([ids(1, 1)], Sampling(other, temperature=1.0, top_k=20, seed=3))[0]
        g = torch.Generator().manual_seed(9)
        y = engine.add([ids(2, 2)], Sampling(8, temperature=1.0, top_k=20, generator=g))[0]
        z = engine.add([ids(3, 3)], Sampling(8, temperature=1.0, top_k=20, generator=g))[0]
        run_to_end(engine, [x, y, z])
        out.append((y.new, z.new))
    assert out[0] == out[1] and len(out[0][0]) == 8


def test_a_failed_shared_sampling_call_falls_back_to_each_group_alone():
    """The shared call fails after the first group drew (its generator advanced): the generators are rewound
    and each group samples alone, so the good one keeps its exact tokens and only the bad one fails."""
    from gpt.engine import sample_next

    m = tiny(12)
    bad_gen = torch.Generator().manual_seed(7)

    def sample(logits, temperature, top_k, top_p, generator):
        if isinstance(generator, list):
            sample_next(logits[:1], temperature, top_k, top_p, generator[0][0])  # draws for the first group
            raise RuntimeError("probability tensor contains nan")
        if generator is bad_gen:
            raise RuntimeError("probability tensor contains nan")
        return sample_next(logits, temperature, top_k, top_p, generator)

    def sampling(gen):
        return Sampling(6, temperature=1.0, top_k=10, generator=gen)

    engine = DecodeEngine(m, max_rows=2, sample=sample)
    good = engine.add([ids(3, 1)], sampling(torch.Generator().manual_seed(3)))[0]
    bad = engine.add([ids(3, 2)], sampling(bad_gen))[0]
    run_to_end(engine, [good, bad])
    assert bad.finish_reason == "error" and bad.new == [] and "nan" in str(bad.error)
    assert good.new == alone(m, ids(3, 1), sampling(torch.Generator().manual_seed(3))) and len(good.new) == 6


def test_bad_rows_are_refused():
    engine = DecodeEngine(tiny(), max_rows=2)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add([[]], Sampling(3))
    with pytest.raises(ValueError, match="max_rows=2"):
        engine.add([[1]] * 3, Sampling(3))
    with pytest.raises(ValueError, match="max_tokens=0"):
        engine.add([[1]], Sampling(0))


def test_ragged_rows_decode_under_bf16_autocast():
    """A float32 model under bf16 autocast (evaluate.py's samples, the trainer's): new keys are bf16, the
    CPU cache float32; rows at different positions still decode."""
    m = tiny(10)
    engine = DecodeEngine(m, max_rows=2)
    rows = [engine.add([ids(n, n)], Sampling(6, temperature=0.0))[0] for n in (3, 8)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run_to_end(engine, rows)
    assert [len(r.new) for r in rows] == [6, 6]


# --- serve.py's continuous batching ------------------------------------------------------------------------

def served(max_batch: int):
    """A serve.py worker (Batcher) over a tiny character model, and a Job maker."""
    import asyncio

    pytest.importorskip("fastapi")
    from gpt.serve import Batcher, Engine, GenerateRequest, Job
    from gpt.tokenizer import CharTokenizer

    tok = CharTokenizer("\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    torch.manual_seed(0)
    eng = Engine(GPT(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32), tok, "cpu")
    loop = asyncio.new_event_loop()

    def job(prompt: str, n: int, **kw) -> Job:
        req = GenerateRequest(prompt=prompt, max_new_tokens=n, **{"temperature": 0.0, **kw})
        return Job(eng, eng.encode(req), req, loop, stream=False)

    return eng, Batcher(eng, max_batch=max_batch, wait_ms=0), job, loop


def wait_for(cond, seconds: float = 20.0) -> None:
    import time

    deadline = time.time() + seconds
    while not cond() and time.time() < deadline:
        time.sleep(0.002)
    assert cond()


def pause_when(eng, cond):
    """Hold the worker inside its decode step (the model's output layer) the first time cond() holds, until
    the returned `go` event is set: the test acts between two steps whatever the threads' scheduling."""
    import threading

    paused, go = threading.Event(), threading.Event()

    def hook(*_):
        if not paused.is_set() and cond():
            paused.set()
            go.wait(20)

    eng.model.lm_head.register_forward_hook(hook)
    return paused, go


def test_a_served_short_request_joins_a_running_long_one_and_finishes_first():
    """Continuous batching: a 6-token request sent while a 256-token one decodes joins at the next step and is
    done 6 steps later, while the long one goes on (a static batcher makes it wait for all 256)."""
    eng, batcher, job, loop = served(max_batch=4)
    try:
        finished = []
        long, short = job("ROMEO:", 256), job("To be", 6, temperature=0.8, seed=3)
        for name, j in (("long", long), ("short", short)):
            real = j.finish
            j.finish = lambda name=name, real=real: finished.append((name, len(long.new))) or real()
        paused, go = pause_when(eng, lambda: len(long.new) == 10)
        batcher.submit(long)
        assert paused.wait(20)  # inside the step that samples the long request's 11th token
        batcher.submit(short)  # joins at the next step
        go.set()
        wait_for(lambda: len(finished) == 2)
        assert finished == [("short", 11 + 6), ("long", 256)]
        assert batcher.stats()["batch_sizes"] == {"1": 2} and batcher.stats()["max_batch_seen"] == 2
        alone_batcher = served(max_batch=1)[1]
        again = job("To be", 6, temperature=0.8, seed=3)
        alone_batcher.submit(again)
        wait_for(lambda: again.row is not None and again.row.done)
        assert short.new == again.new  # joined mid-flight == alone
    finally:
        loop.close()


def test_a_served_cancelled_row_frees_its_slot_for_the_next_request_within_one_step():
    eng, batcher, job, loop = served(max_batch=1)
    try:
        first, second = job("ROMEO:", 256), job("To be", 4)
        paused, go = pause_when(eng, lambda: len(first.new) == 3)
        batcher.submit(first)
        assert paused.wait(20)  # inside the step that samples the first request's 4th token
        batcher.submit(second)  # waits: the one slot is taken
        first.cancelled = True  # what Ticket.release does when the client goes away
        go.set()
        wait_for(lambda: second.row is not None and second.row.done)
        assert len(first.new) == 4 and first.row.finish_reason == "cancelled"
        assert len(second.new) == 4 and batcher.decoder.steps == 4 + 4
    finally:
        loop.close()
