"""Type stubs of `ssdkd.testing`."""

from os import PathLike
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import numpy.typing as npt
import torch

def synthetic_batch(
    batch: int = 2, classes: int = 21, preset: str = "ssd300", objects: int = 6, seed: int = 0
) -> dict[str, npt.NDArray[np.float32]]: ...

class Row:
    name: str
    theirs: float
    ssdkd: float
    rel_diff: float
    ok: bool
    reason: str

class Report:
    rows: list[Row]
    ok: bool
    failed: list[str]
    note: str
    def __bool__(self) -> bool: ...

_Batch = Union[None, str, "PathLike[str]", Mapping[str, Any]]

def compare(
    loss_fn: Callable[..., Any],
    batch: _Batch = None,
    *,
    config: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
    batch_size: int = 2,
    preset: str = "ssd300",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    grad_rtol: Optional[float] = None,
    grad_atol: Optional[float] = None,
    dtype: torch.dtype = torch.float64,
    targets: str = "list",
    backend: str = "cpu",
) -> Report: ...
def assert_matches(loss_fn: Callable[..., Any], batch: _Batch = None, **kwargs: Any) -> Report: ...
