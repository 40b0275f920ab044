"""The native API under /v1: jobs (queue, state, events, cancel), images, and what the server has."""
import asyncio
import base64
import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from stablediff import names, tasks
from stablediff.errors import UserError
from stablediff.pipelines.infotext import settings as read_settings
from stablediff.server import jobs
from stablediff.server.auth import User, new_token, token_digest
from stablediff.server.deps import current_user, services
from stablediff.server.schemas import JobRequest, PngInfoRequest

router = APIRouter(prefix="/v1", dependencies=[Depends(current_user)], tags=["native"])
# an image is written once and never changed: a browser may keep it (each user's own: Vary)
IMMUTABLE = {"Cache-Control": "private, max-age=31536000, immutable", "Vary": "Authorization"}


async def _job_request(request: Request) -> tuple[dict, dict]:
    """The request's parameters and uploads: a JSON body, or multipart with a `request` JSON field and image files."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        try:
            body = json.loads(form.get("request") or "{}")
        except ValueError:
            raise UserError("the multipart field `request` must be the job as JSON") from None
        uploads = {k: await v.read() for k, v in form.items() if hasattr(v, "read")}
        return body, uploads
    try:
        body = await request.json()
    except ValueError:
        raise UserError("send the job as a JSON object: {\"task\": \"txt2img\", \"prompt\": \"...\"}") from None
    if not isinstance(body, dict):
        raise UserError("send the job as a JSON object: {\"task\": \"txt2img\", \"prompt\": \"...\"}")
    return body, {}


@router.post("/jobs", status_code=202, summary="queue a job",
             openapi_extra={"requestBody": {"content": {"application/json": {"schema": JobRequest.model_json_schema()}}}})
async def post_job(request: Request, user: User = Depends(current_user), svc=Depends(services)):
    body, uploads = await _job_request(request)
    job = await asyncio.to_thread(jobs.submit, svc, user, body, uploads)
    svc.wake()
    return {"id": job.id, "position": svc.store.position(job)}


@router.get("/jobs", summary="your jobs, newest first")
def list_jobs(page: int = 1, per_page: int = 20, user: User = Depends(current_user), svc=Depends(services)):
    if page < 1 or not 1 <= per_page <= 100:
        raise UserError("page starts at 1, per_page is 1 to 100")
    found = svc.store.jobs_of(None if user.admin else user.name, per_page, (page - 1) * per_page)
    return {"page": page, "per_page": per_page, "jobs": [jobs.describe(svc, j) for j in found]}


@router.get("/jobs/{job_id}", summary="a job's state, progress and images")
def get_job(job_id: str, user: User = Depends(current_user), svc=Depends(services)):
    return jobs.describe(svc, jobs.owned(svc, user, job_id))


@router.delete("/jobs/{job_id}", summary="cancel a queued job, or a running one within a step")
def cancel_job(job_id: str, user: User = Depends(current_user), svc=Depends(services)):
    return {"id": job_id, "state": jobs.cancel(svc, user, job_id)}


@router.get("/jobs/{job_id}/events", summary="Server-Sent Events: position, step, preview, then the end")
async def job_events(job_id: str, preview_every: int = 1, user: User = Depends(current_user), svc=Depends(services)):
    jobs.owned(svc, user, job_id)

    async def stream():
        last, sent_preview = None, 0
        while True:
            job = svc.store.get(job_id)
            view = jobs.describe(svc, job)
            now = {k: view[k] for k in ("state", "position", "progress", "eta_seconds")}
            if now != last:
                yield f"event: {'progress' if job.state == 'running' else job.state}\ndata: {json.dumps(now)}\n\n"
                last = now
            live = svc.store.preview(job_id)
            if live is not None and live[0] >= sent_preview + preview_every:
                sent_preview = live[0]
                data = {"step": live[0], "png": base64.b64encode(live[1]).decode()}
                yield f"event: preview\ndata: {json.dumps(data)}\n\n"
            if job.state in ("done", "failed", "cancelled"):
                yield f"event: end\ndata: {json.dumps(view)}\n\n"
                return
            await svc.changes.wait(job_id, 1.0)
    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.get("/images/{job_id}/{n}.png", summary="an image, the PNG exactly as the command line writes it")
def get_image(job_id: str, n: int, user: User = Depends(current_user), svc=Depends(services)):
    return Response(jobs.image_png(svc, user, job_id, n), media_type="image/png", headers=IMMUTABLE)


@router.get("/jobs/{job_id}/inputs/{name}.png", summary="a job's input image (image, mask, depth_map) as sent")
def get_input(job_id: str, name: str, user: User = Depends(current_user), svc=Depends(services)):
    return Response(jobs.input_png(svc, user, job_id, name), media_type="image/png", headers=IMMUTABLE)


@router.get("/models", summary="the models a job may name")
def get_models(svc=Depends(services)):
    return {"default": svc.model_name(), "models": list(svc.models)}


@router.put("/models/default", summary="the model jobs use when they name none")
def set_model(body: dict, svc=Depends(services)):
    name = body.get("model")
    if name not in svc.models:
        raise UserError(f"model {name!r} is not on this server; it has: {', '.join(svc.models)}")
    svc.store.set_setting("sd_model_checkpoint", name)
    return {"default": name}


@router.get("/samplers", summary="samplers and schedules")
def get_samplers():
    return {"samplers": [{"name": k, "label": v} for k, v in names.SAMPLER_LABELS.items()],
            "schedules": [{"name": k, "label": v} for k, v in names.SCHEDULE_LABELS.items()]}


@router.get("/tasks", summary="each task's parameters: types, defaults, bounds")
def get_tasks():
    return {task: [{"name": p.name, "type": p.kind if isinstance(p.kind, str) else p.kind.__name__,
                    "default": p.default, "min": p.low, "max": p.high, "choices": p.choices, "help": p.help,
                    "required": p.required} for p in params] for task, params in tasks.TASKS.items()}


@router.get("/loras", summary="the LoRA files a prompt may name as <lora:name:weight>")
def get_loras(svc=Depends(services)):
    return {"loras": jobs.lora_names(svc)}


@router.get("/embeddings", summary="the textual inversion embeddings a prompt may name")
def get_embeddings(svc=Depends(services)):
    return {"embeddings": jobs.embedding_names(svc)}


@router.post("/png-info", summary="the generation settings of a PNG's parameters")
def png_info(body: PngInfoRequest, svc=Depends(services)):
    image = jobs.decode_image(body.image, "image", svc.limits)
    text = image.info.get("parameters")
    found = read_settings(text) if isinstance(text, str) and text.strip() else None
    if found and "guidance_interval" in found:  # JSON has no infinity: the interval as the infotext writes it
        found["guidance_interval"] = "{:g}-{:g}".format(*found["guidance_interval"])
    return {"parameters": text, "settings": found}


@router.post("/tokens", summary="a bearer token for the native API (sign in with Basic once)")
def post_token(user: User = Depends(current_user), svc=Depends(services)):
    token = new_token()
    svc.store.add_token(user.name, token_digest(token))
    return {"token": token, "user": user.name}


@router.delete("/tokens", summary="sign out: the bearer token this request carries is revoked")
def delete_token(request: Request, svc=Depends(services)):
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        raise UserError("send the token to revoke as `Authorization: Bearer ...`")
    return {"revoked": svc.store.remove_token(token_digest(header[7:].strip()))}


@router.get("/me", summary="who you are signed in as")
def me(user: User = Depends(current_user)):
    return {"user": user.name, "admin": user.admin}
