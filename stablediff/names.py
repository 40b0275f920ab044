"""Sampler and schedule names, ours and AUTOMATIC1111's, without torch: the command line checks them before it
imports anything heavy, and the infotext reader maps the webui's names to ours by meaning."""
from stablediff.errors import UserError

# our key -> the webui's label (written into PNG parameters); the sampler functions are in diffusion/samplers.py
SAMPLER_LABELS = {"ddim": "DDIM", "plms": "PLMS", "ddpm": "DDPM", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
                  "heun": "Heun", "dpm2": "DPM2", "dpm2_a": "DPM2 a", "dpmpp_2m": "DPM++ 2M", "dpmpp_2s_a": "DPM++ 2S a",
                  "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE", "unipc": "UniPC",
                  "lcm": "LCM"}

# what the webui (1.9 and later) means by "Schedule type: Automatic" for each sampler: its own scheduler option,
# else k-diffusion's get_sigmas (Uniform); its DDIM, PLMS and UniPC step on the DDIM timesteps
A1111_AUTOMATIC = {"ddim": "ddim", "plms": "ddim", "ddpm": "ddim", "unipc": "ddim", "lms": "uniform", "euler": "uniform",
                   "euler_a": "uniform", "heun": "uniform", "dpm2": "karras", "dpm2_a": "karras", "dpmpp_2m": "karras",
                   "dpmpp_2s_a": "karras", "dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential",
                   "lcm": "uniform"}

# default: the model's own spacing (leading, trailing or linspace, from its config). The webui's schedules are ours
# too, by its definitions (modules/sd_schedulers.py): uniform and sgm_uniform interpolate log sigma at fractional
# timesteps, simple and ddim pick training timesteps (ddim can give one step more than asked, as the webui does);
# lcm: the timesteps of diffusers' LCMScheduler, the LCM sampler's default
SCHEDULE_LABELS = {"default": "Default", "karras": "Karras", "exponential": "Exponential", "trailing": "Trailing",
                   "leading": "Leading", "linspace": "Linspace", "uniform": "Uniform", "sgm_uniform": "SGM Uniform",
                   "simple": "Simple", "ddim": "DDIM", "lcm": "LCM"}
SCHEDULES = tuple(SCHEDULE_LABELS)
A1111_SCHEDULES = ("karras", "exponential", "uniform", "sgm_uniform", "simple", "ddim")  # labels the webui knows
_READ_SCHEDULES = {**{label.lower(): key for key, label in SCHEDULE_LABELS.items()}, "sgmuniform": "sgm_uniform",
                   "normal": "uniform"}  # the webui's Normal is its Uniform: t evenly from sigma_max's to sigma_min's

_SAMPLER_ALIASES = {**{label.lower(): key for key, label in SAMPLER_LABELS.items()},
                    "k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_heun": "heun", "k_dpm_2": "dpm2",
                    "k_dpm_2_a": "dpm2_a", "dpm++ 2m sde": "dpmpp_2m_sde", "uni_pc": "unipc"}


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULE_LABELS:
        raise UserError(f"unknown schedule {schedule!r}; choose from: {', '.join(SCHEDULES)}")
    return schedule


def parse_sampler(name: str | None, schedule: str | None = None) -> tuple[str | None, str | None]:
    """(sampler key, schedule) from our names or A1111's ("DPM++ 2M Karras" -> dpmpp_2m, karras). name None (the
    model's own sampler, known once it is loaded): only a given schedule is checked, and both stay to resolve."""
    if name is None:
        return None, schedule and check_schedule(schedule)
    key = name.strip().lower()
    for suffix in ("karras", "exponential"):
        if key.endswith(" " + suffix):
            key, schedule = key[: -len(suffix) - 1].strip(), schedule or suffix
    key = _SAMPLER_ALIASES.get(key, key.replace("-", "_").replace(" ", "_").replace("+", "p"))
    if key not in SAMPLER_LABELS:
        raise UserError(f"unknown sampler {name!r}; choose from: {', '.join(SAMPLER_LABELS)} "
                        "(AUTOMATIC1111 names such as \"DPM++ 2M Karras\" work too)")
    return key, check_schedule(schedule or "default")


def read_schedule(label: str, sampler: str) -> str:
    """Our schedule key for a "Schedule type" from an infotext (ours or the webui's), by its meaning: Automatic
    is the sampler's own in the webui."""
    if label.strip().lower() == "automatic":
        return A1111_AUTOMATIC[sampler]
    key = _READ_SCHEDULES.get(label.strip().lower())
    if key is None:
        raise UserError(f"Schedule type {label!r} is not one stablediff has; it has: "
                        f"{', '.join(SCHEDULE_LABELS.values())} and Automatic")
    return key
