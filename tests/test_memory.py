"""The memory plan (litft/memory.py) against what a real training step holds.

Truth: autograd's own record of the tensors a real forward pass saves for the backward pass (saved-tensor
hooks on real CPU tensors, each storage once, parameters excluded), the parameters' bytes, and AdamW's state
after a real step. The plan probes 1- and 2-block models on fake tensors and extrapolates; these tests run 3
blocks and 3 samples for real.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import platform
import subprocess
import sys
from dataclasses import replace
from functools import partial

import pytest
import torch
from conftest import ROOT
from test_train import tiny  # noqa: F401  (tiny is a fixture)

from litft import memory
from litft.checkpoint import save_lit_checkpoint
from litft.config import Config
from litft.errors import UserError
from litft.fast import for_training
from litft.lora import WEIGHTS, LoRAConfig, add_lora
from litft.model import Llama
from litft.packing import collate, pack
from litft.precision import base_dtype, train_in_fp32
from litft.qlora import NF4Linear, quantize
from litft.rope import RoPEScaling
from litft.train_args import Method, TrainArgs

CONFIG = replace(Config.from_name("tiny-gqa"), n_layer=3)
METHODS = {"lora": partial(add_lora, config=LoRAConfig(r=4)), "full": lambda model: model.requires_grad_(True)}


def real_step(method: str, quantized: bool, checkpointing: bool, fast: bool, samples: int, seq: int,
              packed: bool = False, config: Config = CONFIG, autocast: bool = False,
              dtype: torch.dtype = torch.float32) -> dict:
    """dtype: the checkpoint's; a 16-bit one under autocast is built as bf16-mixed builds it (litft/precision.py)."""
    torch.manual_seed(0)
    model = Llama(config).to(dtype).requires_grad_(False)
    METHODS[method](model)
    train_in_fp32(model)
    if quantized:
        quantize(model, "nf4")
    model.activation_checkpointing = checkpointing
    loss_fn = for_training(model, fast)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, CONFIG.vocab_size, (samples, seq))
    packed_pos = packed_rows(samples, seq)[2] if packed else None
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", enabled=autocast):
        loss = loss_fn(model.train(), x, x, packed_pos=packed_pos)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    nf4 = {id(m.workspace): m.workspace for m in model.modules() if isinstance(m, NF4Linear)}  # Ŵ is rebuilt there
    held = sum(t.untyped_storage().nbytes() for space in nf4.values() for t in space.slots.values())
    return {"activations": sum(saved.values()), "optimizer": state,
            "weights": sum(p.numel() * p.element_size() for p in model.parameters()) + held,
            "gradients": sum(p.grad.numel() * p.grad.element_size() for p in trainable)}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_plan_of_a_bf16_checkpoint_under_bf16_mixed_counts_a_real_step(method, tmp_path):
    """Llama 3's checkpoints are stored in bf16. Under bf16-mixed the frozen base stays bf16 and the trained weights
    and AdamW's moments are fp32; autocast computes in bf16. The plan priced the whole base in fp32, which doubled
    its weights and made the residual stream fp32."""
    real = real_step(method, False, False, True, samples=3, seq=20, autocast=True, dtype=torch.bfloat16)
    save_lit_checkpoint(Llama(CONFIG).to(torch.bfloat16), tmp_path)
    prepare = memory.prepared_as_trained(Method(name=method, weights_name="w.pth", prepare=METHODS[method]),
                                         "bf16-mixed")
    plan = memory.plan(CONFIG, prepare, 20, dtype=base_dtype("bf16-mixed", tmp_path), autocast=torch.bfloat16,
                       quantize=None, activation_checkpointing=False, loss=lambda model: for_training(model, True),
                       device=torch.device("cpu")).with_micro_batch(3)
    assert plan.activations == real["activations"]
    assert (plan.weights, plan.gradients, plan.optimizer) == (real["weights"], real["gradients"], real["optimizer"])


def test_a_checkpoint_of_mixed_dtypes_is_planned_at_its_widest_and_a_missing_one_is_one_line(tmp_path):
    model = Llama(CONFIG).to(torch.bfloat16)
    model.norm.float()  # a bf16 checkpoint with an fp32 norm: planned in fp32, never under the real bytes
    save_lit_checkpoint(model, tmp_path)
    assert (base_dtype("bf16-mixed", tmp_path), base_dtype("bf16-true", tmp_path)) == (torch.float32, torch.bfloat16)
    with pytest.raises(UserError, match="nowhere has no lit_model.pth; convert the model first"):
        base_dtype("bf16-mixed", tmp_path / "nowhere")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("method,quantized,checkpointing", [("lora", False, False), ("lora", False, True),
                                                            ("lora", True, False), ("full", False, False),
                                                            ("full", False, True)],
                         ids=["lora", "lora-checkpointing", "qlora", "full", "full-checkpointing"])
def test_the_plan_counts_what_a_real_step_holds(method, quantized, checkpointing, fast):
    real = real_step(method, quantized, checkpointing, fast, samples=3, seq=20)
    plan = memory.plan(CONFIG, METHODS[method], 20, dtype=torch.float32, autocast=None,
                       quantize="nf4" if quantized else None, activation_checkpointing=checkpointing,
                       loss=lambda model: for_training(model, fast), device=torch.device("cpu"),
                       loss_chunk=256 if fast else None).with_micro_batch(3)
    assert plan.activations == real["activations"]
    assert (plan.weights, plan.gradients, plan.optimizer) == (real["weights"], real["gradients"], real["optimizer"])


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_a_larger_micro_batch_plans_more_of_what_grows_with_it(fast):
    """Three samples against one: the backward pass's block of gradients triples, as the activations do (checked
    against real steps above); the plain loss's buffers grow with every position (measured below), the fast
    loss holds one chunk however many samples."""
    one = memory.plan(CONFIG, METHODS["lora"], 20, dtype=torch.float32, autocast=None, quantize=None,
                      activation_checkpointing=False, loss=lambda model: for_training(model, fast),
                      device=torch.device("cpu"), loss_chunk=256 if fast else None)
    three = one.with_micro_batch(3)
    assert three.backward == 3 * one.backward > 0
    assert three.loss == 4 * CONFIG.vocab_size * (3 * 20 if fast else 2 * 3 * 20)
    assert (three.weights, three.gradients, three.optimizer) == (one.weights, one.gradients, one.optimizer)


MEASURE = """
import json, sys
import torch
from litft.config import Config
from litft.loss import next_token_loss
from litft.model import Llama
from litft.train import param_groups

def status(field):  # bytes, from the kernel's account of this process (not ru_maxrss, which exec inherits)
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024

def start():  # the peak so far set back to the resident set now (clear_refs 5): the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")

def peak():  # freed memory is given back at once (MALLOC_MMAP_THRESHOLD_), so the peak is the measured part's own
    return status("VmHWM")

what, config = sys.argv[1], Config(**json.loads(sys.argv[2]))
if what == "loss":  # the plain loss of (B, T) positions over the lm_head: its peak beyond what autograd saves
    h = torch.randn(2, 256, config.n_embd, requires_grad=True)
    w, y = torch.randn(config.vocab_size, config.n_embd) * 0.02, torch.randint(0, config.vocab_size, (2, 256))
    next_token_loss(torch.randn(1, 2, 8, requires_grad=True), torch.ones(1, 2, dtype=torch.long)).backward()  # imports
    saved = {}
    def keep(t):
        if t.untyped_storage().data_ptr() not in (h.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    before = start()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = next_token_loss(h @ w.T, y)
    loss.backward()
    print(peak() - before - sum(saved.values()))
else:  # one AdamW step of a full fine-tune, its optimizer built as training builds it, its state already made
    model = Llama(config)
    tiny = torch.nn.Parameter(torch.ones(4))  # a first step imports what AdamW needs: not counted
    tiny.grad = torch.ones(4)
    torch.optim.AdamW([tiny], foreach=what == "foreach").step()
    optimizer = torch.optim.AdamW(param_groups(model, 0.02), foreach=what == "foreach")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.ones_like(p)}
    before = start()
    optimizer.step()
    print(peak() - before)
"""


def measured(what: str, config: Config) -> int:
    """What `what` takes beyond what it starts with, measured by the kernel (a fresh process's peak resident set,
    VmHWM, set back to its resident set just before) under glibc's malloc told to map every buffer above 64 KiB on
    its own, so it is returned when freed."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the measurement relies on glibc's MALLOC_MMAP_THRESHOLD_")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # what the measurement does to set its peak back (Linux ≥ 4.0 with page monitoring)
    except OSError as e:
        pytest.skip(f"the peak resident set cannot be reset here ({e})")
    env = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, "PYTHONPATH": str(ROOT),
           "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    fields = {k: getattr(config, k) for k in ("name", "vocab_size", "n_layer", "n_embd", "n_head", "n_query_groups",
                                              "intermediate_size", "block_size", "tie_embeddings")}
    out = subprocess.run([sys.executable, "-c", MEASURE, what, json.dumps(fields)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


# untied, with a wide MLP: all the matrices together (a GPU's step) and twice the largest (a CPU's) differ
STEP_CONFIG = replace(CONFIG, vocab_size=8192, n_embd=256, intermediate_size=2048, n_layer=2, tie_embeddings=False)


@pytest.mark.parametrize("device, implementation", [("cuda", "foreach"), ("cpu", "for-loop")])
def test_the_plan_counts_what_adams_step_takes_beside_its_state(device, implementation):
    """Truth: the peak resident memory of a real AdamW step, foreach (the default for CUDA tensors: one temporary
    per tensor of a group, held together) and a loop over tensors (the default for CPU ones). The step comes
    after the activations are freed, so the plan counts the larger of the two."""
    plan = memory.plan(STEP_CONFIG, METHODS["full"], 20, dtype=torch.float32, autocast=None, quantize=None,
                       activation_checkpointing=False, loss=lambda model: for_training(model, True),
                       device=torch.device(device))
    real = measured(implementation, STEP_CONFIG)
    # the loop measured 1.11–1.13× twice the largest tensor (18.6–18.9 MB against 16.8), by an allocation not traced
    assert plan.step == pytest.approx(real, rel=0.05 if implementation == "foreach" else 0.15)
    held = plan.weights + plan.gradients + plan.optimizer + plan.process
    assert plan.total == held + max(plan.step, plan.activations + plan.backward + plan.loss)


def test_the_plain_loss_is_planned_at_what_it_takes_beyond_what_autograd_saves():
    """Truth: the peak resident memory of the plain loss over 2 × 256 positions, forward and backward, less the
    log-softmax autograd saves (which the plan counts among the activations): two fp32 (B, T, vocab) buffers."""
    config = replace(CONFIG, vocab_size=32768)  # 200 MB at the peak: above what the imports left
    plan = memory.plan(config, METHODS["lora"], 256, dtype=torch.float32, autocast=None, quantize=None,
                       activation_checkpointing=False, loss=lambda model: for_training(model, False),
                       device=torch.device("cpu"), loss_chunk=None).with_micro_batch(2)
    # measured 137–142 MB (small buffers beside the two, and page noise) against the 134 MB planned; the three
    # buffers counted before were 201 MB, far outside
    assert plan.loss == pytest.approx(measured("loss", config), rel=0.1)


def packed_rows(rows: int, seq: int):
    """(input_ids, labels, packed_pos) of `rows` rows of `seq` tokens, each packed by litft/packing.py from two
    samples (seq - 7 and 7 tokens)."""
    samples = [{"input_ids": torch.ones(n, dtype=torch.long), "labels": torch.ones(n, dtype=torch.long)}
               for n in [seq - 7, 7] * rows]
    x, y, packed_pos = collate(pack(samples, seq), pad_id=0)
    assert x.shape == (rows, seq) and int((packed_pos == 0).sum()) == 2 * rows
    return x, y, packed_pos


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["lora", "lora-checkpointing"])
def test_the_plan_counts_what_a_real_packed_step_holds(checkpointing, fast):
    """--packing: the per-sample mask, a float (B, 1, T, T) tensor, and rotary tables gathered per token. A plan
    of unpacked samples misses them."""
    real = real_step("lora", False, checkpointing, fast, samples=3, seq=20, packed=True)

    def planned(packing: bool) -> float:
        return memory.plan(CONFIG, METHODS["lora"], 20, dtype=torch.float32, autocast=None, quantize=None,
                           activation_checkpointing=checkpointing, loss=lambda model: for_training(model, fast),
                           device=torch.device("cpu"), loss_chunk=256 if fast else None,
                           packing=packing).with_micro_batch(3).activations

    assert planned(packing=True) == real["activations"] != planned(packing=False)


def test_a_packed_plan_of_a_model_with_dynamic_rope_scaling_counts_a_real_step():
    """Dynamic NTK scaling builds its tables for the longest sample's length, a value the plan's fake tensors do
    not hold; past the original context (8 < 20 tokens here) the real step still saves the same."""
    config = replace(CONFIG, rope_scaling=RoPEScaling(type="dynamic", factor=4.0, original_max_position=8))
    real = real_step("lora", False, False, False, samples=3, seq=20, packed=True, config=config)
    plan = memory.plan(config, METHODS["lora"], 20, dtype=torch.float32, autocast=None, quantize=None,
                       activation_checkpointing=False, loss=lambda model: for_training(model, False),
                       device=torch.device("cpu"), loss_chunk=None, packing=True).with_micro_batch(3)
    assert plan.activations == real["activations"]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_packed_rows_keep_one_mask_for_every_layer(autocast):
    """A fourth layer saves the same bytes packed as unpacked: the trunk builds the float mask once, in the dtype
    attention computes in, and every layer reads it. Handed a boolean mask (or an fp32 one under bf16 autocast),
    attention converts it in each layer and keeps each copy for the backward pass: 4 · B · T² more bytes per
    layer in fp32, 30 × 4 MB at micro batch 4 × 512 for SmolLM2-135M."""
    def fourth_layer(packed: bool) -> int:
        def step(n_layer: int) -> int:
            return real_step("lora", quantized=False, checkpointing=False, fast=True, samples=3, seq=20,
                             packed=packed, config=replace(CONFIG, n_layer=n_layer), autocast=autocast)["activations"]
        return step(4) - step(3)

    assert fourth_layer(packed=True) == fourth_layer(packed=False) > 0


def lora_method() -> Method:
    return Method(name="lora", weights_name=WEIGHTS, prepare=partial(add_lora, config=LoRAConfig()))


def test_auto_picks_the_largest_micro_batch_that_fits(tiny, monkeypatch):
    monkeypatch.setattr(memory, "resident_bytes", lambda: 3e8)  # the process, as it is now: held still
    args = TrainArgs(checkpoint_dir=tiny["ckpt"], batch_size=12, micro_batch_size="auto")
    one = memory.plan(Config.from_checkpoint(tiny["ckpt"]), lora_method().prepare, 200, dtype=torch.float32,
                      autocast=None, quantize=None, activation_checkpointing=False,
                      loss=lambda model: for_training(model, True), device=torch.device("cpu"))
    fits_four = one.with_micro_batch(4).total / memory.MARGIN + 1  # 4 fits, 6 does not
    assert one.with_micro_batch(6).total > memory.MARGIN * fits_four
    monkeypatch.setattr(memory, "free_bytes", lambda device: fits_four)
    micro, line = memory.plan_run(args, lora_method(), 200, world_size=1, device=torch.device("cpu"))
    assert micro == 4 and "micro batch 4 × 200 tokens" in line


def test_a_run_that_cannot_fit_is_refused_before_loading(tiny, monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1e6)
    for micro in (2, "auto"):
        args = TrainArgs(checkpoint_dir=tiny["ckpt"], batch_size=4, micro_batch_size=micro)
        with pytest.raises(UserError, match=r"lower --micro_batch_size .* --activation_checkpointing true"):
            memory.plan_run(args, lora_method(), 64, world_size=1, device=torch.device("cpu"))


@pytest.mark.parametrize("library, name", [(None, "glibc"), ("tcmalloc_minimal", "tcmalloc"), ("jemalloc", "jemalloc")])
def test_the_allocator_is_the_one_the_dynamic_loader_preloaded(library, name):
    """Truth: the dynamic loader, given LD_PRELOAD in a fresh process (Debian's libtcmalloc-minimal4,
    libjemalloc2), and the C library Python reports."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if library:
        found = ctypes.util.find_library(library)
        if found is None:
            pytest.skip(f"lib{library} is not installed")
        env["LD_PRELOAD"] = found
    if name == "glibc" and platform.libc_ver()[0] != "glibc":
        pytest.skip("this Python does not run on glibc")
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", "from litft.memory import allocator; print(allocator())"],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert out == [name]


def test_a_cpu_plan_on_glibc_says_the_peak_may_exceed_it(tiny, monkeypatch):
    args = TrainArgs(checkpoint_dir=tiny["ckpt"], batch_size=4, micro_batch_size=2)
    for name, warned in (("glibc", True), ("tcmalloc", False), (None, False)):
        monkeypatch.setattr(memory, "allocator", lambda found=name: found)
        line = memory.plan_run(args, lora_method(), 64, world_size=1, device=torch.device("cpu"))[1]
        assert line.startswith("memory plan: estimated peak")
        assert ("LD_PRELOAD=libtcmalloc_minimal.so.4" in line) == warned, name


def test_auto_never_picks_more_samples_than_the_data_has_per_process(tiny, monkeypatch):
    """A batch of 12 on 1 process, memory for anything: auto takes the largest divisor of 12 the rows fill."""
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1e15)
    args = TrainArgs(checkpoint_dir=tiny["ckpt"], batch_size=12, micro_batch_size="auto")
    picked = {rows: memory.plan_run(args, lora_method(), 64, world_size=1, device=torch.device("cpu"), rows=rows)[0]
              for rows in (100, 12, 5, 3, 1)}
    assert picked == {100: 12, 12: 12, 5: 4, 3: 3, 1: 1}
