"""The request spec of every entry point (KleinPipeline, klein-generate, klein-serve): limits, checks, workflow names.

Each check returns the normalised value or raises a ValueError that names the field, the value and what is allowed;
the server answers it as a 422 (shared/spec/api.md). The API's aspect-ratio table is klein_jax/aspect_ratios.py.
"""

from __future__ import annotations

import enum
import math
import re

import numpy as np

from klein_jax.aspect_ratios import ASPECT_RATIOS, DEFAULT_ASPECT_RATIO

__all__ = ["ASPECT_RATIOS", "DEFAULT_ASPECT_RATIO", "MAX_PROMPT_CHARS", "MAX_REFERENCES", "MAX_SEED", "MAX_STEPS",
           "MIN_STEPS", "MAX_LORA_SCALE", "Workflow", "check_guidance_scale", "check_lora_scale", "check_prompt", "check_reference_count", "check_seed",
           "check_size", "check_steps", "parse_seed", "resolve_aspect_ratio"]

MAX_SEED = 2**64 - 1  # seeds are 0..2**64-1: the two uint32 words of a threefry key (sampler.seed_key_data)
MIN_STEPS, MAX_STEPS = 1, 1000  # the schedule has 1000 training timesteps
MAX_REFERENCES = 4  # shared/spec/api.md: more than 4 reference images in total is an error
MAX_LORA_SCALE = 4.0  # shared/spec/api.md: lora_scale is a finite number in [-4, 4]
MAX_PROMPT_CHARS = 20_000  # far past the 512 tokens the text encoder reads; bounds tokenizing time per request
_SEED_TEXT = re.compile(rf"[0-9]{{1,{len(str(MAX_SEED))}}}", re.ASCII)  # int() would also take "١٢" or "1_0"


class Workflow(enum.StrEnum):
    """The API's workflow names (shared/spec/api.md), chosen by the number of reference images."""

    TEXT_TO_IMAGE = "text-to-image"  # 0 references
    IMAGE_TO_IMAGE = "image-to-image"  # 1 (an edit)
    MULTI_REFERENCE = "multi-reference"  # 2..MAX_REFERENCES

    @classmethod
    def for_references(cls, count: int) -> Workflow:
        """The workflow of `count` reference images (ValueError past MAX_REFERENCES)."""
        count = check_reference_count(count)
        return cls.TEXT_TO_IMAGE if count == 0 else cls.IMAGE_TO_IMAGE if count == 1 else cls.MULTI_REFERENCE


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _shown(value) -> str:
    """repr of a value for an error message, cut to 40 characters (form fields can be long)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_prompt(prompt) -> str:
    """The prompt if it is a str with something besides whitespace and at most MAX_PROMPT_CHARS characters."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty or whitespace only; give a non-empty text")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    return prompt


def check_seed(seed) -> int:
    """The seed as an int if it is an integer in 0..MAX_SEED."""
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={_shown(seed)} is not an integer in 0..{MAX_SEED}")
    return int(seed)


def parse_seed(text: str) -> int:
    """A seed written in ASCII digits (surrounding whitespace allowed), as in a form field or a command line."""
    if not isinstance(text, str) or not _SEED_TEXT.fullmatch(text.strip()):
        raise ValueError(f"seed={_shown(text)} is not an integer in 0..{MAX_SEED}")
    return check_seed(int(text.strip()))


def check_steps(steps) -> int:
    """The number of denoising steps as an int if it is in MIN_STEPS..MAX_STEPS."""
    if not _is_int(steps) or not MIN_STEPS <= steps <= MAX_STEPS:
        raise ValueError(f"num_inference_steps={_shown(steps)} must be an integer in {MIN_STEPS}..{MAX_STEPS}")
    return int(steps)


def check_guidance_scale(scale) -> float | None:
    """None, or the scale as a float if it is a finite number."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) or not math.isfinite(
            scale):
        raise ValueError(f"guidance_scale={_shown(scale)} must be a finite number")
    return float(scale)


def check_lora_scale(scale, *, limit: float | None = MAX_LORA_SCALE) -> float:
    """The LoRA scale (an adapter's weight) as a float if it is finite and, with a limit, in [-limit, limit]."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) or not math.isfinite(
            scale) or (limit is not None and abs(scale) > limit):
        allowed = "a finite number" if limit is None else f"a finite number in [-{limit:g}, {limit:g}]"
        raise ValueError(f"lora_scale={_shown(scale)} must be {allowed}")
    return float(scale)


def check_size(width, height, multiple_of: int = 16) -> tuple[int, int]:
    """(width, height) as ints if both are positive multiples of `multiple_of` (pixels per transformer token)."""
    for name, value in (("width", width), ("height", height)):
        if not _is_int(value):
            raise ValueError(f"{name}={_shown(value)} must be an integer number of pixels")
        if value < multiple_of or value % multiple_of:
            raise ValueError(f"{name}={value} must be a positive multiple of {multiple_of}")
    return int(width), int(height)


def check_reference_count(count: int, *, sources: str = "") -> int:
    """`count` if at most MAX_REFERENCES reference images; `sources` says where they came from, for the error."""
    if count > MAX_REFERENCES:
        given = f" ({sources})" if sources else ""
        raise ValueError(f"{count} reference images given{given}; at most {MAX_REFERENCES} are allowed")
    return count


def resolve_aspect_ratio(name) -> tuple[int, int]:
    """(width, height) in pixels of an API aspect-ratio name; ValueError listing the valid names otherwise."""
    try:
        return ASPECT_RATIOS[name]
    except (KeyError, TypeError):
        raise ValueError(f"aspect_ratio {_shown(name)} is not one of {', '.join(ASPECT_RATIOS)}") from None
