import pytest

from engram import EngramConfig


def test_reference_defaults():
    cfg = EngramConfig()
    assert cfg.engram_vocab_size == [646400, 646400]
    assert (cfg.max_ngram_size, cfg.n_embed_per_ngram, cfg.n_head_per_ngram) == (3, 512, 8)
    assert (cfg.layer_ids, cfg.pad_id, cfg.seed, cfg.kernel_size, cfg.hash) == ([1, 15], 2, 0, 4, "deepseek")
    assert cfg.head_dim == 64 and cfg.num_heads_total == 16


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(max_ngram_size=1, engram_vocab_size=[]), "max_ngram_size"),
        (dict(n_embed_per_ngram=500), "n_embed_per_ngram"),
        (dict(n_head_per_ngram=0), "n_head_per_ngram"),
        (dict(engram_vocab_size=[646400]), "engram_vocab_size"),
        (dict(engram_vocab_size=[646400, 1]), "engram_vocab_size"),
        (dict(layer_ids=[]), "layer_ids"),
        (dict(layer_ids=[1, 1]), "layer_ids"),
        (dict(layer_ids=[-1]), "layer_ids"),
        (dict(hash="md5"), "hash"),
        (dict(pad_id=-1), "pad_id"),
        (dict(kernel_size=0), "kernel_size"),
    ],
)
def test_nonsense_raises_naming_field_and_value(changes, field):
    with pytest.raises(ValueError, match=rf"EngramConfig\.{field}=") as info:
        EngramConfig(**changes)
    assert repr(list(changes.values())[0]) in str(info.value) or field in str(info.value)


def test_xxh64_family_accepted():
    assert EngramConfig(hash="xxh64").hash == "xxh64"
