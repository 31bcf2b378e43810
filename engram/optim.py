"""Row-wise sparse optimizers for Engram tables, fused into the table's backward.

One training step of an Engram layer looks up a few hundred thousand rows of a
table of millions (16k tokens x 16 heads touch at most 262k of 10.34 M rows,
fewer once deduplicated: n-grams are Zipfian). A dense gradient and a dense
optimizer touch every row anyway. Here the gradient is kept as what it is, the
touched rows and their summed gradients, and only those rows are updated:

* :class:`RowwiseSGD`, :class:`RowwiseAdagrad` (one accumulator per row,
  FBGEMM's row-wise Adagrad), :class:`RowwiseAdam` and :class:`RowwiseAdamW`
  (per-element moments, torch.optim.SparseAdam's semantics) are
  ``torch.optim.Optimizer`` s whose state lives beside each table, on its
  device, and appears in ``state_dict()``. They take a gradient as
  ``(rows, row_grads)`` (:meth:`RowwiseOptimizer.update`) or as the sparse
  ``.grad`` of a table (:meth:`RowwiseOptimizer.step`), never a table-sized
  tensor.
* :func:`make_rowwise` makes every Engram table of a model (an
  :class:`~engram.EngramLayer`, a model holding some, or a Hugging Face model
  prepared with :func:`engram.integrations.add_engram_layers`) train row-wise
  in one call. By default the update is fused into the backward pass, as
  FBGEMM's table-batched embeddings do: the lookup's backward deduplicates the
  rows, sums their gradients and updates the table and its state in place; the
  table's ``.grad`` stays None. ``fused=False`` keeps the unfused path: the
  table gets a sparse gradient and ``optimizer.step()`` applies it.

How the rules differ from their dense counterparts (as SparseAdam differs from
Adam): only the rows looked up in a step change. A row that no token looks up
keeps its value and its state: its moments do not decay, weight decay does not
shrink it, and it does not keep moving on its momentum (dense Adam still moves
it by lr * m_hat / (sqrt(v_hat) + eps) while m decays). Adam's bias
corrections use the optimizer's step count (updates of the table so far), as
SparseAdam's do, the same for every row whatever its own history; and eps is
added to sqrt(v) before the bias correction of the denominator (SparseAdam's
``lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)``), not after
it (Adam's ``lr * m_hat / (sqrt(v_hat) + eps)``), i.e. Adam's eps scaled by
1 / sqrt(1 - beta2^t): larger early in training.

In the fused path the table is updated during ``backward()``: with the
hyperparameters the optimizer holds at that moment, before gradient clipping
(the table has no ``.grad`` to clip), once per backward pass (gradient
accumulation over micro-batches updates the table each time).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import ops

_ops = torch.ops.engram

__all__ = [
    "RowwiseOptimizer",
    "RowwiseSGD",
    "RowwiseAdagrad",
    "RowwiseAdam",
    "RowwiseAdamW",
    "make_rowwise",
    "table_parameters",
    "dedup_row_grads",
    "dedup_row_grads_padded",
    "rowwise_sgd_update",
    "rowwise_adagrad_update",
    "rowwise_adam_update",
    "state_bytes",
]


# --------------------------------------------------------------------------
# typed wrappers over the ops
# --------------------------------------------------------------------------


def dedup_row_grads(
    grad: torch.Tensor, ids: torch.Tensor, offsets: Optional[torch.Tensor], num_rows: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """grad [..., K, Dh] of a lookup of ids [..., K] (+ offsets [K]) in a table of
    num_rows rows -> (rows [U] int64, strictly increasing; row_grads [U, Dh]):
    the touched rows and the sum of each one's gradients, added in entry order
    (deterministic; on the CPU equal to the dense gradient's rows bit for bit)."""
    return _ops.dedup_row_grads(grad, ids, offsets, num_rows)


def dedup_row_grads_padded(
    grad: torch.Tensor, ids: torch.Tensor, offsets: Optional[torch.Tensor], num_rows: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`dedup_row_grads` with outputs sized by the entries E = ids.numel()
    (known without reading the ids, so CUDA needs no host sync): rows [E], the
    distinct rows then -1 padding; row_grads [E, Dh], zero in the padding. The
    rows before the padding equal dedup_row_grads' (bit for bit on the CPU).
    The CPU update ops skip the padding."""
    return _ops.dedup_row_grads_padded(grad, ids, offsets, num_rows)


def rowwise_sgd_update(weight, rows, row_grads, lr: float, weight_decay: float = 0.0) -> None:
    """weight[rows] -= lr * (row_grads + weight_decay * weight[rows]), in place."""
    _ops.rowwise_sgd_update(weight, rows, row_grads, lr, weight_decay)


def rowwise_adagrad_update(weight, sum_sq, rows, row_grads, lr: float, eps: float, weight_decay: float = 0.0) -> None:
    """Row-wise Adagrad on weight[rows] and sum_sq[rows] ([R], one per row), in place."""
    _ops.rowwise_adagrad_update(weight, sum_sq, rows, row_grads, lr, eps, weight_decay)


def rowwise_adam_update(
    weight, exp_avg, exp_avg_sq, rows, row_grads, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, decoupled_weight_decay: bool, step: int, step_count: Optional[torch.Tensor] = None,
) -> None:
    """Adam (AdamW if decoupled_weight_decay) on the rows `rows` of weight and its
    moments, in place; step (>= 1) sets the bias corrections, or step_count
    (a 0-dim int64 tensor on weight's device, read by the kernel; then step=0)."""
    _ops.rowwise_adam_update(
        weight, exp_avg, exp_avg_sq, rows, row_grads, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
        step, step_count,
    )


# --------------------------------------------------------------------------
# fake kernels
# --------------------------------------------------------------------------


# The other optim ops have Meta kernels in C++ (csrc/checks.cpp). U, the
# number of distinct rows, is only known once the ids are read: a size only a
# Python fake can make. The padded op's Meta kernel makes this op's checks.
@torch.library.register_fake("engram::dedup_row_grads")
def _dedup_row_grads_fake(grad, ids, offsets, num_rows):
    _ops.dedup_row_grads_padded(grad, ids, offsets, num_rows)
    num_unique = torch.library.get_ctx().new_dynamic_size()
    return ids.new_empty((num_unique,)), grad.new_empty((num_unique, grad.shape[-1]))


# --------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------


def _check_hyperparameter(cls: str, name: str, value, low: float = 0.0, high: Optional[float] = None,
                          strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (high is None or value < high)
    if not ok:
        expected = f"{'>' if strict else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{cls}: {name}={value!r}; expected a finite number {expected}")


class RowwiseOptimizer(torch.optim.Optimizer):
    """Base of the row-wise table optimizers; see the module docstring.

    ``params``: 2-D float32 / float64 tables ([R, Dh] parameters). State is
    created with the optimizer, on each table's device: nothing is allocated
    in the first step, and a ``state_dict()`` taken before any step is
    complete. Each state entry holds ``step`` (updates applied to the table so
    far) and the rule's tensors.
    """

    rule = ""

    def __init__(self, params, defaults: dict) -> None:
        self._attached: List[Tuple[nn.Module, bool]] = []  # (module, its sparse flag before) for remove()
        self.fused_backward = False  # set by make_rowwise
        super().__init__(params, dict(defaults, rule=self.rule))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._init_group_state(self.param_groups[-1])

    def _init_group_state(self, group: dict) -> None:
        for p in group["params"]:
            if p.dim() != 2 or p.dtype not in (torch.float32, torch.float64):
                raise ValueError(
                    f"{type(self).__name__}: a table must be a 2-D float32 or float64 tensor, got a "
                    f"{p.dtype} tensor of shape {list(p.shape)}"
                )
            if not p.is_contiguous():
                raise ValueError(f"{type(self).__name__}: tables are updated in place and must be contiguous")
            if p not in self.state or not self.state[p]:
                self.state[p] = self._new_state(p, group)

    def _new_state(self, p: torch.Tensor, group: dict) -> dict:
        raise NotImplementedError

    def _apply(self, p: torch.Tensor, group: dict, state: dict, rows: torch.Tensor, row_grads: torch.Tensor) -> None:
        raise NotImplementedError

    def _group_of(self, param: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError(f"{type(self).__name__}: the tensor is not one of this optimizer's tables")

    @torch.no_grad()
    def update(self, param: torch.Tensor, rows: torch.Tensor, row_grads: torch.Tensor) -> None:
        """One step for one table from its gradient as (rows [U] strictly
        increasing, row_grads [U, Dh] summed per row), e.g. what
        :func:`dedup_row_grads` returns; only those rows and their state change."""
        group = self._group_of(param)
        state = self.state[param]
        state["step"] += 1
        self._apply(param, group, state, rows, row_grads)

    @torch.no_grad()
    def step(self, closure=None):
        """Applies each table's sparse ``.grad`` (the unfused path:
        ``make_rowwise(..., fused=False)`` or a layer built with sparse
        lookups). Tables whose ``.grad`` is None are skipped, so in the fused
        path this does nothing: the tables were updated during backward."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise TypeError(
                        f"{type(self).__name__}.step: a table has a dense .grad; row-wise optimizers take sparse "
                        "gradients (build the lookup with sparse=True, or use make_rowwise, which sets it up)"
                    )
                rows, row_grads = _sparse_grad_rows(p.grad)
                if rows is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                self._apply(p, group, state, rows, row_grads)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of the same rule and tables. The state tensors are
        copied (they are updated in place afterwards)."""
        for group in state_dict.get("param_groups", []):
            if group.get("rule", self.rule) != self.rule:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the state is of rule {group.get('rule')!r}; "
                    f"this optimizer's rule is {self.rule!r}"
                )
        copied = {
            key: {
                name: value.clone(memory_format=torch.contiguous_format) if torch.is_tensor(value) else value
                for name, value in entry.items()
            }
            for key, entry in state_dict["state"].items()
        }
        super().load_state_dict({**state_dict, "state": copied})
        for group in self.param_groups:
            for p in group["params"]:
                expected = self._new_state(p, group)
                state = self.state.get(p, {})
                if "step" in state:  # a step count kept the way this group counts it (see RowwiseAdam)
                    step = state["step"]
                    state["step"] = (torch.as_tensor(int(step), dtype=torch.int64, device=p.device).clone()
                                     if torch.is_tensor(expected["step"]) else int(step))
                for name, tensor in expected.items():
                    got = state.get(name)
                    if torch.is_tensor(tensor) and (not torch.is_tensor(got) or got.shape != tensor.shape):
                        raise ValueError(
                            f"{type(self).__name__}.load_state_dict: state '{name}' of a table of shape "
                            f"{list(p.shape)} has shape {list(got.shape) if torch.is_tensor(got) else got!r}; "
                            f"expected {list(tensor.shape)}"
                        )

    def remove(self) -> None:
        """Undo :func:`make_rowwise`: the tables go back to dense gradients
        (their state stays in this optimizer)."""
        for module, sparse in self._attached:
            module.table_optimizer = None
            module.sparse = sparse
        self._attached = []


def _sparse_grad_rows(grad: torch.Tensor):
    """A sparse COO gradient of a table -> (rows, row_grads), or (None, None) if empty."""
    if grad._nnz() == 0:
        return None, None
    if grad.is_coalesced():
        # Coalesced COO indices are sorted and unique, values already summed.
        return grad._indices()[0], grad._values()
    values = grad._values()
    return dedup_row_grads(values.unsqueeze(1), grad._indices()[0].unsqueeze(1), None, grad.shape[0])


class RowwiseSGD(RowwiseOptimizer):
    """SGD on the touched rows: ``w -= lr * (g + weight_decay * w)``, rounded as
    torch.optim.SGD rounds it (fused multiply-adds)."""

    rule = "sgd"

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        _check_hyperparameter("RowwiseSGD", "lr", lr)
        _check_hyperparameter("RowwiseSGD", "weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def _new_state(self, p, group):
        return {"step": 0}

    def _apply(self, p, group, state, rows, row_grads):
        _ops.rowwise_sgd_update(p, rows, row_grads, group["lr"], group["weight_decay"])


class RowwiseAdagrad(RowwiseOptimizer):
    """Row-wise Adagrad (FBGEMM's): one accumulator per row (state ``sum_sq``,
    [R]); ``sum_sq[r] += mean(g * g)`` over the row, then
    ``w -= lr * g / (sqrt(sum_sq[r]) + eps)``. ``weight_decay`` adds
    ``weight_decay * w`` to g first (L2)."""

    rule = "adagrad"

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-8, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0) -> None:
        _check_hyperparameter("RowwiseAdagrad", "lr", lr)
        _check_hyperparameter("RowwiseAdagrad", "eps", eps, strict=True)
        _check_hyperparameter("RowwiseAdagrad", "weight_decay", weight_decay)
        _check_hyperparameter("RowwiseAdagrad", "initial_accumulator_value", initial_accumulator_value)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value))

    def _new_state(self, p, group):
        return {"step": 0, "sum_sq": torch.full((p.shape[0],), group["initial_accumulator_value"], dtype=p.dtype,
                                                device=p.device)}

    def _apply(self, p, group, state, rows, row_grads):
        _ops.rowwise_adagrad_update(p, state["sum_sq"], rows, row_grads, group["lr"], group["eps"],
                                    group["weight_decay"])


class RowwiseAdam(RowwiseOptimizer):
    """Adam on the touched rows with per-element moments (state ``exp_avg``,
    ``exp_avg_sq``, shaped like the table): torch.optim.SparseAdam's update,
    plus optional L2 ``weight_decay`` (added to the touched rows' gradients).
    See the module docstring for how it differs from dense Adam.
    ``capturable``: count the steps in a tensor on the table's device (read by
    the kernel), so that a training step captured as a CUDA graph replays
    with each replay's bias corrections (torch.optim.Adam's ``capturable``)."""

    rule = "adam"
    _decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, capturable: bool = False) -> None:
        name = type(self).__name__
        if not isinstance(capturable, bool):
            raise ValueError(f"{name}: capturable={capturable!r}; expected True or False")
        _check_hyperparameter(name, "lr", lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"{name}: betas={betas!r}; expected two numbers in [0, 1)")
        _check_hyperparameter(name, "betas[0]", betas[0], high=1.0)
        _check_hyperparameter(name, "betas[1]", betas[1], high=1.0)
        _check_hyperparameter(name, "eps", eps, strict=True)
        _check_hyperparameter(name, "weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      capturable=capturable))

    def _new_state(self, p, group):
        # capturable: the step count is a 0-dim tensor beside the table, counted
        # and read on the device, so a captured CUDA graph replays each step's
        # bias corrections instead of the captured step's (torch.optim.Adam's
        # capturable=True); a Python int otherwise.
        step = torch.zeros((), dtype=torch.int64, device=p.device) if group.get("capturable") else 0
        return {"step": step, "exp_avg": torch.zeros_like(p, memory_format=torch.contiguous_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.contiguous_format)}

    def _apply(self, p, group, state, rows, row_grads):
        beta1, beta2 = group["betas"]
        step = state["step"]
        if group.get("capturable") and not torch.is_tensor(step):  # turned on after a load
            step = state["step"] = torch.tensor(step, dtype=torch.int64, device=p.device)
        on_device = torch.is_tensor(step)
        _ops.rowwise_adam_update(
            p, state["exp_avg"], state["exp_avg_sq"], rows, row_grads, group["lr"], beta1, beta2, group["eps"],
            group["weight_decay"], self._decoupled, 0 if on_device else step, step if on_device else None,
        )


class RowwiseAdamW(RowwiseAdam):
    """RowwiseAdam with decoupled weight decay (AdamW): a touched row is first
    scaled by ``1 - lr * weight_decay``."""

    rule = "adamw"
    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, capturable: bool = False) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, capturable=capturable)


_RULES = {"sgd": RowwiseSGD, "adagrad": RowwiseAdagrad, "adam": RowwiseAdam, "adamw": RowwiseAdamW}


# --------------------------------------------------------------------------
# the one call (the fused backward is engram.lookup's)
# --------------------------------------------------------------------------


def _embedding_modules(model: nn.Module) -> list:
    from .layer import MultiHeadEmbedding

    return [m for m in model.modules() if isinstance(m, MultiHeadEmbedding)]


def table_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The Engram tables of ``model`` (each once): the parameters to leave out of
    a dense optimizer when the tables train row-wise."""
    tables, seen = [], set()
    for module in _embedding_modules(model):
        weight = module.embedding.weight
        if id(weight) not in seen:
            seen.add(id(weight))
            tables.append(weight)
    return tables


def make_rowwise(model: nn.Module, rule: str = "adam", *, fused: bool = True, **hyperparameters) -> RowwiseOptimizer:
    """Make every Engram table in ``model`` train row-wise; returns the optimizer.

    ``model``: an :class:`~engram.EngramLayer`, any module holding some (a
    Hugging Face model prepared with ``add_engram_layers`` included), or a
    single ``MultiHeadEmbedding``. ``rule``: "sgd", "adagrad", "adam" or
    "adamw"; ``hyperparameters`` go to that optimizer (``lr=``, ``betas=``, ...).

    ``fused=True`` (default): each table is updated inside ``backward()`` and
    its ``.grad`` stays None; ``optimizer.step()`` has nothing left to do (call
    it anyway, it is harmless, and lr schedulers expect it). ``fused=False``:
    the tables get sparse gradients that ``optimizer.step()`` applies.

    The returned optimizer carries the state: ``state_dict()`` /
    ``load_state_dict()`` checkpoint it, lr schedulers drive its param groups,
    ``remove()`` undoes this call. Leave the tables out of the dense optimizer
    (:func:`table_parameters`); in the fused path a dense optimizer skips them
    anyway (their ``.grad`` is None). Call this after moving the model to its
    device: the state is created beside the tables.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_rowwise: model must be an nn.Module, got {type(model).__name__}")
    if rule not in _RULES:
        raise ValueError(f"make_rowwise: rule={rule!r}; expected one of {sorted(_RULES)}")
    modules = _embedding_modules(model)
    if not modules:
        raise ValueError(f"make_rowwise: {type(model).__name__} holds no Engram table (no EngramLayer)")
    for module in modules:
        if module.table_optimizer is not None:
            raise ValueError("make_rowwise: a table of this model already trains row-wise; call remove() on its "
                             "optimizer first")
    optimizer = _RULES[rule](table_parameters(model), **hyperparameters)
    optimizer.fused_backward = fused
    for module in modules:
        optimizer._attached.append((module, module.sparse))
        module.table_optimizer = optimizer
        if not fused:  # sparse gradients, applied by optimizer.step()
            module.sparse = True
    return optimizer


def state_bytes(optimizer: RowwiseOptimizer) -> int:
    """Bytes of the optimizer's state tensors."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
