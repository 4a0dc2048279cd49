"""Patch-feature backbones: one forward gives every layer every detector needs.

:mod:`.registry` (names -> configs as data, ``load_backbone``), :mod:`.base` (the ``PatchBackbone``
contract), :mod:`.efficientnet` and :mod:`.vit` (CLIP, DINOv2), :mod:`.weights` (importing
official weight files into ``models/`` without executing them).
"""
