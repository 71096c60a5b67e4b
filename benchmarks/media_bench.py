"""Media preprocessing speed: ours vs transformers' PIL Qwen2-VL image processor, and video
decode + sample time on a generated 60 s 720p clip. Prints numbers; asserts nothing.

    .venv/bin/python benchmarks/media_bench.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

from qwen2vl.media import VideoSettings, decode, plan_video, process_image, process_video

IMAGE_SIZES = [(448, 448), (1280, 720), (1920, 1080), (4032, 3024)]  # (width, height)
REPEATS = 7


def median_ms(fn, repeats: int = REPEATS) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def photo_like(width: int, height: int) -> Image.Image:
    """Smooth gradients plus noise, so resizing does real work."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    noise = np.random.default_rng(0).normal(0, 20, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def bench_images() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    reference = Qwen2VLImageProcessorPil()
    print("image preprocessing (PIL image in, default min/max pixels), median of", REPEATS)
    print(f"{'size':>11} {'grid':>12} {'ours ms':>9} {'transformers ms':>16} {'speedup':>8}")
    for width, height in IMAGE_SIZES:
        image = photo_like(width, height)
        _, grid = process_image(image)
        ours = median_ms(lambda image=image: process_image(image))
        theirs = median_ms(lambda image=image: reference(images=image, return_tensors="pt"))
        grid_text = "x".join(str(v) for v in grid.tolist())
        speedup = theirs / ours
        print(f"{width:>5}x{height:<5} {grid_text:>12} {ours:9.1f} {theirs:16.1f} {speedup:7.1f}x")


def make_clip(path: Path, seconds: int = 60, fps: int = 30, width: int = 1280, height: int = 720):
    """A moving pattern encoded with mpeg4 at low quality (fast to make), GOP 12 (ffmpeg's)."""
    y, x = np.mgrid[0:height, 0:width]
    luma = ((x // 40 + y // 40) % 2 * 120 + 60).astype(np.uint8)
    chroma = np.full((height // 2, width), 128, np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.qmin, stream.codec_context.qmax = 20, 31
        stream.thread_type = "AUTO"
        for i in range(seconds * fps):
            plane = np.roll(luma, 4 * i, axis=1)
            plane[:80, :] = (i * 7) % 256  # a band that changes every frame
            frame = av.VideoFrame.from_ndarray(np.concatenate([plane, chroma]), format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def bench_video() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        start = time.perf_counter()
        make_clip(path)
        made = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
        print(f"\nvideo: 60 s 1280x720 30 fps mpeg4, {size_mb:.1f} MB, generated in {made:.1f} s")
        plan_ms = median_ms(lambda: plan_video(path), repeats=3)
        print(f"  plan_video (metadata only): {plan_ms:.1f} ms")
        cases = [("fps=2 (default)", VideoSettings()), ("nframes=16", VideoSettings(nframes=16))]
        for name, settings in cases:
            plan = plan_video(path, settings)
            seek_ms = median_ms(lambda s=settings: process_video(path, s), repeats=3)
            default_skip = decode.SEEK_MIN_SKIP
            decode.SEEK_MIN_SKIP = 10**9  # force one sequential pass, for comparison
            try:
                seq_ms = median_ms(lambda s=settings: process_video(path, s), repeats=3)
            finally:
                decode.SEEK_MIN_SKIP = default_skip
            print(
                f"  process_video {name}: {len(plan.frame_indices)} frames -> grid "
                f"{plan.grid_thw}, {plan.tokens} tokens: {seek_ms:.0f} ms "
                f"(one sequential pass, no seeking: {seq_ms:.0f} ms)"
            )


if __name__ == "__main__":
    bench_images()
    bench_video()
