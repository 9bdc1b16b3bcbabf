"""The GPU input path: a batch of JPEGs decoded by torchvision (nvJPEG on CUDA), both model inputs made with torch.

One decode per image at full resolution on the device, then an antialiased resize for each model, as
`preprocess.model_inputs` does with PIL: CLIP's shortest side to 224 (bicubic) and centre crop, the watermark
network's squash to 256x256 (bilinear), each normalized with its model's mean and std. What `decode_jpeg` refuses
(PNG or WebP bytes, and on CUDA what nvJPEG cannot read, e.g. some CMYK files) is decoded by PIL instead and
counted; what PIL refuses too is a failure with the decoder's message, as on the PIL path.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from curate.models.preprocess import (
    CLIP_MEAN,
    CLIP_SIZE,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WATERMARK_SIZE,
    decode,
)

# torchvision 0.29 deprecates its decoders in favour of torchcodec; decode_jpeg is still the one batched nvJPEG API
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)


@dataclass
class TensorBatch:
    """Model inputs of the images of a batch that decoded, on the device, in the order given."""

    index: list[int]  # positions, in the list of encoded images, of the rows below
    clip: torch.Tensor  # float [n, 3, 224, 224], normalized
    watermark: torch.Tensor  # float [n, 3, 256, 256], normalized, channels_last
    failures: list[tuple[int, str]] = field(default_factory=list)  # (position, error) of what neither decoder read
    fallbacks: int = 0  # images decode_jpeg refused and PIL decoded


def decode_images(encoded: Sequence[bytes], device: torch.device) -> tuple[list[torch.Tensor | str], int]:
    """uint8 [3, H, W] RGB tensors on device (or the error text), and how many needed the PIL fallback.

    The whole batch goes to decode_jpeg in one call (nvJPEG's batched decode on CUDA); one bad image fails that
    call, and then each image is tried alone.
    """
    data = [torch.frombuffer(bytearray(item), dtype=torch.uint8) for item in encoded]
    if not data:
        return [], 0
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device)), 0
    except RuntimeError:
        pass
    images: list[torch.Tensor | str] = []
    fallbacks = 0
    for item, raw in zip(data, encoded, strict=True):
        try:
            images.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
            continue
        except RuntimeError:
            pass
        try:
            pixels = np.array(decode(raw, draft=False))
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            images.append(f"{type(error).__name__}: {error}")
            continue
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).to(device))
        fallbacks += 1
    return images, fallbacks


def clip_input(image: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """float [3, size, size] in 0-255: shortest side to size (bicubic, antialiased), centre crop, as `clip_pixels`."""
    height, width = image.shape[-2:]
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    pixels = image.float()
    if (new_width, new_height) != (width, height):
        pixels = F.resize(pixels, [new_height, new_width], F.InterpolationMode.BICUBIC, antialias=True)
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    return pixels[:, top : top + size, left : left + size].clamp_(0, 255)


def watermark_input(image: torch.Tensor, size: int = WATERMARK_SIZE) -> torch.Tensor:
    """float [3, size, size] in 0-255: squashed to size x size, bilinear, antialiased, as `watermark_pixels`."""
    if tuple(image.shape[-2:]) == (size, size):
        return image.float()
    return F.resize(image.float(), [size, size], F.InterpolationMode.BILINEAR, antialias=True).clamp_(0, 255)


def normalized(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float [N, 3, H, W] in 0-255 to (x / 255 - mean) / std, as ToTensor + Normalize compute it."""
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return pixels.div_(255).sub_(mean_t).div_(std_t)


def model_tensors(encoded: Sequence[bytes], device: torch.device) -> TensorBatch:
    """Both model inputs of each image in encoded, from one decode on device."""
    images, fallbacks = decode_images(encoded, device)
    index = [position for position, image in enumerate(images) if not isinstance(image, str)]
    failures = [(position, image) for position, image in enumerate(images) if isinstance(image, str)]
    decoded = [image for image in images if not isinstance(image, str)]
    if not decoded:
        empty = torch.zeros(0, 3, CLIP_SIZE, CLIP_SIZE, device=device)
        return TensorBatch(index, empty, torch.zeros(0, 3, WATERMARK_SIZE, WATERMARK_SIZE, device=device),
                           failures, fallbacks)
    clip = normalized(torch.stack([clip_input(image) for image in decoded]), CLIP_MEAN, CLIP_STD)
    watermark = normalized(torch.stack([watermark_input(image) for image in decoded]), IMAGENET_MEAN, IMAGENET_STD)
    return TensorBatch(index, clip, watermark.contiguous(memory_format=torch.channels_last), failures, fallbacks)


def prepared(encoded: Sequence[bytes], device: torch.device) -> TensorBatch:
    """`model_tensors` for a producer thread: on CUDA on a stream of its own, finished before it is returned."""
    if device.type != "cuda":
        return model_tensors(encoded, device)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        batch = model_tensors(encoded, device)
    stream.synchronize()  # blocks the producer only; the models keep running on the default stream
    return batch


def handed_over(batch: TensorBatch) -> TensorBatch:
    """Tell the CUDA allocator the consumer's stream uses the producer's tensors (a no-op on CPU)."""
    if batch.clip.is_cuda:
        for tensor in (batch.clip, batch.watermark):
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
    return batch


def pixel_tensors(clip_pixels: np.ndarray, watermark_pixels: np.ndarray,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized model inputs on device from the PIL path's uint8 [N, H, W, 3] (pinned, non-blocking on CUDA)."""
    tensors = []
    for pixels, mean, std in ((clip_pixels, CLIP_MEAN, CLIP_STD), (watermark_pixels, IMAGENET_MEAN, IMAGENET_STD)):
        host = torch.from_numpy(pixels)
        if device.type == "cuda":
            host = host.pin_memory()
        tensors.append(normalized(host.to(device, non_blocking=True).permute(0, 3, 1, 2).float(), mean, std))
    return tensors[0], tensors[1]


def gather(parts: list[torch.Tensor], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """The parts concatenated and copied to the host once (the one sync of a table's scoring)."""
    return torch.cat(parts).cpu().numpy().astype(dtype, copy=False)
