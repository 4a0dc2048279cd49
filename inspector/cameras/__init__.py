"""Frame sources and the camera worker: :mod:`.base` (the ``FrameSource`` protocol, ``Frame``, the
camera errors), :mod:`.registry` (which spec opens which source: scheme -> factory, as data),
:mod:`.camera` (the ``Camera`` worker: state, reconnection; ``CameraPool``), :mod:`.sources` (OpenCV
devices and streams, folders), :mod:`.genicam` (GigE Vision / USB3 Vision through Aravis),
:mod:`.fakecam` (Aravis' fake GigE camera for tests and demos). Importing this package loads none
of the optional stacks.
"""
