"""Type stubs of `ssdkd.torchvision`."""

from typing import Any, Mapping, Optional, Sequence

import torch

TORCHVISION_CONFIG: dict[str, Any]
KD_WEIGHTS: dict[str, float]

def to_spec(
    targets: Sequence[Mapping[str, torch.Tensor]],
    anchors: Sequence[torch.Tensor],
    image_size: Optional[Sequence[float]] = None,
    validate: bool = True,
    num_classes: Optional[int] = None,
) -> tuple[list[torch.Tensor], torch.Tensor]: ...

class SSDLoss(torch.nn.Module):
    image_size: Optional[tuple[float, float]]
    config: dict[str, Any]
    validate: bool
    def __init__(
        self,
        image_size: Optional[Sequence[float]] = None,
        *,
        box_coder_weights: Optional[Sequence[float]] = None,
        backend: str = "auto",
        reduction: str = "mean",
        validate: bool = True,
        **config: Any,
    ) -> None: ...
    def forward(
        self,
        targets: Sequence[Mapping[str, torch.Tensor]],
        head_outputs: Mapping[str, torch.Tensor],
        anchors: Sequence[torch.Tensor],
        matched_idxs: Optional[Sequence[torch.Tensor]] = None,
        teacher_outputs: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> dict[str, torch.Tensor]: ...

def total(
    losses: Mapping[str, torch.Tensor], weights: Optional[Mapping[str, float]] = None
) -> torch.Tensor: ...

def global_losses(
    losses: Mapping[str, torch.Tensor], group: Optional[Any] = None
) -> dict[str, torch.Tensor]: ...

def use_ssdkd(
    model: torch.nn.Module,
    *,
    backend: str = "auto",
    reduction: str = "mean",
    validate: bool = True,
    **config: Any,
) -> torch.nn.Module: ...

class Distiller(torch.nn.Module):
    student: torch.nn.Module
    teacher: torch.nn.Module
    loss: SSDLoss
    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module,
        *,
        backend: str = "auto",
        reduction: str = "mean",
        validate: bool = True,
        **config: Any,
    ) -> None: ...
    def train(self, mode: bool = True) -> "Distiller": ...
    def forward(
        self, images: Any, targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]: ...
