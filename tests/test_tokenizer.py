"""engram.tokenizer against an independent, plain-Python statement of spec §1."""

import io
import random
import re
import sys
import unicodedata

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

import engram.tokenizer as et  # noqa: E402
from engram import CompressionTable, EngramConfig, NgramHasher  # noqa: E402
from engram.tokenizer import build_compression, canonical_keys, check_matches, normalize  # noqa: E402

# ---------------------------------------------------------------------------
# Spec §1 restated with unicodedata / str only (no tokenizers), as the oracle.
# ---------------------------------------------------------------------------

SENTINEL = "\ue000"
# str.isspace() accepts the ASCII information separators U+001C..U+001F;
# Unicode White_Space (what the reference's Strip uses) does not.
_NOT_WHITE_SPACE = frozenset("\x1c\x1d\x1e\x1f")


def _is_white_space(c):
    return c.isspace() and c not in _NOT_WHITE_SPACE


def ref_normalize(s):
    s = unicodedata.normalize("NFKC", s)
    s = unicodedata.normalize("NFD", s)
    s = "".join(c for c in s if not unicodedata.category(c).startswith("M"))  # Mn, Mc and Me
    # Per character, as the reference lowercases: no word-final sigma rule.
    s = "".join(c.lower() for c in s)
    s = re.sub(r"[ \t\r\n]+", " ", s)
    if s == " ":
        s = SENTINEL
    start, end = 0, len(s)
    while start < end and _is_white_space(s[start]):
        start += 1
    while end > start and _is_white_space(s[end - 1]):
        end -= 1
    return s[start:end].replace(SENTINEL, " ")


def ref_lookup(size, decode_one, raw_token):
    """Spec §1 steps 1-2, one id at a time."""
    new_ids, lookup = {}, []
    for t in range(size):
        text = decode_one(t)
        if "\ufffd" in text:
            key = raw_token(t)
        else:
            norm = ref_normalize(text)
            key = norm if norm else text
        if key not in new_ids:
            new_ids[key] = len(new_ids)
        lookup.append(new_ids[key])
    return lookup


def ref_lookup_tokenizers(tok):
    return ref_lookup(
        tok.get_vocab_size(with_added_tokens=True),
        lambda t: tok.decode([t], skip_special_tokens=False),
        tok.id_to_token,
    )


# ---------------------------------------------------------------------------
# Tokenizers under test
# ---------------------------------------------------------------------------

SPECIALS = ["<pad>", "<s>", "</s>"]


def _corpus(lines=400):
    rng = random.Random(0)
    words = (
        "Hello hello HELLO hello, World world WORLD the The THE a A cat Cat dog Dog "
        "café Café CAFÉ cafe naïve Naive NAÏVE résumé Resume resume Zürich zurich "
        "straße Straße ﬁne ﬁle fine ＡＢＣ ａｂｃ abc Ελλάδα ελλαδα ΟΔΟΣ οδος "
        "日本語 中文 東京 🙂 😀 🚀 x² H₂O № ½ Ω \u212b \u00c5 \u1112\u1161\u11ab"
    ).split()
    seps = [" ", " ", " ", "  ", "\t", "\n", " \n ", "\r\n", "    "]
    out = []
    for _ in range(lines):
        n = rng.randint(3, 12)
        out.append("".join(rng.choice(words) + rng.choice(seps) for _ in range(n)).rstrip(" "))
    out += ["Hello world. hello world! HELLO WORLD?", "\t\tindented\n    code", "  ", "\n\n\n"]
    return out


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE like DeepSeek's: partial UTF-8 tokens decode to U+FFFD."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens(["<tab>", "  \t"])  # added tokens after the model vocabulary
    return tok


@pytest.fixture(scope="module")
def bpe_table(bpe):
    return build_compression(bpe, progress=False)


WORDS = [
    "<pad>", "<s>", "<unk>", "Hello", "hello", " hello", "HELLO", "\thello\n", "héllo", "ＨＥＬＬＯ",
    " ", "\t", "\n", "\r\n", "   ", "\u00a0", "\u3000", "\u0301", "\x1c", " \x1c", "\u200b",
    "ﬁ", "fi", "\u212b", "\u00c5", "\u00e5", "ΟΔΟΣ", "οδοσ", "ς", "İ", "straße", "STRASSE",
    "①", "1", "🙂", "a b", "A  B",
]  # fmt: skip


@pytest.fixture(scope="module")
def words():
    """A word-level vocabulary of hand-picked spec cases; decoding one id gives the word itself."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.add_special_tokens(["<pad>", "<s>"])
    return tok


# ---------------------------------------------------------------------------
# normalize
# ---------------------------------------------------------------------------

TRICKY = [
    # white space, lone and in runs; U+001C is space to str.isspace() only
    "", " ", "  ", "\t", "\n", "\r\n", " \t\r\n ", "\u00a0", "\u2003", "\u3000", "\x1c", " \x1c ",
    "\x0b", "\x0c", "\u0085", "\u2028", "\u200b", "\ue000", " \ue000 ",
    # case, accents, compatibility forms, ligatures
    "Hello", " hello", "Hello World", "  Hello \t World \n", "café", "CAFÉ", "cafe\u0301", "naïve",
    "Ångström", "\u212b", "\u00c5", "ﬁ", "ﬃ", "ﬆ", "ＡＢＣ", "ａｂｃ１２３", "①②", "x²", "½", "™", "ｶﾀｶﾅ",
    "ΟΔΟΣ", "Σ", "ς", "İstanbul", "ǅ", "ß", "ẞ", "ŉ", "Straße", "Ελλάδα", "Привет", "日本語",
    "\ud55c\uad6d\uc5b4", "\u1112\u1161\u11ab\uad6d\uc5b4",
    # emoji (modifier, ZWJ sequence, flag) and lone or spacing marks
    "🙂", "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f1ef\U0001f1f5",
    "\u0301", "\u0301a", "a\u20dd", "\u093e", "\u0915\u094d\u0937\u093f",
    # special-token and byte-level spellings
    "<pad>", "<｜begin▁of▁sentence｜>", "\ufffd", "Ġhello",
]  # fmt: skip


@pytest.mark.parametrize("text", TRICKY)
def test_normalize_tokenizers_equals_unicodedata(text):
    assert normalize(text) == ref_normalize(text)


def test_normalize_agrees_on_every_old_code_point():
    # Both libraries carry their own Unicode tables (Python 3.11: 14.0; the
    # tokenizers crates: older for NFKC/marks, newer for lowercase), so they
    # may only differ on recently assigned characters. Everything already
    # assigned in Unicode 3.2 must agree, alone and between letters.
    old = unicodedata.ucd_3_2_0
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF and old.category(chr(c)) != "Cn"]
    bad = [(hex(ord(c)), normalize(c), ref_normalize(c)) for c in chars if normalize(c) != ref_normalize(c)]
    assert not bad, bad[:20]
    # In one string to keep this fast: NUL separates the pieces, as nothing
    # normalises to or from it and it is not white space.
    chars = chars[1:]  # all but NUL itself
    joined = "\0".join("A" + c + "B" for c in chars)
    got, want = normalize(joined).split("\0"), ref_normalize(joined).split("\0")
    bad = [(hex(ord(c)), g, w) for c, g, w in zip(chars, got, want) if g != w]
    assert not bad and len(got) == len(want) == len(chars), bad[:20]


def test_normalize_spec_examples():
    assert normalize(" ") == " "  # a lone space survives Strip
    assert normalize("\n") == normalize("\t") == normalize("   ") == normalize("\r\n") == " "
    assert normalize("\u00a0") == " "  # NFKC turns it into a space first
    assert normalize("") == ""
    assert normalize("  Hello \t World \n") == "hello world"
    assert normalize("ＣＡＦÉ") == "cafe"
    assert normalize("ﬁ") == "fi"
    # The reference lowercases each character on its own: final sigma stays σ.
    assert normalize("ΟΔΟΣ") == "οδοσ" != "ΟΔΟΣ".lower()
    assert normalize("\u0301") == ""  # only a mark: the key falls back to the text


# ---------------------------------------------------------------------------
# build_compression
# ---------------------------------------------------------------------------


def test_bpe_matches_plain_python_spec(bpe, bpe_table):
    expected = ref_lookup_tokenizers(bpe)
    assert bpe_table.vocab_size == len(expected) == bpe.get_vocab_size(with_added_tokens=True)
    assert bpe_table.lookup.dtype == torch.int64
    assert bpe_table.lookup.tolist() == expected
    assert bpe_table.num_canonical == len(set(expected)) < bpe_table.vocab_size


def test_bpe_exercises_every_branch(bpe):
    size = bpe.get_vocab_size(with_added_tokens=True)
    texts = [bpe.decode([t], skip_special_tokens=False) for t in range(size)]
    partial = [t for t, s in enumerate(texts) if "\ufffd" in s]
    assert partial, "no partial UTF-8 token: the U+FFFD branch is untested"
    keys = canonical_keys(bpe, progress=False)
    assert all(keys[t] == bpe.id_to_token(t) for t in partial)
    # Two different raw byte tokens of one character stay distinct.
    assert len({keys[t] for t in partial}) == len(partial)
    for special in SPECIALS:
        assert keys[bpe.token_to_id(special)] == special  # kept, not skipped


def test_bpe_case_accent_and_space_variants_collapse(bpe, bpe_table):
    lookup = bpe_table.lookup
    ids = {tok: bpe.token_to_id(tok) for tok in ("hello", "Hello", "Ġhello", "ĠHello", "HELLO", "ĠHELLO")}
    present = {k: v for k, v in ids.items() if v is not None}
    assert len(present) >= 4, f"corpus too small to merge the hello variants: {ids}"
    assert len({int(lookup[v]) for v in present.values()}) == 1
    cafe = [bpe.token_to_id(t) for t in ("café", "Café", "cafe", "Ġcafé", "ĠCafé", "Ġcafe")]
    cafe = [t for t in cafe if t is not None]
    assert len(cafe) >= 2 and len({int(lookup[t]) for t in cafe}) == 1


def test_bpe_whitespace_tokens_map_to_one_space(bpe, bpe_table):
    keys = canonical_keys(bpe, progress=False)
    space = [bpe.token_to_id(t) for t in ("Ġ", "Ċ", "ĉ", "ĠĠ", "Ġĉ", "ĊĠ")]
    space = [t for t in space if t is not None] + [bpe.token_to_id("  \t")]
    assert len(space) >= 4
    assert all(keys[t] == " " for t in space)
    assert len({int(bpe_table.lookup[t]) for t in space}) == 1


def test_word_cases(words):
    table = build_compression(words, progress=False)
    assert table.lookup.tolist() == ref_lookup_tokenizers(words)
    keys = canonical_keys(words, progress=False)
    key = {w: keys[words.token_to_id(w)] for w in WORDS}
    cid = {w: int(table.lookup[words.token_to_id(w)]) for w in WORDS}
    assert len({cid[w] for w in ("Hello", "hello", " hello", "HELLO", "\thello\n", "héllo", "ＨＥＬＬＯ")}) == 1
    for w in (" ", "\t", "\n", "\r\n", "   ", "\u00a0", "\u3000"):
        assert key[w] == " " and cid[w] == cid[" "]
    assert key["\u0301"] == "\u0301"  # normalises to "" -> the text itself
    assert key["\x1c"] == "\x1c" and key[" \x1c"] == "\x1c"  # U+001C is not White_Space
    assert cid["ﬁ"] == cid["fi"] and cid["\u212b"] == cid["\u00c5"] == cid["\u00e5"]
    assert cid["ΟΔΟΣ"] == cid["οδοσ"] != cid["ς"]
    assert cid["straße"] != cid["STRASSE"]  # lowercase, not case folding
    assert cid["①"] == cid["1"] and cid["a b"] == cid["A  B"]
    assert key["<pad>"] == "<pad>" and cid["<s>"] == 1
    # First appearance: canonical ids never exceed token ids and start at 0.
    assert all(c <= t for t, c in enumerate(table.lookup.tolist())) and int(table.lookup[0]) == 0


def test_deterministic(bpe, bpe_table):
    assert build_compression(bpe, progress=False) == bpe_table


# ---------------------------------------------------------------------------
# Saving, checks and errors
# ---------------------------------------------------------------------------


def test_state_dict_round_trip(bpe, bpe_table):
    buf = io.BytesIO()
    torch.save(bpe_table.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    loaded = CompressionTable.from_state_dict(state)
    assert loaded == bpe_table and loaded.num_canonical == bpe_table.num_canonical
    other = CompressionTable.identity(3)
    other.load_state_dict(state)
    assert other == bpe_table
    check_matches(loaded, bpe, full=True)


def test_size_mismatch_is_a_clear_error(bpe, words, bpe_table):
    n_bpe, n_words = bpe.get_vocab_size(with_added_tokens=True), words.get_vocab_size(with_added_tokens=True)
    with pytest.raises(ValueError, match=rf"vocab_size={n_bpe}\b.*len\(tokenizer\)={n_words}\b"):
        check_matches(bpe_table, words)
    # The default of an EngramLayer without a table: DeepSeek-V3's padded 129280.
    with pytest.raises(ValueError, match=rf"vocab_size=129280\b.*len\(tokenizer\)={n_bpe}\b"):
        check_matches(CompressionTable.identity(129280), bpe)
    check_matches(bpe_table, bpe)


def test_check_matches_accepts_holders(bpe, bpe_table):
    hasher = NgramHasher(EngramConfig(), bpe_table)
    check_matches(hasher, bpe)
    with pytest.raises(ValueError, match="len\\(tokenizer\\)"):
        check_matches(NgramHasher(EngramConfig(), CompressionTable.identity(bpe_table.vocab_size + 1)), bpe)
    with pytest.raises(TypeError, match="check_matches"):
        check_matches(object(), bpe)


def test_check_matches_full_finds_a_different_table(bpe, bpe_table):
    same_size = CompressionTable.identity(bpe_table.vocab_size)
    check_matches(same_size, bpe)  # the size check alone cannot tell
    with pytest.raises(ValueError, match="differs from build_compression"):
        check_matches(same_size, bpe, full=True)


def test_unsupported_tokenizer():
    with pytest.raises(TypeError, match="tokenizers.Tokenizer or a transformers tokenizer"):
        build_compression({"hello": 0})


# ---------------------------------------------------------------------------
# Progress bar
# ---------------------------------------------------------------------------


def test_progress_bar_for_large_vocabularies(bpe, bpe_table, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(et, "PROGRESS_THRESHOLD", 10)
    assert build_compression(bpe) == bpe_table
    assert "engram canonical ids" in capsys.readouterr().err
    build_compression(bpe, progress=False)
    assert "engram canonical ids" not in capsys.readouterr().err


def test_without_tqdm(bpe, bpe_table, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(et, "PROGRESS_THRESHOLD", 10)
    assert build_compression(bpe) == bpe_table  # silently no bar
    with pytest.warns(UserWarning, match="tqdm is not installed"):
        assert build_compression(bpe, progress=True) == bpe_table


# ---------------------------------------------------------------------------
# transformers (optional)
# ---------------------------------------------------------------------------


def test_transformers_tokenizer(bpe, bpe_table):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False)
    assert len(hf) == bpe_table.vocab_size
    table = build_compression(hf, progress=False)
    expected = ref_lookup(len(hf), lambda t: hf.decode([t], skip_special_tokens=False), hf.convert_ids_to_tokens)
    assert table.lookup.tolist() == expected
    assert table == bpe_table  # same tokenizer behind both APIs
    check_matches(table, hf)
    with pytest.raises(ValueError, match=r"len\(tokenizer\)"):
        check_matches(CompressionTable.identity(len(hf) + 5), hf)
