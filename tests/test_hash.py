"""Hash ids: bit-exact against the numpy statement of spec §2-3 in engram.reference."""

import numpy as np
import pytest
import torch
import xxhash
from torch.library import opcheck

import engram
from engram import CompressionTable, EngramConfig, NgramHasher
from engram import reference as ref
from engram._loader import load

_engine = load("_engine")


def reference_ids(cfg: EngramConfig, table: CompressionTable, input_ids: torch.Tensor):
    primes = ref.layer_head_primes(cfg.engram_vocab_size, cfg.max_ngram_size, cfg.n_head_per_ngram, cfg.layer_ids)
    lookup = table.lookup.numpy()
    if cfg.hash == "deepseek":
        mult = ref.layer_multipliers(table.num_canonical, cfg.max_ngram_size, cfg.seed, cfg.layer_ids)
        return ref.ngram_hash(input_ids.numpy(), lookup, mult, primes, cfg.max_ngram_size, cfg.n_head_per_ngram, cfg.pad_id)
    return ref.ngram_hash_xxh64(
        input_ids.numpy(), lookup, cfg.seed, cfg.layer_ids, primes, cfg.max_ngram_size, cfg.n_head_per_ngram, cfg.pad_id
    )


def assert_bit_exact(cfg, table, input_ids):
    got = NgramHasher(cfg, table).hash(input_ids)
    want = reference_ids(cfg, table, input_ids)
    assert list(got) == list(cfg.layer_ids)
    for layer_id in cfg.layer_ids:
        assert got[layer_id].dtype == torch.int64
        np.testing.assert_array_equal(got[layer_id].numpy(), want[layer_id])


def random_compression(vocab: int, canonical: int) -> CompressionTable:
    # A many-to-one map numbered by first appearance, like spec §1 builds.
    raw = torch.randint(0, canonical, (vocab,))
    raw[:canonical] = torch.randperm(canonical)
    _, first = np.unique(raw.numpy(), return_index=True)
    order = np.argsort(first)
    renumber = np.empty(canonical, dtype=np.int64)
    renumber[order] = np.arange(canonical)
    return CompressionTable(torch.from_numpy(renumber[raw.numpy()]))


# --------------------------------------------------------------------------
# known values of the reference configuration
# --------------------------------------------------------------------------


def test_known_reference_values():
    hasher = NgramHasher(EngramConfig(), CompressionTable.identity(129280))
    assert hasher.head_sizes(1)[:8] == [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523]
    assert hasher.table_rows(1) == 10_344_164
    assert hasher.table_rows(15) == 10_348_242
    sizes = hasher.head_sizes(1) + hasher.head_sizes(15)
    assert len(set(sizes)) == 32 and all(ref.is_prime(p) for p in sizes)
    assert hasher.offsets(1).tolist() == (np.cumsum([0] + hasher.head_sizes(1))[:-1]).tolist()


def test_known_multipliers_with_99092_canonical_ids():
    table = CompressionTable(torch.arange(120_000) % 99_092)
    hasher = NgramHasher(EngramConfig(), table)
    assert hasher.multipliers(1).tolist() == [76632096046245, 4839876093313, 35959672319349]
    assert all(m % 2 == 1 for m in hasher.multipliers(15).tolist())


def test_head_primes_match_reference_statement():
    for sizes, n, h, layers in [([646400, 646400], 3, 8, [1, 15]), ([50, 70, 30], 4, 3, [5, 0, 2]), ([2], 2, 4, [0])]:
        want = ref.layer_head_primes(sizes, n, h, layers)
        got = _engine.head_primes(sizes, h, len(layers))
        assert got == [want[l] for l in layers]


# --------------------------------------------------------------------------
# bit-exact ids
# --------------------------------------------------------------------------

FAMILIES = ["deepseek", "xxh64"]


@pytest.mark.parametrize("family", FAMILIES)
def test_random_ids_reference_config(family):
    cfg = EngramConfig(hash=family)
    table = random_compression(129_280, 99_092)
    ids = torch.randint(0, 129_280, (3, 97))
    assert_bit_exact(cfg, table, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_large_batches_bit_exact_and_recycled_outputs_independent(family):
    # 8 MiB of ids: the kernel streams cache lines past the cache and reuses
    # freed output blocks; a live output must never be handed out again.
    cfg = EngramConfig(hash=family)
    table = random_compression(129_280, 99_092)
    hasher = NgramHasher(cfg, table)
    first_ids, second_ids = torch.randint(0, 129_280, (2, 8, 4096))
    first = hasher.hash(first_ids)
    kept = {layer: ids.clone() for layer, ids in first.items()}
    for _ in range(3):  # recycles the blocks freed in between
        hasher.hash(second_ids)
    for layer in cfg.layer_ids:
        assert torch.equal(first[layer], kept[layer])
    del first
    assert_bit_exact(cfg, table, second_ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (1, 2), (4, 3), (1, 5)])
def test_short_sequences(family, shape):
    # T = 1 and T < N: every window reaches into the pad region.
    cfg = EngramConfig(hash=family, max_ngram_size=4, engram_vocab_size=[1000, 1003, 997])
    table = random_compression(300, 200)
    assert_bit_exact(cfg, table, torch.randint(0, 300, shape))


@pytest.mark.parametrize("family", FAMILIES)
def test_largest_id_and_pad(family):
    cfg = EngramConfig(hash=family)
    table = random_compression(129_280, 99_092)
    ids = torch.full((2, 9), 129_279)
    ids[1, ::2] = cfg.pad_id
    ids[0, 0] = 0
    assert_bit_exact(cfg, table, ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "sizes, n, heads, layers",
    [([2, 3], 3, 1, [0]), ([7919, 104729], 3, 4, [3, 0, 7]), ([100, 200, 300, 400], 5, 2, [2, 9]), ([2**31], 2, 2, [1])],
)
def test_odd_table_sizes_and_several_layers(family, sizes, n, heads, layers):
    cfg = EngramConfig(
        hash=family, engram_vocab_size=sizes, max_ngram_size=n, n_head_per_ngram=heads,
        n_embed_per_ngram=heads * 4, layer_ids=layers, seed=12345,
    )
    table = random_compression(5000, 3000)
    assert_bit_exact(cfg, table, torch.randint(0, 5000, (2, 33)))


def test_tiny_vocabulary_gives_huge_multipliers():
    # V' = 2 makes multipliers ~2^62, so products wrap: must match numpy's int64.
    cfg = EngramConfig(pad_id=0)
    table = CompressionTable(torch.tensor([0, 1, 1]))
    assert_bit_exact(cfg, table, torch.randint(0, 3, (2, 64)))


def test_negative_ids_follow_the_reference():
    # Chosen behaviour: negative ids pass through compression unchanged, like
    # the reference release, and hash with floor modulo -- bit-exact with it.
    cfg = EngramConfig()
    table = random_compression(1000, 700)
    ids = torch.randint(-50, 1000, (2, 40))
    ids[0, 3] = -(2**40)
    assert_bit_exact(cfg, table, ids)


def test_non_contiguous_ids():
    cfg = EngramConfig()
    table = random_compression(1000, 700)
    ids = torch.randint(0, 1000, (30, 4)).t()
    assert not ids.is_contiguous()
    got = NgramHasher(cfg, table).hash(ids)
    want = NgramHasher(cfg, table).hash(ids.contiguous())
    for layer_id in cfg.layer_ids:
        assert torch.equal(got[layer_id], want[layer_id])


def test_offsets_option_adds_each_heads_first_row():
    cfg = EngramConfig()
    hasher = NgramHasher(cfg, CompressionTable.identity(1000))
    ids = torch.randint(0, 1000, (2, 17))
    plain, rows = hasher.hash(ids), hasher.hash(ids, with_offsets=True)
    for layer_id in cfg.layer_ids:
        assert torch.equal(rows[layer_id], plain[layer_id] + hasher.offsets(layer_id))
        assert int(rows[layer_id].max()) < hasher.table_rows(layer_id)


def test_fused_pass_equals_per_layer_pass():
    cfg = EngramConfig(layer_ids=[4, 2, 9])
    hasher = NgramHasher(cfg, CompressionTable.identity(1000))
    ids = torch.randint(0, 1000, (2, 50))
    fused = hasher.hash_stacked(ids)
    for i, layer_id in enumerate(cfg.layer_ids):
        assert torch.equal(fused[i], hasher.hash_stacked(ids, [layer_id])[0])


# --------------------------------------------------------------------------
# xxh64: our kernel code against the PyPI xxhash package
# --------------------------------------------------------------------------


def test_xxh64_bit_exact_with_xxhash_package():
    rng = np.random.default_rng(7)
    for length in list(range(0, 80)) + [127, 128, 1000, 4097]:
        data = rng.integers(0, 256, size=length, dtype=np.uint8).tobytes()
        seed = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        assert _engine.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed=seed)


def test_xxh64_ngram_seed_definition():
    # README: seed of (seed, layer id, order) = XXH64 of the three LE int64, seed 0.
    for s, l, n in [(0, 1, 2), (0, 15, 3), (12345, 7, 4)]:
        want = xxhash.xxh64_intdigest(np.array([s, l, n], dtype="<i8").tobytes(), seed=0)
        assert _engine.xxh64_ngram_seed(s, l, n) == want == ref.xxh64_seed(s, l, n)


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------


def hasher_default():
    return NgramHasher(EngramConfig(), CompressionTable.identity(1000))


def test_id_beyond_vocabulary():
    ids = torch.randint(0, 1000, (2, 8))
    ids[1, 5] = 1000
    with pytest.raises(IndexError, match=r"ngram_hash: input_ids holds 1000 at flat index 13; expected values < 1000"):
        hasher_default().hash(ids)


@pytest.mark.parametrize(
    "ids, error, pattern",
    [
        (torch.zeros(2, 3), TypeError, r"ngram_hash: input_ids must be Long, got Float"),
        (torch.zeros(2, 3, dtype=torch.int32), TypeError, r"input_ids must be Long, got Int"),
        (torch.zeros(6, dtype=torch.long), ValueError, r"input_ids must have 2 dims, got shape \[6\]"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, r"input_ids must have 2 dims, got shape \[1, 2, 3\]"),
        (torch.zeros(0, 3, dtype=torch.long), ValueError, r"input_ids has shape \[0, 3\].*B >= 1"),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, r"input_ids has shape \[2, 0\].*T >= 1"),
    ],
)
def test_bad_ids(ids, error, pattern):
    with pytest.raises(error, match=pattern):
        hasher_default().hash(ids)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor, got list"):
        hasher_default().hash([[1, 2, 3]])


def test_mismatched_devices():
    ids = torch.zeros(2, 3, dtype=torch.long)
    lookup = torch.arange(10, device="meta")
    keys = torch.ones(1, 3, dtype=torch.long)
    sizes = torch.full((1, 16), 7, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"lookup is on meta but input_ids is on cpu"):
        engram.ops.ngram_hash(ids, lookup, keys, sizes, None, 2, "deepseek")


def test_op_argument_errors():
    ids = torch.zeros(2, 3, dtype=torch.long)
    lookup = torch.arange(10)
    keys = torch.ones(1, 3, dtype=torch.long)
    sizes = torch.full((1, 16), 7, dtype=torch.long)
    with pytest.raises(ValueError, match="family must be 'deepseek' or 'xxh64', got 'md5'"):
        engram.ops.ngram_hash(ids, lookup, keys, sizes, None, 2, "md5")
    with pytest.raises(IndexError, match=r"pad_id=10 is outside the tokenizer vocabulary \[0, 10\)"):
        engram.ops.ngram_hash(ids, lookup, keys, sizes, None, 10, "deepseek")
    with pytest.raises(ValueError, match=r"head_sizes has shape \[1, 15\]; expected K = \(N-1\)\*H"):
        engram.ops.ngram_hash(ids, lookup, keys, sizes[:, :15], None, 2, "deepseek")
    with pytest.raises(ValueError, match=r"head_sizes holds 0 at flat index 3"):
        engram.ops.ngram_hash(ids, lookup, keys, sizes.index_fill(1, torch.tensor([3]), 0), None, 2, "deepseek")
    with pytest.raises(ValueError, match=r"offsets has shape \[1, 4\]"):
        engram.ops.ngram_hash(ids, lookup, keys, sizes, torch.zeros(1, 4, dtype=torch.long), 2, "deepseek")
    with pytest.raises(ValueError, match=r"keys has shape \[1, 1\], i.e. max n-gram order 1"):
        engram.ops.ngram_hash(ids, lookup, keys[:, :1], sizes, None, 2, "deepseek")


def test_pad_id_outside_vocabulary_in_hasher():
    with pytest.raises(ValueError, match="pad_id=2 is outside the tokenizer vocabulary of 2 ids"):
        NgramHasher(EngramConfig(), CompressionTable.identity(2))


def test_unknown_layer():
    with pytest.raises(KeyError, match="layer_id=3 is not an Engram layer"):
        hasher_default().head_sizes(3)


# --------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------


def test_opcheck_compress_ids():
    lookup = torch.randint(0, 50, (100,))
    for ids in [torch.randint(-3, 100, (4, 9)), torch.randint(0, 100, (7,)), torch.randint(0, 100, (9, 4)).t()]:
        opcheck(torch.ops.engram.compress_ids.default, (ids, lookup))


@pytest.mark.parametrize("family", FAMILIES)
def test_opcheck_ngram_hash(family):
    cfg = EngramConfig(hash=family, engram_vocab_size=[101, 211])
    hasher = NgramHasher(cfg, random_compression(300, 200))
    lookup, keys, sizes, offsets = hasher._params(torch.device("cpu"), cfg.layer_ids)
    for ids, offs in [(torch.randint(0, 300, (2, 11)), None), (torch.randint(0, 300, (1, 2)), offsets)]:
        opcheck(torch.ops.engram.ngram_hash.default, (ids, lookup, keys, sizes, offs, cfg.pad_id, family))
