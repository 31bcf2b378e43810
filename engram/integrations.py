"""Engram layers in existing models, without editing the models' code.

Two tools:

* :func:`add_engram_layers` puts :class:`~engram.EngramLayer` s into a Hugging
  Face ``transformers`` decoder (Llama, GPT-2, Mistral, Qwen, ... built from a
  config or loaded from a checkpoint) at chosen block indices. Each layer
  becomes a submodule ``<block>.engram`` and updates the residual stream at the
  start of its block, ``hidden = hidden + engram(hidden, input_ids)``, as the
  reference release places it. ``input_ids`` reach the blocks through forward
  pre-hooks: one on the backbone stashes the ids of the call, one per chosen
  block adds the Engram update to the block's input. ``generate()`` works with
  and without the KV cache: with a cache the backbone sees only the new tokens,
  so each Engram layer keeps the last few token ids and block inputs it needs
  (N-1 ids for the n-gram hash, (kernel_size-1)*N positions for the short
  convolution) and recomputes exactly what a full forward would.

  The hooks pass ids from the backbone's call to its blocks, so run each
  forward's backward before the next forward when gradient checkpointing
  recomputes blocks (the usual training loop does).

  Saving: ``model.save_pretrained(dir)`` stores the Engram weights, the
  compression table (as the buffer ``engram_compression.lookup``) and the
  Engram settings (``config.engram``); :func:`load_pretrained` rebuilds the
  model from that folder. A plain ``state_dict`` also works: build the same
  model, call :func:`add_engram_layers` with the same arguments, then
  ``load_state_dict``.

* :func:`record_gates` records the gate values (spec §5) of every Engram layer
  in any module during a forward pass, for plots such as the gate heat map.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .compression import CompressionTable
from .config import EngramConfig
from .layer import EngramLayer

__all__ = [
    "add_engram_layers",
    "remove_engram_layers",
    "engram_layers",
    "load_pretrained",
    "engram_gates",
    "record_gates",
]

# Attribute names of the decoder-block list in common transformers models.
_BLOCK_PATHS = ("layers", "h", "blocks", "decoder.layers", "transformer.h", "model.layers")
_COMPRESSION_MODULE = "engram_compression"
# Names a backbone's forward takes its KV cache under: transformers renamed
# past_key_values to cache during 5.x (and keeps the old name as an alias).
_CACHE_ARGUMENTS = ("cache", "past_key_values")


# --------------------------------------------------------------------------
# gates
# --------------------------------------------------------------------------


def engram_gates(layer: EngramLayer, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The gate of ``layer`` for these inputs: ``[B, T, G]`` values in (0, 1)
    (``EngramLayer.gate``; spec §5)."""
    if not isinstance(layer, EngramLayer):
        raise TypeError(f"engram_gates: layer must be an EngramLayer, got {type(layer).__name__}")
    return layer.gate(hidden_states, input_ids)


@contextlib.contextmanager
def record_gates(model: nn.Module) -> Iterator[Dict[int, torch.Tensor]]:
    """Record the gates of every EngramLayer in ``model`` during the forward
    passes inside the block: yields a dict ``{layer_id: [B, T, G]}`` (the last
    call of each layer wins; values are detached).

        with record_gates(model) as gates:
            model(ids)
        gates[1]  # [B, T, G]
    """
    gates: Dict[int, torch.Tensor] = {}
    handles = []

    def hook(layer: EngramLayer, args, kwargs) -> None:
        names = ("hidden_states", "input_ids")
        bound = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
        with torch.no_grad():
            gates[layer.layer_id] = engram_gates(layer, bound["hidden_states"], bound["input_ids"]).detach()

    layers = [m for m in model.modules() if isinstance(m, EngramLayer)]
    if not layers:
        raise ValueError(f"record_gates: {type(model).__name__} holds no EngramLayer")
    try:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        yield gates
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------
# Hugging Face integration
# --------------------------------------------------------------------------


class _CompressionBuffer(nn.Module):
    """Holds the compression lookup as a persistent buffer so that
    save_pretrained / state_dict carry it next to the Engram weights (the
    hash parameters depend on it)."""

    def __init__(self, lookup: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("lookup", lookup.clone())


class _Context:
    """Per-model state shared by the hooks: the token ids of the current call
    (with the history a KV cache implies) and, per Engram layer, the tail of
    block inputs an incremental call needs."""

    def __init__(self, config: EngramConfig) -> None:
        n, k = config.max_ngram_size, config.kernel_size
        # The conv output at t reads values back to t-(k-1)*n; each value's
        # hash reads ids back n-1 further. Recomputing over this window makes an
        # incremental step equal to the full forward.
        self.window = (k - 1) * n + (n - 1)
        # Assisted generation crops the cache back by up to the drafted tokens
        # of the last call; tails keep that many extra positions (at most this).
        self.rollback_limit = 256
        self.ids: Optional[torch.Tensor] = None  # [B, past + t] tokens of the sequences in flight
        self.past = 0  # tokens already in the cache for this call
        self.rows: Optional[torch.Tensor] = None  # cache row -> row of the previous call (beam search)
        self.tails: Dict[int, torch.Tensor] = {}  # layer id -> [B, <=window, D] block inputs
        self.generate_ids: Optional[torch.Tensor] = None  # full ids stashed by generate()
        self.active = False
        # The KV cache of an incremental call and the argument it came in,
        # checked after the backbone ran (see _make_backbone_check).
        self.cache = None
        self.cache_argument = ""
        # A cache given to the outer model (e.g. *ForCausalLM), which must
        # reach the backbone.
        self.outer_cache = None
        self.outer_cache_argument = ""


class _Handles:
    def __init__(self) -> None:
        self.hooks: list = []
        self.context: Optional[_Context] = None
        self.layer_ids: List[int] = []
        self.blocks_path = ""


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _find_blocks(backbone: nn.Module, n_layers: Optional[int], blocks) -> tuple:
    if isinstance(blocks, nn.ModuleList):
        for name, m in backbone.named_modules():
            if m is blocks:
                return name, m
        raise ValueError("add_engram_layers: blocks= is not a submodule of the model's backbone")
    if isinstance(blocks, str):
        found = _get_path(backbone, blocks)
        if not isinstance(found, nn.ModuleList):
            raise ValueError(f"add_engram_layers: blocks={blocks!r} is not an nn.ModuleList in {type(backbone).__name__}")
        return blocks, found
    if blocks is not None:
        raise ValueError(f"add_engram_layers: blocks must be None, an attribute path or an nn.ModuleList, got {blocks!r}")
    for path in _BLOCK_PATHS:
        found = _get_path(backbone, path)
        if isinstance(found, nn.ModuleList) and (n_layers is None or len(found) == n_layers):
            return path, found
    lists = [(name, m) for name, m in backbone.named_modules() if isinstance(m, nn.ModuleList)]
    lists = [(name, m) for name, m in lists if n_layers is None or len(m) == n_layers]
    if len(lists) == 1:
        return lists[0]
    raise ValueError(
        f"add_engram_layers: could not find the decoder blocks of {type(backbone).__name__}; pass blocks='attr.path'"
    )


def _backbone(model: nn.Module) -> nn.Module:
    # The module that receives input_ids and runs the blocks (LlamaModel,
    # GPT2Model, ...): hooking it rather than the LM head wrapper also covers
    # calls to the backbone alone.
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _config_value(model: nn.Module, *names: str) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuple caches
        return int(cache[0][0].shape[-2])
    return 0


def _match_rows(prefix: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """For each row of ``prefix`` [B, P], a row of ``history`` [B', P] with the
    same tokens. Beam search reorders and duplicates the cache's rows; rows with
    equal token prefixes have equal block inputs, so any match is exact."""
    if prefix.shape[0] == history.shape[0] and torch.equal(prefix, history):
        return torch.arange(prefix.shape[0], device=prefix.device)
    eq = (prefix[:, None, :] == history[None, :, :]).all(-1)  # [B, B']
    if not bool(eq.any(-1).all()):
        raise RuntimeError(
            "Engram: the tokens before the new ones do not match any sequence the model saw earlier with this cache; "
            "run the model on the full sequence (no cache) first"
        )
    return eq.float().argmax(-1)


def _roll_back(ctx: _Context, past: int) -> None:
    """The cache was cropped to ``past`` tokens (assisted generation rejected
    drafted ones): forget the rejected ids and block inputs, so that hashing
    and the conv see only accepted tokens."""
    drop = ctx.ids.shape[1] - past
    for layer_id, tail in ctx.tails.items():
        if tail.shape[1] - drop < min(ctx.window, past):
            raise RuntimeError(
                f"Engram: the KV cache was cropped by {drop} tokens, more than the {tail.shape[1] - ctx.window} "
                f"the Engram layers can roll back; call the model on the whole sequence instead"
            )
    ctx.ids = ctx.ids[:, :past]
    ctx.tails = {l: t[:, : t.shape[1] - drop] for l, t in ctx.tails.items()}


def _make_backbone_hook(ctx: _Context, forward_sig: inspect.Signature):
    def hook(module, args, kwargs):
        try:
            bound = forward_sig.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        extra = bound.get("kwargs", {}) if isinstance(bound.get("kwargs"), dict) else {}
        ids = bound.get("input_ids")
        if ids is None:
            raise ValueError(
                "Engram layers need input_ids: the model was called with inputs_embeds only "
                "(the n-gram hash reads token ids)"
            )
        cache, ctx.cache_argument = None, ""
        for name in _CACHE_ARGUMENTS:
            found = bound.get(name, extra.get(name))
            if found is not None:
                cache, ctx.cache_argument = found, name
                break
        past = _cache_length(cache)
        outer, ctx.outer_cache = ctx.outer_cache, None
        if cache is None and _cache_length(outer) > 0:
            raise RuntimeError(
                f"Engram: the KV cache passed to the model as {ctx.outer_cache_argument!r} never reached "
                f"{type(module).__name__} (transformers {_transformers_version()} takes it under another name); "
                "the model would decode without it, so Engram refuses the call"
            )
        ctx.cache = cache if past > 0 else None
        full, ctx.generate_ids = ctx.generate_ids, None
        if past == 0:
            ctx.ids, ctx.rows, ctx.tails = ids, None, {}
        else:
            if ctx.ids is not None and past < ctx.ids.shape[1]:
                _roll_back(ctx, past)
            if ctx.ids is None or ctx.ids.shape[1] != past:
                seen = 0 if ctx.ids is None else ctx.ids.shape[1]
                raise RuntimeError(
                    f"Engram: the model was called with a cache of {past} tokens but its Engram layers have seen "
                    f"{seen}; call the model on the whole sequence first and keep feeding the same cache"
                )
            if full is not None and full.shape == (ids.shape[0], past + ids.shape[1]):
                rows = _match_rows(full[:, :past], ctx.ids)
            elif ctx.ids.shape[0] == ids.shape[0]:
                rows = torch.arange(ids.shape[0], device=ids.device)
            else:
                raise RuntimeError(
                    f"Engram: batch size changed from {ctx.ids.shape[0]} to {ids.shape[0]} while reusing the cache"
                )
            ctx.ids, ctx.rows = torch.cat([ctx.ids[rows], ids], dim=1), rows
        ctx.past = past
        ctx.active = True

    return hook


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:  # a backbone from elsewhere
        return "not installed"
    return transformers.__version__


def _make_outer_hooks(ctx: _Context):
    """Hooks on the outer model (the *ForCausalLM around the backbone) that
    note a cache it was given, so that the backbone hook can tell when the
    outer model dropped it (an argument name this version does not take)."""

    def before(module, args, kwargs):
        ctx.outer_cache, ctx.outer_cache_argument = None, ""
        for name in _CACHE_ARGUMENTS:
            if kwargs.get(name) is not None:
                ctx.outer_cache, ctx.outer_cache_argument = kwargs[name], name
                break

    def after(module, args, kwargs, output):
        ctx.outer_cache = None

    return before, after


def _make_backbone_check(ctx: _Context, forward_sig: inspect.Signature):
    """After an incremental call, the cache the Engram layers followed must
    have grown by the new tokens. If it did not, the backbone ignored it (a
    transformers version that takes the cache under another argument name):
    its attention saw only the new tokens while the Engram layers saw the whole
    history, so the output is neither the cached continuation nor a fresh
    forward. Refuse it instead of returning wrong logits."""
    declared = [name for name in _CACHE_ARGUMENTS if name in forward_sig.parameters]

    def hook(module, args, kwargs, output):
        cache, ctx.cache = ctx.cache, None
        if cache is None or not hasattr(cache, "get_seq_length"):
            return None
        if int(cache.get_seq_length()) == ctx.past:
            expected = f"takes its KV cache as {declared[0]!r}" if declared else "declares no KV cache argument"
            raise RuntimeError(
                f"Engram: {type(module).__name__} ignored the KV cache passed as {ctx.cache_argument!r} "
                f"(transformers {_transformers_version()}: its forward {expected}); its output would not be the cached "
                "continuation, so Engram refuses it. Pass the cache under the argument the model takes, "
                "or call the model on the whole sequence."
            )
        return None

    return hook


def _make_block_hook(ctx: _Context, layer: EngramLayer):
    layer_id = layer.layer_id

    def hook(block, args, kwargs):
        if not ctx.active or ctx.ids is None:
            raise RuntimeError(
                f"Engram: decoder block {layer_id} ran without the backbone's input_ids; call the model "
                "(or its backbone), not the block directly"
            )
        if args:
            hidden, where = args[0], "arg"
        elif "hidden_states" in kwargs:
            hidden, where = kwargs["hidden_states"], "kwarg"
        else:
            raise RuntimeError(f"Engram: cannot find the hidden states among block {layer_id}'s arguments")
        t = hidden.shape[1]
        if ctx.past == 0:
            ids = ctx.ids
            if ids.shape != hidden.shape[:2]:
                raise RuntimeError(
                    f"Engram: block {layer_id} got hidden states {list(hidden.shape)} for input_ids {list(ids.shape)}"
                )
            update = layer(hidden, ids)
            window_in = hidden
        else:
            previous = ctx.tails.get(layer_id)
            if previous is None:
                raise RuntimeError(f"Engram: block {layer_id} has no cached inputs for this KV cache")
            window_in = torch.cat([previous[ctx.rows].to(hidden.dtype), hidden], dim=1)
            update = layer(window_in, ctx.ids[:, -window_in.shape[1] :])[:, -t:]
        # A copy, not a view: a view would keep the whole block input alive.
        # Not under torch.export: an exported program keeps no state between
        # calls (it takes whole sequences), and the slice's symbolic length
        # would add a guard export cannot prove.
        if not torch.compiler.is_exporting():
            keep = ctx.window + min(t, ctx.rollback_limit)
            ctx.tails[layer_id] = window_in[:, -keep:].detach().clone()
        hidden = hidden + update
        if where == "arg":
            return (hidden,) + tuple(args[1:]), kwargs
        return args, dict(kwargs, hidden_states=hidden)

    return hook


def engram_layers(model: nn.Module) -> Dict[int, EngramLayer]:
    """{block index: EngramLayer} of a model prepared by add_engram_layers."""
    handles = getattr(model, "_engram_handles", None)
    if handles is None:
        return {}
    blocks = _get_path(_backbone(model), handles.blocks_path)
    return {i: blocks[i].engram for i in handles.layer_ids}


def add_engram_layers(
    model: nn.Module,
    config: EngramConfig,
    layer_ids: Optional[Sequence[int]] = None,
    compression: Optional[CompressionTable] = None,
    hc_mult: int = 1,
    blocks=None,
) -> nn.Module:
    """Add an EngramLayer at the start of each chosen decoder block; returns ``model``.

    - ``config``: the Engram settings; ``config.pad_id`` must be a token id of
      the model's vocabulary.
    - ``layer_ids``: zero-based block indices, a subset of ``config.layer_ids``
      (default: all of them); each must be a block of the model.
    - ``compression``: the tokenizer's canonical-id table
      (:func:`engram.tokenizer.build_compression`); default: identity over the
      model's vocabulary. It may map fewer ids than the model's (padded)
      embedding has; an id outside it raises ``IndexError`` at hash time.
    - ``blocks``: the decoder-block ``nn.ModuleList`` or its attribute path in
      the backbone, when it is not found automatically.

    New layers are created in the model's dtype and device and in training mode
    if the model is. Call :func:`remove_engram_layers` to undo.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"add_engram_layers: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, EngramConfig):
        raise ValueError(f"add_engram_layers: config must be an EngramConfig, got {type(config).__name__}")
    if getattr(model, "_engram_handles", None) is not None:
        raise ValueError("add_engram_layers: the model already has Engram layers; call remove_engram_layers first")
    layer_ids = list(config.layer_ids if layer_ids is None else layer_ids)
    if not layer_ids or len(set(layer_ids)) != len(layer_ids):
        raise ValueError(f"add_engram_layers: layer_ids={layer_ids} must be distinct and non-empty")
    missing = [i for i in layer_ids if i not in config.layer_ids]
    if missing:
        raise ValueError(
            f"add_engram_layers: layer_ids {missing} are not in config.layer_ids={config.layer_ids} "
            "(the hash parameters are derived per configured layer)"
        )
    backbone = _backbone(model)
    n_layers = _config_value(model, "num_hidden_layers", "n_layer")
    blocks_path, block_list = _find_blocks(backbone, n_layers, blocks)
    bad = [i for i in layer_ids if not (isinstance(i, int) and 0 <= i < len(block_list))]
    if bad:
        raise ValueError(f"add_engram_layers: layer_ids {bad} are outside the model's {len(block_list)} blocks")
    hidden_size = _config_value(model, "hidden_size", "n_embd", "d_model")
    if hidden_size is None:
        raise ValueError("add_engram_layers: the model's config has no hidden_size; cannot size the Engram layers")
    vocab = _config_value(model, "vocab_size")
    if compression is None:
        if vocab is None:
            raise ValueError("add_engram_layers: pass compression= (the model's config has no vocab_size)")
        compression = CompressionTable.identity(vocab)
    if not isinstance(compression, CompressionTable):
        raise ValueError(f"add_engram_layers: compression must be a CompressionTable, got {type(compression).__name__}")
    for i in layer_ids:
        if hasattr(block_list[i], "engram"):
            raise ValueError(f"add_engram_layers: block {i} already has an attribute 'engram'")

    ref = next(iter(model.parameters()), None)
    handles = _Handles()
    handles.layer_ids, handles.blocks_path = layer_ids, blocks_path
    handles.context = ctx = _Context(config)
    # On a meta-device model, build the layers there too: a planned table of
    # billions of rows must not be allocated on the host first.
    on_meta = ref is not None and ref.device.type == "meta"
    for i in layer_ids:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            layer = EngramLayer(config, i, hidden_size, hc_mult=hc_mult, compression=compression)
        if ref is not None:
            layer = layer.to(device=ref.device, dtype=ref.dtype)
        layer.train(model.training)
        block_list[i].engram = layer
        handles.hooks.append(block_list[i].register_forward_pre_hook(_make_block_hook(ctx, layer), with_kwargs=True))
    forward_sig = inspect.signature(backbone.forward)
    handles.hooks.append(backbone.register_forward_pre_hook(_make_backbone_hook(ctx, forward_sig), with_kwargs=True))
    handles.hooks.append(backbone.register_forward_hook(_make_backbone_check(ctx, forward_sig), with_kwargs=True))
    if backbone is not model:
        before, after = _make_outer_hooks(ctx)
        handles.hooks.append(model.register_forward_pre_hook(before, with_kwargs=True))
        handles.hooks.append(model.register_forward_hook(after, with_kwargs=True, always_call=True))
    lookup = _CompressionBuffer(compression.lookup)
    if ref is not None:
        lookup = lookup.to(ref.device)
    setattr(model, _COMPRESSION_MODULE, lookup)

    # generate() slices input_ids to the uncached tokens before calling the
    # model; stash the full (beam-reordered) ids so the hooks can match rows.
    original = getattr(model, "prepare_inputs_for_generation", None)
    if original is not None:

        @functools.wraps(original)  # generate() inspects this signature
        def prepare_inputs_for_generation(input_ids, *args, **kwargs):
            ctx.generate_ids = input_ids
            return original(input_ids, *args, **kwargs)

        model.prepare_inputs_for_generation = prepare_inputs_for_generation

    # Recorded in config.json by save_pretrained, read back by load_pretrained.
    if getattr(model, "config", None) is not None:
        model.config.engram = {
            "config": dataclasses.asdict(config),
            "layer_ids": layer_ids,
            "hc_mult": hc_mult,
            "blocks": blocks_path,
        }
    model._engram_handles = handles
    return model


def remove_engram_layers(model: nn.Module) -> Dict[int, EngramLayer]:
    """Undo :func:`add_engram_layers`; returns the removed ``{block index: layer}``."""
    handles = getattr(model, "_engram_handles", None)
    if handles is None:
        raise ValueError("remove_engram_layers: the model has no Engram layers")
    layers = engram_layers(model)
    blocks = _get_path(_backbone(model), handles.blocks_path)
    for h in handles.hooks:
        h.remove()
    for i in handles.layer_ids:
        del blocks[i].engram
    delattr(model, _COMPRESSION_MODULE)
    if "prepare_inputs_for_generation" in vars(model):
        del model.prepare_inputs_for_generation
    if getattr(model, "config", None) is not None and hasattr(model.config, "engram"):
        del model.config.engram
    del model._engram_handles
    return layers


def _read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        import json

        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: Dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    raise ValueError(f"load_pretrained: no model.safetensors (or index) in {path!r}; save with save_pretrained")


def load_pretrained(model_class, path: str, **config_kwargs) -> nn.Module:
    """Rebuild a model saved with ``save_pretrained`` after
    :func:`add_engram_layers`: its backbone, its Engram layers and their
    compression table, all from ``path``. Returns the model in eval mode.

    ``model_class`` is the transformers class, e.g. ``LlamaForCausalLM``;
    ``config_kwargs`` override config fields (e.g. ``dtype``-independent ones).
    Plain ``model_class.from_pretrained(path)`` would drop the Engram weights.
    """
    config_class = getattr(model_class, "config_class", None)
    if config_class is None:
        raise ValueError(f"load_pretrained: {model_class!r} has no config_class; pass a transformers model class")
    config = config_class.from_pretrained(path, **config_kwargs)
    meta = getattr(config, "engram", None)
    if not isinstance(meta, dict):
        raise ValueError(f"load_pretrained: {path!r} has no Engram settings in config.json (config.engram)")
    state = _read_checkpoint(path)
    key = f"{_COMPRESSION_MODULE}.lookup"
    if key not in state:
        raise ValueError(f"load_pretrained: {path!r} lacks {key!r}; was it saved after add_engram_layers?")
    model = model_class(config)
    add_engram_layers(
        model,
        EngramConfig(**meta["config"]),
        layer_ids=meta["layer_ids"],
        compression=CompressionTable(state[key]),
        hc_mult=meta["hc_mult"],
        blocks=meta.get("blocks"),
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected and hasattr(model_class, "from_pretrained"):
        # transformers 5.x saves some weights in their checkpoint layout (MoE
        # experts one tensor each, fused in memory): let from_pretrained
        # convert the backbone, then load the Engram weights as saved.
        model = _load_converted(model_class, path, config, meta, state)
        return model.eval()
    if unexpected:
        raise ValueError(f"load_pretrained: unexpected weights in {path!r}: {unexpected[:5]}")
    # save_pretrained omits tied copies (e.g. lm_head.weight tied to the
    # embeddings); those are fine, anything else missing is an error.
    by_name = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(by_name[k]) for k in state if k in by_name}
    untied = [k for k in missing if k not in by_name or id(by_name[k]) not in loaded]
    if untied:
        raise ValueError(f"load_pretrained: weights missing from {path!r}: {untied[:5]}")
    return model.eval()


def _load_converted(model_class, path: str, config, meta: Dict, state: Dict[str, torch.Tensor]) -> nn.Module:
    model = model_class.from_pretrained(path, config=config)
    add_engram_layers(
        model,
        EngramConfig(**meta["config"]),
        layer_ids=meta["layer_ids"],
        compression=CompressionTable(state[f"{_COMPRESSION_MODULE}.lookup"]),
        hc_mult=meta["hc_mult"],
        blocks=meta.get("blocks"),
    )
    own = {id(t) for layer in engram_layers(model).values() for t in layer.state_dict(keep_vars=True).values()}
    own.add(id(getattr(model, _COMPRESSION_MODULE).lookup))
    wanted = [k for k, t in model.state_dict(keep_vars=True).items() if id(t) in own]
    absent = [k for k in wanted if k not in state]
    if absent:
        raise ValueError(f"load_pretrained: Engram weights missing from {path!r}: {absent[:5]}")
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return model
