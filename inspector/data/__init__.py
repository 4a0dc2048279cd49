"""Data on disk: :mod:`.mvtec`, the one MVTec-layout reader/writer and the one mask rule, used by
evaluation, training, the defect generators and the benches. (The bundled sample products are
built by :mod:`inspector.synth.samples`: they are real photographs plus generated defects.)"""
