"""AUTOMATIC1111's API under /sdapi/v1, over the same queue as /v1: existing clients work unchanged."""
import asyncio
import base64
import json
import os
import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from stablediff import __version__, names
from stablediff.checkpoints.hashing import cached_hash
from stablediff.errors import UserError
from stablediff.pipelines.infotext import read_infotext
from stablediff.server import jobs
from stablediff.server.auth import User
from stablediff.server.deps import current_user, services
from stablediff.server.schemas import A1111Img2Img, A1111Txt2Img, PngInfoRequest

router = APIRouter(prefix="/sdapi/v1", dependencies=[Depends(current_user)], tags=["automatic1111"])

RESIZE = {0: "just-resize", 1: "crop-and-resize", 2: "resize-and-fill"}
FILL = {0: "fill", 1: "original", 2: "latent-noise", 3: "latent-nothing"}
UPSCALERS = {None: "latent", "": "latent", "latent": "latent", "latent (bilinear)": "latent",
             "latent (nearest)": "latent-nearest", "latent (nearest-exact)": "latent-nearest", "lanczos": "lanczos"}


def _sampling(req, svc) -> dict:
    """The fields both image routes share, as the native job's parameters."""
    sampler = req.sampler_name or req.sampler_index or "Euler"
    key, suffix = names.parse_sampler(sampler)  # a webui name we lack: 400 naming the ones we have
    scheduler = suffix if suffix != "default" else req.scheduler or "Automatic"  # "DPM++ 2M Karras" wins, as there
    settings = {**svc.settings, **(req.override_settings or {})}
    out = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": req.steps, "sampler": key,
           "schedule": names.read_schedule(scheduler, key), "scale": req.cfg_scale, "seed": req.seed,
           "subseed": req.subseed if req.subseed_strength else None, "subseed_strength": req.subseed_strength,
           "batch_size": req.batch_size, "n_iter": req.n_iter, "width": req.width, "height": req.height,
           "eta": req.eta, "clip_skip": int(settings.get("CLIP_stop_at_last_layers", 1))}
    model = settings.get("sd_model_checkpoint")
    if model:
        out["model"] = _model_by_title(svc, model)
    return out


def _model_by_title(svc, title: str) -> str:
    """A model named as the webui names it: its title ("file.safetensors [hash]"), its file name or its stem."""
    for name in svc.models:
        if title in (name, _title(svc, name), name.rsplit(".", 1)[0]) or title.split(" [")[0] == name:
            return name
    raise UserError(f"sd_model_checkpoint {title!r} is not on this server; it has: {', '.join(svc.models)}")


def _title(svc, name: str) -> str:
    path = svc.models[name]
    short = cached_hash(path) if path.is_file() else None
    return f"{name} [{short}]" if short else name


async def _run(svc, user: User, body: dict, request_echo: dict) -> dict:
    """Queue the job, wait for its end, and answer as the webui does: images, parameters, info."""
    job = await asyncio.to_thread(jobs.submit, svc, user, body)
    svc.wake()
    job = await jobs.wait(svc, job.id)
    if job.state == "failed":  # it was accepted but could not be made: the reason, never a bare 500
        return JSONResponse({"error": f"the job failed: {job.error}", "job_id": job.id}, status_code=422)
    images = [base64.b64encode(svc.store.image(job.id, im["n"])).decode() for im in job.images]
    return {"images": images, "parameters": request_echo, "info": json.dumps(_info(svc, job))}


def _info(svc, job) -> dict:
    p, infotexts = job.params, [im["infotext"] for im in job.images]
    seeds = [im["seed"] for im in job.images] or [p["seed"]]
    model = svc.models[p["model"]]
    return {"prompt": p["prompt"], "all_prompts": [p["prompt"]] * len(seeds), "negative_prompt": p["negative_prompt"],
            "all_negative_prompts": [p["negative_prompt"]] * len(seeds), "seed": seeds[0], "all_seeds": seeds,
            "subseed": p.get("subseed") or -1, "all_subseeds": [(p.get("subseed") or -1)] * len(seeds),
            "subseed_strength": p["subseed_strength"], "width": p.get("width"), "height": p.get("height"),
            "sampler_name": names.SAMPLER_LABELS[p["sampler"]] if p["sampler"] else None, "cfg_scale": p["scale"],
            "steps": p["steps"], "batch_size": p["batch_size"], "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": model.name.rsplit(".", 1)[0], "sd_model_hash": cached_hash(model) if model.is_file() else None,
            "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": p.get("strength", p.get("hires_denoise")), "extra_generation_params": {},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "job_timestamp":
            time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), "clip_skip": p["clip_skip"],
            "is_using_inpainting_conditioning": False, "version": f"stablediff {__version__}", "job_id": job.id,
            "nsfw_content_detected": [im.get("nsfw") for im in job.images]}


@router.post("/txt2img")
async def txt2img(req: A1111Txt2Img, user: User = Depends(current_user), svc=Depends(services)):
    body = {"task": "txt2img", **_sampling(req, svc)}
    if req.enable_hr:
        if (req.hr_upscaler or "").lower() not in UPSCALERS:
            raise UserError(f"hr_upscaler {req.hr_upscaler!r}: this server has Latent, Latent (nearest) and Lanczos")
        body.update(hires_scale=req.hr_scale, hires_steps=req.hr_second_pass_steps or None,
                    hires_denoise=req.denoising_strength if req.denoising_strength is not None else 0.7,
                    hires_upscaler=UPSCALERS[(req.hr_upscaler or "").lower()])
    return await _run(svc, user, body, req.model_dump())


@router.post("/img2img")
async def img2img(req: A1111Img2Img, user: User = Depends(current_user), svc=Depends(services)):
    if not req.init_images:
        raise UserError("init_images is empty: send the starting image as base64")
    if req.resize_mode not in RESIZE or req.inpainting_fill not in FILL:
        raise UserError("resize_mode is 0 to 2 and inpainting_fill 0 to 3")
    body = {**_sampling(req, svc), "image": req.init_images[0], "strength": req.denoising_strength,
            "resize_mode": RESIZE[req.resize_mode]}
    if req.mask:
        body.update(task="inpaint", mask=req.mask, mask_blur=req.mask_blur if req.mask_blur is not None else req.mask_blur_x,
                    fill=FILL[req.inpainting_fill], only_masked=bool(req.inpaint_full_res),
                    padding=req.inpaint_full_res_padding, invert_mask=bool(req.inpainting_mask_invert))
    else:
        body["task"] = "img2img"
    echo = req.model_dump()
    echo["init_images"], echo["mask"] = None, None  # the webui does not echo the images either
    return await _run(svc, user, body, echo)


@router.get("/progress")
def progress(skip_current_image: bool = False, user: User = Depends(current_user), svc=Depends(services)):
    job = jobs.running_of(svc, user)
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": _state(None), "current_image": None, "textinfo": None}
    p = job.progress
    done = (p.get("step", 0) + (p.get("batch", 1) - 1) * p.get("steps", 1)) / max(1, p.get("steps", 1) * p.get("batches", 1))
    image = None if skip_current_image else jobs.preview(svc, job)
    return {"progress": round(done, 4), "eta_relative": jobs.eta_seconds(job) or 0.0, "state": _state(job),
            "current_image": base64.b64encode(image).decode() if image else None, "textinfo": None}


def _state(job) -> dict:
    p = job.progress if job else {}
    return {"skipped": False, "interrupted": bool(job and job.cancel), "stopping_generation": False,
            "job": f"task({job.id})" if job else "", "job_count": p.get("batches", 0), "job_timestamp":
            time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0",
            "job_no": p.get("batch", 1) - 1 if job else 0, "sampling_step": p.get("step", 0),
            "sampling_steps": p.get("steps", 0)}


@router.post("/interrupt")
def interrupt(user: User = Depends(current_user), svc=Depends(services)):
    job = jobs.running_of(svc, user)
    if job is not None:
        jobs.cancel(svc, user, job.id)
    return {}


@router.post("/skip")
def skip(user: User = Depends(current_user), svc=Depends(services)):
    return interrupt(user, svc)  # a job's images come from one render here: skipping it is interrupting it


@router.get("/options")
def get_options(svc=Depends(services)):
    return {"sd_model_checkpoint": _title(svc, svc.model_name()),
            "CLIP_stop_at_last_layers": svc.settings.get("CLIP_stop_at_last_layers", 1),
            "samples_format": "png", "sd_vae": "Automatic", "eta_ddim": 0.0, "eta_ancestral": 1.0}


@router.post("/options")
def set_options(body: dict, svc=Depends(services)):
    if "sd_model_checkpoint" in body:
        svc.store.set_setting("sd_model_checkpoint", _model_by_title(svc, str(body["sd_model_checkpoint"])))
    if "CLIP_stop_at_last_layers" in body:
        value = body["CLIP_stop_at_last_layers"]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 12:
            raise UserError("CLIP_stop_at_last_layers is a whole number from 1 to 12")
        svc.settings["CLIP_stop_at_last_layers"] = value
        svc.store.set_setting("CLIP_stop_at_last_layers", value)
    return None


@router.get("/samplers")
def samplers():
    return [{"name": label, "aliases": [key], "options": {}} for key, label in names.SAMPLER_LABELS.items()]


@router.get("/schedulers")
def schedulers():
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}] + \
        [{"name": key, "label": names.SCHEDULE_LABELS[key], "aliases": None, "default_rho": 7.0 if key == "karras" else -1,
          "need_inner_model": key in ("uniform", "sgm_uniform", "simple", "ddim")} for key in names.A1111_SCHEDULES]


@router.get("/sd-models")
def sd_models(svc=Depends(services)):
    out = []
    for name, path in svc.models.items():
        short = cached_hash(path) if path.is_file() else None
        out.append({"title": _title(svc, name), "model_name": name.rsplit(".", 1)[0], "hash": short, "sha256": None,
                    "filename": name, "config": None})
    return out


@router.get("/sd-vae")
def sd_vae():
    return []


@router.get("/loras")
def loras(svc=Depends(services)):
    return [{"name": e["name"], "alias": e["name"], "path": e["path"], "metadata": {}} for e in jobs.lora_names(svc)]


@router.get("/embeddings")
def embeddings(svc=Depends(services)):
    return {"loaded": {n: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                           "vectors": None} for n in jobs.embedding_names(svc)}, "skipped": {}}


@router.post("/png-info")
def png_info(body: PngInfoRequest, svc=Depends(services)):
    image = jobs.decode_image(body.image, "image", svc.limits)
    text = image.info.get("parameters")
    if not isinstance(text, str):
        return {"info": "", "items": {}, "parameters": {}}
    prompt, negative, fields = read_infotext(text)
    return {"info": text, "items": {"parameters": text}, "parameters": {"Prompt": prompt, "Negative prompt": negative,
                                                                         **fields}}


@router.post("/refresh-checkpoints")
def refresh_checkpoints(svc=Depends(services)):
    svc.refresh_models()
    return None


@router.get("/upscalers")
def upscalers():
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1},
            {"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


@router.get("/memory")
def memory(svc=Depends(services)):
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    total = page * os.sysconf("SC_PHYS_PAGES") if page else 0
    free = page * os.sysconf("SC_AVPHYS_PAGES") if page else 0
    cuda = svc.worker.memory() if svc.worker is not None else {"error": "this server does not render (workers do)"}
    return {"ram": {"free": free, "used": total - free, "total": total}, "cuda": cuda}


@router.get("/scripts")
def scripts():
    return {"txt2img": [], "img2img": []}
