"""Face detection, 68 landmarks and the FFHQ alignment StyleHEAT expects of a source portrait.

Detector and landmarks: dlib's HOG frontal face detector (1 upsample) and the iBUG 68-point shape
predictor shipped in the ``face_recognition_models`` package (real weights, nothing downloaded).
Landmarks are (68, 2) float64 pixel coordinates, x right, y down, iBUG order (0-based: 36-41 left eye,
42-47 right eye, 48 and 54 mouth corners).

Alignment (``align_face_single`` of StyleHEAT's ``utils/video_preprocess``, itself the FFHQ recipe):
an oriented square ``quad`` is built from the eye centres and mouth corners::

    eye_avg = (mean(left eye) + mean(right eye)) / 2,  eye_to_eye = right - left,
    mouth_avg = (mouth_left + mouth_right) / 2,        eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - rot90(eye_to_mouth), normalised, times max(2 |eye_to_eye|, 1.8 |eye_to_mouth|)
    y = rot90(x);  c = eye_avg + 0.1 eye_to_mouth;  quad = [c-x-y, c-x+y, c+x+y, c+x-y]

then the image is optionally shrunk (Lanczos), cropped around the quad with a 10 % border, and
resampled onto a 1024x1024 square (Pillow QUAD transform, bilinear), then resized to the output size
with Lanczos if smaller. StyleHEAT runs it with padding disabled (areas outside the photo are black);
``pad=True`` fills them FFHQ-style (reflected and blurred) instead.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

TRANSFORM_SIZE = 1024
DETECT_MAX_SIDE = 1024  # larger images are detected on a downscaled copy (landmarks at full resolution)
LARGE_SIDE = 640  # from this size on, detection first tries without upsampling


class NoFaceError(ValueError):
    """No face was found in an image."""


# --------------------------------------------------------------------------------------------
# dlib
# --------------------------------------------------------------------------------------------

_DLIB_LOCK = threading.Lock()
_RUN_LOCK = threading.Lock()  # dlib's detector keeps scratch state: one call at a time
_DLIB: dict[str, object] = {}


def _dlib_models():
    """(detector, predictor), loaded once. Raises RuntimeError naming the missing package."""
    with _DLIB_LOCK:
        if not _DLIB:
            try:
                import dlib
            except ImportError as exc:
                raise RuntimeError("face detection needs dlib: pip install dlib==20.0.1 "
                                   "(it builds from source; cmake and a C++ compiler are required)") from exc
            model = shape_predictor_path()
            _DLIB["detector"] = dlib.get_frontal_face_detector()
            _DLIB["predictor"] = dlib.shape_predictor(str(model))
            _DLIB["dlib"] = dlib
        return _DLIB["dlib"], _DLIB["detector"], _DLIB["predictor"]


def shape_predictor_path() -> Path:
    """``shape_predictor_68_face_landmarks.dat`` inside the installed face_recognition_models package.

    Located without importing the package (its ``__init__`` needs ``pkg_resources``, which recent
    setuptools no longer ship).
    """
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face landmarks need the face_recognition_models package: "
                           "pip install face_recognition_models==0.3.0")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "models" / "shape_predictor_68_face_landmarks.dat"
        if path.is_file():
            return path
    raise RuntimeError("face_recognition_models is installed but shape_predictor_68_face_landmarks.dat is "
                       "missing from it; reinstall it: pip install --force-reinstall face_recognition_models==0.3.0")


def dlib_available() -> bool:
    try:
        _dlib_models()
        return True
    except RuntimeError:
        return False


@dataclass
class Face:
    """One detected face: box (left, top, right, bottom) in pixels and its 68 landmarks (x, y down)."""

    box: tuple[int, int, int, int]
    landmarks: np.ndarray  # (68, 2) float64

    @property
    def area(self) -> int:
        l, t, r, b = self.box
        return max(0, r - l) * max(0, b - t)


def _as_rgb_uint8(image: np.ndarray, what: str = "image") -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"{what} must be an (H, W, 3) RGB array, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 RGB, got dtype {img.dtype}")
    return np.ascontiguousarray(img[:, :, :3])


def predict_landmarks(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """68 landmarks of the face inside ``box`` (left, top, right, bottom), without detection."""
    dlib, _, predictor = _dlib_models()
    img = _as_rgb_uint8(image)
    l, t, r, b = (int(round(v)) for v in box)
    with _RUN_LOCK:
        shape = predictor(img, dlib.rectangle(l, t, r, b))
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def detect_faces(image: np.ndarray, *, upsample: int = 1) -> list[Face]:
    """All frontal faces, largest first, each with its 68 landmarks at full resolution.

    Images larger than 1024 px are searched on a downscaled copy; images of 640 px or more are first
    searched without upsampling, then with ``upsample`` if that finds nothing. Smaller images (the
    256 crops of the 3DMM path) use ``upsample`` directly, as the reference run did.
    """
    dlib, detector, predictor = _dlib_models()
    img = _as_rgb_uint8(image)
    h, w = img.shape[:2]
    scale = 1.0
    search = img
    if max(h, w) > DETECT_MAX_SIDE:
        scale = DETECT_MAX_SIDE / max(h, w)
        search = np.asarray(Image.fromarray(img).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                        resample=Image.BILINEAR))
    faces = []
    with _RUN_LOCK:
        rects = []
        if upsample > 0 and max(search.shape[:2]) >= LARGE_SIDE:
            rects = list(detector(search, 0))  # faces in large photos are found without upsampling (4x faster)
        if not rects:
            rects = list(detector(search, upsample))
        for rect in rects:
            box = (rect.left(), rect.top(), rect.right(), rect.bottom())
            if scale != 1.0:
                box = tuple(int(round(v / scale)) for v in box)
            shape = predictor(img, dlib.rectangle(*box))
            lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            faces.append(Face(box, lm))
    faces.sort(key=lambda f: f.area, reverse=True)
    return faces


@dataclass
class Detection:
    landmarks: np.ndarray  # (68, 2) of the largest face
    box: tuple[int, int, int, int]
    faces_found: int


def detect_landmarks(image: np.ndarray, *, upsample: int = 1) -> Detection | None:
    """Landmarks of the largest face, or None when there is no face."""
    faces = detect_faces(image, upsample=upsample)
    if not faces:
        return None
    return Detection(faces[0].landmarks, faces[0].box, len(faces))


# --------------------------------------------------------------------------------------------
# FFHQ quad and warp
# --------------------------------------------------------------------------------------------

def ffhq_quad(lm68: np.ndarray) -> tuple[np.ndarray, float]:
    """Oriented crop square (4, 2) [upper-left, lower-left, lower-right, upper-right] and its side."""
    lm = np.asarray(lm68, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {lm.shape}")
    eye_left = lm[36:42].mean(axis=0)
    eye_right = lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    x = x / np.hypot(*x)
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.array([-x[1], x[0]])
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad, float(np.hypot(*x) * 2)


def quad_to_output(points: np.ndarray, quad: np.ndarray, size: int) -> np.ndarray:
    """Map pixel coordinates of the source image into the aligned ``size`` x ``size`` image."""
    q = np.asarray(quad, dtype=np.float64) + 0.5          # continuous coordinates (pixel k spans [k, k+1])
    origin, ex, ey = q[0], (q[3] - q[0]) / size, (q[1] - q[0]) / size
    m = np.stack([ex, ey], axis=1)                         # source = origin + m @ (u, v)
    p = np.asarray(points, dtype=np.float64) + 0.5
    uv = np.linalg.solve(m, (p - origin).T).T
    return uv - 0.5


def _pad_ffhq(img: Image.Image, quad: np.ndarray, qsize: float, border: int) -> tuple[Image.Image, np.ndarray]:
    """Reflect-pad the image where the quad leaves it, blurring and fading the padding (FFHQ style)."""
    from scipy.ndimage import gaussian_filter

    w, h = img.size
    lo = np.floor(quad.min(axis=0)).astype(int)
    hi = np.ceil(quad.max(axis=0)).astype(int)
    pad = [max(-lo[0] + border, 0), max(-lo[1] + border, 0), max(hi[0] - w + border, 0), max(hi[1] - h + border, 0)]
    if max(pad) <= border - 4:
        return img, quad
    pad = [max(p, int(np.rint(qsize * 0.3))) for p in pad]
    arr = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), mode="reflect")
    hh, ww = arr.shape[:2]
    yy, xx = np.ogrid[:hh, :ww]
    xx = np.float32(xx)
    yy = np.float32(yy)
    with np.errstate(divide="ignore", invalid="ignore"):
        mx = np.minimum(xx / max(pad[0], 1e-6), (ww - 1 - xx) / max(pad[2], 1e-6))
        my = np.minimum(yy / max(pad[1], 1e-6), (hh - 1 - yy) / max(pad[3], 1e-6))
    mask = np.maximum(1.0 - mx, 1.0 - my)[:, :, None].astype(np.float32)
    blur = qsize * 0.02
    arr += (gaussian_filter(arr, [blur, blur, 0]) - arr) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(mask, 0.0, 1.0)
    out = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")
    return out, quad + np.array(pad[:2], dtype=np.float64)


def warp_ffhq(image: np.ndarray, quad: np.ndarray, qsize: float, output_size: int = 1024, *,
              transform_size: int = TRANSFORM_SIZE, pad: bool = False) -> np.ndarray:
    """Resample ``quad`` of ``image`` to an ``output_size`` square (StyleHEAT's shrink/crop/transform)."""
    img = Image.fromarray(_as_rgb_uint8(image))
    quad = np.array(quad, dtype=np.float64)
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(img.size[0]) / shrink)), int(np.rint(float(img.size[1]) / shrink)))
        img = img.resize(rsize, Image.LANCZOS)
        quad /= shrink
        qsize /= shrink
    border = max(int(np.rint(qsize * 0.1)), 3)
    lo = np.floor(quad.min(axis=0)).astype(int)
    hi = np.ceil(quad.max(axis=0)).astype(int)
    crop = (max(lo[0] - border, 0), max(lo[1] - border, 0), min(hi[0] + border, img.size[0]),
            min(hi[1] + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= np.array(crop[:2], dtype=np.float64)
    if pad:
        img, quad = _pad_ffhq(img, quad, qsize, border)
    img = img.transform((transform_size, transform_size), Image.QUAD, tuple((quad + 0.5).flatten()),
                        Image.BILINEAR)
    if output_size < transform_size:
        img = img.resize((output_size, output_size), Image.LANCZOS)
    elif output_size > transform_size:
        raise ValueError(f"output size {output_size} is larger than the transform size {transform_size}")
    return np.asarray(img)


# --------------------------------------------------------------------------------------------
# Portrait API
# --------------------------------------------------------------------------------------------

@dataclass
class AlignedPortrait:
    """An FFHQ-aligned portrait and where it came from."""

    image: np.ndarray              # (size, size, 3) uint8 RGB
    landmarks: np.ndarray          # (68, 2) the source landmarks mapped into ``image`` (x, y down)
    faces_found: int               # faces dlib found; the largest was used
    source_landmarks: np.ndarray   # (68, 2) in the input image
    face_box: tuple[int, int, int, int]  # (left, top, right, bottom) of the chosen face in the input
    quad: np.ndarray               # (4, 2) crop square in the input (upper-left, lower-left, lower-right, upper-right)
    warnings: list[str] = field(default_factory=list)

    @property
    def image_256(self) -> np.ndarray:
        """The 256x256 version the encoders take (Lanczos, as the official 256 output)."""
        if self.image.shape[0] == 256:
            return self.image
        return np.asarray(Image.fromarray(self.image).resize((256, 256), Image.LANCZOS))


def align_portrait(image: np.ndarray, *, size: int = 1024, pad: bool = False, upsample: int = 1,
                   source_name: str | None = None) -> AlignedPortrait:
    """Detect the face (the largest if several), 68 landmarks, FFHQ crop/rotation -> ``size``^2 RGB.

    Raises :class:`NoFaceError` (a ValueError) naming ``source_name`` when no face is found.
    """
    name = source_name or "the image"
    img = _as_rgb_uint8(image, what=name)
    if not 16 <= size <= TRANSFORM_SIZE:
        raise ValueError(f"aligned size must be between 16 and {TRANSFORM_SIZE}, got {size}")
    faces = detect_faces(img, upsample=upsample)
    if not faces:
        raise NoFaceError(f"no face found in {name} ({img.shape[1]}x{img.shape[0]}): use a photo with one clearly "
                          "visible, roughly frontal face (dlib's frontal face detector found none)")
    face = faces[0]
    warnings = []
    if len(faces) > 1:
        warnings.append(f"{len(faces)} faces found in {name}; using the largest (box {face.box})")
    quad, qsize = ffhq_quad(face.landmarks)
    lo, hi = quad.min(axis=0), quad.max(axis=0)
    if lo[0] < 0 or lo[1] < 0 or hi[0] > img.shape[1] or hi[1] > img.shape[0]:
        warnings.append(f"the face crop extends past the edges of {name}; "
                        + ("the border was filled by reflection" if pad else "those areas are black (use pad=True)"))
    out = warp_ffhq(img, quad, qsize, size, pad=pad)
    lm_out = quad_to_output(face.landmarks, quad, size)
    return AlignedPortrait(out, lm_out, len(faces), face.landmarks, face.box, quad, warnings)


def read_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (EXIF orientation applied); clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        from PIL import ImageOps

        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as exc:  # not an OSError: would otherwise be a traceback
        raise ValueError(f"{path} is too large to open safely ({exc}); scale it down first "
                         f"(a portrait needs no more than about 2000 pixels a side)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read {path} as an image ({exc}); use a PNG or JPEG file") from exc
