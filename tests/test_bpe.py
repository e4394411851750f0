"""The byte-level BPE trained on the run's own text (gpt.bpe): tiktoken ids equal to the HF tokenizer it was
trained as, round trips, special tokens (only <|endoftext|> from training; the stages add theirs, so a pretrained
bpe model is a base model), the trained-tokenizer cache, checkpoints, HF and GGUF export, one-line refusals."""

import io

import base64
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY
from gpt import bpe
from gpt.bpe import hf_backend, merges_of, ranks_of, token_text, train_backend
from gpt.chat import END, SPECIAL as CHAT_SPECIAL, chat_tokenizer, encode_chat
from gpt.data import Shakespeare, TextFiles
from gpt.errors import UserError
from gpt.evaluation.generation import is_chat
from gpt.inference import encode_prompt
from gpt.tokenizer import (BOS, BPE_SPECIAL, BPE_TRAINED_SPECIAL, EOT, BpeTokenizer, TiktokenTokenizer, Tokenizer,
                           from_identity, read_bpe_file, with_special_tokens, write_bpe_file)
from inprocess import run_here

PLAYS = ["tragedies/hamlet", "tragedies/macbeth"]
SAMPLES = [
    "", " ", "Hello world! It's 2024: THE'S we'll they've 12345678 3.14159", "  leading and trailing  \n",
    "\n\n\nlines\r\n\r\nwindows\ttabs\x0bvt\x0cff", "naïve café, Ærøskøbing; Straße", "你好，世界！这是中文文本。",
    "emoji 🎉🎉 👨‍👩‍👧 🇫🇷 ✨", "mixed 中文English123数字", "\u3000\u00a0\u2028\u0085odd spaces", "x" * 300,
    "<|endoftext|> literal <|bos|> <|user|>", "def f(x):\n    return x**2  # code\n",
]
PLAIN = [t for t in SAMPLES if "<|" not in t]  # HF tokenizers (and llama.cpp) match special tokens in text; ours never

# Dao De Jing (public domain), chapters 1-8 to train on, 9-10 to measure on.
DAO_TRAIN = (
    "道可道，非常道。名可名，非常名。无名天地之始；有名万物之母。故常无欲，以观其妙；常有欲，以观其徼。此两者，同出而异名，"
    "同谓之玄。玄之又玄，众妙之门。天下皆知美之为美，斯恶已。皆知善之为善，斯不善已。故有无相生，难易相成，长短相形，"
    "高下相倾，音声相和，前后相随。是以圣人处无为之事，行不言之教；万物作焉而不辞，生而不有，为而不恃，功成而弗居。"
    "夫唯弗居，是以不去。不尚贤，使民不争；不贵难得之货，使民不为盗；不见可欲，使民心不乱。是以圣人之治，虚其心，"
    "实其腹，弱其志，强其骨。常使民无知无欲。使夫智者不敢为也。为无为，则无不治。道冲，而用之或不盈。渊兮，似万物之宗。"
    "挫其锐，解其纷，和其光，同其尘。湛兮，似或存。吾不知谁之子，象帝之先。天地不仁，以万物为刍狗；圣人不仁，"
    "以百姓为刍狗。天地之间，其犹橐龠乎？虚而不屈，动而愈出。多言数穷，不如守中。谷神不死，是谓玄牝。玄牝之门，"
    "是谓天地根。绵绵若存，用之不勤。天长地久。天地所以能长且久者，以其不自生，故能长生。是以圣人后其身而身先，"
    "外其身而身存。非以其无私邪？故能成其私。上善若水。水善利万物而不争，处众人之所恶，故几于道。居善地，心善渊，"
    "与善仁，言善信，政善治，事善能，动善时。夫唯不争，故无尤。"
)
DAO_HELD_OUT = (
    "持而盈之，不如其已；揣而锐之，不可长保。金玉满堂，莫之能守；富贵而骄，自遗其咎。功成身退，天之道也。"
    "载营魄抱一，能无离乎？专气致柔，能如婴儿乎？涤除玄览，能无疵乎？爱民治国，能无为乎？天门开阖，能为雌乎？"
    "明白四达，能无知乎？生之畜之，生而不有，为而不恃，长而不宰，是谓玄德。"
)


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Random unicode (every plane), random bytes read as text, and random picks of an alphabet of edge cases."""
    rng = random.Random(seed)
    alphabet = " \t\n\r\x0b\x0c\x85\xa0\u2028\u3000abcXYZ019'.,!?-_你好😀é\u0301ñ'sllve"
    out = []
    for i in range(n):
        k = rng.randint(0, 40)
        if i % 3 == 0:
            out.append("".join(chr(rng.choice([rng.randint(1, 0x7F), rng.randint(0x80, 0x7FF),
                                               rng.randint(0x800, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                               for _ in range(k)))
        elif i % 3 == 1:
            out.append(bytes(rng.randrange(256) for _ in range(k)).decode("utf-8", "replace"))
        else:
            out.append("".join(rng.choice(alphabet) for _ in range(k)))
    return out


@pytest.fixture(scope="module")
def plays_text() -> str:
    return "".join(text for _, text in Shakespeare(PLAYS).pieces())


@pytest.fixture(scope="module")
def trained(plays_text):
    """(the HF tokenizer as trained, our BpeTokenizer from its ranks): 700 merges on ~300 KB of plays + Chinese;
    its special tokens are training's (<|endoftext|> only)."""
    backend = train_backend([plays_text[:300_000], DAO_TRAIN], 700)
    return backend, BpeTokenizer.trained(ranks_of(backend), "cl100k", BPE_TRAINED_SPECIAL)


def test_tiktoken_from_the_ranks_splits_text_as_the_trained_hf_tokenizer(trained, plays_text):
    backend, tok = trained
    assert tok.ranks[:256] == [bytes([b]) for b in range(256)]
    texts = SAMPLES + random_texts(600) + [plays_text[i:i + 400] for i in range(300_000, 700_000, 20_000)]
    for text in texts:
        ours = [token_text(tok.ranks[i]) for i in tok.encode(text)]
        assert ours == backend.encode(text).tokens, text


def test_hf_tokenizer_rebuilt_from_the_ranks_gives_our_ids(trained, plays_text):
    _, tok = trained
    rebuilt = hf_backend(tok)
    for text in PLAIN + random_texts(600, seed=1) + [plays_text[-2000:]]:
        assert rebuilt.encode(text).ids == tok.encode(text), text
    assert rebuilt.token_to_id(EOT) == tok.eot_id == tok.base_vocab_size


def test_decode_encode_round_trips_any_text(trained):
    _, tok = trained
    for text in SAMPLES + random_texts(900, seed=2):
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_never_made_from_text(trained):
    _, base = trained
    tok = chat_tokenizer(base)
    assert isinstance(tok, Tokenizer) and not tok.needs_fit and BpeTokenizer(512).needs_fit
    assert tok.special == [EOT, *CHAT_SPECIAL]
    assert tok.vocab_size == 256 + 700 + len(tok.special)
    text = " ".join(BPE_SPECIAL) + "".join(BPE_SPECIAL) + "<|endoftext|"
    assert max(tok.encode(text)) < tok.base_vocab_size
    assert tok.decode(tok.encode(text)) == text
    ids = [tok.special_id(t) for t in tok.special]
    assert ids == list(range(tok.base_vocab_size, tok.vocab_size))
    assert tok.decode(ids) == "".join(tok.special)


def test_a_pretrained_bpe_is_a_base_model_until_a_stage_adds_tokens(trained):
    """Training reserves only <|endoftext|> (documents are separated by it): no <|bos|> in prompts, no chat
    template. The stages add theirs after it, as for gpt2 and char: their presence tells the model's kind."""
    _, tok = trained
    n = tok.base_vocab_size
    assert tok.special == [EOT] and tok.eot_id == n and tok.vocab_size == n + 1
    assert tok.bos_id is None and not is_chat(tok)
    assert encode_prompt(tok, "hi", 32) == tok.encode("hi") and encode_prompt(tok, "", 32) == [n]
    chat = chat_tokenizer(tok)  # what finetune.py stage=sft (and the RL stages) use
    assert is_chat(chat) and chat.bos_id is None and chat.eot_id == n
    assert [chat.special_id(t) for t in CHAT_SPECIAL] == [n + 1, n + 2, n + 3, n + 4]
    user, end, assistant = chat.special_id("<|user|>"), chat.special_id(END), chat.special_id("<|assistant|>")
    assert encode_chat(chat, [{"role": "user", "content": "hi"}], generation_prompt=True)[0] == \
        [user, *tok.encode("hi"), end, assistant]
    assert chat_tokenizer(chat) is chat
    completion = with_special_tokens(tok, [BOS, EOT])  # what finetune.py stage=completion uses
    assert completion.special == [EOT, BOS] and completion.bos_id == n + 1 and not is_chat(completion)
    assert encode_prompt(completion, "hi", 32) == [n + 1, *tok.encode("hi")]
    assert with_special_tokens(completion, [EOT, BOS]).identity() == completion.identity()


def test_infer_interactive_on_a_pretrained_bpe_is_base_model_mode(trained, capsys):
    from omegaconf import OmegaConf

    from gpt.engine import Sampling, complete
    from gpt.inference import interactive
    from gpt.model import GPT

    _, tok = trained
    torch.manual_seed(0)
    model = GPT(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0).eval()
    cfg = OmegaConf.create({"ckpt": "m.pt", "num_samples": 1, "chat": False, "max_new_tokens": 4, "temperature": 0.0,
                            "top_k": None, "top_p": None, "seed": 0, "device": "cpu", "use_cache": True})
    text = interactive(cfg, model, tok, io.StringIO("ROMEO:\n"), io.StringIO())
    assert "base model: the text you type is continued" in capsys.readouterr().err
    ids = tok.encode("ROMEO:\n")  # no <|bos|> in front
    want = tok.decode(complete(model, [ids], Sampling(4, 0.0, stop_ids=(tok.eot_id,)))[0].new)
    assert text == "ROMEO:\n" + want
    with pytest.raises(UserError, match="chat=true needs a chat-tuned checkpoint"):
        interactive(OmegaConf.merge(cfg, {"chat": True}), model, tok, io.StringIO(""), io.StringIO())


def test_bpe_trained_on_chinese_compresses_chinese_better_than_gpt2():
    tok = BpeTokenizer(256 + len(BPE_TRAINED_SPECIAL) + 300)
    tok.fit(DAO_TRAIN)
    gpt2 = TiktokenTokenizer("gpt2")
    nbytes = len(DAO_HELD_OUT.encode())
    ours, theirs = nbytes / len(tok.encode(DAO_HELD_OUT)), nbytes / len(gpt2.encode(DAO_HELD_OUT))
    assert ours > theirs, (ours, theirs)


def test_identity_round_trips_through_json_and_weights_only_load(trained, tmp_path):
    _, tok = trained
    identity = tok.identity()
    assert identity["type"] == "bpe" and identity["pattern"] == "cl100k"
    again = from_identity(json.loads(json.dumps(identity)))
    assert again.ranks == tok.ranks and again.special == tok.special
    torch.save({"tokenizer": identity}, tmp_path / "t.pt")
    loaded = torch.load(tmp_path / "t.pt", weights_only=True)["tokenizer"]
    assert from_identity(loaded).encode("to be or not") == tok.encode("to be or not")


def _tampered(identity: dict, **change) -> dict:
    return {**identity, **change}


@pytest.mark.parametrize("change, message", [
    (dict(pattern=r"(a+)+$"), "pattern='(a+)+$' is not one of ['cl100k']"),
    (dict(pattern=None), "pattern=None is not one of"),
    (dict(ranks="AAEC"), "ranks must be a list"),
    (dict(ranks=list(range(300))), "ranks[0] is not a base64 string"),
    (dict(ranks=["!!"] * 300), "is not base64"),
    (dict(ranks=[base64.b64encode(bytes([b])).decode() for b in range(255, -1, -1)]), "ranks 0..255 must be"),
    (dict(ranks=[base64.b64encode(bytes([b])).decode() for b in range(256)] * 2), "hold a token twice"),
    (dict(ranks=[base64.b64encode(bytes([b])).decode() for b in range(200)]), "list of 256.."),
    (dict(special=[1]), "special='[1]' is not a list"),
    (dict(special=["<|foo|>"]), "special=\"['<|foo|>']\" must be a list of distinct names from ['<|endoftext|>'"),
    (dict(special=None), "special='None' must be a list of distinct names"),  # not rebuilt with defaults
    (dict(extra=1), "unexpected keys ['extra']"),
])
def test_tampered_identity_is_refused_in_one_line(trained, change, message):
    _, tok = trained
    with pytest.raises(UserError) as e:
        from_identity(_tampered(tok.identity(), **change))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_identity_and_file_keep_their_special_tokens(trained, tmp_path):
    """An identity's special list is taken as written (an empty one too); tokenizer.file= takes the file's
    ranks, special tokens and pattern, and its errors name the file."""
    _, tok = trained
    bare = from_identity({**tok.identity(), "special": []})
    assert bare.special == [] and bare.eot_id is None and bare.vocab_size == len(tok.ranks)
    assert bare.cache_key() != tok.cache_key()  # the documents' separator differs: another token cache
    completion = with_special_tokens(tok, [BOS, EOT])
    path = write_bpe_file(completion, tmp_path / "completion.json")
    loaded = BpeTokenizer(file=str(path))
    assert loaded.identity() == completion.identity() and loaded.bos_id == tok.base_vocab_size + 1
    assert loaded.pattern == "cl100k" and loaded.vocab_size == tok.vocab_size + 1
    path.write_text(json.dumps({**tok.identity(), "special": ["<|pad|>"]}))
    with pytest.raises(UserError, match=r"^tokenizer identity in tokenizer file '.*completion.json' \(bpe\): "
                                        r"special=.*<\|pad\|>"):
        BpeTokenizer(file=str(path))


def test_vocab_size_below_bytes_and_special_tokens_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer.vocab_size=200 is out of range for bpe.*use 257\.\."):
        BpeTokenizer(200)
    proc = run_here("prepare.py", "tokenizer=bpe", "tokenizer.vocab_size=100", cwd=tmp_path)
    assert proc.returncode == 2 and "tokenizer.vocab_size=100 is out of range" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_too_little_text_for_the_vocabulary_is_refused():
    with pytest.raises(UserError, match="has only .* distinct merges.*use a vocab_size of at most"):
        BpeTokenizer(4096).fit("tiny text")


def test_trained_tokenizer_is_kept_and_reused(tmp_path, monkeypatch, plays_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(plays_text[:200_000])
    cache = tmp_path / "cache" / "tokens"  # where the command line looks too (GPT_CACHE_DIR/tokens)
    monkeypatch.setenv("GPT_CACHE_DIR", str(cache.parent))
    first = TextFiles(str(corpus), cache_dir=str(cache)).load(BpeTokenizer(600))
    assert first.tokenizer.vocab_size == 600 and not first.reused
    kept = list((cache / "tokenizers").glob("*.json"))
    assert len(kept) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(bpe, "train_backend", no_training)
    shutil.rmtree(first.cache_path)  # the token cache is gone; the trained tokenizer is not
    again = TextFiles(str(corpus), cache_dir=str(cache)).load(BpeTokenizer(600))
    assert not again.reused and again.tokenizer.identity() == first.tokenizer.identity()
    assert again.train.tolist() == first.train.tolist()
    # the command line finds the same tokenizer for the same data and settings (no training either)
    out = tmp_path / "tok.json"
    proc = run_here("-m", "gpt.bpe_cli", "train", "--data", str(corpus), "--vocab-size", "600", "--out", str(out),
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_bpe_file(out).identity() == first.tokenizer.identity()
    # other settings are another tokenizer: trained anew
    with pytest.raises(AssertionError, match="trained again"):
        TextFiles(str(corpus), cache_dir=str(cache)).load(BpeTokenizer(601))


def test_training_text_leaves_the_validation_text_out(tmp_path):
    from gpt.prepare import in_val, training_text

    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.txt").write_text(f"document {i} " * 20)
    source = TextFiles(str(folder), val_fraction=0.25)
    texts = "".join(training_text(source.plan(), 10**9))
    held = [i for i in range(40) if in_val(i, 0.25)]
    assert held and all(f"document {i} " not in texts for i in held)
    assert all(f"document {i} " in texts for i in range(40) if i not in held)
    one = tmp_path / "one.txt"
    one.write_text("a" * 900 + "b" * 100)  # one document: the cache holds out its last 10%
    assert "".join(training_text(TextFiles(str(one)).plan(), 10**9)) == "a" * 900
    assert "".join(training_text(TextFiles(str(one)).plan(), 300)) == "a" * 300


def test_cli_train_then_compare(tmp_path, plays_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(plays_text[:150_000])
    out = tmp_path / "tok.json"
    proc = run_here("-m", "gpt.bpe_cli", "train", "--data", str(corpus), "--vocab-size", "500", "--out", str(out),
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    tok = read_bpe_file(out)
    assert tok.vocab_size == 500
    # a file trains nothing: tokenizer.file loads it as it is
    assert BpeTokenizer(file=str(out)).identity() == tok.identity() and not BpeTokenizer(file=str(out)).needs_fit
    text = tmp_path / "sample.txt"
    text.write_text(plays_text[-30_000:])
    # python -m gpt.tokenizer is the same command line
    proc = run_here("-m", "gpt.tokenizer", "compare", "--text", str(text), "--tokenizer", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    nbytes = len(text.read_text().encode())
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    gpt2 = TiktokenTokenizer("gpt2")
    assert f"| {nbytes / len(gpt2.encode(text.read_text())):.2f} |" in rows["gpt2"]
    assert f"| {nbytes / len(tok.encode(text.read_text())):.2f} |" in rows["bpe tok.json"]
    assert "cl100k" in rows
    bad = run_here("-m", "gpt.bpe_cli", "compare", "--tokenizer", str(tmp_path / "none.json"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: tokenizer file") and bad.stderr.count("\n") == 1


def _bpe_checkpoint(tok, tmp_path: Path, name: str = "bpe.pt") -> Path:
    from gpt.checkpoint import save_checkpoint
    from gpt.model import GPT

    torch.manual_seed(0)
    cfg = dict(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0, bias=True)
    model = GPT(**cfg)
    return save_checkpoint({"model": model.state_dict(), "config": {"model": {"_target_": "gpt.model.GPT", **cfg}},
                            "tokenizer": tok.identity(), "step": 0}, tmp_path / name)


def test_hf_export_tokenizer_gives_our_ids_and_chat_only_for_a_chat_model(trained, tmp_path, plays_text):
    transformers = pytest.importorskip("transformers")
    from gpt.interop import export_hf, import_hf

    _, base = trained
    messages = [{"role": "user", "content": "你好 there"}, {"role": "assistant", "content": " ok"}]
    for tok, name in ((base, "base"), (chat_tokenizer(base), "chat")):
        out = export_hf(str(_bpe_checkpoint(tok, tmp_path, f"{name}.pt")), str(tmp_path / name))
        fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
        for text in PLAIN + random_texts(100, seed=3) + [plays_text[-3000:]]:
            assert fast(text).input_ids == tok.encode(text), text
            assert fast.decode(tok.encode(text)) == text
        config = json.loads((out / "tokenizer_config.json").read_text())
        assert fast.convert_tokens_to_ids(EOT) == tok.eot_id
        if tok is base:  # a pretrained model: no chat template, no begin token but end-of-text (as GPT-2)
            assert "chat_template" not in config and fast.chat_template is None
            assert json.loads((out / "config.json").read_text())["bos_token_id"] == tok.eot_id
        else:
            chat = fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
            assert list(chat["input_ids"]) == encode_chat(tok, messages, generation_prompt=True)[0]
        back = torch.load(import_hf(str(out), str(tmp_path / f"{name}-back.pt")), weights_only=True)
        assert back["tokenizer"] == tok.identity()


def test_gguf_export_writes_the_ranks_as_a_llama_bpe_vocabulary(trained, tmp_path):
    pytest.importorskip("gguf")
    from gguf import GGUFReader
    from tokenizers import Tokenizer, models

    from gpt.gguf_export import export_gguf

    _, base = trained
    chat_out = export_gguf(str(_bpe_checkpoint(chat_tokenizer(base), tmp_path, "chat.pt")), str(tmp_path / "c.gguf"))
    assert "tokenizer.chat_template" in GGUFReader(str(chat_out)).fields
    tok = base
    out = export_gguf(str(_bpe_checkpoint(tok, tmp_path)), str(tmp_path / "m.gguf"))
    reader = GGUFReader(str(out))
    assert "tokenizer.chat_template" not in reader.fields  # a pretrained model is no chat model
    fields = {k: reader.fields[k].contents() for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre",
                                                        "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                        "tokenizer.ggml.token_type")}
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.ggml.tokens"] == [token_text(t) for t in tok.ranks] + tok.special
    assert fields["tokenizer.ggml.token_type"] == [1] * len(tok.ranks) + [3] * len(tok.special)
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    assert merges == [(token_text(a), token_text(b)) for a, b in merges_of(tok.ranks)]
    # llama.cpp's llama-bpe: the file's merges, applied after a whole-piece lookup, give our ids
    vocab = {t: i for i, t in enumerate(fields["tokenizer.ggml.tokens"][:len(tok.ranks)])}
    merge_bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    merge_bpe.pre_tokenizer = hf_backend(tok).pre_tokenizer
    for text in PLAIN + random_texts(200, seed=4):
        assert merge_bpe.encode(text).ids == tok.encode(text), text


@pytest.mark.slow
def test_llama_cpp_tokenizes_a_bpe_gguf_as_we_do_and_generates_our_tokens(trained, tmp_path, plays_text):
    """llama.cpp itself (llama-cpp-python) on the exported file: its llama-bpe pre-tokenizer with our merges gives
    our ids, and its greedy generation our 16 tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
    from gpt.checkpoint import load_checkpoint, save_checkpoint
    from gpt.gguf_export import export_gguf
    from gpt.model import GPT

    _, tok = trained
    path = _bpe_checkpoint(tok, tmp_path)
    ckpt = load_checkpoint(str(path))
    model = GPT(**{k: v for k, v in ckpt["config"]["model"].items() if k != "_target_"})
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():  # sharpen the logits so float32 vs llama.cpp's kernels cannot flip a near tie
        model.transformer.wte.weight.mul_(8.0)
    out = export_gguf(str(save_checkpoint({**ckpt, "model": model.state_dict()}, tmp_path / "sharp.pt")),
                      str(tmp_path / "m.gguf"))
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False, logits_all=False)
    for text in PLAIN + random_texts(100, seed=5) + [plays_text[-2000:]]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    prompt = tok.encode("ROMEO: But soft")
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(t)
        if len(theirs) == 16:
            break
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(16):
            ids = torch.cat([ids, model(ids)[0][:, -1:].argmax(-1)], dim=1)
    assert theirs == ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """A tiny train.py run with tokenizer=bpe (vocab_size=400) on the bundled plays: its run folder."""
    run_dir = tmp_path_factory.mktemp("bpe-run")
    proc = run_here("train.py", *TINY, "tokenizer=bpe", "tokenizer.vocab_size=400", "trainer.max_iters=3",
                    cwd=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dir.glob("outputs/*-*-*/*")
    return run


@pytest.mark.slow
def test_train_with_bpe_then_sample_from_the_checkpoint_alone(bpe_run, tmp_path):
    ckpt_path = bpe_run / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["tokenizer"]["type"] == "bpe" and len(ckpt["tokenizer"]["ranks"]) == 400 - 1
    assert ckpt["tokenizer"]["special"] == [EOT]  # what pretraining used, nothing a later stage adds
    assert ckpt["config"]["model"]["vocab_size"] == 400 == ckpt["config"]["tokenizer"]["vocab_size"]
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ckpt_path, alone / "model.pt")
    out = run_here("infer.py", "ckpt=model.pt", "prompt=ROMEO: 你好", "max_new_tokens=8", cwd=alone,
                   env={"GPT_CACHE_DIR": str(tmp_path / "empty-cache")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ROMEO: 你好")
    assert sorted(p.name for p in alone.iterdir()) == ["model.pt"]
    chat = run_here("infer.py", "ckpt=model.pt", "prompt=hi", "chat=true", cwd=alone)
    assert chat.returncode == 2 and "chat=true needs a chat-tuned checkpoint" in chat.stderr


FINETUNE = ["trainer.max_iters=2", "trainer.eval_interval=2", "trainer.eval_iters=1", "trainer.batch_size=4",
            "scheduler.schedule.warmup_iters=1"]


def _finetuned(parent: Path, cwd: Path, *args: str) -> tuple[Path, dict]:
    """finetune.py on `parent` in a new folder `cwd`: (the run folder, its last checkpoint)."""
    cwd.mkdir()
    proc = run_here("finetune.py", f"ckpt={parent}", *args, *FINETUNE, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = cwd.glob("outputs/*-*-*/*")
    return run, torch.load(run / "checkpoints" / "last.pt", weights_only=True)


@pytest.mark.slow
def test_sft_on_a_bpe_parent_adds_the_chat_tokens_after_end_of_text(bpe_run, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(20)))
    run, ckpt = _finetuned(bpe_run, tmp_path / "sft", "stage=sft", f"data={data}", "stage.eval_examples=2",
                      "stage.max_new_tokens=4")
    tok, n = from_identity(ckpt["tokenizer"]), 400 - 1
    assert tok.special == [EOT, *CHAT_SPECIAL] and is_chat(tok) and tok.bos_id is None
    assert [tok.special_id(t) for t in tok.special] == [n, n + 1, n + 2, n + 3, n + 4]
    assert ckpt["config"]["model"]["vocab_size"] == tok.vocab_size == 404  # the stage grew the vocabulary
    messages = [{"role": "user", "content": "2+2="}]
    assert encode_chat(tok, messages, generation_prompt=True)[0] == [n + 2, *tok.encode("2+2="), n + 4, n + 3]
    out = run_here("infer.py", f"ckpt={run}", "prompt=2+2=", "chat=true", "max_new_tokens=4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_completion_on_a_bpe_parent_adds_bos(bpe_run, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"ROMEO: line {i}."}) + "\n" for i in range(20)))
    _, ckpt = _finetuned(bpe_run, tmp_path / "completion", "stage=completion", f"data={data}")
    tok, n = from_identity(ckpt["tokenizer"]), 400 - 1
    assert tok.special == [EOT, BOS] and tok.bos_id == n + 1 and not is_chat(tok)
    assert ckpt["document_tokens"] == {"bos": BOS, "eos": EOT} and ckpt["config"]["model"]["vocab_size"] == 401
    assert encode_prompt(tok, "ROMEO:", 32) == [n + 1, *tok.encode("ROMEO:")]


def _cli_files(d: Path) -> None:
    tok = BpeTokenizer(256 + 1 + 5)
    tok.fit("abababab cdcdcd " * 20)
    write_bpe_file(tok, d / "tok.json")
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (d / "text.txt").write_text("some text")
    (d / "deep.json").write_text("[" * 100_000 + "]" * 100_000)  # 200 KB: well under the size cap
    (d / "chatty.json").write_text(json.dumps({**tok.identity(), "special": [EOT, "<|tool|>"]}))
    (d / "regex.json").write_text(json.dumps({**tok.identity(), "pattern": "(a+)+$"}))


@pytest.mark.parametrize("args, message", [
    (("compare", "--text", "{d}/empty.txt", "--tokenizer", "{d}/tok.json"), "--text '{d}/empty.txt' is empty"),
    (("compare", "--text", "{d}/latin1.txt", "--tokenizer", "{d}/tok.json"), "--text '{d}/latin1.txt' is not UTF-8"),
    (("compare", "--text", "{d}/text.txt", "--tokenizer", "{d}/deep.json"),
     "tokenizer file '{d}/deep.json' is JSON nested too deeply"),
    (("compare", "--text", "{d}/text.txt", "--tokenizer", "{d}/chatty.json"),
     "tokenizer identity in tokenizer file '{d}/chatty.json' (bpe): special="),
    (("compare", "--text", "{d}/text.txt", "--tokenizer", "{d}/regex.json"),
     "tokenizer identity in tokenizer file '{d}/regex.json' (bpe): pattern='(a+)+$' is not one of"),
    (("train", "--out", "{d}"), "--out '{d}' is a directory; give a file path"),
])
def test_cli_bad_input_is_one_error_line_naming_it(tmp_path, args, message):
    _cli_files(tmp_path)
    proc = run_here("-m", "gpt.bpe_cli", *(a.format(d=tmp_path) for a in args), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: " + message.format(d=tmp_path)), proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_the_token_cache_key_of_trained_ranks_names_the_pattern(trained, monkeypatch):
    """The same ranks split by another pre-split pattern give other ids: another token cache (tokenizer.file=
    takes the file's pattern)."""
    _, tok = trained
    monkeypatch.setitem(bpe.PATTERNS, "other", bpe.PATTERNS["cl100k"] + "|x")
    other = from_identity({**tok.identity(), "pattern": "other"})
    assert other.ranks == tok.ranks and other.cache_key() != tok.cache_key()
