"""Inference fast path for the per-frame StyleGAN2 synthesis (64x64 feature -> image).

For one identity the W+ code is fixed, so every modulated convolution of the layers above 64x64 has the
same weights for every frame. :class:`FoldedSynthesis` folds, once per (identity, output size, dtype):

* the style modulation and the demodulation into plain conv weights (``w * s * rsqrt(sum (w*s)^2 + eps)``),
  so frames run as ordinary batched convolutions with shared weights (no per-sample grouped conv);
* the no-op noise injection away and the FusedLeakyReLU bias into the conv bias (after the blur for the
  upsampling convs, where it must come after the FIR filter);
* the ``sqrt(2)`` gain of every leaky ReLU into the weights of the layers that consume it (a positive
  scale commutes with the leaky ReLU), and the ``1/16`` of the ``[1,3,3,1]`` blur into the upsampling
  conv weights; the blur (integer taps) and the activation bias run as one depthwise convolution.

``FoldedSynthesis.build(generator, wplus, out_size=S)`` then ``module(feat64, skip32)`` equals
``generator.synthesize_from_64(feat64, skip32, wplus.expand(B, ...), out_size=S)`` (float32: within the
reference parity tolerance; only rounding order differs). For ``out_size < generator.size`` it stops at
that block and returns the accumulated RGB skip there (cheap previews at 256 or 512).

Options (all per built module):

* ``dtype=torch.bfloat16``: weights and the feature path in bfloat16, the RGB skip accumulated in float32
  (explicit casts rather than ``torch.autocast``: the same convolutions autocast would run in bf16, with a
  deterministic choice of what stays float32).
  Fast only where the hardware has bf16 arithmetic (CUDA Ampere+, CPUs with AVX512-BF16 / AMX); see
  :func:`bf16_supported`. Elsewhere it still computes the right thing, slowly (PyTorch emulates it).
  Accuracy: PSNR of a 1024^2 frame against float32 is reported by ``benchmarks/bench_render.py``;
  ``BF16_MIN_PSNR_DB`` is the lower bound the tests assert.
* ``channels_last=True``: NHWC activations (oneDNN / cuDNN prefer them for these convolutions).
* ``winograd`` (CPU float32; default: on where :func:`winograd_preferred`, i.e. torch has NNPACK and the CPU
  has no AVX512): the 3x3 convolutions of blocks with at least :data:`WINOGRAD_MIN_CHANNELS` channels (and not
  above :data:`WINOGRAD_MAX_RES`) run through NNPACK's Winograd kernel (about 2x fewer multiplies than a
  direct / im2col convolution; measured 1.5-2.4x faster than oneDNN on 2 AVX2 cores for 64-512 channels, slower
  at 32). NNPACK's kernels are AVX2 only: on a 2-core AVX512/AMX Xeon oneDNN's direct AVX512 convolution was
  faster (1024^2 synthesis 0.61 vs 0.64 s, 256^2 0.24 vs 0.29 s), hence the default. NNPACK's batched mode is
  slow (2.4x per frame at batch 2), so a batch runs through it one frame at a time. Those blocks stay NCHW
  (NNPACK's layout); the others use ``channels_last``. Rounding differs from the direct convolution by ~1e-6
  relative (inside the parity tolerance: tests/test_parity_full.py).
* ``compile=True`` (CUDA only, opt-in): wraps the forward in ``torch.compile``; the first call per batch
  size compiles (about a minute).
* ``cuda_graphs=True`` (CUDA only, opt-in): captures one CUDA graph per batch size on first use and
  replays it (inputs copied into static buffers; the returned image is a fresh tensor).

CPU and CUDA run the same Python code; only ``device`` differs, so the CPU tests cover the CUDA code path
except ``compile`` / ``cuda_graphs``, which were written without a GPU and are untested so far.
Shapes: B = batch, C = fx channels.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.ops import make_fir_kernel, modulate_weight, shape_or_type
from models.stylegan2 import F_RES, Generator

__all__ = ["FoldedSynthesis", "FoldedCache", "bf16_supported", "BF16_MIN_PSNR_DB", "synthesis_macs",
           "winograd_available", "winograd_preferred", "WINOGRAD_MIN_CHANNELS"]

#: Lower bound on the PSNR (dB, images in [-1, 1], peak-to-peak 2) of a bfloat16 frame against float32 that the
#: tests assert on tiny configs. bfloat16 keeps 8 mantissa bits (~0.4 % relative rounding per layer; the RGB skip
#: is accumulated in float32). Measured: 62.8 dB on the seeded full-size 1024^2 network
#: (benchmarks/bench_render.py), 47-64 dB on the tiny test configs.
BF16_MIN_PSNR_DB = 40.0

_SQRT2 = math.sqrt(2.0)
_BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)     # the official FIR taps; the blurs below rely on exactly these
_SLOPE = 0.2
#: blocks with at least this many channels use the Winograd 3x3 convolution on CPU (see ``winograd``)
WINOGRAD_MIN_CHANNELS = 64
#: ... and a resolution of at most this (out_size <= 256), or WINOGRAD_MAX_RES_BELOW_LARGER when larger blocks
#: follow: those run channels_last, and converting a 256^2 NCHW activation costs more than Winograd saves there
#: (measured on 2 AVX2 cores: 1024^2 synthesis 1.39-1.52 s direct, 1.22-1.25 s Winograd up to 128, 1.24-1.42 s
#: up to 256; 256^2 synthesis 0.57-0.62 s direct, 0.35-0.37 s Winograd up to 256)
WINOGRAD_MAX_RES = 256
WINOGRAD_MAX_RES_BELOW_LARGER = 128


def winograd_available(device: torch.device | str = "cpu") -> bool:
    """True where the NNPACK Winograd convolution can run (a CPU torch built with NNPACK)."""
    return torch.device(device).type == "cpu" and bool(torch.backends.nnpack.is_available())


def winograd_preferred(device: torch.device | str = "cpu") -> bool:
    """The ``winograd`` default: NNPACK is there and the CPU has no AVX512 (where it has, oneDNN's AVX512
    direct convolution beats NNPACK's AVX2 Winograd; see the module docstring for the measurements)."""
    return winograd_available(device) and torch.backends.cpu.get_cpu_capability() not in ("AVX512",)


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """True where bfloat16 convolutions run natively fast: CUDA with bf16 support, or a CPU whose oneDNN
    reports bf16 (AVX512-BF16 / AMX). On other CPUs bfloat16 works but is emulated (much slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def synthesis_macs(generator_or_config, out_size: int, *, from_res: int = F_RES) -> dict[str, int]:
    """Multiply-accumulates per frame of the synthesis from ``from_res`` (64) to ``out_size``.

    Counts what :class:`FoldedSynthesis` executes: transposed 3x3 stride-2 convs (``k*k*Cin*Cout*H*W`` on
    the input grid), the 4x4 blur after them (16 taps per output sample), 3x3 convs, 1x1 ToRGB and the RGB
    skip upsampling (16 taps per output sample on the zero-inserted grid, i.e. 4 real ones). Returns
    ``{"conv": ..., "other": ..., "total": ...}``. ``from_res=4`` counts a full pass from the constant
    input (what the official code runs per generator call), with the 4x4 conv and ``to_rgb1``.
    """
    cfg = getattr(generator_or_config, "config", generator_or_config)
    if from_res not in (4, F_RES):
        raise ValueError(f"from_res must be 4 (full pass) or {F_RES} (per-frame part), got {from_res}")
    conv = other = 0
    res = F_RES
    if from_res == 4:
        c4 = cfg.channels(4)
        conv += 9 * c4 * c4 * 16 + 3 * c4 * 16              # conv1 and to_rgb1 at 4x4
        res = 8
    while res <= out_size:
        c = cfg.channels(res)
        if not (from_res == F_RES and res == F_RES):         # the 64 block's upsampling conv is per identity
            h = res // 2
            conv += 9 * cfg.channels(h) * c * h * h          # transposed conv on the input grid
            other += 16 * c * res * res                      # blur
        conv += 9 * c * c * res * res                        # 3x3 conv
        conv += 3 * c * res * res                            # ToRGB 1x1
        other += 4 * 3 * res * res                           # skip upsample (4 non-zero taps per output)
        res *= 2
    return {"conv": int(conv), "other": int(other), "total": int(conv + other)}


@dataclass
class _Block:
    """Folded weights of one resolution block (res >= 64)."""

    res: int
    up_weight: torch.Tensor | None      # (Cin, C, 3, 3) for conv_transpose2d, x sqrt2 x 1/16; None at 64
    up_bias: torch.Tensor | None        # (C,) FusedLeakyReLU bias of the upsampling conv (after the blur)
    conv_weight: torch.Tensor           # (C, C, 3, 3)
    conv_bias: torch.Tensor             # (C,)
    rgb_weight: torch.Tensor            # (3, C, 1, 1), x sqrt2
    rgb_bias: torch.Tensor              # (3,) float32


class FoldedSynthesis(nn.Module):
    """Per-identity folded synthesis from 64x64: forward(feat64 (B,C,64,64), skip32 (B|1,3,32,32)) ->
    image (B,3,S,S) float32, S = ``out_size``. Build with :meth:`build`; it holds no reference to the
    generator. Weights are buffers (``.to(device)`` works; dtype is fixed at build time)."""

    def __init__(self, blocks: Sequence[_Block], *, fx_channels: int, out_size: int, dtype: torch.dtype,
                 channels_last: bool, compile: bool = False, cuda_graphs: bool = False,
                 winograd_res: Sequence[int] = ()):
        super().__init__()
        self.winograd_res = frozenset(int(r) for r in winograd_res)
        self.fx_channels = int(fx_channels)
        self.out_size = int(out_size)
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.use_compile = bool(compile)
        self.use_cuda_graphs = bool(cuda_graphs)
        self._res: list[int] = []
        for blk in blocks:
            r = blk.res
            self._res.append(r)
            if blk.up_weight is not None:
                self.register_buffer(f"up_weight_{r}", blk.up_weight)
                self.register_buffer(f"up_bias_{r}", blk.up_bias)
            self.register_buffer(f"conv_weight_{r}", blk.conv_weight)
            self.register_buffer(f"conv_bias_{r}", blk.conv_bias)
            self.register_buffer(f"rgb_weight_{r}", blk.rgb_weight)
            self.register_buffer(f"rgb_bias_{r}", blk.rgb_bias)
        self.register_buffer("skip_kernel", torch.ones(3, 1, 4, 4))   # replaced in build()
        self.register_buffer("blur_kernel", torch.ones(1, 1, 4, 4))   # replaced in build()
        self._compiled = None
        self._graphs: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    @torch.no_grad()
    def build(cls, generator: Generator, wplus: torch.Tensor, *, out_size: int | None = None,
              dtype: torch.dtype = torch.float32, channels_last: bool = False,
              device: torch.device | str | None = None, compile: bool = False,
              cuda_graphs: bool = False, winograd: bool | None = None) -> "FoldedSynthesis":
        """Fold ``generator``'s layers above 64x64 for one W+ code.

        generator: models.stylegan2.Generator (any config); wplus (1, n_latent, style_dim) (or (n_latent,
        style_dim)); out_size: power of two in [64, generator.size] (default: generator.size); dtype:
        torch.float32 or torch.bfloat16; device: where the folded weights live (default: wplus's device).
        compile / cuda_graphs: opt-in CUDA-only accelerations (ValueError elsewhere).
        winograd: None = on where :func:`winograd_preferred` and dtype is float32; True insists (ValueError
        where it cannot run: no NNPACK, or bfloat16); False = never.
        """
        if not isinstance(generator, Generator):
            raise TypeError(f"generator must be a models.stylegan2.Generator, got {type(generator).__name__}")
        cfg = generator.config
        if not isinstance(wplus, torch.Tensor):
            raise TypeError(f"wplus must be a tensor, got {type(wplus).__name__}")
        if wplus.ndim == 2:
            wplus = wplus.unsqueeze(0)
        want = (1, generator.n_latent, generator.style_dim)
        if tuple(wplus.shape) != want:
            raise ValueError(f"wplus must have shape {want} (one identity; frames share it), got "
                             f"{tuple(wplus.shape)}")
        if not torch.isfinite(wplus).all():
            raise ValueError("wplus contains NaN or inf")
        size = int(out_size) if out_size is not None else generator.size
        generator._check_out_size(size)
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        dev = torch.device(device) if device is not None else wplus.device
        if (compile or cuda_graphs) and dev.type != "cuda":
            raise ValueError("compile= and cuda_graphs= are CUDA-only options (opt-in); build on a CUDA device "
                             f"or leave them off (device is {dev})")

        can_winograd = winograd_available(dev) and dtype == torch.float32
        if winograd and not can_winograd:
            raise ValueError("winograd=True needs a CPU torch with NNPACK and dtype float32 "
                             f"(device {dev}, dtype {dtype}, NNPACK {torch.backends.nnpack.is_available()})")
        use_winograd = (can_winograd and winograd_preferred(dev)) if winograd is None else bool(winograd)
        top = min(size, WINOGRAD_MAX_RES) if size <= WINOGRAD_MAX_RES else WINOGRAD_MAX_RES_BELOW_LARGER
        winograd_res = [r for r in (F_RES * 2 ** i for i in range(8))
                        if r <= top and cfg.channels(r) >= WINOGRAD_MIN_CHANNELS] if use_winograd else []

        latent = wplus.to(device=next(generator.parameters()).device, dtype=torch.float32)

        def folded(conv, idx: int, demodulate: bool) -> torch.Tensor:
            # the very weights ModulatedConv2d builds for a batch-1 style (same op order)
            return modulate_weight(conv.weight[0] * conv.scale, conv.modulation(latent[:, idx]),
                                   demodulate=demodulate, eps=conv.eps)[0]

        def to_dev(t: torch.Tensor, dt: torch.dtype, nchw: bool = False) -> torch.Tensor:
            t = t.detach().to(device=dev, dtype=dt, copy=True).contiguous()   # never alias the generator
            if channels_last and t.ndim == 4 and not nchw:
                t = t.contiguous(memory_format=torch.channels_last)
            return t

        blocks: list[_Block] = []
        k = int(math.log2(F_RES)) - 3
        res = F_RES
        while res <= size:
            i = 2 * k + 1
            up_w = up_b = None
            if res != F_RES:
                up = generator.convs[2 * k]
                if tuple(up.conv.blur.kernel.shape) != (4, 4):
                    raise ValueError("FoldedSynthesis supports the [1, 3, 3, 1] blur kernel only")
                w = folded(up.conv, i, demodulate=True) * _SQRT2 / 16.0          # input is an activation
                up_w = to_dev(w.transpose(0, 1), dtype, res in winograd_res)     # (Cin, Cout, 3, 3)
                up_b = to_dev(up.activate.bias, dtype)
            conv = generator.convs[2 * k + 1]
            w = folded(conv.conv, i + 1, demodulate=True)
            if res != F_RES:
                w = w * _SQRT2                                                   # input is an activation
            rgb = generator.to_rgbs[k]
            rw = folded(rgb.conv, i + 2, demodulate=False) * _SQRT2
            blocks.append(_Block(res=res, up_weight=up_w, up_bias=up_b,
                                 conv_weight=to_dev(w, dtype, res in winograd_res),
                                 conv_bias=to_dev(conv.activate.bias, dtype),
                                 rgb_weight=to_dev(rw, dtype, res in winograd_res), rgb_bias=to_dev(rgb.bias.view(3), torch.float32)))
            res *= 2
            k += 1
        module = cls(blocks, fx_channels=cfg.fx_channels, out_size=size, dtype=dtype,
                     channels_last=channels_last, compile=compile, cuda_graphs=cuda_graphs,
                     winograd_res=winograd_res)
        # ToRGB skip upsampling: upfirdn2d(up=2, pad=(2,1), kernel*4) == conv_transpose2d(stride 2, padding 1)
        ref_kernel = generator.to_rgbs[k - 1].upsample.kernel if size > F_RES else None
        if ref_kernel is not None and tuple(ref_kernel.shape) != (4, 4):
            raise ValueError("FoldedSynthesis supports the [1, 3, 3, 1] upsampling kernel only")
        kern = make_fir_kernel(_BLUR_TAPS, gain=4.0)
        module.skip_kernel = torch.flip(kern, (0, 1)).view(1, 1, 4, 4).expand(3, 1, 4, 4).contiguous().to(dev)
        taps = torch.tensor(_BLUR_TAPS)
        module.blur_kernel = torch.outer(taps, taps).view(1, 1, 4, 4).to(device=dev, dtype=dtype)
        return module.eval()

    # ------------------------------------------------------------------ running
    @property
    def device(self) -> torch.device:
        return self.skip_kernel.device

    def _check(self, feat64: torch.Tensor, skip32: torch.Tensor) -> None:
        c = self.fx_channels
        if not isinstance(feat64, torch.Tensor) or feat64.ndim != 4 or tuple(feat64.shape[1:]) != (c, F_RES, F_RES):
            raise ValueError(f"feat64 must have shape (B, {c}, {F_RES}, {F_RES}), got {shape_or_type(feat64)}")
        half = F_RES // 2
        if (not isinstance(skip32, torch.Tensor) or skip32.ndim != 4 or tuple(skip32.shape[1:]) != (3, half, half)
                or skip32.shape[0] not in (1, feat64.shape[0])):
            raise ValueError(f"skip32 must have shape (B={feat64.shape[0]} or 1, 3, {half}, {half}), "
                             f"got {shape_or_type(skip32)}")
        if feat64.device != self.device or skip32.device != self.device:
            raise ValueError(f"inputs are on {feat64.device}/{skip32.device} but this FoldedSynthesis was built "
                             f"on {self.device}; move them (or build it on their device)")

    def _run(self, feat64: torch.Tensor, skip32: torch.Tensor) -> torch.Tensor:
        """The whole synthesis (pure tensor code: the same on CPU, CUDA, compiled or graph-captured)."""
        cl = torch.channels_last if self.channels_last else torch.contiguous_format
        x = feat64.to(dtype=self.dtype)
        skip = skip32.to(dtype=torch.float32).expand(feat64.shape[0], -1, -1, -1)
        for r in self._res:
            wino = r in self.winograd_res
            x = x.contiguous(memory_format=torch.contiguous_format if wino else cl)   # no-op within a layout
            if r != F_RES:
                x = F.conv_transpose2d(x, getattr(self, f"up_weight_{r}"), stride=2)     # (B, C, 2H+1, 2W+1)
                # [1,3,3,1]^2 blur (integer taps; 1/16 is in up_weight) + the activation bias, one pass
                x = F.conv2d(x, self.blur_kernel.expand(x.shape[1], 1, 4, 4), getattr(self, f"up_bias_{r}"),
                             padding=1, groups=x.shape[1])                                # (B, C, 2H, 2W)
                x = F.leaky_relu_(x, _SLOPE)
            if wino:   # one frame at a time: NNPACK's batched (training-style) algorithm is slower per frame
                weight, bias = getattr(self, f"conv_weight_{r}"), getattr(self, f"conv_bias_{r}")
                frames = [torch._nnpack_spatial_convolution(f.contiguous(), weight, bias, [1, 1, 1, 1])
                          for f in x.split(1)]
                x = frames[0] if len(frames) == 1 else torch.cat(frames)
            else:
                x = F.conv2d(x, getattr(self, f"conv_weight_{r}"), getattr(self, f"conv_bias_{r}"), padding=1)
            x = F.leaky_relu_(x, _SLOPE)
            rgb = F.conv2d(x, getattr(self, f"rgb_weight_{r}")).to(torch.float32)
            up = F.conv_transpose2d(skip, self.skip_kernel, stride=2, padding=1, groups=3)
            skip = rgb.add_(up).add_(getattr(self, f"rgb_bias_{r}").view(1, 3, 1, 1))
        return skip.contiguous()

    def _graph_run(self, feat64: torch.Tensor, skip32: torch.Tensor) -> torch.Tensor:
        key = (feat64.shape[0], skip32.shape[0])
        entry = self._graphs.get(key)
        if entry is None:
            static_feat, static_skip = feat64.clone(), skip32.clone()
            runner = self._compiled or self._run
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):                         # warm-up (cuDNN autotuning, allocator) off-graph
                    runner(static_feat, static_skip)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = runner(static_feat, static_skip)
            entry = self._graphs[key] = (graph, static_feat, static_skip, static_out)
        graph, static_feat, static_skip, static_out = entry
        static_feat.copy_(feat64)
        static_skip.copy_(skip32)
        graph.replay()
        return static_out.clone()

    @torch.no_grad()
    def forward(self, feat64: torch.Tensor, skip32: torch.Tensor) -> torch.Tensor:
        """feat64 (B, C, 64, 64) warped/refined feature, skip32 (B or 1, 3, 32, 32) -> (B, 3, S, S) float32."""
        self._check(feat64, skip32)
        if self.use_compile and self._compiled is None:
            self._compiled = torch.compile(self._run, dynamic=False)
        if self.use_cuda_graphs:
            return self._graph_run(feat64, skip32)
        if self._compiled is not None:
            return self._compiled(feat64, skip32)
        return self._run(feat64, skip32)

    def extra_repr(self) -> str:
        return (f"out_size={self.out_size}, fx_channels={self.fx_channels}, dtype={self.dtype}, "
                f"channels_last={self.channels_last}, compile={self.use_compile}, "
                f"cuda_graphs={self.use_cuda_graphs}, winograd_res={sorted(self.winograd_res)}")


class FoldedCache:
    """A small LRU of built :class:`FoldedSynthesis` modules for the engine.

    ``get(key, generator, wplus, out_size=S, **build_options)`` returns the module for ``(key, S, options)``,
    building it on a miss. ``key`` must identify the W+ code (e.g. the identity id plus the quantised edit
    strengths): the cache never looks at ``wplus`` on a hit. One module per output size and dtype is kept,
    so switching between 1024 frames and 256 previews does not refold. Thread-safe.
    """

    def __init__(self, capacity: int = 16):
        if capacity < 1:
            raise ValueError(f"FoldedCache capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._items: "OrderedDict[tuple, FoldedSynthesis]" = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    def get(self, key: Hashable, generator: Generator, wplus: torch.Tensor, *, out_size: int | None = None,
            **options) -> FoldedSynthesis:
        size = int(out_size) if out_size is not None else generator.size
        full = (key, size, tuple(sorted((k, str(v)) for k, v in options.items())))
        with self._lock:
            hit = self._items.get(full)
            if hit is not None:
                self._items.move_to_end(full)
                return hit
        module = FoldedSynthesis.build(generator, wplus, out_size=size, **options)
        with self._lock:
            self.builds += 1
            self._items[full] = module
            self._items.move_to_end(full)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return module

    def forget(self, key: Hashable) -> None:
        """Drop every module built for ``key`` (all sizes / options)."""
        with self._lock:
            for k in [k for k in self._items if k[0] == key]:
                del self._items[k]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
