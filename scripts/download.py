"""Download a Llama-architecture model from the Hugging Face Hub into checkpoints/<org>/<name>.

    python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct
    python scripts/download.py --repo_id meta-llama/Llama-2-7b-hf --access_token hf_...  # gated: accept its license
    python scripts/download.py --repo_id list                                             # the models litft names

Only what litft needs is fetched: config.json, the tokenizer files and the weights, as safetensors when the
repository has them (else pytorch_model*.bin). `--convert true` then runs scripts/convert_hf_checkpoint.py.
Without a network (or with HF_HUB_OFFLINE=1) use the offline path instead: a GGUF file and
scripts/convert_gguf_checkpoint.py (see howto/download_and_convert.md).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from litft.config import CONFIGS
from litft.convert_hf import convert_hf_checkpoint
from litft.errors import UserError
from litft.files import TOKENIZER_FILES

OFFLINE_HINT = "for an offline start, convert a GGUF file with scripts/convert_gguf_checkpoint.py"
SAFETENSORS = ["model*.safetensors", "model.safetensors.index.json"]
PYTORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def main(repo_id: str, checkpoint_dir: Path = Path("checkpoints"), access_token: Optional[str] = None,
         convert: bool = False) -> None:
    """Fetch a model's config, tokenizer and weights.

    Args:
        repo_id: the Hub repository, e.g. HuggingFaceTB/SmolLM2-135M-Instruct; `list` prints the models litft names.
        checkpoint_dir: the files land in checkpoint_dir/repo_id.
        access_token: a Hugging Face token, for gated models such as Llama-2 (default: $HF_TOKEN or your login).
        convert: also convert the weights to a lit checkpoint (lit_model.pth + model_config.yaml) in place.
    """
    if repo_id == "list":
        print("\n".join(sorted({c.hf_repo for c in CONFIGS.values() if c.hf_repo})))
        return
    token = access_token  # None: huggingface_hub uses $HF_TOKEN or the token saved by `hf auth login`
    patterns = ["config.json", *TOKENIZER_FILES, *weight_patterns(repo_id, token)]
    local_dir = Path(checkpoint_dir) / repo_id
    created = not local_dir.exists()
    try:
        with hub_errors(repo_id):
            from huggingface_hub import snapshot_download

            snapshot_download(repo_id, local_dir=local_dir, allow_patterns=patterns, token=token)
    except BaseException:
        if created and local_dir.is_dir() and not any(p.name != ".cache" for p in local_dir.iterdir()):
            shutil.rmtree(local_dir)  # nothing came: leave no empty directory (partial downloads resume, so stay)
        raise
    print(f"downloaded {repo_id} to {local_dir}")
    if convert:
        print(convert_hf_checkpoint(local_dir))


def weight_patterns(repo_id: str, token: str | None) -> list[str]:
    """Which weight files to fetch: safetensors if the repository has them, else PyTorch .bin files."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id):
        files = [s.rfilename for s in HfApi().model_info(repo_id, token=token).siblings or []]
    if any(f.endswith(".safetensors") and f.startswith("model") for f in files):
        return SAFETENSORS
    if any(f.startswith("pytorch_model") and f.endswith(".bin") for f in files):
        return PYTORCH_BIN
    raise UserError(f"{repo_id} has no model*.safetensors or pytorch_model*.bin weights; "
                    "is it a transformers Llama model?")


@contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """Turn the Hub's exceptions into one line that says what to do."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        message = explain(error, repo_id)
        if message is None:
            raise
        raise UserError(message) from None


def explain(error: Exception, repo: str) -> str | None:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    if isinstance(error, HFValidationError):
        return (f"--repo_id {repo!r} is not a Hub repository id (ORG/NAME); "
                "`--repo_id list` prints the models litft names")

    if isinstance(error, OfflineModeIsEnabled) or (isinstance(error, LocalEntryNotFoundError) and is_offline()):
        return f"cannot download {repo}: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1); {OFFLINE_HINT}"
    if isinstance(error, GatedRepoError):
        return (f"{repo} is gated: accept its license on https://huggingface.co/{repo}, then pass --access_token "
                "(or set HF_TOKEN)")
    if isinstance(error, RepositoryNotFoundError):
        return (f"{repo} was not found on the Hub (a private one needs --access_token); "
                "`--repo_id list` prints the models litft names")
    if isinstance(error, HfHubHTTPError):
        return f"the Hub refused {repo}: {str(error).splitlines()[0]}"
    if is_network_error(error):
        return (f"cannot reach the Hugging Face Hub for {repo} ({type(error).__name__}); "
                f"check the network, or {OFFLINE_HINT}")
    return None


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_network_error(error: BaseException) -> bool:
    """Connection failures, whichever HTTP library this huggingface_hub version uses underneath."""
    module = type(error).__module__.split(".")[0]
    return isinstance(error, (ConnectionError, TimeoutError)) or module in ("httpx", "httpx2", "httpcore", "requests",
                                                                              "urllib3")


if __name__ == "__main__":
    from litft.cli import run

    run(main)
