"""LoRA training: low-rank factors beside the frozen layers of the UNet (attention, feed-forward, optionally the 3x3
convolutions) and optionally the text encoder, added to each layer's output by a forward hook (the model's own
modules and weights stay as they are), and written in kohya's layout, with the `ss_*` metadata AUTOMATIC1111
shows: the file that `--lora` and `<lora:name:1>` read here, and that AUTOMATIC1111, ComfyUI and diffusers load."""
from torch import nn

from stablediff.adapters.lora import module_names

# which of the model's layers get factors, by their kohya names (diffusers' paths, "_" for ".")
UNET_ATTENTION = ("_attn1_to_q", "_attn1_to_k", "_attn1_to_v", "_attn1_to_out_0",
                  "_attn2_to_q", "_attn2_to_k", "_attn2_to_v", "_attn2_to_out_0", "_proj_in", "_proj_out")
UNET_FEED_FORWARD = ("_ff_net_0_proj", "_ff_net_2")
UNET_CONVOLUTIONS = ("_conv1", "_conv2", "_downsamplers_0_conv", "_upsamplers_0_conv")  # the 3x3 ones kohya's conv_dim takes
TEXT = ("_q_proj", "_k_proj", "_v_proj", "_out_proj", "_mlp_fc1", "_mlp_fc2")


class LoraFactors(nn.Module):
    """down then up, scaled by alpha / rank; up starts at zero, so training starts from the base model."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.lora_down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=5 ** 0.5)  # as kohya and PEFT start them
        nn.init.zeros_(self.lora_up.weight)
        self.rank, self.alpha = rank, alpha

    def forward(self, x):  # (in the factors' dtype: a frozen model may be in bf16 or fp16)
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) * (self.alpha / self.rank)


def _canonical(model, prefixes=("lora_unet_", "lora_te_")) -> dict[tuple[str, str], str]:
    """(part, our module name) -> its kohya name (or, with prefixes unet./text_encoder., diffusers' PEFT name): the
    first of those module_names gives each layer."""
    out = {}
    for name, target in module_names(model).items():
        if name.startswith(prefixes):
            out.setdefault(target, name)
    return out


class LoraNetwork(nn.Module):
    """The factors of every targeted layer, keyed by kohya name; attach() hooks them onto the model."""

    def __init__(self, model, rank: int, alpha: float, conv_rank: int = 0, conv_alpha: float = 1.0,
                 text_encoder: bool = False, feed_forward: bool = True):
        super().__init__()
        wanted = UNET_ATTENTION + (UNET_FEED_FORWARD if feed_forward else ())
        self.factors = nn.ModuleDict()
        self.targets: dict[str, tuple[str, str]] = {}
        for (part, ours), kohya in _canonical(model).items():
            layer = getattr(model, part).get_submodule(ours)
            unet_layer = part == "unet" and kohya.endswith(wanted)
            conv = part == "unet" and conv_rank and isinstance(layer, nn.Conv2d) and layer.kernel_size == (3, 3) \
                and kohya.endswith(UNET_CONVOLUTIONS)
            text = part == "text_encoder" and text_encoder and kohya.endswith(TEXT)
            if unet_layer or text:
                self.factors[kohya] = LoraFactors(layer, rank, alpha)
            elif conv:
                self.factors[kohya] = LoraFactors(layer, conv_rank, conv_alpha)
            else:
                continue
            self.targets[kohya] = (part, ours)
        self.handles = []

    def attach(self, model) -> "LoraNetwork":
        """Add each layer's factors to its output, until detach()."""
        self.detach()
        for kohya, (part, ours) in self.targets.items():
            factors = self.factors[kohya]
            layer = getattr(model, part).get_submodule(ours)
            self.handles.append(layer.register_forward_hook(lambda m, args, out, f=factors: out + f(args[0]).to(out.dtype)))
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _weights(self):
        """(kohya name, factors, down, up): each layer's factors in fp32 on the CPU (a linear layer's 2-d, a
        convolution's 4-d)."""
        for kohya, factors in self.factors.items():
            yield (kohya, factors, factors.lora_down.weight.detach().float().cpu().contiguous(),
                   factors.lora_up.weight.detach().float().cpu().contiguous())

    def kohya_state_dict(self) -> dict:
        """lora_unet_* / lora_te_* with .lora_down.weight, .lora_up.weight and .alpha, as kohya writes them."""
        import torch

        sd = {}
        for kohya, factors, down, up in self._weights():
            sd |= {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up,
                   f"{kohya}.alpha": torch.tensor(float(factors.alpha))}
        return sd

    def peft_state_dict(self, model) -> dict:
        """diffusers' own layout (unet.<path>.lora_A.weight / lora_B.weight, text_encoder.<path>...): no alpha key,
        so alpha / rank is folded into lora_B, which gives the same product."""
        names = _canonical(model, ("unet.", "text_encoder."))
        sd = {}
        for kohya, factors, down, up in self._weights():
            name = names[self.targets[kohya]]
            sd |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up * (factors.alpha / factors.rank)}
        return sd
