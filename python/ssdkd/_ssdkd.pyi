"""Type stubs of the compiled part (`ssdkd._ssdkd`); the public API is in `ssdkd`."""

from os import PathLike
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_Path = Union[str, "PathLike[str]"]

class InputError(ValueError):
    tensor: Optional[str]
    image: Optional[int]
    index: Optional[int]
    key: Optional[str]
    path: Optional[str]

class NoAdapterError(RuntimeError): ...
class GpuError(RuntimeError): ...
class InternalError(RuntimeError): ...

class NumericalError(RuntimeError):
    tensor: Optional[str]
    index: Optional[int]

class Backend:
    kind: str
    name: str
    adapter: str
    fallback: Optional[str]
    def __init__(self, kind: str = "auto") -> None: ...
    def evaluate(
        self,
        student_loc: _F32,
        student_conf: _F32,
        teacher_loc: Optional[_F32],
        teacher_conf: Optional[_F32],
        targets: _F32,
        priors: _F32,
        config_json: str,
        gradients: bool = False,
        decisions: bool = False,
        validate: bool = True,
    ) -> Evaluation: ...

class Evaluation:
    soft_loss: float
    l2_loss: float
    loss_c: float
    loss_l: float
    total: float
    num_pos: int
    num_neg: int
    num_bounded: int
    soft_sum: float
    l2_sum: float
    conf_sum: float
    loc_sum: float
    backend: str
    adapter: str
    grad_student_conf: Optional[_F32]
    grad_student_loc: Optional[_F32]
    conf_target: Optional[npt.NDArray[np.uint32]]
    loc_target: Optional[_F32]
    neg_mask: Optional[npt.NDArray[np.uint8]]
    def terms(self) -> dict[str, float]: ...

class CudaShared:
    """The GPU backend sharing buffers with a CUDA device (Linux, cargo feature `cuda`).
    Opening fails with `NoAdapterError` naming the reason."""

    ordering: str
    adapter: str
    uuid: str
    bytes_read_back: int
    def __init__(self, device_index: int) -> None: ...
    def evaluate(
        self,
        ptrs: list[int],
        shape: tuple[int, int, int, int],
        config_json: str,
        stream: int,
        grad_conf_ptr: int,
        grad_loc_ptr: int,
        validate: bool,
    ) -> Evaluation: ...

def cuda_unavailable_reason(device_index: int) -> Optional[str]: ...

CONFIG_KEYS: list[str]
DEFAULT_CONFIG_JSON: str
PRESETS: list[str]
TENSORS: list[str]
TERMS: list[str]
LOSS_TOLERANCE: tuple[float, float]
GRADIENT_TOLERANCE: tuple[float, float]

def check_shapes(
    shapes: list[Optional[list[int]]], gradients: bool = False, decisions: bool = False
) -> None: ...
def check_config(config_json: str) -> None: ...
def input_error(
    message: str, tensor: Optional[str] = None, key: Optional[str] = None
) -> InputError: ...
def compare_loss(actual: float, expected: float, rel: float, abs: float) -> float: ...
def compare_gradient(
    actual: _F32, expected: _F32, rel: float, abs: float
) -> tuple[int, float, float, float, int]: ...
def read_batch(path: _Path) -> tuple[dict[str, Optional[_F32]], str]: ...
def write_batch(
    path: _Path,
    student_loc: _F32,
    student_conf: _F32,
    teacher_loc: Optional[_F32],
    teacher_conf: Optional[_F32],
    targets: _F32,
    priors: _F32,
    config_json: str,
) -> None: ...
def preset_priors(name: str) -> _F32: ...
def preset_config(name: str) -> dict[str, Any]: ...
def custom_priors(
    image_size: float,
    maps: list[tuple[int, Optional[float], float, float, list[float]]],
    clip: bool,
) -> _F32: ...
def synthetic(
    batch: int, classes: int, preset: str, objects: int, vary_objects: bool, seed: int
) -> dict[str, _F32]: ...
