"""Many LoRAs over one base model, in one batch: each row of the batch uses its own (or none).

A LoRA changes a frozen weight W by a low-rank product (litft/lora.py). Serving several fine-tunes of one base
does not need several copies of W: row b of a batch, asking for LoRA a(b), gets

    y_b = W x_b + s_a · B_a A_a x_b          s_a = α_a / r_a  (α_a / √r_a with rsLoRA)

The big matmul W x runs once for the whole batch. The LoRAs of a layer are concatenated, A's one under the
other and the scaled B's side by side, and a 0/1 mask keeps, for each row, only the ranks of its own LoRA:

    A_cat = [A_1; A_2; ...]                   (Σr, d_in)
    B_cat = [s_1 B_1, s_2 B_2, ...]           (d_out, Σr)
    Y = X Wᵀ + ((X A_catᵀ) ⊙ M) B_catᵀ        (B, T, d_in) -> (B, T, Σr) -> (B, T, d_out)
    M[b, j] = 1 where rank j belongs to row b's LoRA, else 0 (a row with no LoRA: all 0)

So a batch over any mix of LoRAs costs two small matmuls per layer, whatever the number of LoRAs; each row
computes the Σr ranks of all of them: Σr·(d_in + d_out) against W's d_in·d_out multiply-adds, e.g. Σr = 32 on a
576 × 576 layer (SmolLM2-135M) is 11 % of W's work, on a 4096 × 4096 one (Llama-2-7B) 1.6 %. With hundreds of
LoRAs, S-LoRA's gathering kernels avoid computing the ranks a row does not use. The LoRAs may differ in rank, scaling and targets: a
layer a LoRA does not target holds none of its ranks. Batching many LoRAs over one base is S-LoRA's idea
(Sheng et al. 2023, https://arxiv.org/abs/2311.03285; also Punica, Chen et al. 2023); PEFT's `adapter_names`
does it with a loop over the LoRAs. Merging (W' = W + s·B·A) is what one LoRA per process does; with many it
would need a copy of W per LoRA.

`add_loras(model, {name: lora_path})` loads the runs; `use_loras(model, names)` says, before a forward pass,
which LoRA each row of the batch uses (None: the base model).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from litft.config import Config
from litft.errors import UserError
from litft.files import load_state_dict
from litft.load_finetuned import check_same_base
from litft.lora import LINEAR, LoRAConfig


class MultiLoRALinear(nn.Module):
    """A frozen linear layer (plain or NF4) plus any number of LoRAs, each applied to the rows that ask for it."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("A", None, persistent=False)  # (Σr, d_in): every LoRA's A, one under the other
        self.register_buffer("B", None, persistent=False)  # (d_out, Σr): every LoRA's s·B, side by side
        self.register_buffer("owner", None, persistent=False)  # (Σr,): which LoRA (its index in `names`) owns a rank
        self.names: list[str] = []
        self.mask: Tensor | None = None  # (B, Σr), set by use_loras; None: no row of the batch uses a LoRA here

    def add(self, name: str, A: Tensor, B: Tensor, scaling: float) -> None:
        owner = torch.full((A.size(0),), len(self.names), device=A.device)
        self.names.append(name)
        self.A = A if self.A is None else torch.cat((self.A, A))
        self.B = scaling * B if self.B is None else torch.cat((self.B, scaling * B), dim=1)
        self.owner = owner if self.owner is None else torch.cat((self.owner, owner))

    def use(self, names: list[str | None]) -> None:
        """Row b of the next batches uses LoRA names[b] (None, or one this layer has not: no update)."""
        rows = torch.tensor([self.names.index(n) if n in self.names else -1 for n in names], device=self.owner.device)
        mask = rows[:, None] == self.owner  # (B, Σr)
        self.mask = mask.to(self.A.dtype) if mask.any() else None

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d_in) -> (B, T, d_out); also (B, d_in) -> (B, d_out)
        y = self.base(x)  # W x (+ b) for every row at once
        if self.mask is None:
            return y
        mask = self.mask.view(x.size(0), *(1,) * (x.dim() - 2), -1)  # (B, 1, Σr) for (B, T, d_in)
        ranks = (x @ self.A.T) * mask  # (B, T, Σr): each row keeps its own LoRA's ranks
        return y + ranks @ self.B.T  # (B, T, Σr) -> (B, T, d_out)


def add_loras(model: nn.Module, runs: dict[str, Path], quantize: str | None = None) -> nn.Module:
    """Load each LoRA run (`name -> lit_model_lora.pth`) into `model`, in place, next to the others.

    `quantize` is the scheme the base is served in; a run trained on an NF4 base (QLoRA) must be served on it.
    """
    for name, path in runs.items():
        config = check_run(name, Path(path), model.config, quantize)
        state_dict = load_state_dict(Path(path))
        if not state_dict or any(key.rsplit(".", 1)[-1] not in ("lora_A", "lora_B") for key in state_dict):
            raise UserError(f"LoRA {name!r}: {path} holds other tensors than LoRA's A and B; pass a LoRA run's "
                            "lit_model_lora.pth")
        for layer_name in sorted({key.rsplit(".", 1)[0] for key in state_dict}):
            layer = multi_lora_layer(model, layer_name, path)
            A, B = state_dict[f"{layer_name}.lora_A"], state_dict[f"{layer_name}.lora_B"]
            check_shapes(layer.base, A, B, layer_name, path)
            p = next(layer.base.parameters())
            dtype = p.dtype if p.is_floating_point() else model.embed.weight.dtype  # an NF4 base stores bytes
            layer.add(name, A.to(p.device, dtype), B.to(p.device, dtype), config.scaling)
    return model


def check_run(name: str, path: Path, base: Config, quantize: str | None) -> LoRAConfig:
    """The one-line refusals: a run that is not a LoRA, was trained on another base, or cannot share a batch."""
    if not path.is_file():
        raise UserError(f"LoRA {name!r}: {path} does not exist; pass a run's lit_model_lora.pth")
    config = LoRAConfig.from_dir(path.parent)
    check_same_base(path.parent, base, path)
    if config.new_tokens or "embed" in config.targets:
        raise UserError(f"LoRA {name!r} ({path}) adapts the embedding or adds tokens, which rows of one batch cannot "
                        "share; serve it alone with generate/lora.py, or merge it with scripts/merge_lora.py")
    if config.quantize not in (None, quantize):
        raise UserError(f"LoRA {name!r} was trained on an {config.quantize} base (QLoRA); serve the base with "
                        f"--quantize {config.quantize}, or merge it with scripts/merge_lora.py")
    return config


def multi_lora_layer(model: nn.Module, layer_name: str, path: Path) -> MultiLoRALinear:
    """The layer `layer_name` as a MultiLoRALinear (wrapping it the first time a LoRA targets it)."""
    is_target = layer_name == "lm_head" or layer_name.split(".", 2)[-1] in LINEAR.values()
    try:
        layer = model.get_submodule(layer_name)
    except AttributeError:
        layer = None
    if layer is None or not is_target:
        raise UserError(f"{path} adapts {layer_name}, which this base model has not; pass the base it was trained on")
    if not isinstance(layer, MultiLoRALinear):
        layer = MultiLoRALinear(layer)
        model.set_submodule(layer_name, layer)
    return layer


def check_shapes(base: nn.Module, A: Tensor, B: Tensor, layer_name: str, path: Path) -> None:
    d_in, d_out = base.in_features, base.out_features
    if A.dim() != 2 or B.dim() != 2 or A.size(1) != d_in or B.size(0) != d_out or A.size(0) != B.size(1):
        raise UserError(f"{path} was made for another base model: {layer_name}'s A and B are {tuple(A.shape)} and "
                        f"{tuple(B.shape)}, this base's layer is {d_out} x {d_in}; pass the base it was trained on")


def use_loras(model: nn.Module, names: list[str | None]) -> None:
    """Row b of the next batches uses LoRA names[b] (None: the base model alone)."""
    for module in model.modules():
        if isinstance(module, MultiLoRALinear):
            module.use(names)


def lora_names(model: nn.Module) -> set[str]:
    """Every LoRA loaded into `model` by add_loras."""
    return {name for m in model.modules() if isinstance(m, MultiLoRALinear) for name in m.names}
