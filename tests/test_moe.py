"""engram.moe: parameter accounting, planning and the expert-for-Engram swap
on tiny transformers 5.x MoE models (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3)
built from configs, a meta-device DeepSeek-V3-shaped 27B model, and a user
MoE module that follows the protocol. Offline: nothing is downloaded."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from engram import EngramConfig, EngramLayer, moe  # noqa: E402
from engram import integrations  # noqa: E402
from engram.reference import is_prime  # noqa: E402

H, I, MOE_I, V, L, E, K = 32, 64, 16, 128, 3, 8, 2
SMALL = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, eos_token_id=None, bos_token_id=None)


def make_config(family: str):
    if family == "mixtral":
        return transformers.MixtralConfig(**SMALL, num_local_experts=E, num_experts_per_tok=K)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**SMALL, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=MOE_I,
                                           head_dim=8)
    if family == "olmoe":
        return transformers.OlmoeConfig(**SMALL, num_experts=E, num_experts_per_tok=K)
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **SMALL, n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=MOE_I, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    raise AssertionError(family)


FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"]


def make_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(family)).eval()
    # Routers of some families start at zero (every expert ties); random rows
    # make routing, and so the calibration rule, meaningful.
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.weight.normal_(0, 0.5)
                m.e_score_correction_bias.copy_(torch.randn_like(m.e_score_correction_bias))
            elif type(m).__name__.endswith("Router"):
                m.weight.normal_(0, 0.5)
    return model


def plan_small(model, rho=0.5, **kw):
    kw.setdefault("engram_layers", [0, 2])
    kw.setdefault("engram_width", 16)
    kw.setdefault("head_dim", 4)
    return moe.plan(model, rho, **kw)


# --------------------------------------------------------------------------
# accounting, against counts written out by hand
# --------------------------------------------------------------------------

ATTN_GQA = H * H + 2 * (H // 4 * 2) * H + H * H  # q, k, v (2 kv heads of 8), o
NORMS = 2 * H  # input and post-attention RMSNorm per block


def hand_count(family):
    """(total, activated, routed, shared) by hand for the configs above."""
    if family in ("mixtral", "olmoe"):
        expert = 3 * H * I  # gate, up, down of the intermediate size
        attn = ATTN_GQA + (H + H // 4 * 2 if family == "olmoe" else 0)  # OLMoE: q_norm [32], k_norm [16]
        block_dense = attn + NORMS + E * H  # + router
        routed = L * E * expert
        total = L * (block_dense + E * expert) + H  # + final norm
        return total, total - routed + L * K * expert, routed, 0
    if family == "qwen3_moe":
        expert = 3 * H * MOE_I
        attn = ATTN_GQA + 2 * 8  # q_norm, k_norm of head_dim 8
        routed = L * E * expert
        total = L * (attn + NORMS + E * H + E * expert) + H
        return total, total - routed + L * K * expert, routed, 0
    # DeepSeek-V3: MLA attention; block 0 dense, blocks 1-2 MoE with one shared expert.
    heads, nope, rope, v_dim, kv_rank = 4, 4, 4, 8, 16
    attn = (H * heads * (nope + rope) + H * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v_dim)
            + heads * v_dim * H)
    expert, shared = 3 * H * MOE_I, 3 * H * MOE_I
    routed = 2 * E * expert
    total = (attn + NORMS + 3 * H * I) + 2 * (attn + NORMS + E * H + E * expert + shared) + H
    return total, total - routed + 2 * K * expert, routed, 2 * shared


@pytest.mark.parametrize("family", FAMILIES)
def test_count_parameters_matches_hand_count(family):
    model = make_model(family)
    c = moe.count_parameters(model)
    total, activated, routed, shared = hand_count(family)
    assert (c.total, c.activated, c.routed_experts, c.shared_experts) == (total, activated, routed, shared)
    assert c.sparse == total - activated
    assert c.routed_activated == routed * K // E
    assert c.engram_table == c.engram_dense == c.engram_table_activated == 0
    # Embedding and LM head are outside the total (untied here: two tables).
    assert c.embedding == 2 * V * H
    assert c.total + c.embedding == sum(p.numel() for p in model.parameters())


def test_engram_dense_formula_matches_a_layer():
    for width, heads, n, k, g in [(16, 4, 3, 4, 1), (24, 3, 2, 3, 2), (32, 8, 4, 2, 1)]:
        cfg = EngramConfig(engram_vocab_size=[53] * (n - 1), max_ngram_size=n, n_embed_per_ngram=width,
                           n_head_per_ngram=heads, layer_ids=[0], kernel_size=k)
        layer = EngramLayer(cfg, 0, H, hc_mult=g)
        table = layer.multi_head_embedding.embedding.weight
        dense = sum(p.numel() for p in layer.parameters() if p is not table)
        assert moe.engram_dense_parameters(H, width, n, k, g) == dense


# --------------------------------------------------------------------------
# plan + swap on the four families
# --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rho", [2 / 3, 0.5, 1 / 6])
def test_plan_and_swap(family, rho):
    model = make_model(family)
    before = moe.count_parameters(model)
    p = plan_small(model, rho)
    kept = K + round(rho * (E - K))
    assert set(p.experts.values()) == {kept} and p.rho_effective == pytest.approx((kept - K) / (E - K))
    assert abs(p.after["total"] - before.total) <= 0.005 * before.total
    # Per-head primes, distinct over all layers, from the project's search.
    primes = [q for sizes in p.head_sizes.values() for q in sizes]
    assert all(is_prime(q) for q in primes) and len(set(primes)) == len(primes) == 2 * 2 * 4
    # P_act changes only by Engram's dense parameters and K looked-up rows per
    # layer, less the removed router rows.
    moe_layers = len(p.experts)
    engram_act = 2 * (moe.engram_dense_parameters(H, 16) + 2 * 16)
    assert p.activated_change_params == engram_act - moe_layers * (E - kept) * H

    report = moe.swap_experts_for_engram(model, p)
    after = moe.count_parameters(model)
    assert after.as_dict() == p.after == report.after
    assert after.routed_activated == before.routed_activated
    layers = integrations.engram_layers(model)
    assert sorted(layers) == [0, 2]
    for i, layer in layers.items():
        assert layer.hasher.head_sizes(i) == p.head_sizes[i]
    ids = torch.randint(1, V, (2, 9))
    assert torch.isfinite(model(ids).logits).all()
    assert model.config.num_local_experts == kept


@pytest.mark.parametrize("family", FAMILIES)
def test_swap_keeps_the_chosen_expert_slices(family):
    model = make_model(family)
    original = copy.deepcopy(model)
    p = plan_small(model, 0.5)
    keep = {i: [1, 2, 4, 6, 7] for i in p.experts}
    moe.swap_experts_for_engram(model, p, keep=keep)
    for i in p.experts:
        new, old = model.model.layers[i].mlp, original.model.layers[i].mlp
        idx = torch.tensor(keep[i])
        assert torch.equal(new.experts.gate_up_proj, old.experts.gate_up_proj[idx])
        assert torch.equal(new.experts.down_proj, old.experts.down_proj[idx])
        assert torch.equal(new.gate.weight, old.gate.weight[idx])
        if hasattr(old.gate, "e_score_correction_bias"):
            assert torch.equal(new.gate.e_score_correction_bias, old.gate.e_score_correction_bias[idx])
        assert new.gate.num_experts == new.experts.num_experts == 5
        if family == "deepseek_v3":
            # Sigmoid router: a -1e9 correction bias on the dropped experts
            # excludes them from the original block exactly, so both compute the same.
            x = torch.randn(1, 4, H)
            with torch.no_grad():
                dropped = torch.tensor([e for e in range(E) if e not in keep[i]])
                old.gate.e_score_correction_bias[dropped] = -1e9
                assert torch.allclose(new(x), old(x), atol=1e-6)


def test_calibration_keeps_the_most_routed_experts():
    model = make_model("mixtral")
    p = plan_small(model, 0.5)
    ids = torch.randint(1, V, (4, 16))
    counts = {}

    def hook(i):
        def f(module, args, out):
            counts[i] = counts.get(i, 0) + torch.bincount(out[2].flatten(), minlength=E)
        return f

    handles = [model.model.layers[i].mlp.gate.register_forward_hook(hook(i)) for i in range(L)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    report = moe.swap_experts_for_engram(model, p, calibration=ids)
    for i in range(L):
        assert report.routing_counts[i] == counts[i].tolist()
        dropped = set(range(E)) - set(report.kept[i])
        # Every kept expert was routed at least as often as every dropped one.
        assert min(counts[i][report.kept[i]].tolist()) >= max(counts[i][sorted(dropped)].tolist())


def test_plan_on_meta_deepseek_v3_27b():
    """Engram-27B's shape (paper §3): ~26 B total, ~3.5 B active, 72 routed
    experts at top-6 plus 2 shared; rho = 74.3% keeps 55; built on meta."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=129280, hidden_size=2560, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=32, num_key_value_heads=32, n_routed_experts=72, num_experts_per_tok=6,
        n_shared_experts=2, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=768, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, pad_token_id=2)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    c = moe.count_parameters(model)
    assert 25.5e9 < c.total < 26.7e9 and 3.3e9 < c.activated < 3.7e9
    p = moe.plan(model, 0.743, engram_layers=[1, 14], engram_width=1280, head_dim=160)
    assert set(p.experts.values()) == {55}
    assert abs(p.total_change) <= 0.005
    assert 0 < p.activated_change <= 0.01
    assert 5.5e9 < p.after["engram_table"] < 6.0e9
    report = moe.swap_experts_for_engram(model, p)
    assert report.after == p.after
    assert all(t.device.type == "meta" for t in model.parameters())
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape == (55, 2 * 1536, 2560)


# --------------------------------------------------------------------------
# errors, and nothing changes on a failed swap
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0, -0.1, 1.5, float("nan"), "0.5", True])
def test_rho_out_of_range(rho):
    with pytest.raises(ValueError, match=r"rho=.*\(0, 1\]"):
        plan_small(make_model("mixtral"), rho)


def test_rho_too_small_names_the_smallest_allowed():
    with pytest.raises(ValueError, match=r"rho=0.05 leaves 2 routed experts.*top-k=2.*smallest rho allowed is 0.166667"):
        plan_small(make_model("mixtral"), 0.05)


def test_rho_too_close_to_one():
    with pytest.raises(ValueError, match=r"rho=0.95 removes no expert; the largest rho below 1 that removes one"):
        plan_small(make_model("mixtral"), 0.95)
    # Qwen3-MoE's experts are small: one expert does not pay for the Engram
    # layers' projections at this width.
    with pytest.raises(ValueError, match=r"rho=0.8 frees .* too few .*dense parameters.*largest rho allowed is"):
        plan_small(make_model("qwen3_moe"), 0.8, engram_width=32, head_dim=4)


def test_bad_layers_and_head_dim():
    model = make_model("olmoe")
    with pytest.raises(ValueError, match=r"engram_layers=\[0, 3\] holds \[3\], outside the model's 3 blocks"):
        plan_small(model, engram_layers=[0, 3])
    with pytest.raises(ValueError, match=r"engram_layers=\[-1\] holds \[-1\]"):
        plan_small(model, engram_layers=[-1])
    with pytest.raises(ValueError, match=r"head_dim=5 does not divide the Engram width engram_width=16"):
        plan_small(model, head_dim=5)


def test_non_moe_model_names_what_is_missing():
    cfg = transformers.LlamaConfig(**SMALL)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"has no MoE layer.*experts.gate_up_proj.*ExpertProtocol"):
        moe.count_parameters(model)
    with pytest.raises(ValueError, match="has no MoE layer"):
        plan_small(model)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict(),
            {n for n, _ in model.named_modules()})


def assert_unchanged(model, snap):
    state, config, names = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert model.config.to_dict() == config
    assert {n for n, _ in model.named_modules()} == names
    assert getattr(model, "_engram_handles", None) is None


def test_plan_for_another_model_names_the_layer():
    p = plan_small(make_model("mixtral"), 0.5)
    other = transformers.AutoModelForCausalLM.from_config(
        transformers.MixtralConfig(**dict(SMALL, intermediate_size=48), num_local_experts=E, num_experts_per_tok=K))
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"MoE layer 0 does not match the plan"):
        moe.swap_experts_for_engram(other, p)
    assert_unchanged(other, snap)
    other = make_model("qwen3_moe")
    with pytest.raises(ValueError, match=r"MoE layer 0 does not match the plan"):
        moe.swap_experts_for_engram(other, p)


def test_failed_swap_leaves_the_model_as_it_was(monkeypatch):
    model = make_model("deepseek_v3")
    p = plan_small(model, 0.5)
    snap = snapshot(model)
    calls = []
    real = integrations.EngramLayer.__init__

    def failing(self, config, layer_id, *args, **kwargs):
        calls.append(layer_id)
        if len(calls) == 2:  # the first layer is already in place when the second fails
            raise RuntimeError("out of memory (simulated)")
        real(self, config, layer_id, *args, **kwargs)

    monkeypatch.setattr(integrations.EngramLayer, "__init__", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        moe.swap_experts_for_engram(model, p)
    assert calls == [0, 2]
    assert_unchanged(model, snap)
    monkeypatch.setattr(integrations.EngramLayer, "__init__", real)
    # Bad keep= is refused before anything changes, too.
    with pytest.raises(ValueError, match=r"keep\[1\]=\[0, 1\]; expected 5 distinct"):
        moe.swap_experts_for_engram(model, p, keep={1: [0, 1], 2: [0, 1, 2, 3, 4]})
    assert_unchanged(model, snap)
    moe.swap_experts_for_engram(model, p)  # and the same plan still applies


def test_swapping_twice_needs_replan():
    model = make_model("mixtral")
    p = plan_small(model, 0.8)
    moe.swap_experts_for_engram(model, p)
    with pytest.raises(ValueError, match="already swapped by engram.moe; pass replan=True"):
        moe.swap_experts_for_engram(model, p)
    with pytest.raises(ValueError, match="already swapped"):
        plan_small(model, 0.5)
    # Re-plan from the 7 experts left: 2 + round(0.5 * 5) = 4 (round half to even: 2.5 -> 3 with floor(x+.5)).
    p2 = plan_small(model, 0.5, replan=True)
    assert set(p2.experts.values()) == {2 + 3}
    moe.swap_experts_for_engram(model, p2, replan=True)
    assert moe.count_parameters(model).as_dict() == p2.after
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 5


# --------------------------------------------------------------------------
# save / load, generate
# --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_save_load_round_trip(family, tmp_path):
    model = make_model(family)
    moe.swap_experts_for_engram(model, plan_small(model, 0.5), calibration=torch.randint(1, V, (2, 12)))
    with torch.no_grad():
        for layer in integrations.engram_layers(model).values():
            layer.multi_head_embedding.embedding.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = integrations.load_pretrained(type(model), str(tmp_path))
    assert loaded.config.num_local_experts == 5
    assert loaded.config.engram_moe["kept"] == {str(k): v for k, v in model.config.engram_moe["kept"].items()}
    ids = torch.randint(1, V, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert moe.count_parameters(loaded).as_dict() == moe.count_parameters(model).as_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_and_without_cache(family):
    model = make_model(family)
    moe.swap_experts_for_engram(model, plan_small(model, 0.5))
    ids = torch.randint(1, V, (2, 6))
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# --------------------------------------------------------------------------
# a user's own MoE module
# --------------------------------------------------------------------------


class UserMoE(nn.Module):
    """Experts as a ModuleList and a linear router: implements the protocol."""

    def __init__(self, hidden, inner, experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, inner), nn.SiLU(), nn.Linear(inner, hidden))
                                     for _ in range(experts))

    def moe_num_experts(self):
        return len(self.experts)

    def moe_top_k(self):
        return self.top_k

    def moe_routed_parameters(self):
        return list(self.experts.parameters())

    def moe_router_parameters(self):
        return [self.router.weight]

    def moe_keep_experts(self, indices):
        self.experts = nn.ModuleList(self.experts[i] for i in indices.tolist())
        self.router.weight = nn.Parameter(self.router.weight.detach()[indices])

    def forward(self, x):
        w, idx = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for j in range(self.top_k):
            for e, expert in enumerate(self.experts):
                mask = (idx[..., j] == e).unsqueeze(-1)
                out = out + mask * w[..., j : j + 1] * expert(x)
        return out


class UserBlock(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.norm = nn.RMSNorm(hidden)
        self.moe = UserMoE(hidden, 24, 6, 2)

    def forward(self, x):
        return x + self.moe(self.norm(x))


class UserConfig:
    hidden_size, vocab_size, num_hidden_layers = 16, 50, 2


class UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = UserConfig()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(UserBlock(16) for _ in range(2))
        self.head = nn.Linear(16, 50, bias=False)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        return self.head(x)


def test_user_module_protocol():
    torch.manual_seed(0)
    model = UserModel()
    c = moe.count_parameters(model)
    expert = 16 * 24 + 24 + 24 * 16 + 16
    assert c.routed_experts == 2 * 6 * expert
    assert c.total == 2 * (16 + 6 * 16 + 6 * expert)
    assert c.activated == c.total - 2 * 4 * expert
    p = moe.plan(model, 0.5, engram_layers=[1], engram_width=8, head_dim=2)
    assert p.experts == {0: 4, 1: 4}
    report = moe.swap_experts_for_engram(model, p)
    assert [len(b.moe.experts) for b in model.layers] == [4, 4]
    assert moe.count_parameters(model).as_dict() == p.after == report.after
    assert model(torch.randint(0, 50, (2, 7))).shape == (2, 7, 50)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_assisted_generation_matches_greedy(family, monkeypatch):
    """A draft model proposes tokens, the swapped model verifies them and its
    cache is cropped to the accepted ones: the Engram layers must roll back
    their token history and block inputs too."""
    model = make_model(family)
    moe.swap_experts_for_engram(model, plan_small(model, 0.5))
    torch.manual_seed(5)
    draft = transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen3MoeConfig(**dict(SMALL, num_hidden_layers=1), num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=16, head_dim=8)).eval()
    rolled = []
    real = integrations._roll_back
    monkeypatch.setattr(integrations, "_roll_back", lambda ctx, past: (rolled.append(past), real(ctx, past)))
    ids = torch.randint(1, V, (1, 7))
    greedy = model.generate(ids, max_new_tokens=16, do_sample=False)
    assisted = model.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=draft)
    assert rolled, "the draft's tokens were never rejected; the test would not exercise the roll-back"
    assert torch.equal(greedy, assisted)


# --------------------------------------------------------------------------
# the examples' --quick runs (CI)
# --------------------------------------------------------------------------


def load_example(name):
    import importlib.util
    import os

    pytest.importorskip("tokenizers", reason="the examples train a BPE tokenizer on the stdlib source")
    pytest.importorskip("tqdm", reason="the examples show a progress bar")
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_allocation_sweep_quick(tmp_path):
    import json
    import math

    result = load_example("allocation_sweep").main(["--out", str(tmp_path), "--quick"])
    saved = json.loads((tmp_path / "allocation.json").read_text())
    assert saved["points"] == json.loads(json.dumps(result["points"]))
    rhos = [q["rho"] for q in saved["points"]]
    assert rhos == [1.0, 0.8, 0.4]
    ref = saved["reference_accounting"]
    for q in saved["points"]:
        assert abs(q["accounting"]["total"] - ref["total"]) <= 0.005 * ref["total"]
        assert q["accounting"]["total"] == (q["plan"]["after"]["total"] if q["plan"] else ref["total"])
        assert len(q["val_loss_per_seed"]) == 2 and all(math.isfinite(v) for v in q["val_loss_per_seed"])
        assert len(q["runs"]) == 2 and all(r["train_seconds"] > 0 for r in q["runs"])
    assert saved["points"][0]["accounting"]["engram_table"] == 0
    assert saved["points"][-1]["experts"] < saved["points"][1]["experts"] < saved["points"][0]["experts"]
    if _has_matplotlib():
        assert (tmp_path / "allocation.png").stat().st_size > 0


def test_memory_scaling_quick(tmp_path):
    import json

    load_example("memory_scaling").main(["--out", str(tmp_path), "--quick"])
    saved = json.loads((tmp_path / "memory_scaling.json").read_text())
    slots = [q["slots"] for q in saved["points"]]
    assert len(slots) >= 5 and slots == sorted(slots) and slots[-1] >= 30 * slots[0]
    # Equal dense parameters at every size; only the table grows.
    dense = {q["accounting"]["total"] - q["accounting"]["engram_table"] for q in saved["points"]}
    control = saved["controls"]["one_row_per_head"]["accounting"]
    assert dense == {control["total"] - control["engram_table"]}
    assert saved["controls"]["one_row_per_head"]["slots"] == 8  # 2 orders x 4 heads, one row each
    assert saved["controls"]["no_engram"]["accounting"]["engram_dense"] == 0
    assert {"exponent", "r2", "prefactor"} <= set(saved["fit"])
    if _has_matplotlib():
        assert (tmp_path / "memory_scaling.png").stat().st_size > 0


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
