"""Type stubs of the public `ssdkd` API."""

from os import PathLike
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

from ._ssdkd import Backend as Backend
from ._ssdkd import Evaluation as Evaluation
from ._ssdkd import GpuError as GpuError
from ._ssdkd import InputError as InputError
from ._ssdkd import InternalError as InternalError
from ._ssdkd import NoAdapterError as NoAdapterError
from ._ssdkd import NumericalError as NumericalError

_F32 = npt.NDArray[np.float32]
_Array = npt.NDArray[np.floating[Any]]
_Path = Union[str, "PathLike[str]"]

__version__: str
DEFAULT_CONFIG: dict[str, Any]
CONFIG_KEYS: tuple[str, ...]
PRESETS: tuple[str, ...]

def evaluate(
    student_loc: _Array,
    student_conf: _Array,
    teacher_loc: Optional[_Array],
    teacher_conf: Optional[_Array],
    targets: _Array,
    priors: Union[_Array, str],
    *,
    backend: Union[str, Backend] = "auto",
    gradients: bool = False,
    decisions: bool = False,
    validate: bool = True,
    **config: Any,
) -> Evaluation: ...
def priors(
    preset_or_config: Union[str, Mapping[str, Any], None] = None,
    /,
    *,
    image_size: Optional[float] = None,
    feature_maps: Optional[Sequence[int]] = None,
    steps: Optional[Sequence[float]] = None,
    min_sizes: Optional[Sequence[float]] = None,
    max_sizes: Optional[Sequence[float]] = None,
    aspect_ratios: Optional[Sequence[Sequence[float]]] = None,
    clip: bool = True,
) -> _F32: ...
def read_batch(path: _Path) -> tuple[dict[str, Optional[_F32]], dict[str, Any]]: ...
def write_batch(
    path: _Path,
    tensors: Mapping[str, Union[_Array, str, None]],
    config: Optional[Mapping[str, Any]] = None,
) -> None: ...
