"""Jobs (a task and its parameters as tasks.py names them) through the Python API: what the server's workers and
`stablediff batch` both call, so a job makes the same images wherever it runs."""


def render(model, jobs, load_input, on_batch=None) -> dict[str, list]:
    """Every job's images (jobs of one batch key, store.Job-like: .id, .task, .params): one call of the Python API
    per batch, n_iter batches; job j's image i of batch k has the seed it has alone, seed_j + k * batch_size_j + i.
    load_input(reference) gives a job's input image; on_batch(owner_of, k, n_iter, per_batch) a step callback."""
    first = jobs[0].params
    prompts, negatives, owner_of = [], [], []
    for job in jobs:
        n = job.params["batch_size"]
        prompts += [job.params["prompt"]] * n
        negatives += [job.params["negative_prompt"]] * n
        owner_of += [job.id] * n
    out = {job.id: [] for job in jobs}
    iterations = first["n_iter"]
    for it in range(iterations):
        batch_seeds = [j.params["seed"] + it * j.params["batch_size"] + i for j in jobs
                       for i in range(j.params["batch_size"])]
        callback = on_batch(owner_of, it, iterations, len(prompts)) if on_batch is not None else None
        images = call(model, jobs[0].task, first, prompts, negatives, batch_seeds, callback, load_input)
        for job_id, image in zip(owner_of, images):
            out[job_id].append(image)
    return out


def call(model, task: str, p: dict, prompts, negatives, seeds, callback, load_input):
    """One batch through the Python API."""
    from stablediff.pipelines.hires import Hires

    shared = {k: p[k] for k in ("steps", "sampler", "schedule", "scale", "eta", "clip_skip", "subseed",
                                 "subseed_strength")}
    shared.update(seed=seeds, callback=callback)
    image = load_input(p.get("image"))
    if task == "txt2img":
        hires = Hires(p["hires_scale"], p["hires_steps"], p["hires_denoise"], p["hires_upscaler"]) \
            if p["hires_scale"] else None
        return model.txt2img(prompts, negatives, width=p["width"], height=p["height"], hires=hires, **shared)
    if task == "upscale":
        return model.upscale(image, prompts, negatives, noise_level=p["noise_level"], tile=p["tile"],
                             overlap=p["overlap"], **shared)
    if task == "outpaint":
        return model.outpaint(image, prompts, negatives, extend=p["extend"], mask_blur=p["mask_blur"],
                              fill=p["fill"], **shared)
    shared.update(width=p["width"], height=p["height"], strength=p["strength"], resize_mode=p["resize_mode"])
    if task == "img2img":
        return model.img2img(image, prompts, negatives, **shared)
    if task == "depth2img":
        depth = load_input(p.get("depth_map"))
        return model.depth2img(image, prompts, negatives, depth_map=depth.convert("F") if depth else None, **shared)
    return model.inpaint(image, load_input(p["mask"]).convert("L"), prompts, negatives, fill=p["fill"],
                         mask_blur=p["mask_blur"], invert_mask=p["invert_mask"], only_masked=p["only_masked"],
                         padding=p["padding"], **shared)
