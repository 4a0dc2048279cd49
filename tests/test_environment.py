"""The pinned stack imports together: torchvision's compiled ops load beside torch (the trap of
a CPU-only torch with PyPI's CUDA torchvision), and the field libraries we build on import."""


def test_stack_imports():
    import anomalib
    import open_clip
    import torch
    import torch_geometric
    import torchvision
    from torchvision.ops import nms

    assert torch.__version__.startswith("2.13.0")
    assert torchvision.__version__.startswith("0.28.0")
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]
    assert open_clip.__version__ and anomalib.__version__ and torch_geometric.__version__


def test_opencv_is_headless_only():
    from importlib import metadata

    names = {d.metadata["Name"].lower() for d in metadata.distributions()}
    assert "opencv-python-headless" in names
    assert "opencv-python" not in names, "two OpenCV wheels clobber cv2: keep only the headless one"
