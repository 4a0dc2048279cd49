"""CLIP backbone at any resolution and the one shared pass.

* Position-embedding interpolation: exact at the native grid, open_clip's own ``resize_pos_embed``
  (bicubic, what the official MuSc loads at 518 px) reproduced value for value at another size,
  the official AnomalyCLIP bilinear formula too, and the papers' 518 px on a /14 CLIP gives the
  37x37 grid.
* One forward per image: MuSc alone (patch tokens + global embedding), and MuSc + AnomalyCLIP
  on the same images through :func:`score_shared`, counted on the patch embedding, with results
  equal to each detector scoring on its own.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from inspector.backbones.registry import load_backbone
from inspector.backbones.vit import ClipBackbone
from inspector.detectors.anomalyclip.detector import AnomalyCLIP
from inspector.detectors.musc.detector import MuSc
from inspector.detectors.shared_pass import score_shared


@pytest.fixture(scope="module")
def bb():
    return load_backbone("clip/tiny", device="cpu")


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class _Counter:
    """Counts images through the patch embedding (``conv1``): one per image per forward."""

    def __init__(self, bb: ClipBackbone):
        self.images = 0
        self.handle = bb.visual.conv1.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.images += int(inputs[0].shape[0])

    def close(self):
        self.handle.remove()


def test_native_size_is_open_clip_exactly(bb):
    x = _images(2, 64)
    with torch.no_grad():
        out = bb.run(x, layers=bb.layer_ids)
        ref = bb.model.visual.forward_intermediates(x, indices=list(bb.layer_ids), output_fmt="NLC")
    assert torch.equal(bb.global_embedding(out.cls), bb.model.encode_image(x))
    for i, t in zip(bb.layer_ids, ref["image_intermediates"]):
        torch.testing.assert_close(out.tokens[i][:, 1:], t, rtol=0, atol=1e-6)
    assert torch.equal(bb.pos_embed(8, 8), bb.visual.positional_embedding)


def test_other_size_equals_open_clip_resize_pos_embed(bb):
    """80 px (10x10 grid) through our interpolation == a CLIP built at 80 px whose position
    embedding open_clip's resize_pos_embed resized: bicubic, align_corners=False and no antialias,
    as the official MuSc's vendored open_clip calls it at 518 px (current open_clip passes
    antialias=True, a different bicubic kernel)."""
    from open_clip.model import CLIP, resize_pos_embed

    sd = {k: v.clone() for k, v in bb.model.state_dict().items()}
    torch.manual_seed(0)
    big = CLIP(embed_dim=32, vision_cfg={"image_size": 80, "patch_size": 8, "width": 48, "layers": 4, "head_width": 16},
               text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 4}).eval()
    resize_pos_embed(sd, big, antialias=False)
    big.load_state_dict(sd)
    x = _images(2, 80, seed=1)
    with torch.no_grad():
        ours = bb.run(x)
        assert ours.grid == (10, 10)
        torch.testing.assert_close(bb.global_embedding(ours.cls), big.encode_image(x), rtol=1e-5, atol=1e-5)
        feats = bb(x)
    assert all(v.shape == (2, 10, 10, 48) for v in feats.values())


def test_bilinear_is_the_official_anomalyclip_formula(bb):
    pos = bb.visual.positional_embedding
    side, c = 8, pos.shape[1]
    g = pos[1:].reshape(-1, side, side, c).permute(0, 3, 1, 2)
    g = F.interpolate(g, (13, 13), mode="bilinear")  # official: default align_corners (False)
    want = torch.cat([pos[:1], g.reshape(-1, c, 169).transpose(1, 2)[0]], 0)
    torch.testing.assert_close(bb.pos_embed(13, 13, "bilinear"), want, rtol=0, atol=0)
    assert not torch.allclose(bb.pos_embed(13, 13, "bicubic"), want)
    with pytest.raises(ValueError, match="pos_interp"):
        ClipBackbone(bb.model, name="x", pos_interp="nearest")


def test_518_px_on_a_patch14_clip_gives_37x37():
    """The papers' setting: a ViT-*/14 trained at 336 px (24x24 grid) run at 518 px."""
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, quick_gelu=True,
                 vision_cfg={"image_size": 336, "patch_size": 14, "width": 32, "layers": 2, "head_width": 16},
                 text_cfg={"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1})
    bb = ClipBackbone(model, name="clip/tiny14", image_size=518, is_random=True,
                      tokenizer=open_clip.get_tokenizer("ViT-B-16"))
    assert bb.preprocess.size == 518 and bb.native_size == 336
    x = _images(1, 518)
    with torch.no_grad():
        feats = bb(x)
        pos = bb.pos_embed(37, 37)
    assert all(v.shape == (1, 37, 37, 32) for v in feats.values())
    assert pos.shape == (1 + 37 * 37, 32)
    # corners of a bicubic align_corners=False upsampling stay close to the native corners, and the
    # interpolated grid is smooth between them: a value check, not only a shape
    native = model.visual.positional_embedding[1:].reshape(24, 24, 32)
    up = pos[1:].reshape(37, 37, 32)
    assert (up[0, 0] - native[0, 0]).abs().max() < (native[0, 0] - native[12, 12]).abs().max()
    torch.testing.assert_close(bb.pos_embed(24, 24), model.visual.positional_embedding)


def test_musc_one_forward_per_image_with_global_embedding(bb):
    x = _images(5, 64, seed=2)
    m = MuSc(bb, r_list=(1,))
    c = _Counter(bb)
    try:
        feats, glob = m.extract(x)
    finally:
        c.close()
    assert c.images == 5
    with torch.no_grad():
        torch.testing.assert_close(glob, bb.model.encode_image(x), rtol=0, atol=1e-6)
        ref = bb(x)
    assert all(torch.equal(feats[k], ref[k]) for k in ref)


@pytest.mark.parametrize("size", [64, 80])
def test_musc_and_anomalyclip_share_one_forward_per_image(bb, size):
    x = _images(6, size, seed=3)
    musc = MuSc(bb, r_list=(1, 3), pos_interp="bilinear")
    acl = AnomalyCLIP(bb, seed=1)
    alone = [musc.score(x), acl.score(x)]
    c = _Counter(bb)
    try:
        together = score_shared(x, [musc, acl], batch_size=4)
    finally:
        c.close()
    assert c.images == 6  # one backbone forward per image for both detectors
    for a, b in zip(alone, together):
        torch.testing.assert_close(b.maps, a.maps, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.scores, a.scores, rtol=0, atol=1e-5)
    # separately, the two cost two forwards per image
    c = _Counter(bb)
    try:
        musc.score(x)
        acl.score(x)
    finally:
        c.close()
    assert c.images == 12


def test_shared_pass_refuses_disagreeing_interpolation(bb):
    x = _images(3, 80)
    with pytest.raises(ValueError, match="interpolate position embeddings differently"):
        score_shared(x, [MuSc(bb, r_list=(1,)), AnomalyCLIP(bb)])  # bicubic (MuSc) vs bilinear (AnomalyCLIP)
    # at the native size nothing is interpolated: no conflict
    assert len(score_shared(_images(3, 64), [MuSc(bb, r_list=(1,)), AnomalyCLIP(bb)])) == 2
