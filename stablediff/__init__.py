"""stablediff: Stable Diffusion in clean PyTorch."""

__all__ = ["StableDiffusion", "Hires", "Refiner"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy, so `import stablediff` and `stablediff --help` stay fast
    if name == "StableDiffusion":
        from stablediff.api import StableDiffusion

        return StableDiffusion
    if name in ("Hires", "Refiner"):
        from stablediff import api

        return getattr(api, name)
    raise AttributeError(name)
