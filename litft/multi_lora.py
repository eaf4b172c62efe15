"""Many LoRAs over one base model, in one batch: each row of the batch uses its own (or none).

A LoRA changes a frozen weight W by a low-rank product (litft/lora.py). Serving several fine-tunes of one base
does not need several copies of W: row b of a batch, asking for LoRA a(b), gets

    y_b = W x_b + s_a · B_a A_a x_b          s_a = α_a / r_a  (α_a / √r_a with rsLoRA)

The big matmul W x runs once for the whole batch; each LoRA then adds its update to its own rows only:

    Y = X Wᵀ                                  (B, T, d_in) -> (B, T, d_out), every row
    Y[rows_a] += s_a · X[rows_a] A_aᵀ B_aᵀ    (n_a, T, d_in) -> (n_a, T, r_a) -> (n_a, T, d_out), per LoRA

The LoRAs may differ in rank, scaling and targets: a layer a LoRA does not target simply adds nothing for its
rows. This is the batching of S-LoRA (Sheng et al. 2023, https://arxiv.org/abs/2311.03285) and Punica
(Chen et al. 2023), written with plain indexing instead of their custom kernels; PEFT's `adapter_names`
argument does the same. Merging (W' = W + s·B·A) is what one LoRA per process does; with many it would need a
copy of W per LoRA.

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
        self.loras = nn.ParameterDict()  # "<key>_A": (r, d_in), "<key>_B": (d_out, r)
        self.keys: dict[str, str] = {}  # LoRA name -> key (a name may hold dots, a parameter name may not)
        self.scalings: dict[str, float] = {}
        self.rows: list[tuple[str, slice | Tensor]] = []  # (LoRA name, the batch rows using it), set by use_loras

    def add(self, name: str, A: Tensor, B: Tensor, scaling: float) -> None:
        self.keys[name] = key = f"lora{len(self.keys)}"
        self.loras[f"{key}_A"] = nn.Parameter(A, requires_grad=False)
        self.loras[f"{key}_B"] = nn.Parameter(B, requires_grad=False)
        self.scalings[name] = scaling

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d_in) -> (B, T, d_out)
        y = self.base(x)  # W x (+ b) for every row at once
        for name, rows in self.rows:
            if name in self.keys:
                A, B = self.loras[f"{self.keys[name]}_A"], self.loras[f"{self.keys[name]}_B"]
                update = x[rows] @ A.T @ B.T  # (n, T, d_in) -> (n, T, r) -> (n, T, d_out)
                if isinstance(rows, slice):  # rows next to each other: add in place, no gather, no copy of y
                    y[rows].add_(update, alpha=self.scalings[name])
                else:
                    y = y.index_add(0, rows, update, alpha=self.scalings[name])
        return y


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
    """Row b of the next batches uses LoRA names[b] (None: the base model alone). The rows of a LoRA are
    fastest next to each other (litft/generate.py keeps a batch sorted so): a slice of the batch, not a gather."""
    groups = {}
    for b, name in enumerate(names):
        if name is not None:
            groups.setdefault(name, []).append(b)
    device = model.embed.weight.device
    rows = [(name, slice(bs[0], bs[-1] + 1) if bs[-1] - bs[0] == len(bs) - 1 else torch.tensor(bs, device=device))
            for name, bs in groups.items()]
    for module in model.modules():
        if isinstance(module, MultiLoRALinear):
            module.rows = rows


def lora_names(model: nn.Module) -> set[str]:
    """Every LoRA loaded into `model` by add_loras."""
    return {name for m in model.modules() if isinstance(m, MultiLoRALinear) for name in m.scalings}
