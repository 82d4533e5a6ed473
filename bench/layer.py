"""Forward + backward of one LoRA layer at M = 4096, r = 64: QuantLoRALinear against a frozen bf16
nn.Linear with the same LoRA (goal: at most 1.10x its time) and against bitsandbytes' Linear4bit with
PEFT's LoRA (goal: at least 1.2x faster), plus the memory each holds for backward.

    python bench/layer.py [--reps 50] [--out bench/RESULTS.md]

Prints a markdown table (device, date, git commit); exits 0 with a note where there is no CUDA.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import arg_parser, cuda_median_ms, emit, git_commit, no_cuda  # noqa: E402
from qlora.layer import QuantLoRALinear  # noqa: E402

M, R, ALPHA = 4096, 64, 16
SHAPES = [(4096, 4096), (11008, 4096)]  # (out, in): attention projection, Llama-7B MLP up/gate
DTYPE = torch.bfloat16


class BF16LoRALinear(nn.Module):
    """The baseline: a frozen bf16 weight with exactly QuantLoRALinear's adapter arithmetic."""

    def __init__(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
        super().__init__()
        self.weight = nn.Parameter(weight.to(DTYPE), requires_grad=False)
        self.lora_A = nn.Parameter(lora_a.clone())
        self.lora_B = nn.Parameter(lora_b.clone())
        self.scaling = scaling

    def forward(self, x):
        h = x.to(DTYPE)
        out = F.linear(h, self.weight)
        down = F.linear(h, self.lora_A.to(DTYPE)).reshape(-1, self.lora_A.shape[0])
        out = torch.addmm(out.reshape(-1, self.weight.shape[0]), down, self.lora_B.to(DTYPE).t(), alpha=self.scaling)
        return out.view(*x.shape[:-1], self.weight.shape[0])


def bnb_peft_layer(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor):
    """bitsandbytes Linear4bit (NF4, double quant, bf16 compute) wrapped by PEFT's LoRA; None if missing."""
    try:
        import bitsandbytes as bnb
        import peft
    except ImportError as err:
        print(f"note: bitsandbytes + PEFT row skipped ({err})", file=sys.stderr)
        return None

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            out_features, in_features = weight.shape
            self.proj = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=DTYPE,
                                          compress_statistics=True, quant_type="nf4")
            self.proj.weight = bnb.nn.Params4bit(weight.to("cpu", DTYPE), requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4")

        def forward(self, x):
            return self.proj(x)

    model = Wrapper().cuda()  # quantises on the way to the GPU
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"])
    model = peft.get_peft_model(model, config)
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(lora_a)
        lora.lora_B["default"].weight.copy_(lora_b)
    return model


def trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def step(layer, x, grad_out):
    # autograd.grad rather than backward(): no .grad accumulation kernels in the timing.
    out = layer(x)
    return torch.autograd.grad(out, [x] + trainable(layer), grad_out)


def time_ms(layer, x, grad_out, warmup: int, reps: int) -> float:
    """Median of reps CUDA-event timings of forward + backward, after warm-up (Triton autotuning)."""
    return cuda_median_ms(lambda: step(layer, x, grad_out), reps, warmup)


def held_for_backward(layer, x) -> tuple[int, int]:
    """(bytes of distinct tensors autograd saved, excluding the layer's own parameters and buffers;
    bytes allocated by the forward still held after it, less the output itself)."""
    own = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated() - before - out.untyped_storage().nbytes()
    del out
    return sum(saved.values()), allocated


def main(argv=None) -> int:
    parser = arg_parser(__doc__, reps=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    if no_cuda("bench/layer.py: no CUDA device, nothing measured (needs an H100/H200-class GPU)"):
        return 0

    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    lines = [
        f"### QuantLoRALinear forward + backward, M={M}, r={R}, bf16",
        "",
        f"{device}, torch {torch.__version__}, {datetime.date.today().isoformat()}, commit {git_commit()}; "
        f"median of {args.reps} after {args.warmup} warm-up; memory = saved tensors (allocated) held for backward",
        "",
        "| out x in | layer | ms | vs bf16+LoRA | memory for backward MiB |",
        "|---|---|---|---|---|",
    ]
    for out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features, device="cuda") * in_features ** -0.5
        layer = QuantLoRALinear.from_linear(_as_linear(weight), r=R, alpha=ALPHA, compute_dtype=DTYPE)
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.01)  # non-zero, as after some training
        lora_a, lora_b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        candidates = {
            "bf16 nn.Linear + LoRA": BF16LoRALinear(weight, lora_a, lora_b, layer.scaling),
            "qlora QuantLoRALinear": layer,
            "bnb Linear4bit + PEFT LoRA": bnb_peft_layer(weight, lora_a, lora_b),
        }
        x = torch.randn(M, in_features, device="cuda", dtype=DTYPE, requires_grad=True)
        grad_out = torch.randn(M, out_features, device="cuda", dtype=DTYPE)
        baseline = None
        for name, candidate in candidates.items():
            if candidate is None:
                continue
            # autocast: PEFT's adapters are float32 and run in bf16 only under autocast, as in training.
            with torch.autocast("cuda", dtype=DTYPE):
                ms = time_ms(candidate, x, grad_out, args.warmup, args.reps)
                saved, allocated = held_for_backward(candidate, x)
            baseline = baseline or ms
            lines.append(f"| {out_features}x{in_features} | {name} | {ms:.3f} | {ms / baseline:.2f}x | "
                         f"{saved / 2**20:.1f} ({allocated / 2**20:.1f}) |")
        del candidates, layer
        torch.cuda.empty_cache()
    emit("\n".join(lines) + "\n", args.out)
    return 0


def _as_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=DTYPE)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear.requires_grad_(False)


if __name__ == "__main__":
    sys.exit(main())
