"""Visual inputs: images and videos in, Qwen2-VL vision patches out (no torchvision, no model).

    pixel_values, grid_thw = process_image(source)         # [N, 1176] float32, (1, h, w)
    process_image(source, ImageSettings(max_pixels=28 * 28 * 256))
    video = process_video(source_or_frames, VideoSettings(fps=1.0))  # VideoInput; unpacks alike
    plan_image(source) / plan_video(source)                 # sizes and tokens, no pixels
    media_config.image_settings() / media_config.video_settings()  # a checkpoint's defaults
    process_part({"type": "image", "image": src, "max_pixels": ...}, media_config)

Modules: source (loading and refusing input), resize (smart_resize), patches (normalise and
patchify), image (and ImageSettings), sampling (VideoSettings, video frame rules, token cap),
decode (PyAV), video, config (preprocessor_config.json), parts (chat content parts with
per-item overrides).
"""

from qwen2vl.media.config import MediaConfig, load_media_config
from qwen2vl.media.image import ImagePlan, ImageSettings, plan_image, process_image
from qwen2vl.media.parts import plan_part, process_part
from qwen2vl.media.patches import CLIP_MEAN, CLIP_STD
from qwen2vl.media.resize import smart_resize
from qwen2vl.media.sampling import VideoPlan, VideoSettings
from qwen2vl.media.source import MediaAccess, load_image
from qwen2vl.media.video import VideoInput, plan_video, process_video

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ImagePlan",
    "ImageSettings",
    "MediaAccess",
    "MediaConfig",
    "VideoInput",
    "VideoPlan",
    "VideoSettings",
    "load_image",
    "load_media_config",
    "plan_image",
    "plan_part",
    "plan_video",
    "process_image",
    "process_part",
    "process_video",
    "smart_resize",
]
