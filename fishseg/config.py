"""The configs that produce a cache and a run, defined once.

Each config is a small frozen dataclass. Its JSON form is stored in the artifact it produced
(HDF5 attributes for a cache, checkpoint metadata and ``run.json`` for a run), and the
fingerprint of a cache is a hash of everything that determines its content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from typing import Any, Callable, Sequence, TypeVar

from fishseg.errors import FishsegError

DEFAULT_BACKBONE = "facebook/dinov3-vits16-pretrain-lvd1689m"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COMPRESSIONS = ("none", "lzf", "gzip")  # HDF5 filters for the features; a storage choice, not content
DEFAULT_COMPRESSION = "none"  # chosen by `fishseg bench` (README "Performance")
LOSSES = ("bce", "dice", "bce+dice", "ce", "ce+dice")  # bce*: binary caches; ce*: caches with classes; dice: both
BINARY_LOSSES = ("bce", "dice", "bce+dice")
MULTICLASS_LOSSES = ("ce", "dice", "ce+dice")
CLASS_WEIGHTS = ("none", "balanced")  # balanced: inverse pixel frequency from the cache's counts
SCHEDULES = ("constant", "cosine")
AUGMENTATIONS = ("none", "flips", "views")
IDENTITY = "identity"  # the photo as it is: the view every cache holds
VIEWS = ("hflip", "vflip", "rot90", "rot180", "rot270", "transpose")  # extra views `extract --views` can store
LAST_BLOCK = (-1,)  # the default layers: the backbone's last block
SPLITS = ("random", "grouped")
DECODER_NAMES = ("linear", "seed-cnn", "progressive", "guided")  # the keys of fishseg.models.decoders.DECODERS
DEMO_SPECIES = 4  # species the demo generator draws (fishseg.data.synthetic.SPECIES): `classes` is 1 to this
DEMO_MIN_IMAGES = 2  # per species in the demo: one to train on and one to validate on, at the least
MASK_FORMATS = ("binary", "index", "rgb", "species")  # how extraction reads masks; README "Mask formats"
MAX_CLASSES = 256  # masks are stored as uint8 class indices (fishseg.classes.MAX_CLASSES)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what --precision asks for; fishseg.runtime.precision_policy decides


def shown(value: Any) -> str:
    """A value as a user types it on the command line or in a TOML grid, for messages: 12,12 not (12, 12), true
    not True, '' for an empty list, 1e6 not 1000000.0; text in quotes (unescaped), so that an empty or spaced value
    shows."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(shown, value)) or "''"
    if isinstance(value, float):
        return _float_text(value)
    return f"'{value}'" if isinstance(value, str) else str(value)


def shown_setting(field: str, value: Any) -> str:
    """A TrainConfig field's value as `train` takes it: ``shown``, but layers () is all."""
    return "all" if field == "layers" and not value else shown(value)


def _require(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise FishsegError(f"{field} {shown(value)}: expected {expected}")


def _whole(value: Any) -> bool:
    """An int, and not a bool (which Python counts as one: ``epochs = true`` in a grid is a mistake)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(value: Any, field: str, minimum: int) -> None:
    _require(_whole(value) and value >= minimum, field, value, f"a whole number >= {minimum}")


def _real(value: Any, field: str, low: float, high: float = math.inf, *, open_low: bool = False,
          open_high: bool = False) -> None:
    """A finite number in [low, high] (ends excluded when open); nan and inf never pass."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    inside = number and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    bounds = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high or high == math.inf else ']'}"
    _require(inside, field, value, f"a finite number in {bounds}")


def _choice(value: Any, field: str, choices: Sequence[str]) -> None:
    _require(value in choices, field, value, f"one of {', '.join(choices)}")


def check_precision(value: Any) -> None:
    """Precision is a runtime choice like the device (``auto`` differs by GPU), so it lives in no config: the
    precision actually used is recorded in the cache and the run instead."""
    _choice(value, "precision", PRECISIONS)


def check_compression(value: Any) -> None:
    """Compression is a storage choice of the cache file, not of its content, so it lives in no config either."""
    _choice(value, "compression", COMPRESSIONS)


def _as_tuple(config: Any, field: str) -> tuple:
    """A list (as JSON reads back) or a single value (a sweep grid's) as the tuple the field holds."""
    value = getattr(config, field)
    value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    object.__setattr__(config, field, value)
    _require_once(value, field)
    return value


def _require_once(values: tuple, field: str, text: Callable[[Any], str] = shown) -> None:
    """Each value once; the refusal names those given more than once."""
    repeated = list(dict.fromkeys(value for value in values if values.count(value) > 1))
    _require(not repeated, field, values, f"each value once ({', '.join(map(text, repeated))} more than once)")


def _block_indices(config: Any, field: str, allow_empty: bool) -> None:
    """Backbone blocks: 1 … n, or -1 … -n counting from the end (0 is the embedding, not a block)."""
    for block in _as_tuple(config, field):
        _require(_whole(block) and block != 0, field, block,
                 "block indices 1 … n, or -1 … -n counting from the end")
    _require(allow_empty or bool(getattr(config, field)), field, getattr(config, field), "at least one block")


def resolve_layers(layers: Sequence[int], num_blocks: int) -> tuple[int, ...]:
    """Block indices 1 … ``num_blocks``, or -k counting from the end (-1 = the last), as 1 … ``num_blocks``."""
    resolved = tuple(block if block > 0 else num_blocks + 1 + block for block in layers)
    if not all(1 <= block <= num_blocks for block in resolved):
        blocks = f"{num_blocks} block{'s' if num_blocks != 1 else ''}"
        raise FishsegError(f"layers {format_layers(layers)}: the backbone has {blocks} (1 … {num_blocks}, "
                           f"or -1 … -{num_blocks} counting from the end)")
    if len(set(resolved)) != len(resolved):
        raise FishsegError(f"layers {format_layers(layers)}: name the same block twice")
    return resolved


def value_text(value: Any) -> str:
    """A config value as sweep folder names and leaderboards show it: layers as 9+12 (or all), floats exact and
    short (``float(text) == value``)."""
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value)) or "all"
    return _float_text(value) if isinstance(value, float) else str(value)


def _float_text(value: float) -> str:
    """Python's shortest repr (0.001, 1e-05: the names of existing sweep folders), except for whole numbers from
    1e5 up, which read as 1e6 or 2.5e7 rather than 1000000.0 or 1e+16 when that is shorter."""
    text = repr(value)
    if not (math.isfinite(value) and value.is_integer() and abs(value) >= 1e5):
        return text
    digits = next(digits for digits in range(17) if float(f"{value:.{digits}e}") == value)
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    compact = f"{mantissa}e{int(exponent)}"
    return compact if len(compact) < len(text) else text


def format_layers(layers: Sequence[int]) -> str:
    return ",".join(map(str, layers))


def check_patch_multiple(image_size: int, patch: int) -> None:
    """The input side must tile into patches; the refusal suggests the nearest multiples (both when tied)."""
    if image_size % patch:
        below = image_size // patch * patch
        candidates = [size for size in (below, below + patch) if size > 0]
        distance = min(abs(size - image_size) for size in candidates)
        nearest = [size for size in candidates if abs(size - image_size) == distance]
        raise FishsegError(f"`image_size={image_size}`: not a multiple of the backbone's patch size {patch}; "
                           f"try {' or '.join(map(str, nearest))}")


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """What determines the content of a feature cache (runtime options such as device are not here)."""

    backbone: str = DEFAULT_BACKBONE  # Hub id or local directory saved with save_pretrained
    image_size: int = 448  # square input side in pixels; must be divisible by the patch size
    preview_size: int = 224  # side of the RGB preview stored per image for reports
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation applied after scaling to [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD
    layers: tuple[int, ...] = LAST_BLOCK  # blocks whose patch tokens (after the final norm) are stored
    views: tuple[str, ...] = ()  # transformed photos whose features are stored too, from VIEWS
    # Pixel classes (README "Mask formats"): "binary" masks (non-zero = fish), "index" (a pixel's value is its
    # class), "rgb" (a pixel's colour is its class's entry in ``colours``) or "species" (binary masks whose fish
    # pixels take the class of the image's species folder). ``classes``: the names, index = mask value, 0 = the
    # background; () for binary.
    mask_format: str = "binary"
    classes: tuple[str, ...] = ()
    colours: tuple[tuple[int, int, int], ...] = ()  # with "rgb": each class's colour in the masks, in class order

    def __post_init__(self) -> None:
        _require(isinstance(self.backbone, str) and bool(self.backbone), "backbone", self.backbone,
                 "a Hub id or a model folder")
        _integer(self.image_size, "image_size", 1)
        _integer(self.preview_size, "preview_size", 1)
        for name in ("mean", "std"):
            values = getattr(self, name)
            _require(isinstance(values, tuple) and len(values) == 3, name, values, "3 numbers (R, G, B)")
            for value in values:
                _real(value, name, 0.0, open_low=name == "std")
        _block_indices(self, "layers", allow_empty=False)
        for view in _as_tuple(self, "views"):
            _choice(view, "views", VIEWS)
        self._check_classes()

    def _check_classes(self) -> None:
        _choice(self.mask_format, "mask_format", MASK_FORMATS)
        names = _as_tuple(self, "classes")
        colours = tuple(tuple(colour) if isinstance(colour, (list, tuple)) else colour for colour in self.colours)
        object.__setattr__(self, "colours", colours)
        if self.mask_format == "binary":
            _require(not names and not colours, "classes", names, "none with binary masks (mask_format 'binary')")
            return
        _require(2 <= len(names) <= MAX_CLASSES, "classes", names, f"2 to {MAX_CLASSES} class names")
        for name in names:
            _require(isinstance(name, str) and name.strip() == name and bool(name), "classes", name,
                     "a non-empty name without leading or trailing spaces")
        if self.mask_format != "rgb":
            _require(not colours, "colours", colours, "none unless mask_format is 'rgb'")
            return
        _require(len(colours) == len(names), "colours", colours, f"one colour for each of the {len(names)} classes")
        for colour in colours:
            _require(isinstance(colour, tuple) and len(colour) == 3 and all(_whole(v) and 0 <= v <= 255 for v in colour),
                     "colours", colour, "3 whole numbers 0 … 255 (R, G, B)")
        _require_once(colours, "colours", lambda colour: f"RGB {colour}")


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    """What a loaded backbone is, as recorded in the cache."""

    name: str  # Hub id or directory it was loaded from
    model_type: str  # transformers model_type, e.g. "dinov3_vit"
    patch_size: int
    feature_dim: int
    num_register_tokens: int
    random_init: bool  # True when the weights were never trained (tests, demo)
    # The rest of the architecture and a digest of the weights; None: unrecorded (older caches).
    num_blocks: int | None = None  # transformer blocks
    num_heads: int | None = None  # attention heads per block
    mlp_dim: int | None = None  # hidden size of each block's MLP, as the model config states it
    mlp: str | None = None  # "plain" or "gated" (DINOv3's gated MLP, DINOv2's SwiGLU)
    weights_sha256: str | None = None  # backbone.weights_digest: equal for equal weights whatever their folder

    @property
    def architecture(self) -> dict[str, Any]:
        """The fields that say what network this is (not which weights, nor where it came from)."""
        return {name: value for name, value in dataclasses.asdict(self).items()
                if name not in ("name", "random_init", "weights_sha256")}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The decoder training recipe; defaults reproduce the reference notebook."""

    decoder: str = "seed-cnn"  # key of fishseg.models.decoders.DECODERS
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW default
    val_fraction: float = 0.2
    seed: int = 42  # drives the split, the decoder init and the batch order
    split: str = "random"  # "random" (the reference's) or "grouped" (near-duplicates never on both sides)
    group_pattern: str = ""  # regex whose match in an image id names its group; "" = the cache's near-duplicate groups
    folds: int = 0  # K of K-fold cross-validation; 0 = one train/val split
    fold: int = 0  # which fold this run validates on, when folds > 0
    loss: str = "bce"  # binary: "bce" (the reference's), "dice" (soft Dice), "bce+dice"; classes: "ce", "dice", "ce+dice"
    schedule: str = "constant"  # learning rate: "constant" or "cosine" (linear warm-up, then cosine to 0)
    warmup_epochs: int = 1  # with schedule "cosine"
    augment: str = "none"  # "none", "flips" (of the cached grid and mask) or "views" (one stored view per image)
    layers: tuple[int, ...] = ()  # cached blocks the decoder sees, concatenated on channels; () = all cached
    class_weights: str = "none"  # with classes: "balanced" weighs each class's pixels by inverse frequency

    def __post_init__(self) -> None:
        """Every field is checked here, so the Python API refuses what the CLI refuses (no fall-through)."""
        _choice(self.decoder, "decoder", DECODER_NAMES)
        _integer(self.epochs, "epochs", 1)
        _integer(self.batch_size, "batch_size", 1)
        _real(self.lr, "lr", 0.0, open_low=True)
        _real(self.weight_decay, "weight_decay", 0.0)
        _real(self.val_fraction, "val_fraction", 0.0, 1.0, open_low=True, open_high=True)
        _integer(self.seed, "seed", 0)
        _choice(self.split, "split", SPLITS)
        _require(isinstance(self.group_pattern, str), "group_pattern", self.group_pattern, "a regular expression")
        try:
            re.compile(self.group_pattern)
        except re.error as error:
            raise FishsegError(f"group_pattern {shown(self.group_pattern)}: not a regular expression "
                               f"({error})") from None
        _require(_whole(self.folds) and self.folds != 1 and self.folds >= 0, "folds", self.folds,
                 "0 (one split) or a whole number >= 2")
        _integer(self.fold, "fold", 0)
        _require(self.fold < max(self.folds, 1), "fold", self.fold, f"a fold index below folds ({self.folds})")
        _choice(self.loss, "loss", LOSSES)
        _choice(self.schedule, "schedule", SCHEDULES)
        _integer(self.warmup_epochs, "warmup_epochs", 0)
        _choice(self.augment, "augment", AUGMENTATIONS)
        _block_indices(self, "layers", allow_empty=True)
        _choice(self.class_weights, "class_weights", CLASS_WEIGHTS)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What ``fishseg demo`` generates and trains, checked before anything is written."""

    classes: int = 3  # species generated, the first of DEMO_SPECIES
    images_per_class: int = 12
    epochs: int = 20
    image_size: int = 448

    def __post_init__(self) -> None:
        _require(_whole(self.classes) and 1 <= self.classes <= DEMO_SPECIES, "classes", self.classes,
                 f"a whole number from 1 to {DEMO_SPECIES}")
        _integer(self.images_per_class, "images_per_class", DEMO_MIN_IMAGES)
        _integer(self.epochs, "epochs", 1)
        _integer(self.image_size, "image_size", 1)


Config = TypeVar("Config", ExtractConfig, BackboneInfo, TrainConfig)


def to_json(config: Any) -> str:
    """Canonical JSON of a config dataclass (sorted keys, so equal configs give equal strings)."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def from_json(cls: type[Config], text: str) -> Config:
    """Rebuild a config from ``to_json`` output; lists become tuples so it compares equal."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}
    return cls(**fields)


def fingerprint(*parts: str | Sequence[str]) -> str:
    """A short stable hash of strings (configs as JSON, lists of image ids)."""
    digest = hashlib.sha256()
    for part in parts:
        items = [part] if isinstance(part, str) else list(part)
        for item in items:
            digest.update(item.encode("utf-8"))
            digest.update(b"\0")
        digest.update(b"\1")
    return digest.hexdigest()[:16]
