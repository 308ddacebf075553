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

class NumericalError(RuntimeError):
    tensor: Optional[str]
    index: Optional[int]

def evaluate(
    student_loc: _F32,
    student_conf: _F32,
    teacher_loc: Optional[_F32],
    teacher_conf: Optional[_F32],
    targets: _F32,
    priors: _F32,
    backend: str,
    gradients: bool,
    decisions: bool,
    validate: bool,
    config_json: str,
) -> dict[str, Any]: ...
def gradients_of_last(
    student_loc: _F32,
    student_conf: _F32,
    teacher_loc: Optional[_F32],
    teacher_conf: Optional[_F32],
    targets: _F32,
    priors: _F32,
    backend: str,
    config_json: str,
) -> Optional[tuple[_F32, _F32]]: ...
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
def custom_priors(
    image_size: float,
    maps: list[tuple[int, Optional[float], float, float, list[float]]],
    clip: bool,
) -> _F32: ...
def synthetic(
    batch: int, classes: int, preset: str, objects: int, vary_objects: bool, seed: int
) -> dict[str, _F32]: ...
def make_input_error(
    message: str, tensor: Optional[str] = None, key: Optional[str] = None
) -> InputError: ...
