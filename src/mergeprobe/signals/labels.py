"""The run's label distribution: how much accuracy a merge could take away.

A merged model that loses the task falls at worst to the majority label's rate, so the room
above it bounds what a merge can cost (``label_room``, ``head_interference_room``). The
callback counts the labels of the training batches it sees before its horizon; nothing
else about the data is kept.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .._util import collective_device
from ..exceptions import InvalidParameterError
from ..signature import Signature

NAN = float("nan")


class LabelCounter:
    """Counts class labels of training batches through a forward pre-hook on the model.

    Only single-label classification batches count: a one-dimensional integer ``labels``
    keyword argument (``-100`` entries, ignored by the loss, are skipped). Token labels of
    language models, regression targets and batches without labels leave it empty. Batches
    in eval mode do not count. Labels stay on their device until ``summary``: counting costs
    the training loop no synchronisation.

    Args:
        counts: label -> count to start from (a resumed run's earlier batches).
        on_error: called with the exception when the hook fails; the counter then goes
            quiet instead of raising into the user's forward pass.
    """

    def __init__(
        self,
        counts: Mapping[int, int] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.counts = {int(k): int(v) for k, v in (counts or {}).items()}
        self.on_error = on_error
        self._pending: list[torch.Tensor] = []
        self._handle = None
        self.failed = False

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def attach(self, model: nn.Module) -> None:
        if self._handle is None and not self.failed:
            self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            labels = kwargs.get("labels")
            if (
                not module.training
                or not isinstance(labels, torch.Tensor)
                or labels.dim() != 1
                or labels.is_floating_point()
                or labels.is_complex()
                or labels.dtype == torch.bool
            ):
                return
            self._pending.append(labels.detach().clone())
        except Exception as exc:  # never break the user's forward pass
            self.failed = True
            self.detach()
            if self.on_error is not None:
                self.on_error(exc)

    def summary(self, across_ranks: bool = False) -> dict[str, Any] | None:
        """``counts`` (label -> count), ``seen`` and ``majority_fraction``; ``None`` before
        any labelled batch.

        With ``across_ranks`` the counts are summed over the data-parallel ranks, each of
        which saw its own share of the batches (two collectives: every rank must call it).
        """
        if self._pending:
            values = torch.cat(self._pending).to("cpu", torch.long)  # one copy off the device
            self._pending = []
            labels, counts = torch.unique(values[values >= 0], return_counts=True)
            for label, count in zip(labels.tolist(), counts.tolist(), strict=True):
                self.counts[label] = self.counts.get(label, 0) + count
        return label_summary(_sum_across_ranks(self.counts) if across_ranks else self.counts)


def label_summary(counts: Mapping[Any, int]) -> dict[str, Any] | None:
    """The ``labels`` metadata of a signature from label -> count: ``counts`` (keys as
    strings: ``1`` and ``"1"`` are one class), ``seen`` and ``majority_fraction``; ``None``
    when nothing was counted."""
    merged: dict[str, int] = {}
    for label, count in counts.items():
        if count:
            merged[str(label)] = merged.get(str(label), 0) + int(count)
    seen = sum(merged.values())
    if not seen:
        return None
    return {
        "counts": dict(sorted(merged.items(), key=_label_order)),
        "seen": seen,
        "majority_fraction": max(merged.values()) / seen,
    }


def _label_order(item: tuple[str, int]) -> tuple[bool, int | str]:
    label = item[0]
    if label.lstrip("-").isdigit():
        return False, int(label)  # class ids in numeric order, then names
    return True, label


def class_label(value: Any) -> int | str:
    """One class label as an int or a str (numpy and 0-d tensor values too); an error for a
    float, a bool, a list or anything else that is not one class."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    elif type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        value = value.item()  # np.int64, np.str_
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return str(value)
    raise InvalidParameterError(
        f"class labels must be integers or strings; got {value!r} ({type(value).__name__}): "
        "regression targets and multi-label rows have no label room"
    )


def count_labels(labels: Mapping[Any, int] | Iterable[Any]) -> dict[int | str, int]:
    """label -> count from class labels (ints or strings) or from their counts; a clear error
    for anything that is not a class label."""
    counts: dict[int | str, int] = {}
    if isinstance(labels, Mapping):
        for label, count in labels.items():
            if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
                raise InvalidParameterError(
                    f"label counts must be non-negative integers; got {count!r} for {label!r}"
                )
            key = class_label(label)
            counts[key] = counts.get(key, 0) + int(count)
    else:
        if isinstance(labels, str | bytes):
            raise InvalidParameterError("labels must be a sequence of class labels, not a string")
        for label in labels:
            key = class_label(label)
            counts[key] = counts.get(key, 0) + 1
    if not sum(counts.values()):
        raise InvalidParameterError("no labels given: the label room needs at least one")
    return counts


def _sum_across_ranks(counts: Mapping[int, int]) -> dict[int, int]:
    """label -> count summed over the ranks (a rank may have seen fewer classes)."""
    dist = torch.distributed
    device = collective_device()
    size = torch.tensor([max(counts) + 1 if counts else 0], device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    if not size.item():  # no rank saw a label: every rank skips the second collective
        return {}
    total = torch.zeros(int(size.item()), dtype=torch.long)
    for label, count in counts.items():
        total[label] = count
    total = total.to(device)  # one copy, not one per class
    dist.all_reduce(total)
    return {label: count for label, count in enumerate(total.tolist()) if count}


def label_room(signature: Signature) -> float:
    """``1 −`` the share of the run's most frequent training label (its ``labels`` metadata,
    recorded by the callback for single-label classification); NaN when unknown or when only
    one class was seen.

    Accuracy a merge takes away falls at worst to the majority label's rate, so a task with
    little room above it has little to lose (``benchmarks/results/predictor_eval.md``)."""
    labels = signature.metadata.get("labels") or {}
    share = labels.get("majority_fraction")
    if not isinstance(share, int | float) or not 0 < share < 1:
        # One class seen (label-sorted data, a horizon of a few batches) says nothing about
        # the task's balance: a room of 0 would predict that every merge is harmless.
        return NAN
    return 1.0 - float(share)
