"""Pipeline configuration: every threshold and size in one place, overridable by ``SPARKLE_*`` env vars.

Sources of the defaults:
- gates (8, 8.5, mean O_score >= 8 on frames [1, 26, 51, 76]) and the 81-frame, 2-FPS conventions:
  Sparkle (arXiv 2605.06535) and ``../shared/reference/formats.md``;
- sizes: Sparkle's released pairs are 1280x720 (720x1280 portrait), 16 fps, 81 frames: the ``real`` profile and
  the distributed run (:func:`distributed_config`) default to that; the ``cpu``/``tiny`` profiles to 832x480
  (Wan2.2's 480p size), since 1280x720 is 2.4x the pixels per frame for their CPU backends and the embedded
  default is meant to finish in minutes on a laptop; frame count 4k+1: Wan2.2 input conventions (Sparkle-Bench
  trims to 4k+1 as well);
- camera-filter thresholds: ``../shared/data/videos/SOURCES.md`` measured <= 0.05 px (static) against
  >= 6.6 px (handheld) of median homography motion per 0.5 s at 640 px width; 1.0 px sits between them
  with a 20x margin on each side.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CameraFilterConfig(BaseModel):
    """Stage 1 coarse filter: optical flow + RANSAC homography between frames sampled at ``sample_fps``.

    Env: ``SPARKLE_CAMERA__MAX_CORNER_MOTION_PX=2``. Motion thresholds are px at ``analysis_width`` per pair
    of samples (1/``sample_fps`` s). Why these defaults: ``../shared/data/videos/SOURCES.md`` measured the
    static clips at <= 0.05 px (corner and border) and the handheld clip at >= 6.6 px; 1.0 px sits between
    them with a >= 6x margin on each side and is ~1/640 of the frame width per 0.5 s, below what a viewer
    reads as camera motion. The feature and fallback constants were measured as noted on each field.
    """

    sample_fps: float = Field(2.0, gt=0, description="frames per second analysed (Sparkle: 2 FPS)")
    analysis_width: int = Field(640, ge=64, description="frames are resized to this width (upright), px")
    max_corner_motion_px: float = Field(1.0, gt=0, description="median image-corner displacement under H, px per pair")
    max_border_flow_px: float = Field(1.0, gt=0, description="median LK flow in the outer band, px per pair")
    min_inlier_ratio: float = Field(
        0.3, ge=0, le=1, description="below this, the homography is not trusted (SOURCES.md: 0.85-0.89 static, "
        "0.55 handheld; a moving foreground in the band lowers it)")
    ransac_reproj_px: float = Field(3.0, gt=0, description="RANSAC inlier threshold, px (SOURCES.md)")
    max_corners: int = Field(
        144, ge=10, description="tracked points per pair at most, spread over an 8x6 grid (3 a cell); 400 "
        "points (with a 15x15, 3-level tracker) moved no real clip's metric by more than 0.3 px and doubled "
        "the tracking time; 144 instead of 200 moved the 7 real clips' metrics (../shared/data/videos and the "
        "four released Sparkle sources) by at most 0.11 px (the handheld clip's by 1 px, at 7.7 px) and cut "
        "the measuring time by 17 %")
    border_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="outer band (fraction of each side) whose points fit the background's "
        "homography; a foreground rarely covers most of it")
    min_border_points: int = Field(
        12, ge=4, description="fewer tracked points in the band: fit H on all points instead")
    min_tracked_points: int = Field(
        16, ge=8, description="fewer tracked corners: the pair uses the low-texture fallback")
    min_corner_eig: float = Field(
        5e-4, ge=0, description="absolute floor of the Shi-Tomasi score (cv2.cornerMinEigenVal, blockSize 3, "
        "Sobel 3, on 0-255 grey at half analysis size): grey noise of sigma 2 peaks at 2.2e-4, sigma 4 at "
        "7e-4; a corner of 11 grey levels contrast scores ~5e-4; real clips' corners score >= 8e-4")
    fallback_width: int = Field(
        160, ge=32, description="low-texture fallback (normalised cross-correlation) works at this width, px; "
        "area downscaling by 4 averages noise and codec blocks")
    min_fallback_ncc: float = Field(
        0.5, ge=0, le=1, description="fallback correlation peak below this: the pair is not measured (measured: "
        "0.99 on a nearly flat still or panning scene, 0.09-0.16 on pure noise)")
    analysis_max_frames: int | None = Field(
        81, ge=1, description="file analysis decodes at most this many frames from t=0 (the pipeline keeps 81)")
    analysis_max_seconds: float | None = Field(
        None, gt=0, description="file analysis stops after this many seconds from the first frame (None: off)")


class GateConfig(BaseModel):
    """EditScore gates (Sparkle): frame-0 edit, foreground removal, final video on sampled frames."""

    frame0_edit_min_overall: float = Field(8.0, ge=0, le=10)
    fg_removal_min_overall: float = Field(8.5, ge=0, le=10)
    video_min_mean_o_score: float = Field(8.0, ge=0, le=10)
    video_frame_indices: tuple[int, ...] = Field(
        (1, 26, 51, 76), description="frames judged for 81-frame clips; spread the same way for shorter ones")


class BaitConfig(BaseModel):
    """BAIT: multi-anchor tracking with a pixel-wise majority vote."""

    anchor_fps: float = Field(2.0, gt=0, description="anchor frames per second (Sparkle: 2 FPS, same as round 2)")
    # A pixel with exactly half of the votes: "foreground" keeps the subject whole (the judge's Foreground
    # Integrity punishes a clipped subject harder than a thin halo of old background).
    tie_is_foreground: bool = True


class ConformConfig(BaseModel):
    """How the source is conformed so that source and edited videos match exactly (Kiwi-Edit drops others)."""

    fps: float | None = Field(16.0, gt=0, le=120, description="frame rate of every sample: the source is "
                              "resampled to it by timestamp (Sparkle's data is always 16 fps, Wan2.2's native "
                              "rate); None keeps the source's rate")
    max_frames: int = Field(81, ge=1, description="frames kept from t=0 (after resampling), then trimmed to 4k+1")
    max_long_side: int = Field(832, ge=16, le=1280)
    max_short_side: int = Field(480, ge=16, le=720)
    multiple: int = Field(16, ge=2, description="output sides are multiples of this (Wan VAE/patch size)")

    @field_validator("max_long_side", "max_short_side")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"{v} is not a multiple of 16")
        return v


class ControlConfig(BaseModel):
    """Stage 5's control video (``edited_video_canny/{id}.mp4``).

    ``mode``: ``decoupled`` (Sparkle: Canny of the source inside the mask, of the background video outside),
    or the two signals the paper compares against: ``foreground_only`` (source edges inside the mask, nothing
    outside) and ``copy_paste`` (source pixels inside the mask pasted over the background video). Canny
    thresholds 100/200: OpenCV's customary pair (2:1 ratio, as Canny recommends), used by the Wan Fun-Control
    preprocessors.
    """

    mode: Literal["decoupled", "foreground_only", "copy_paste"] = "decoupled"
    canny_low: int = Field(100, ge=0, le=255)
    canny_high: int = Field(200, ge=0, le=255)


class PipelineConfig(BaseSettings):
    """Everything a sample's journey needs besides its inputs. Env: ``SPARKLE_GATES__FRAME0_EDIT_MIN_OVERALL=7``."""

    model_config = SettingsConfigDict(env_prefix="SPARKLE_", env_nested_delimiter="__", extra="forbid")

    profile: Literal["cpu", "tiny", "real"] = Field(
        "cpu", description="which backend every service uses: cpu (classical), tiny (random tiny models), real")
    camera: CameraFilterConfig = CameraFilterConfig()
    gates: GateConfig = GateConfig()
    bait: BaitConfig = BaitConfig()
    conform: ConformConfig = ConformConfig()
    control: ControlConfig = ControlConfig()
    catalogue: str | None = Field(None, description="theme catalogue JSON (default: the packaged one)")

    @model_validator(mode="after")
    def _sparkle_size_for_real(self):
        """The ``real`` profile makes Sparkle's 1280x720 unless a conform size was given (argument or env)."""
        if self.profile == "real" and "conform" not in self.model_fields_set:
            self.conform = ConformConfig(max_long_side=SPARKLE_SIZE[0], max_short_side=SPARKLE_SIZE[1])
        return self


SPARKLE_SIZE = (1280, 720)
"""Largest (long, short) side of Sparkle's released pairs, px: the real profile's and the distributed run's size."""

CPU_SIZE = (832, 480)
"""Largest (long, short) side for the cpu and tiny profiles, px (see the module docstring for why)."""


def default_size(profile: str) -> tuple[int, int]:
    """``(long, short)`` px a profile conforms to by default: :data:`SPARKLE_SIZE` for ``real``, else
    :data:`CPU_SIZE`."""
    return SPARKLE_SIZE if profile == "real" else CPU_SIZE


def distributed_config() -> PipelineConfig:
    """The distributed run's base configuration: ``PipelineConfig()`` from ``SPARKLE_*``, at Sparkle's 1280x720
    unless ``SPARKLE_CONFORM__*`` says otherwise (its services run the real models)."""
    config = PipelineConfig()
    if "conform" not in config.model_fields_set:
        config.conform = ConformConfig(max_long_side=SPARKLE_SIZE[0], max_short_side=SPARKLE_SIZE[1])
    return config
