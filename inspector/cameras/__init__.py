"""Frame sources: :mod:`.sources` (the ``FrameSource`` protocol, OpenCV devices and streams, folders,
the scheme registry and the ``Camera`` worker), :mod:`.genicam` (GigE Vision / USB3 Vision through
Aravis), :mod:`.fakecam` (Aravis' fake GigE camera for tests and demos). Importing this package
loads none of the optional stacks.
"""
