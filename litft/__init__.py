"""litft: readable Llama fine-tuning — LoRA, LLaMA-Adapter v1/v2 and full fine-tuning on Lightning Fabric."""

from litft.config import Config
from litft.model import Llama

__all__ = ["Config", "Llama"]
