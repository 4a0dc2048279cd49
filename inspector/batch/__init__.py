"""Batch scoring of folders, globs and manifests: :mod:`.common` (load, ERROR row, heatmap,
summary), :mod:`.local` (threads on this machine), :mod:`.ray` (a Ray cluster), :mod:`.report`
(CSV + HTML reports), :mod:`.uploads` (zips uploaded for a batch).
"""
