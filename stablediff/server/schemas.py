"""Request bodies: the native job (made from tasks.py, for the OpenAPI page) and AUTOMATIC1111's, field by field
with its defaults. Unknown fields are ignored, as the webui ignores them; numbers must be finite."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from stablediff import tasks

_TYPES = {int: int, float: float, str: str, bool: bool, tuple: list[int], tasks.IMAGE: str}


def _job_fields() -> dict:
    fields = {}
    for params in tasks.TASKS.values():
        for p in params:
            fields.setdefault(p.name, (_TYPES[p.kind] | None, Field(None, description=f"{p.help} (default "
                                                                      f"{p.default!r}; per task: GET /v1/tasks)")))
    return fields


JobRequest = create_model("JobRequest", __config__=ConfigDict(extra="forbid"),
                          task=(Literal[tuple(tasks.TASKS)], ...), model=(str | None, None), **_job_fields())


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str = Field(description="a PNG as base64 or a data: URI")


class A1111Base(BaseModel):
    """The fields txt2img and img2img share, with the webui's defaults."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    eta: float | None = None
    override_settings: dict | None = None
    send_images: bool = True
    save_images: bool = False


class A1111Txt2Img(A1111Base):
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    denoising_strength: float | None = None


class A1111Img2Img(A1111Base):
    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask_blur: int | None = None
    mask_blur_x: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
