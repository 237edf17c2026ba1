"""Export a trained run as one ONNX graph (backbone + decoder) that runs without fishseg, torch or transformers.

The graph takes uint8 RGB images N×3×S×S at the run's image size S (the photo resized to S×S, as
``predict`` resizes it) and returns float32 fish probabilities N×1×S×S; threshold them at 0.5 for the
mask. A run with several classes returns the class probabilities N×C×S×S instead (the softmax over the C
classes; a pixel's class is their arg max), and its metadata names the classes and their colours. Normalisation (÷255, the run's mean and std) happens inside the graph, so a deployment feeds
raw pixels and cannot get it wrong. A decoder that uses the photo as a guide (``guided``) gets its
P×P preview from the input itself, inside the graph (antialiased bilinear resize, rounded to uint8),
where ``predict`` resizes the original photo to P×P: the two guides may differ by a unit here and there.

Exported with torch's dynamo exporter (``torch.onnx.export(dynamo=True)``): the TorchScript exporter
cannot translate the antialiased resize that the guided decoder uses, and the dynamo exporter traces
DINOv3's RoPE and SDPA attention as they run in eager mode. The batch axis is dynamic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fishseg.classes import Classes
from fishseg.errors import FishsegError
from fishseg.evaluation.metrics import THRESHOLD
from fishseg.formats.runs import RunRecord
from fishseg.inference.segmenter import Segmenter
from fishseg.models.backbone import Backbone
from fishseg.models.decoders import uses_image
from fishseg.runtime import atomic_path, precision_scope
from fishseg.version import __version__

__all__ = ["INPUT_NAME", "MIN_OPSET", "OUTPUT_NAME", "ExportResult", "TensorSpec", "export_onnx"]

INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
MIN_OPSET = 18  # the first with Resize(antialias=1), which the guided decoder's guide needs
PROTOBUF_LIMIT = 2 * 1024 ** 3  # one .onnx file holds at most 2 GB (a protobuf message)
INSTALL_HINT = "pip install fishseg[export]"
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output of the exported graph: its name, shape ("N" is the dynamic batch) and element type."""

    name: str
    shape: tuple[str | int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not self.name or not all(side == "N" or (isinstance(side, int) and side > 0) for side in self.shape):
            raise ValueError(f"not a tensor spec: {self}")

    def describe(self) -> str:
        """E.g. "images: N×3×448×448 uint8"."""
        return f"{self.name}: {'×'.join(map(str, self.shape))} {self.dtype}"


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What ``fishseg.export`` returns: the ONNX file it wrote, its input and output, and the metadata it carries.

    ``path``: the .onnx file (``size_bytes`` long); ``image_size``: S of the uint8 N×3×S×S images it takes;
    ``input`` and ``output``: name, shape ("N": any batch) and element type of each; ``opset``: the ONNX opset;
    ``metadata``: the model's metadata_props as written (where it came from, how to read its output; left out of
    ``repr``); ``classes``: what the output's channels mean (binary: one channel, the fish probability; several
    classes: channel k is class k's probability)."""

    path: Path
    image_size: int
    input: TensorSpec
    output: TensorSpec
    opset: int
    metadata: dict[str, str] = dataclasses.field(repr=False)
    size_bytes: int
    classes: Classes = Classes()

    def __post_init__(self) -> None:
        if (self.image_size < 1 or self.size_bytes < 1 or self.opset < MIN_OPSET
                or self.output.shape[1] != self.classes.channels):
            raise ValueError(f"not an export result: {self}")


class _Exported(nn.Module):
    """uint8 images N×3×S×S → fish probabilities N×1×S×S float32 (several classes: class probabilities
    N×C×S×S): the Segmenter's forward, as predict runs it, with the guide of a decoder that uses the photo
    resized from the input inside the graph."""

    def __init__(self, segmenter: Segmenter) -> None:
        super().__init__()
        self.model, self.decoder = segmenter.backbone.model, segmenter.decoder  # registered: the graph's weights
        self.segmenter = segmenter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        guides = self._guides(images) if uses_image(self.decoder) else None
        probabilities = self.segmenter.forward(images, guides)
        return probabilities[:, None] if self.segmenter.classes.binary else probabilities

    def _guides(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S uint8 → the preview N×P×P×3, uint8 values (as float32) like the cache's previews."""
        side = (self.segmenter.preview_size,) * 2
        pixels = F.interpolate(images.float(), size=side, mode="bilinear", align_corners=False, antialias=True)
        return pixels.round().clamp(0, 255).permute(0, 2, 3, 1)


def export_onnx(run: str | Path, out: str | Path, *, backbone: str | None = None, opset: int | None = None,
                overwrite: bool = False) -> ExportResult:
    """Write the run's best decoder and its backbone as one ONNX graph to ``out`` (see the module docstring).

    ``backbone`` loads the backbone from elsewhere (a local folder of the same weights); it is checked against
    the run's, as predict checks it. Traced on the CPU in float32, whatever device trained the run.
    """
    onnx = _require_onnx()
    run, out = Path(run), Path(out)
    _refuse_target(out, overwrite)
    if opset is not None and opset < MIN_OPSET:
        raise FishsegError(f"opset {opset}: the exported graph needs ONNX opset {MIN_OPSET} or newer "
                           f"(an antialiased Resize); pass `opset` >= {MIN_OPSET}, or leave it out")
    segmenter = Segmenter.from_run(run, backbone, "cpu", precision="fp32")
    _refuse_oversize(segmenter.backbone, segmenter.decoder)
    proto = _trace(_Exported(segmenter).eval(), segmenter.image_size, opset)
    metadata = _metadata(segmenter.record, segmenter.classes)
    onnx.helper.set_model_props(proto, metadata)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    side, classes = segmenter.image_size, segmenter.classes
    return ExportResult(path=out, image_size=side, input=TensorSpec(INPUT_NAME, ("N", 3, side, side), "uint8"),
                        output=TensorSpec(OUTPUT_NAME, ("N", classes.channels, side, side), "float32"),
                        opset=_opset_of(proto), metadata=metadata, size_bytes=out.stat().st_size, classes=classes)


def _require_onnx() -> Any:
    """The ``onnx`` module; onnx and onnxscript (which the dynamo exporter imports) are an optional extra."""
    try:
        onnx, _ = (importlib.import_module(name) for name in ("onnx", "onnxscript"))
    except ImportError as error:
        raise FishsegError(f"export needs {error.name}, which is not installed: {INSTALL_HINT}") from None
    return onnx


def _refuse_target(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise FishsegError(f"{out}: is a folder; `out` is the .onnx file to write, e.g. {out / 'model.onnx'}")
    if out.exists() and not overwrite:
        raise FishsegError(f"{out}: exists; pass `overwrite=True` to replace it, or choose another `out`")


def _refuse_oversize(model: Backbone, decoder: nn.Module) -> None:
    """A graph over 2 GB cannot be one .onnx file (ViT-H+ and 7B in float32): say so before tracing it."""
    size = sum(tensor.numel() * tensor.element_size() for part in (model.model, decoder) for tensor in
               [*part.parameters(), *part.buffers()])
    if size >= PROTOBUF_LIMIT:
        raise FishsegError(f"backbone {model.info.name}: its weights take {size / 1024 ** 3:.1f} GB, over the 2 GB "
                           f"that one .onnx file holds; export a run on a smaller backbone (up to ViT-L)")


def _trace(module: _Exported, side: int, opset: int | None) -> Any:
    """The module as an ONNX ModelProto with a dynamic batch axis (traced with a batch of 2: a batch of 1 would
    be specialised)."""
    example = torch.zeros(2, 3, side, side, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter(), precision_scope("fp32"):  # no autocast casts in the graph, whatever the caller's
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset, verbose=False,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"images": {0: batch}})
    return program.model_proto


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's own notes (deprecations, optimiser passes, torchvision absent) are not the user's concern:
    warnings and its loggers below ERROR are silenced while it runs."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _metadata(record: RunRecord, classes: Classes) -> dict[str, str]:
    """The model's metadata_props: where it came from (configs, backbone, version) and how to read its output
    (several classes: the class names and colours, as JSON lists, in channel order)."""
    common = {
        "fishseg_version": __version__,
        "fishseg_backbone": record.backbone["name"],
        "fishseg_backbone_info": json.dumps(record.backbone),
        "fishseg_decoder": record.train_config.decoder,
        "fishseg_train_config": json.dumps(dataclasses.asdict(record.train_config)),
        "fishseg_extract_config": json.dumps(record.extract_config),
        "fishseg_best_epoch": str(record.best_epoch),
        "fishseg_best_val_iou": f"{record.best_val_iou:.6f}",
        "fishseg_input": "images: N×3×S×S uint8 RGB, the photo resized to S×S (bilinear); normalised inside",
    }
    if classes.binary:
        return {**common, "fishseg_output": "probabilities: N×1×S×S float32 fish probability",
                "fishseg_threshold": str(THRESHOLD)}
    return {**common, "fishseg_output": f"probabilities: N×{len(classes)}×S×S float32, the probability of each "
                                        f"class (softmax over the classes); a pixel's class is the arg max",
            "fishseg_classes": json.dumps(list(classes.names)),
            "fishseg_colours": json.dumps([list(colour) for colour in classes.colours])}


def _opset_of(proto: Any) -> int:
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
