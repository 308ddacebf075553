"""Type stubs of `ssdkd.torch`."""

from typing import Any, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt
import torch

_Targets = Union[torch.Tensor, Sequence[torch.Tensor]]

def pad_targets(targets: _Targets) -> npt.NDArray[np.float32]: ...

class MultiBoxLoss_KD(torch.nn.Module):
    last_path: Optional[str]
    def __init__(
        self,
        num_classes: int,
        overlap_thresh: float = 0.5,
        prior_for_matching: bool = True,
        bkg_label: int = 0,
        neg_mining: bool = True,
        neg_pos: int = 3,
        neg_overlap: float = 0.5,
        encode_target: bool = False,
        use_gpu: bool = True,
        negatives_for_hard: float = 100.0,
        neg_w: float = 1.5,
        pos_w: float = 1.0,
        Temp: float = 1.0,
        reg_m: float = 0.0,
        *,
        variance: Sequence[float] = (0.1, 0.2),
        backend: str = "auto",
        reduction: str = "mean",
        validate: bool = True,
    ) -> None: ...
    def forward(
        self, predictions: Sequence[torch.Tensor], pred_t: Sequence[Any], targets: _Targets
    ) -> tuple[torch.Tensor, ...]: ...

class MultiBoxLoss(torch.nn.Module):
    last_path: Optional[str]
    def __init__(
        self,
        num_classes: int,
        overlap_thresh: float = 0.5,
        prior_for_matching: bool = True,
        bkg_label: int = 0,
        neg_mining: bool = True,
        neg_pos: int = 3,
        neg_overlap: float = 0.5,
        encode_target: bool = False,
        use_gpu: bool = True,
        negatives_for_hard: float = 100.0,
        *,
        variance: Sequence[float] = (0.1, 0.2),
        backend: str = "auto",
        reduction: str = "mean",
        validate: bool = True,
    ) -> None: ...
    def forward(
        self, predictions: Sequence[torch.Tensor], targets: _Targets
    ) -> tuple[torch.Tensor, ...]: ...

def cuda_path(
    device: Optional[Union[str, torch.device]] = None, backend: str = "auto"
) -> dict[str, Any]: ...
def global_terms(
    soft_sum: torch.Tensor,
    l2_sum: torch.Tensor,
    conf_sum: torch.Tensor,
    loc_sum: torch.Tensor,
    num_pos: torch.Tensor,
    group: Optional[Any] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...
