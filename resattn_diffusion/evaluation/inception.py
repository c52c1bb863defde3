"""The FID Inception network: InceptionV3 as in TensorFlow's 2015-12-05 graph, 2048-d pool features.

Which weights and which resize give the standard FID number
------------------------------------------------------------
FID is only comparable between papers when it uses the same network, weights and input pipeline. The standard
network is the InceptionV3 graph released by TensorFlow on 2015-12-05 (the one the original TTUR FID code
loads). Its PyTorch port differs from torchvision's ``inception_v3`` in four blocks (average pools that ignore
padding, a max pool in the last block) and has 1008 output classes; :class:`FIDInceptionV3` is that variant.

Weights: ``pt_inception-2015-12-05-6726825d.pth`` from pytorch-fid
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth).
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` has the same layer names and loads as well.
These tools never download: pass the file with ``--inception-weights PATH`` (or ``inception_weights=``), set
``RESATTN_INCEPTION_WEIGHTS``, or leave it in the torch hub cache where pytorch-fid puts it.

Input pipeline (``resize``):

* ``"pytorch-fid"`` (default): RGB in [0, 1], resized to 299x299 with PyTorch's bilinear interpolation
  (``align_corners=False``, no antialiasing) from the full-resolution image, then scaled to [-1, 1] by
  ``2 x - 1``. This is pytorch-fid's pipeline, the one most diffusion papers report.
* ``"tf1"``: TensorFlow 1's legacy bilinear resize (source pixel ``i * in / out``, no half-pixel centres) on
  [0, 255] values, then ``(x - 128) / 128`` -- what the TF graph itself does; matches the original TTUR code and
  torch-fidelity. The two differ by a fraction of a FID point; never compare numbers across them.

Features are the 2048-d output of the final average pool ("pool3"), computed in float32.

torchvision's ImageNet ``inception_v3`` weights are deliberately not offered: they are a different network and
give numbers that are not FID.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EvaluationError

#: File name of the standard FID weights as published by pytorch-fid.
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
#: The same weights as published by torch-fidelity.
TORCH_FIDELITY_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
#: Environment variable naming a local weights file, used when no path is passed.
WEIGHTS_ENV = "RESATTN_INCEPTION_WEIGHTS"
RESIZE_MODES: tuple[str, ...] = ("pytorch-fid", "tf1")
INPUT_SIZE = 299
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3 as in TF), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_average_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's 3x3 average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_tf_average_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], dim=1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_tf_average_pool(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class InceptionE(nn.Module):
    """The last two blocks. TF pools the first with an unpadded average and the second with a max pool."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        if self.pool == "avg":
            pooled = _tf_average_pool(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], dim=1)


def resize_bilinear_tf1(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1's legacy ``resize_bilinear(align_corners=False)``: output pixel ``i`` samples the source at
    ``i * in / out`` (no half-pixel offset), interpolating linearly between its floor and the next pixel."""

    def axis_weights(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
        low = source.floor().long().clamp(max=in_size - 1)
        high = (low + 1).clamp(max=in_size - 1)
        fraction = (source - low.to(torch.float64)).to(images.dtype).to(images.device)
        return low.to(images.device), high.to(images.device), fraction

    out_h, out_w = size
    low, high, frac = axis_weights(images.shape[-2], out_h)
    rows = images[..., low, :] * (1 - frac)[:, None] + images[..., high, :] * frac[:, None]
    low, high, frac = axis_weights(images.shape[-1], out_w)
    return rows[..., low] * (1 - frac) + rows[..., high] * frac


class FIDInceptionV3(nn.Module):
    """InceptionV3 of the TF 2015-12-05 FID graph; ``forward`` maps RGB images in [0, 1] (any size, N x 3 x H x W)
    to 2048-d pool features.

    Layer names match pytorch-fid's ``FIDInceptionA/C/E`` port (and torch-fidelity's), so their weight files load
    with :meth:`load_weights`. The 1008-class ``fc`` exists only so those files load strictly; it is never used.

    Args:
        resize: ``"pytorch-fid"`` or ``"tf1"`` (see the module docstring).
    """

    def __init__(self, resize: str = "pytorch-fid"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise EvaluationError(f"inception resize must be one of {list(RESIZE_MODES)}, got {resize!r}.")
        self.resize_mode = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, 1008)
        self.eval()
        self.requires_grad_(False)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images of any size -> [0, 1] images of 299x299, with the interpolation of ``resize_mode``.

        (Bilinear interpolation is linear in the pixel values, so resizing before or after TF's scaling to
        [0, 255] is the same.)"""
        size = (INPUT_SIZE, INPUT_SIZE)
        if tuple(images.shape[-2:]) == size:
            return images
        if self.resize_mode == "tf1":
            return resize_bilinear_tf1(images, size)
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> the network's input range: ``2 x - 1`` (pytorch-fid) or ``(255 x - 128) / 128`` (TF graph)."""
        if self.resize_mode == "tf1":
            return (images * 255.0 - 128.0) / 128.0
        return 2.0 * images - 1.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise EvaluationError(f"FID Inception expects RGB images N x 3 x H x W, got shape {tuple(images.shape)}.")
        x = self.normalize(self.resize(images))
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, output_size=1), 1)

    def load_weights(self, path: str | os.PathLike) -> FIDInceptionV3:
        """Load a pytorch-fid / torch-fidelity weights file (``.pth``, or ``.safetensors``) strictly."""
        path = Path(path)
        if not path.is_file():
            raise EvaluationError(f"Inception weights file {str(path)!r} does not exist (--inception-weights).")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state_dict = load_file(str(path))
            else:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any unreadable file: say which and why
            raise EvaluationError(f"cannot read Inception weights {str(path)!r} (--inception-weights): {err}") from err
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
            state_dict = state_dict["state_dict"]
        if not isinstance(state_dict, dict):
            raise EvaluationError(f"{str(path)!r} does not hold a state dict (--inception-weights).")
        # Files saved by older torch lack BatchNorm's num_batches_tracked counters; they do not affect eval.
        own = self.state_dict()
        state_dict = dict(state_dict)
        for key in own:
            if key.endswith("num_batches_tracked") and key not in state_dict:
                state_dict[key] = own[key]
        state_dict = {k: v for k, v in state_dict.items() if k in own or not k.endswith("num_batches_tracked")}
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise EvaluationError(
                f"{str(path)!r} is not an FID Inception weights file (missing {len(missing)} keys, e.g. "
                f"{missing[:3]}; unexpected {len(unexpected)}, e.g. {unexpected[:3]}). Use {FID_WEIGHTS_NAME} "
                f"from {FID_WEIGHTS_URL}."
            )
        mismatched = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(own[k].shape)]
        if mismatched:
            raise EvaluationError(
                f"{str(path)!r} has tensors of the wrong shape (e.g. {mismatched[0]!r}); it is not the FID "
                f"Inception ({FID_WEIGHTS_NAME})."
            )
        self.load_state_dict(state_dict, strict=True)
        return self


def find_inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """The local FID weights file to use: ``weights_path``, else ``$RESATTN_INCEPTION_WEIGHTS``, else a copy in the
    torch hub cache (where pytorch-fid / torch-fidelity keep their downloads). Never downloads.

    Raises:
        EvaluationError: none was found; the message names ``--inception-weights``.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise EvaluationError(f"Inception weights file {str(path)!r} does not exist (--inception-weights).")
        return path
    from_env = os.environ.get(WEIGHTS_ENV)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise EvaluationError(f"${WEIGHTS_ENV} names {from_env!r}, which does not exist.")
        return path
    hub_checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for name in (FID_WEIGHTS_NAME, TORCH_FIDELITY_WEIGHTS_NAME):
        if (hub_checkpoints / name).is_file():
            return hub_checkpoints / name
    raise EvaluationError(
        "FID needs Inception weights; none found offline. Pass --inception-weights "
        f"/path/to/{FID_WEIGHTS_NAME} (Python: inception_weights=...), or set ${WEIGHTS_ENV}. "
        f"The file is published at {FID_WEIGHTS_URL}."
    )


def load_fid_inception(
    weights_path: str | os.PathLike | None = None, resize: str = "pytorch-fid", device: str | torch.device = "cpu"
) -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with the standard weights from a local file (see :func:`find_inception_weights`),
    in eval mode on ``device``."""
    model = FIDInceptionV3(resize=resize)
    model.load_weights(find_inception_weights(weights_path))
    return model.to(device).eval()


class TorchFidelityInception(nn.Module):
    """torch-fidelity's InceptionV3 (``inception-v3-compat``, feature ``"2048"``), for users who have it installed.

    Its input pipeline is the ``"tf1"`` one; it expects uint8 images, so [0, 1] inputs are rounded to 8 bits first.
    With ``weights_path=None`` torch-fidelity downloads its weights, which fails offline: pass the file.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:
            raise EvaluationError(
                "inception backend 'torch-fidelity' needs the torch-fidelity package (pip install torch-fidelity); "
                "or use the built-in backend with --inception-weights PATH."
            ) from err
        try:
            self.network = FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048"],
                feature_extractor_weights_path=None if weights_path is None else str(weights_path),
            )
        except Exception as err:  # a failed download or unreadable file, reported with the flag that fixes it
            raise EvaluationError(
                f"torch-fidelity could not load its Inception weights ({err}). Offline, pass --inception-weights "
                f"/path/to/{TORCH_FIDELITY_WEIGHTS_NAME} or {FID_WEIGHTS_NAME}."
            ) from err

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images * 255.0).round().clamp(0, 255).to(torch.uint8)
        return self.network(pixels)[0]
