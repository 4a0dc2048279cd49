"""Data on disk: :mod:`.mvtec` (the one MVTec-layout reader/writer and mask rule) and :mod:`.samples`
(the bundled sample products built from real photographs of normal surfaces)."""
