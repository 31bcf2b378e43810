"""Trade routed MoE experts for Engram memory at equal parameters (paper §3).

Three tools, for Hugging Face MoE decoders (transformers 5.x Mixtral,
Qwen3-MoE, OLMoE, DeepSeek-V3, built from a config, on the meta device or
loaded) and for a user's own MoE modules that follow :class:`ExpertProtocol`:

* :func:`count_parameters` splits the parameters by the paper's definitions.
  The vocabulary embedding and the LM head are not counted. Routed experts are
  sparse except for the top-k share each token activates; an Engram table is
  sparse except for the K rows each token looks up; everything else (attention,
  norms, routers, shared experts, dense layers, Engram projections, norms and
  conv) is activated.
* :func:`plan` turns a share ``rho`` of the sparse parameters left to routed
  experts into a number of experts per MoE layer and Engram tables of equal
  total size. With ``E`` experts and top-k ``k`` per layer, ``rho = (E' - k) /
  (E - k)``: the paper's Engram-27B keeps 55 of 72 experts at top-6,
  ``rho = 49/66 = 74.2%``. The freed parameters, less the new dense Engram
  parameters, become table rows; the per-head table sizes are the primes the
  project's own search (spec §2) picks above one minimum size per layer.
* :func:`swap_experts_for_engram` applies a plan in place: it slices every
  per-expert tensor down to the kept experts, updates the config's expert
  count and adds the Engram layers with :func:`engram.integrations.add_engram_layers`
  (so ``generate()``, ``save_pretrained`` and
  :func:`engram.integrations.load_pretrained` work as for dense models).

Which experts stay: by default the first ``E'`` of each layer (the rule for a
model trained from scratch, where indices carry no meaning). Pass
``calibration=input_ids`` to keep, per layer, the ``E'`` experts the router
picked most often on that batch (the least routed go; ties keep the lower
index), or ``keep={layer: indices}`` to choose yourself. Kept experts keep
their relative order.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from . import _loader
from .compression import CompressionTable
from .config import EngramConfig
from .layer import EngramLayer
from . import integrations

__all__ = [
    "ExpertProtocol",
    "ParameterCount",
    "MoePlan",
    "SwapReport",
    "count_parameters",
    "engram_dense_parameters",
    "plan",
    "swap_experts_for_engram",
]

_engine = _loader.load("_engine")

# Config fields that hold the routed-expert count, by family (the families'
# attribute_map aliases make num_local_experts work for all four).
_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
_SHARED_NAMES = ("shared_experts", "shared_expert", "shared_expert_gate")
_MARK = "engram_moe"  # config field recording a swap


class ExpertProtocol:
    """What a user's own MoE module implements to take part (duck-typed; no
    need to inherit from this class):

    - ``moe_num_experts() -> int``: routed experts it holds now;
    - ``moe_top_k() -> int``: experts each token is routed to;
    - ``moe_routed_parameters() -> list[nn.Parameter]``: the parameters of
      the routed experts (counted sparse, ``top_k / num_experts`` of them
      activated); anything else in the module counts as activated;
    - ``moe_keep_experts(indices: LongTensor) -> None``: keep only these
      experts (sorted, distinct, in range), in place, router included.
      It runs after every check of the swap passed, so it should not fail.

    ``moe_router_parameters() -> list`` (optional): parameters with one row
    per expert outside the experts (the router's), so that the plan can
    predict what a swap removes; default: none.
    """

    def moe_num_experts(self) -> int:  # pragma: no cover - documentation
        raise NotImplementedError

    def moe_top_k(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def moe_routed_parameters(self) -> List[nn.Parameter]:  # pragma: no cover
        raise NotImplementedError

    def moe_keep_experts(self, indices: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------------
# finding MoE layers
# --------------------------------------------------------------------------


@dataclass
class _MoeLayer:
    index: int  # decoder block index
    name: str  # path of the MoE module inside the block
    module: nn.Module
    kind: str  # "hf" (fused experts + router) or "protocol"
    num_experts: int
    top_k: int
    routed: int  # parameters of the routed experts
    router_per_expert: int  # router parameters per expert (removed with it)

    def shapes(self) -> Dict[str, List[int]]:
        if self.kind == "protocol":
            return {f"{self.name}.routed[{i}]": list(p.shape) for i, p in enumerate(self.module.moe_routed_parameters())}
        out = {}
        for part in ("experts", "gate"):
            for n, t in _per_expert_tensors(getattr(self.module, part), self.num_experts):
                out[f"{self.name}.{part}.{n}"] = list(t.shape)
        return out


def _is_protocol(m: nn.Module) -> bool:
    return all(callable(getattr(m, a, None)) for a in
               ("moe_num_experts", "moe_top_k", "moe_routed_parameters", "moe_keep_experts"))


def _hf_expert_count(m: nn.Module) -> Optional[int]:
    """E for a transformers 5.x sparse MoE block: `experts` with fused 3-D
    per-expert weights and a `gate` router whose weight is [E, H]."""
    experts, gate = getattr(m, "experts", None), getattr(m, "gate", None)
    if not isinstance(experts, nn.Module) or not isinstance(gate, nn.Module):
        return None
    weight = getattr(gate, "weight", None)
    up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
        return None
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (up, down)):
        return None
    e = weight.shape[0]
    return e if up.shape[0] == e and down.shape[0] == e else None


def _per_expert_tensors(module: nn.Module, e: int):
    """(name, tensor) of the module's own parameters and buffers with one slice
    per expert along dim 0 (gate_up_proj, down_proj, biases, the router's
    weight and per-expert buffers such as e_score_correction_bias)."""
    out = []
    for n, p in module.named_parameters(recurse=False):
        if p.dim() >= 1 and p.shape[0] == e:
            out.append((n, p))
    for n, b in module.named_buffers(recurse=False):
        if b is not None and b.dim() >= 1 and b.shape[0] == e:
            out.append((n, b))
    return out


def _top_k(m: nn.Module, model: nn.Module) -> Optional[int]:
    for obj in (getattr(m, "gate", None), m):
        k = getattr(obj, "top_k", None)
        if isinstance(k, int):
            return k
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    return k if isinstance(k, int) else None


def _blocks(model: nn.Module, blocks=None):
    backbone = integrations._backbone(model)
    n_layers = integrations._config_value(model, "num_hidden_layers", "n_layer")
    try:
        return integrations._find_blocks(backbone, n_layers, blocks)
    except ValueError as err:
        raise ValueError(str(err).replace("add_engram_layers", "engram.moe")) from None


def _moe_layers(model: nn.Module, blocks=None, who: str = "engram.moe") -> List[_MoeLayer]:
    _, block_list = _blocks(model, blocks)
    layers = []
    for i, block in enumerate(block_list):
        for name, m in block.named_modules():
            if isinstance(m, EngramLayer):
                continue
            if _is_protocol(m):
                routed = sum(p.numel() for p in m.moe_routed_parameters())
                e, k = int(m.moe_num_experts()), int(m.moe_top_k())
                router = getattr(m, "moe_router_parameters", None)
                per = sum(p.numel() for p in router()) // max(e, 1) if callable(router) else 0
                layers.append(_MoeLayer(i, name, m, "protocol", e, k, routed, per))
                break
            e = _hf_expert_count(m)
            if e is not None:
                k = _top_k(m, model)
                if k is None:
                    raise ValueError(f"{who}: cannot find the top-k of the MoE module {name!r} in block {i}")
                routed = sum(t.numel() for _, t in _per_expert_tensors(m.experts, e)
                             if isinstance(t, nn.Parameter))
                per = sum(t.numel() for _, t in _per_expert_tensors(m.gate, e) if isinstance(t, nn.Parameter)) // e
                layers.append(_MoeLayer(i, name, m, "hf", e, k, routed, per))
                break
    if not layers:
        raise ValueError(
            f"{who}: {type(model).__name__} has no MoE layer: no block holds a module with fused experts "
            "(experts.gate_up_proj / experts.down_proj, [E, ...]) and a router (gate.weight, [E, H]), nor a module "
            "implementing engram.moe.ExpertProtocol (moe_num_experts, moe_top_k, moe_routed_parameters, "
            "moe_keep_experts)"
        )
    return layers


# --------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------


@dataclass
class ParameterCount:
    """Parameter counts by the paper's definitions (embedding and LM head excluded).

    ``total = activated + sparse``; ``routed_experts`` of which
    ``routed_activated`` (top-k of E) are activated; ``engram_table`` of
    which ``engram_table_activated`` (K rows of head_dim per token and layer)
    are activated; ``engram_dense`` (projections, norms, conv) all activated;
    ``shared_experts`` all activated. ``embedding`` is the vocabulary
    embedding plus an untied LM head, reported but not in ``total``.
    """

    total: int
    activated: int
    sparse: int
    routed_experts: int
    routed_activated: int
    shared_experts: int
    engram_table: int
    engram_table_activated: int
    engram_dense: int
    embedding: int

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


def _embedding_params(model: nn.Module) -> set:
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        m = fn() if callable(fn) else None
        if isinstance(m, nn.Module):
            ids.update(id(p) for p in m.parameters())
    return ids


def _engram_counts(layer: EngramLayer):
    table = layer.multi_head_embedding.embedding.weight
    looked_up = layer.config.num_heads_total * layer.config.head_dim
    dense = sum(p.numel() for p in layer.parameters() if p is not table)
    return table.numel(), looked_up, dense


def count_parameters(model: nn.Module, blocks=None) -> ParameterCount:
    """Total, activated-per-token, sparse, routed-expert, shared-expert,
    Engram-table and Engram-dense parameter counts of ``model`` (see
    :class:`ParameterCount`). Works on the meta device (only shapes are read).
    ``blocks``: the decoder blocks' attribute path when not found automatically."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"count_parameters: model must be an nn.Module, got {type(model).__name__}")
    excluded = _embedding_params(model)
    total = embedding = 0
    for p in model.parameters():  # tied parameters once
        if id(p) in excluded:
            embedding += p.numel()
        else:
            total += p.numel()
    routed = routed_act = shared = 0
    for layer in _moe_layers(model, blocks, "count_parameters"):
        routed += layer.routed
        # The exact share top_k / E, summed as integers per layer.
        routed_act += layer.routed * layer.top_k // layer.num_experts
        for name in _SHARED_NAMES:
            sub = getattr(layer.module, name, None)
            if isinstance(sub, nn.Module):
                shared += sum(p.numel() for p in sub.parameters())
            elif isinstance(sub, nn.Parameter):
                shared += sub.numel()
    table = table_act = dense = 0
    for m in model.modules():
        if isinstance(m, EngramLayer):
            t, a, d = _engram_counts(m)
            table, table_act, dense = table + t, table_act + a, dense + d
    activated = total - routed - table + routed_act + table_act
    return ParameterCount(total, activated, total - activated, routed, routed_act, shared, table, table_act, dense,
                          embedding)


def engram_dense_parameters(hidden_size: int, engram_width: int, max_ngram_size: int = 3, kernel_size: int = 4,
                            hc_mult: int = 1) -> int:
    """Parameters of one EngramLayer outside its table: value and key
    projections (with biases), the gate's two RMSNorms per branch and the short
    conv with its RMSNorms. ``engram_width`` is n_embed_per_ngram."""
    d, g = hidden_size, hc_mult
    engram_dim = (max_ngram_size - 1) * engram_width
    return (1 + g) * (engram_dim * d + d) + 2 * g * d + g * d * kernel_size + g * d


# --------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------


@dataclass
class MoePlan:
    """What :func:`plan` decided; apply it with :func:`swap_experts_for_engram`.

    ``experts[layer]``: routed experts each MoE layer keeps (top-k unchanged);
    ``engram_config``: the Engram layers' settings (None at rho = 1);
    ``head_sizes[layer]``: that layer's K prime table sizes;
    ``before`` / ``after``: :class:`ParameterCount` fields of the model before
    the swap and as the swap will leave it; ``total_change`` and
    ``activated_change``: after - before, relative to before.
    """

    rho: float
    rho_effective: float
    model_type: str
    experts_before: Dict[int, int]
    experts: Dict[int, int]
    top_k: Dict[int, int]
    shapes: Dict[int, Dict[str, List[int]]]
    engram_config: Optional[EngramConfig]
    hc_mult: int
    head_sizes: Dict[int, List[int]]
    before: Dict[str, int]
    after: Dict[str, int]
    total_change: float
    activated_change: float
    activated_change_params: int
    replan: bool = False
    blocks: Optional[str] = None

    def summary(self) -> Dict:
        """A JSON-friendly dict of the plan."""
        out = dataclasses.asdict(self)
        out["engram_config"] = None if self.engram_config is None else dataclasses.asdict(self.engram_config)
        return out


def _as_count(model, blocks, replan: bool) -> ParameterCount:
    c = count_parameters(model, blocks)
    if replan:  # as if the existing Engram layers were gone
        removed = c.engram_table + c.engram_dense
        act = c.engram_table_activated + c.engram_dense
        c = ParameterCount(c.total - removed, c.activated - act, c.sparse - (removed - act), c.routed_experts,
                           c.routed_activated, c.shared_experts, 0, 0, 0, c.embedding)
    return c


def _check_swappable(model: nn.Module, replan: bool, who: str) -> None:
    cfg = getattr(model, "config", None)
    swapped = getattr(cfg, _MARK, None) is not None
    if (swapped or getattr(model, "_engram_handles", None) is not None) and not replan:
        what = "was already swapped by engram.moe" if swapped else "already has Engram layers"
        raise ValueError(
            f"{who}: the model {what}; pass replan=True to plan() and swap_experts_for_engram() to remove its "
            "Engram layers and plan again from the experts it has now"
        )


def _table_rows(v: int, heads: int, orders: int, n_layers: int) -> int:
    return sum(sum(p) for p in _engine.head_primes([v] * orders, heads, n_layers))


def plan(
    model: nn.Module,
    rho: float,
    engram_layers: Sequence[int],
    head_dim: Optional[int] = None,
    engram_width: Optional[int] = None,
    max_ngram_size: int = 3,
    kernel_size: int = 4,
    hc_mult: int = 1,
    pad_id: Optional[int] = None,
    seed: int = 0,
    hash: str = "deepseek",
    blocks=None,
    replan: bool = False,
) -> MoePlan:
    """Plan the swap of routed experts for Engram tables at equal total parameters.

    - ``rho`` in (0, 1]: the share of the sparse parameters left to routed
      experts, ``rho = (E' - k) / (E - k)``; ``E'`` is rounded to the nearest
      integer (``rho_effective`` is what it gives). rho = 1 is the model as is.
    - ``engram_layers``: block indices that get an Engram layer.
    - ``engram_width``: n_embed_per_ngram (default: the hidden size);
      ``head_dim``: width of one hashed head (default: width / 8); it must
      divide ``engram_width``.
    - ``max_ngram_size``, ``kernel_size``, ``hc_mult``, ``seed``, ``hash``:
      the Engram settings (:class:`~engram.EngramConfig`); ``pad_id``: default
      the config's pad_token_id, else 0.
    - ``replan``: plan for a model swapped before, from its present experts,
      its Engram layers to be replaced.

    The freed expert and router parameters minus the Engram layers' dense ones
    become table rows, split evenly over the layers; the table's per-head
    sizes are distinct primes (spec §2). Raises ``ValueError`` naming the
    argument and its limit when the plan cannot hold P_tot within 0.5%.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"plan: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0 < rho <= 1) or math.isnan(rho):
        raise ValueError(f"plan: rho={rho!r}; expected a number in (0, 1] (the share of sparse parameters left "
                         "to routed experts; 1 keeps every expert)")
    _check_swappable(model, replan, "plan")
    moe = _moe_layers(model, blocks, "plan")
    blocks_path, block_list = _blocks(model, blocks)
    n_blocks = len(block_list)
    engram_layers = list(engram_layers)
    if not engram_layers or len(set(engram_layers)) != len(engram_layers):
        raise ValueError(f"plan: engram_layers={engram_layers}; expected distinct block indices, at least one")
    bad = [i for i in engram_layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_blocks]
    if bad:
        raise ValueError(f"plan: engram_layers={engram_layers} holds {bad}, outside the model's {n_blocks} blocks "
                         f"(valid: 0..{n_blocks - 1})")
    hidden = integrations._config_value(model, "hidden_size", "n_embd", "d_model")
    if hidden is None:
        raise ValueError("plan: the model's config has no hidden_size; cannot size the Engram layers")
    width = hidden if engram_width is None else engram_width
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"plan: engram_width={engram_width!r}; expected a positive int")
    if head_dim is None:
        if width % 8:
            raise ValueError(f"plan: engram_width={width} is not a multiple of 8; pass head_dim=")
        head_dim = width // 8
    if not isinstance(head_dim, int) or head_dim < 1 or width % head_dim:
        raise ValueError(f"plan: head_dim={head_dim!r} does not divide the Engram width engram_width={width}; "
                         f"expected a divisor of {width}")
    if pad_id is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        vocab = integrations._config_value(model, "vocab_size")
        pad_id = pad if isinstance(pad, int) and (vocab is None or 0 <= pad < vocab) else 0
    before = _as_count(model, blocks, replan)

    # Experts each layer keeps: E' = k + round(rho (E - k)).
    kept, ks, befores = {}, {}, {}
    for layer in moe:
        e, k = layer.num_experts, layer.top_k
        free = e - k
        if free < 1:
            raise ValueError(f"plan: MoE layer {layer.index} has {e} experts at top-k={k}; none is sparse")
        keep_free = int(math.floor(rho * free + 0.5))
        if keep_free < 1:
            raise ValueError(
                f"plan: rho={rho} leaves {k + keep_free} routed experts in layer {layer.index}, which at "
                f"top-k={k} leaves no expert unrouted (at least k + 1 = {k + 1} must stay); "
                f"the smallest rho allowed is {1 / free:.6g}"
            )
        groups = getattr(getattr(layer.module, "gate", None), "num_group", None)
        if isinstance(groups, int) and groups > 1 and (k + keep_free) % groups:
            raise ValueError(
                f"plan: rho={rho} keeps {k + keep_free} experts in layer {layer.index}, not a multiple of the "
                f"router's n_group={groups}; pick a rho whose expert count divides by it"
            )
        kept[layer.index], ks[layer.index], befores[layer.index] = k + keep_free, k, e
    eff = [(kept[l.index] - l.top_k) / (l.num_experts - l.top_k) for l in moe]
    rho_eff = sum(eff) / len(eff)

    removed = sum((l.num_experts - kept[l.index]) * (l.routed // l.num_experts + l.router_per_expert) for l in moe)
    removed_router = sum((l.num_experts - kept[l.index]) * l.router_per_expert for l in moe)
    shapes = {l.index: l.shapes() for l in moe}
    after = dict(before.as_dict())
    after["routed_experts"] = sum(l.routed // l.num_experts * kept[l.index] for l in moe)
    after["routed_activated"] = sum(after_routed * l.top_k // kept[l.index] for l, after_routed in
                                    ((l, l.routed // l.num_experts * kept[l.index]) for l in moe))
    cfg, head_sizes = None, {}
    if removed == 0:
        if rho < 1:
            free = min(l.num_experts - l.top_k for l in moe)
            raise ValueError(f"plan: rho={rho} removes no expert; the largest rho below 1 that removes one is "
                             f"{(free - 1) / free:.6g}")
    else:
        n_l, orders = len(engram_layers), max_ngram_size - 1
        heads = width // head_dim
        dense = n_l * engram_dense_parameters(hidden, width, max_ngram_size, kernel_size, hc_mult)
        target_rows = (removed - dense) // head_dim
        if target_rows < 2 * n_l * orders * heads:
            per_expert = min(l.routed // l.num_experts + l.router_per_expert for l in moe) * len(moe)
            need = -(-(dense + 2 * n_l * orders * heads * head_dim) // per_expert)  # experts to remove per layer
            free = min(l.num_experts - l.top_k for l in moe)
            limit = (free - need) / free
            hint = (f"the largest rho allowed is {limit:.6g}" if limit > 0 else
                    "no rho can: remove fewer Engram layers or narrow engram_width")
            raise ValueError(
                f"plan: rho={rho} frees {removed:,} expert parameters, too few for {n_l} Engram layers' "
                f"{dense:,} dense parameters plus a table; {hint}"
            )
        # Largest per-head minimum size v whose prime tables fit the target, or v+1 if closer.
        lo, hi = 2, max(3, target_rows // (n_l * orders * heads) + 2)
        while _table_rows(hi, heads, orders, n_l) <= target_rows:
            hi *= 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _table_rows(mid, heads, orders, n_l) <= target_rows:
                lo = mid
            else:
                hi = mid
        v = min((lo, hi), key=lambda x: abs(_table_rows(x, heads, orders, n_l) - target_rows))
        cfg = EngramConfig(engram_vocab_size=[v] * orders, max_ngram_size=max_ngram_size,
                           n_embed_per_ngram=width, n_head_per_ngram=heads, layer_ids=engram_layers, pad_id=pad_id,
                           seed=seed, kernel_size=kernel_size, hash=hash)
        primes = _engine.head_primes(cfg.engram_vocab_size, heads, n_l)
        head_sizes = {l: list(p) for l, p in zip(engram_layers, primes)}
        table = sum(sum(p) for p in primes) * head_dim
        after["engram_table"] = table
        after["engram_table_activated"] = n_l * cfg.num_heads_total * head_dim
        after["engram_dense"] = dense
        after["total"] = before.total - removed + table + dense
        after["activated"] = (before.activated - removed_router + dense + after["engram_table_activated"])
        after["sparse"] = after["total"] - after["activated"]
    total_change = (after["total"] - before.total) / before.total
    if abs(total_change) > 0.005:
        raise ValueError(
            f"plan: rho={rho} changes the total parameters by {100 * total_change:+.3f}%, beyond the 0.5% limit "
            "(the table's prime sizes could not match the freed parameters)"
        )
    act_change = after["activated"] - before.activated
    return MoePlan(
        rho=float(rho), rho_effective=rho_eff, model_type=type(model).__name__, experts_before=befores,
        experts=kept, top_k=ks, shapes=shapes, engram_config=cfg, hc_mult=hc_mult, head_sizes=head_sizes,
        before=before.as_dict(), after=after, total_change=total_change,
        activated_change=act_change / before.activated, activated_change_params=act_change, replan=replan,
        blocks=blocks_path,
    )


# --------------------------------------------------------------------------
# the swap
# --------------------------------------------------------------------------


@dataclass
class SwapReport:
    """What :func:`swap_experts_for_engram` did: the kept expert indices per
    MoE layer, the rule that chose them, the Engram layers added and the
    parameter counts measured before and after."""

    kept: Dict[int, List[int]]
    rule: str
    engram_layers: List[int]
    before: Dict[str, int]
    after: Dict[str, int]
    routing_counts: Optional[Dict[int, List[int]]] = None
    extra: Dict = field(default_factory=dict)


def _routing_counts(model: nn.Module, moe: List[_MoeLayer], calibration: torch.Tensor) -> Dict[int, List[int]]:
    counts = {l.index: torch.zeros(l.num_experts, dtype=torch.int64) for l in moe}
    handles = []

    def make_hook(layer):
        def hook(module, args, output):
            idx = output[-1] if isinstance(output, tuple) else output
            counts[layer.index] += torch.bincount(idx.reshape(-1).cpu(), minlength=layer.num_experts)
        return hook

    for l in moe:
        if l.kind != "hf":
            raise ValueError(f"swap_experts_for_engram: calibration= needs a transformers router; layer {l.index} "
                             "is a user module (pass keep= instead)")
        handles.append(l.module.gate.register_forward_hook(make_hook(l)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=calibration)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: v.tolist() for k, v in counts.items()}


def swap_experts_for_engram(
    model: nn.Module,
    plan: MoePlan,
    calibration: Optional[torch.Tensor] = None,
    keep: Optional[Dict[int, Sequence[int]]] = None,
    compression: Optional[CompressionTable] = None,
    replan: bool = False,
) -> SwapReport:
    """Apply ``plan`` to ``model`` in place; returns a :class:`SwapReport`.

    Keeps ``plan.experts[layer]`` routed experts per MoE layer (the first
    ones; with ``calibration`` [B, T] token ids the most routed on it; or the
    indices in ``keep``), slicing every per-expert parameter and buffer of the
    experts and the router, updates the config's expert count, then adds the
    planned Engram layers (``compression``: as in
    :func:`~engram.integrations.add_engram_layers`). Every check runs first: a
    failed swap leaves the model as it was.
    """
    who = "swap_experts_for_engram"
    if not isinstance(plan, MoePlan):
        raise ValueError(f"{who}: plan must be an engram.moe.MoePlan from engram.moe.plan(), got {type(plan).__name__}")
    _check_swappable(model, replan, who)
    if replan and not plan.replan:
        raise ValueError(f"{who}: replan=True needs a plan made with plan(..., replan=True)")
    moe = {l.index: l for l in _moe_layers(model, plan.blocks, who)}
    if set(moe) != set(plan.experts):
        raise ValueError(f"{who}: the plan is for MoE layers {sorted(plan.experts)} but the model has MoE layers "
                         f"{sorted(moe)} (a plan made for another model?)")
    for i, layer in moe.items():
        shapes = layer.shapes()
        if layer.num_experts != plan.experts_before[i] or shapes != plan.shapes[i]:
            raise ValueError(f"{who}: MoE layer {i} does not match the plan: the model has {layer.num_experts} "
                             f"experts with shapes {shapes}, the plan expects {plan.experts_before[i]} with "
                             f"{plan.shapes[i]} (a plan made for another model?)")
    _, block_list = _blocks(model, plan.blocks)
    cfg = plan.engram_config
    if cfg is not None:
        busy = [i for i in cfg.layer_ids if hasattr(block_list[i], "engram") and not replan]
        if busy:
            raise ValueError(f"{who}: blocks {busy} already have an attribute 'engram'")
    if calibration is not None and keep is not None:
        raise ValueError(f"{who}: pass calibration= or keep=, not both")

    # Which experts stay, per layer.
    counts = None
    if keep is not None:
        rule = "given by keep="
        kept = {}
        for i, layer in moe.items():
            if i not in keep:
                raise ValueError(f"{who}: keep= has no entry for MoE layer {i}")
            idx = sorted(int(x) for x in keep[i])
            if len(set(idx)) != plan.experts[i] or not all(0 <= x < layer.num_experts for x in idx):
                raise ValueError(f"{who}: keep[{i}]={list(keep[i])}; expected {plan.experts[i]} distinct indices "
                                 f"in 0..{layer.num_experts - 1}")
            kept[i] = idx
    elif calibration is not None:
        if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.int64:
            raise ValueError(f"{who}: calibration must be an int64 [B, T] tensor of token ids")
        rule = "most routed on the calibration batch (least routed removed; ties keep the lower index)"
        counts = _routing_counts(model, list(moe.values()), calibration)
        kept = {}
        for i in moe:
            order = sorted(range(len(counts[i])), key=lambda e: (-counts[i][e], e))
            kept[i] = sorted(order[: plan.experts[i]])
    else:
        rule = "first n experts of each layer"
        kept = {i: list(range(plan.experts[i])) for i in moe}

    before = count_parameters(model, plan.blocks)
    # Sliced tensors, computed before anything changes.
    changes = []  # (module, name, new tensor, is_parameter)
    for i, layer in moe.items():
        if layer.kind != "hf" or len(kept[i]) == layer.num_experts:
            continue
        ref = layer.module.experts.gate_up_proj
        idx = torch.tensor(kept[i], dtype=torch.int64, device=ref.device)
        for part in ("experts", "gate"):
            sub = getattr(layer.module, part)
            for name, t in _per_expert_tensors(sub, layer.num_experts):
                new = t.detach().index_select(0, idx.to(t.device))
                if isinstance(t, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=t.requires_grad)
                changes.append((sub, name, new, isinstance(t, nn.Parameter)))

    old_engram = None
    if cfg is not None:
        if replan and getattr(model, "_engram_handles", None) is not None:
            meta = dict(model.config.engram)
            old_lookup = getattr(model, integrations._COMPRESSION_MODULE).lookup
            old_layers = integrations.remove_engram_layers(model)
            old_engram = (meta, old_lookup, old_layers)
        try:
            integrations.add_engram_layers(model, cfg, compression=compression, hc_mult=plan.hc_mult,
                                           blocks=plan.blocks)
        except BaseException:
            _undo_engram(model, block_list, cfg.layer_ids)
            if old_engram is not None:
                _restore_engram(model, *old_engram)
            raise

    # Nothing below can fail on checked inputs.
    for sub, name, new, is_param in changes:
        if is_param:
            setattr(sub, name, new)
        else:
            sub._buffers[name] = new
    for i, layer in moe.items():
        n = len(kept[i])
        if layer.kind == "protocol":
            if n != layer.num_experts:
                layer.module.moe_keep_experts(torch.tensor(kept[i], dtype=torch.int64))
            continue
        for obj in (layer.module, layer.module.experts, layer.module.gate):
            if getattr(obj, "num_experts", None) == layer.num_experts:
                obj.num_experts = n
    config = getattr(model, "config", None)
    if config is not None:
        e0 = next(iter(moe.values())).num_experts
        n0 = len(next(iter(kept.values())))
        for name in _EXPERT_COUNT_FIELDS:
            if getattr(config, name, None) == e0:
                setattr(config, name, n0)
        if getattr(model, "num_experts", None) == e0:  # *ForCausalLM's copy for the aux loss
            model.num_experts = n0
        setattr(config, _MARK, {"rho": plan.rho, "rho_effective": plan.rho_effective, "kept": {str(k): v for k, v in kept.items()},
                                "experts_before": {str(k): v for k, v in plan.experts_before.items()}, "rule": rule})
    after = count_parameters(model, plan.blocks)
    return SwapReport(kept=kept, rule=rule, engram_layers=[] if cfg is None else list(cfg.layer_ids),
                      before=before.as_dict(), after=after.as_dict(), routing_counts=counts)


def _undo_engram(model: nn.Module, block_list, layer_ids) -> None:
    """Remove whatever a failed add_engram_layers left behind."""
    if getattr(model, "_engram_handles", None) is not None:
        integrations.remove_engram_layers(model)
        return
    for i in layer_ids:
        if isinstance(getattr(block_list[i], "engram", None), EngramLayer):
            del block_list[i].engram
    if hasattr(model, integrations._COMPRESSION_MODULE):
        delattr(model, integrations._COMPRESSION_MODULE)


def _restore_engram(model: nn.Module, meta: Dict, lookup: torch.Tensor, layers: Dict[int, EngramLayer]) -> None:
    integrations.add_engram_layers(model, EngramConfig(**meta["config"]), layer_ids=meta["layer_ids"],
                                   compression=CompressionTable(lookup.cpu()), hc_mult=meta["hc_mult"],
                                   blocks=meta.get("blocks"))
    for i, new in integrations.engram_layers(model).items():
        new.load_state_dict(layers[i].state_dict())
