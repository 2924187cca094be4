"""Seeded synthetic videos from photographs that scikit-image ships: camera pans and zooms, with moving occluders.

Every class is one photograph (`CLASSES`) with its own kind of camera motion: a pan in a direction at a speed, or a
zoom in or out. A video of class c shows a `VideoSize` window moving over photograph c: each frame is a bilinear
resample (`grid_sample`) of a *canvas* (the photograph centre-cropped to the frame's aspect ratio and resized, with
antialiasing, to twice the frame size, so that no frame is magnified more than 1.6x nor minified more than 1.6x). Per
video, the motion is drawn around its class's (direction +-15 degrees, speed +-30%, start position uniform over the
positions that keep the whole path inside the canvas), and with probability `occluder_probability` a disc or square of
a random colour crosses the frame in a straight line in front of the photograph (the attention then has something to
track that is not tied to the camera).

Everything random comes from one `torch.Generator` seeded by the caller (`make_batch(..., seed=...)`), drawn on the
CPU in a fixed order, so a batch is a pure function of (labels, seed, size): training draws batch `i` with seed
`base + i` and stopping early changes nothing that came before. Values are in [-1, 1], shape `(B, 3, F, H, W)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["CLASSES", "ClassSpec", "VideoSize", "canvas", "load_photograph", "make_batch"]


@dataclasses.dataclass(frozen=True)
class ClassSpec:
    """One class: a scikit-image photograph and its camera motion.

    pan_degrees: direction in which the window moves over the photograph (0 = right, 90 = down: the content then moves
    the other way on screen); pan_speed: pan speed in canvas half-widths per frame (the canvas spans [-1, 1]);
    zoom_rate: log zoom per frame (> 0 zooms out: the window grows; < 0 zooms in).
    """

    name: str
    image: str
    pan_degrees: float
    pan_speed: float
    zoom_rate: float = 0.0


# Photographs bundled with scikit-image (no download), one per class; motions chosen to differ in kind, direction
# and speed so the class tokens have to carry the motion as well as the content.
CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("astronaut, slow pan right", "astronaut", 0.0, 0.025),
    ClassSpec("cat, fast pan left", "chelsea", 180.0, 0.05),
    ClassSpec("coffee, pan down", "coffee", 90.0, 0.035),
    ClassSpec("rocket, pan up", "rocket", 270.0, 0.035),
    ClassSpec("galaxies, zoom in", "hubble_deep_field", 0.0, 0.0, -0.03),
    ClassSpec("tissue, diagonal pan", "immunohistochemistry", 45.0, 0.04),
    ClassSpec("motorcycle, zoom out", "motorcycle", 0.0, 0.0, 0.03),
    ClassSpec("cameraman, pan left and zoom in", "camera", 200.0, 0.02, -0.02),
)

_ZOOM_RANGE = (0.625, 1.6)  # window size relative to half the canvas


@dataclasses.dataclass(frozen=True)
class VideoSize:
    """Pixel size of a video: frames, height, width."""

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VideoSize.{field.name}={value!r} is invalid: expected a positive int")


def load_photograph(image: str) -> torch.Tensor:
    """A photograph bundled with scikit-image as float32 `(3, H, W)` in [0, 1]."""
    try:
        import skimage.data
    except ImportError as error:  # pragma: no cover - the extra is documented
        raise ImportError(
            "benchmarks/quality needs scikit-image for its training videos: pip install -e '.[quality]'"
        ) from error
    if image == "motorcycle":
        array = skimage.data.stereo_motorcycle()[0]
    else:
        loader = getattr(skimage.data, image, None)
        if loader is None:
            raise ValueError(f"image={image!r} is not a scikit-image photograph")
        array = loader()
    tensor = torch.from_numpy(array.copy())
    if tensor.ndim == 2:
        tensor = tensor[..., None].expand(-1, -1, 3)
    return tensor[..., :3].permute(2, 0, 1).float() / 255.0


@functools.lru_cache(maxsize=8)
def _canvas_cpu(size: VideoSize, classes: tuple[ClassSpec, ...]) -> torch.Tensor:
    height, width = 2 * size.height, 2 * size.width
    canvases = []
    for spec in classes:
        photo = load_photograph(spec.image)
        _, h, w = photo.shape
        # Centre crop to the frame's aspect ratio, then resize with antialiasing.
        if h * width > w * height:
            crop = round(w * height / width)
            photo = photo[:, (h - crop) // 2 : (h - crop) // 2 + crop, :]
        else:
            crop = round(h * width / height)
            photo = photo[:, :, (w - crop) // 2 : (w - crop) // 2 + crop]
        resized = F.interpolate(photo[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        canvases.append(resized[0].clamp(0, 1) * 2 - 1)
    return torch.stack(canvases)


def canvas(size: VideoSize, device: torch.device | str = "cpu", classes: tuple[ClassSpec, ...] = CLASSES):
    """The classes' canvases `(C, 3, 2H, 2W)` in [-1, 1] for videos of `size`."""
    return _canvas_cpu(size, classes).to(device)


def _uniform(generator: torch.Generator, low, high, shape=()) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _camera_paths(labels: torch.Tensor, frames: int, generator: torch.Generator, classes) -> tuple:
    """Per video and frame: window centre `(B, F, 2)` (x, y in canvas coordinates) and window scale `(B, F)`."""
    batch = labels.numel()
    centres = torch.empty(batch, frames, 2, dtype=torch.float64)
    scales = torch.empty(batch, frames, dtype=torch.float64)
    steps = torch.arange(frames, dtype=torch.float64)
    for index, label in enumerate(labels.tolist()):
        spec = classes[label]
        angle = math.radians(spec.pan_degrees) + float(_uniform(generator, -1, 1)) * math.radians(15)
        speed = spec.pan_speed * float(_uniform(generator, 0.7, 1.3))
        zoom = spec.zoom_rate * float(_uniform(generator, 0.7, 1.3))
        low, high = _ZOOM_RANGE
        # Start the zoom where the whole path fits the allowed range.
        span = zoom * (frames - 1)
        start_scale = float(_uniform(generator, max(low, low * math.exp(-span)), min(high, high * math.exp(-span))))
        scale = start_scale * torch.exp(zoom * steps)
        # The window spans scale * 0.5 of the canvas's half-extent on each side; its centre must keep it inside.
        margin = 1.0 - 0.5 * float(scale.max())
        velocity = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64) * speed
        travel = velocity * (frames - 1)
        # A path longer than the room it has is slowed down to fit.
        fit = min(1.0, 2 * margin / max(float(travel.abs().max()), 1e-12))
        velocity, travel = velocity * fit, travel * fit
        start_low = -margin - torch.clamp(travel, max=0)
        start_high = margin - torch.clamp(travel, min=0)
        start = start_low + (start_high - start_low) * torch.rand(2, generator=generator, dtype=torch.float64)
        centres[index] = start + steps[:, None] * velocity
        scales[index] = scale
    return centres, scales


def _occluders(batch: int, size: VideoSize, probability: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per video: present, shape (0 disc, 1 square), radius (pixels), colour in [-1, 1], start and velocity (pixels)."""
    present = torch.rand(batch, generator=generator, dtype=torch.float64) < probability
    square = torch.rand(batch, generator=generator, dtype=torch.float64) < 0.5
    radius = _uniform(generator, 0.08, 0.16, (batch,)) * size.height
    colour = _uniform(generator, -1.0, 1.0, (batch, 3))
    start = torch.stack(
        [_uniform(generator, 0, size.width, (batch,)), _uniform(generator, 0, size.height, (batch,))], dim=-1
    )
    angle = _uniform(generator, 0, 2 * math.pi, (batch,))
    speed = _uniform(generator, 0.5, 1.5, (batch,)) * size.height / max(size.frames, 1)
    velocity = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1) * speed[:, None]
    return dict(present=present, square=square, radius=radius, colour=colour, start=start, velocity=velocity)


def make_batch(
    labels: torch.Tensor,
    *,
    seed: int,
    size: VideoSize,
    device: torch.device | str = "cpu",
    occluder_probability: float = 0.5,
    classes: tuple[ClassSpec, ...] = CLASSES,
) -> torch.Tensor:
    """Videos `(B, 3, F, H, W)` in [-1, 1], float32 on `device`, of the classes `labels` (int, `(B,)`); a pure
    function of (labels, seed, size, occluder_probability)."""
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels must be in [0, {len(classes)}), got {labels.tolist()}")
    if not 0.0 <= occluder_probability <= 1.0:
        raise ValueError(f"occluder_probability={occluder_probability!r} is invalid: expected a number in [0, 1]")
    generator = torch.Generator().manual_seed(int(seed))
    batch, frames = labels.numel(), size.frames
    centres, scales = _camera_paths(labels, frames, generator, classes)
    occluders = _occluders(batch, size, occluder_probability, generator)

    device = torch.device(device)
    # Frame pixel centres in [-1, 1] (align_corners=False convention), scaled to the window on the canvas. The
    # random draws above are float64 on the CPU; the per-pixel work runs on `device` in float32.
    ys = (torch.arange(size.height, device=device) + 0.5) / size.height * 2 - 1
    xs = (torch.arange(size.width, device=device) + 0.5) / size.width * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([grid_x, grid_y], dim=-1)  # (H, W, 2) as grid_sample wants: x first
    centres, scales = centres.to(device, torch.float32), scales.to(device, torch.float32)
    sample_grid = centres[:, :, None, None, :] + 0.5 * scales[:, :, None, None, None] * base
    sources = canvas(size, device, classes)[labels.to(device)]  # (B, 3, 2H, 2W)
    sources = sources[:, None].expand(-1, frames, -1, -1, -1).reshape(batch * frames, *sources.shape[1:])
    video = F.grid_sample(
        sources,
        sample_grid.reshape(batch * frames, size.height, size.width, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    ).reshape(batch, frames, 3, size.height, size.width)

    # Occluders, composited with a one-pixel soft edge.
    shapes = {name: value.to(device, torch.float32) for name, value in occluders.items()}
    py = torch.arange(size.height, device=device) + 0.5
    px = torch.arange(size.width, device=device) + 0.5
    t = torch.arange(frames, device=device, dtype=torch.float32)
    position = shapes["start"][:, None, :] + t[None, :, None] * shapes["velocity"][:, None, :]  # (B, F, 2)
    dx = px[None, None, None, :] - position[..., 0, None, None]
    dy = py[None, None, :, None] - position[..., 1, None, None]
    distance = torch.where(
        shapes["square"][:, None, None, None] > 0, torch.maximum(dx.abs(), dy.abs()), torch.sqrt(dx**2 + dy**2)
    )
    coverage = torch.clamp(shapes["radius"][:, None, None, None] - distance + 0.5, 0.0, 1.0)
    coverage = (coverage * shapes["present"][:, None, None, None])[:, :, None]
    video = video * (1 - coverage) + shapes["colour"][:, None, :, None, None] * coverage
    return video.permute(0, 2, 1, 3, 4).contiguous()
