"""torch.compile keeps the qlora ops in one graph; the Triton kernels build for an H100 (sm_90)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qlora.codebook import dynamic_map, nf4_codebook
from qlora.kernels import dequantize as D
from qlora.kernels import matmul as MM
from qlora.kernels import quantize as Q


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def weight_args(N=24, K=128, double_quant=True):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, absmax = Q.quantize_nf4_blocks_reference(w, 64)
    nested = (None, None, None)
    if double_quant:
        codes, nested_absmax, offset = Q.quantize_absmax_reference(absmax)
        absmax, nested = codes, (nested_absmax, dynamic_map(), offset)
    return (packed, absmax, nf4_codebook(), N, K, 64, *nested)


def layer(x, args, bias):
    # What a QLoRA layer does around the base matmul, plus a dequantise and a quantise.
    y = torch.nn.functional.silu(MM.nf4_linear(x * 0.5, *args, bias=bias))
    w = D.dequantize_nf4(*args[:3], args[3] * args[4], args[5], x.dtype, *args[6:])
    packed, absmax = Q.quantize_nf4_blocks(w, 64)
    return y.sum() + w.float().sum() + absmax.sum()


def test_fullgraph_keeps_ops_in_one_graph():
    args = weight_args()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, bias = torch.randn(3, 128), torch.randn(24)
    got = torch.compile(layer, fullgraph=True, backend=capture)(x, args, bias)
    torch.testing.assert_close(got, layer(x, args, bias))
    assert len(graphs) == 1
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {"qlora.nf4_linear", "qlora.dequantize_nf4", "qlora.quantize_nf4_blocks"} <= targets


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_forward_backward_matches_eager(backend):
    # aot_eager traces forward and backward through the ops' fake and autograd registrations
    # quickly; inductor (C++ codegen on CPU, a few seconds) checks the real compiler path once.
    args = weight_args()
    x = torch.randn(2, 3, 128, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)

    def f(x, bias):
        return (torch.nn.functional.silu(MM.nf4_linear(x * 0.5, *args, bias=bias)) ** 2).sum()

    f(x, bias).backward()
    want = (x.grad.clone(), bias.grad.clone())
    x.grad = bias.grad = None
    torch.compile(f, fullgraph=True, backend=backend)(x, bias).backward()
    torch.testing.assert_close(x.grad, want[0])
    torch.testing.assert_close(bias.grad, want[1])


def test_opcheck():
    args = weight_args(double_quant=True)
    plain = weight_args(double_quant=False)
    x = torch.randn(3, 128, dtype=torch.float32, requires_grad=True)
    for a in (args, plain):
        torch.library.opcheck(torch.ops.qlora.nf4_linear, (x, *a, torch.randn(24)))
        torch.library.opcheck(torch.ops.qlora.nf4_linear_grad_input, (torch.randn(3, 24), *a))
        torch.library.opcheck(torch.ops.qlora.dequantize_nf4, (*a[:3], 24 * 128, 64, torch.bfloat16, *a[6:]))
    torch.library.opcheck(torch.ops.qlora.quantize_nf4_blocks, (torch.randn(1001), 64))
    torch.library.opcheck(torch.ops.qlora.quantize_absmax, (torch.rand(300), 256))


SM90_CHECK = textwrap.dedent('''
    import os, subprocess
    os.environ["TRITON_INTERPRET"] = "0"   # real compiler, no GPU needed to build
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from qlora.kernels import dequantize as D, quantize as Q, matmul as MM, gemv as G

    target = GPUTarget("cuda", 90, 32)
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")

    def build(fn, sig, consts, **opts):
        sig = dict(sig, **{k: "constexpr" for k in consts})
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=opts)

    def sass(kernel):
        path = "/tmp/qlora_sm90_%d.cubin" % os.getpid()
        open(path, "wb").write(kernel.asm["cubin"])
        return subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout

    W = dict(packed_ptr="*u8", absmax_ptr="*u8", nested_absmax_ptr="*fp32", nested_code_ptr="*fp32",
             offset_ptr="*fp32", qmap_ptr="*fp32")
    common = dict(DOUBLE_QUANT=True, NESTED_BLOCKSIZE=256, ON_GPU=True)
    deq = build(D._dequantize_kernel, dict(W, out_ptr="*bf16", byte_limit="i64", n_blocks="i64", n_tiles="i32"),
                dict(BLOCKSIZE=64, BLOCKS_PER_TILE=64, **common), num_warps=4)
    # The nested absmax must be decoded with two roundings: no fused multiply-add anywhere.
    assert "mul.rn.f32" in deq.asm["ptx"] and "FFMA" not in sass(deq), "contracted absmax decode"
    quant = build(Q._quantize_kernel, dict(x_ptr="*bf16", bin_table_ptr="*i64", packed_ptr="*u8",
                  absmax_ptr="*fp32", numel="i64", elem_limit="i64", n_blocks="i64", full_tiles="i32"),
                  dict(BLOCKSIZE=64, BLOCKS_PER_TILE=64, HAS_TAIL=True, ON_GPU=True), num_warps=4)
    # IEEE reciprocal, not rcp.approx: the thresholds compare exactly; NaN takes bin 0 by cvt.rzi's rule.
    assert "div.rn.f32" in quant.asm["ptx"] and "rcp.approx" not in quant.asm["ptx"]
    assert "cvt.rzi.s32.f32" in quant.asm["ptx"]
    assert "max.NaN.f32" in quant.asm["ptx"]  # a NaN input makes its block's absmax NaN (quantize_nf4's check)
    build(Q._quantize_absmax_kernel, dict(absmax_ptr="*fp32", offset_ptr="*fp32", midpoints_ptr="*fp32",
          codes_ptr="*u8", nested_absmax_ptr="*fp32", n="i32"), dict(NESTED_BLOCKSIZE=256), num_warps=4)
    for M in (16, 4096):  # the configs the dispatch launches
        cfg = MM._fused_config(M, 64)
        opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        cfg.pop("ctas_per_sm")
        fwd = build(MM._nf4_linear_kernel, dict(x_ptr="*bf16", **W, bias_ptr="*bf16", out_ptr="*bf16", M="i32",
                    N="i32", K="i32", row_bytes="i32", k_per_split="i32"),
                    dict(HAS_BIAS=True, SPLIT_K=1, BLOCKSIZE=64, GROUP_M=8, **common, **cfg), **opts)
        assert "wgmma" in fwd.asm["ptx"] or "mma.sync" in fwd.asm["ptx"]
        build(MM._nf4_linear_grad_input_kernel, dict(g_ptr="*bf16", **W, out_ptr="*fp32", M="i32", N="i32",
              K="i32", row_bytes="i32", n_per_split="i32"), dict(SPLIT_N=2, EVEN_N=False, BLOCKSIZE=64, GROUP_M=8, **common, **cfg),
              **opts)
    build(G._nf4_gemv_kernel, dict(x_ptr="*fp16", **W, bias_ptr="*fp16", out_ptr="*fp32", M="i32", N="i32",
          K="i32", row_bytes="i32", k_per_split="i32"), dict(M_PAD=4, BLOCK_N=8, BLOCKS_K=4, BLOCKSIZE=64, HAS_BIAS=False,
          SPLIT_K=2, **common), num_warps=4)
    print("sm_90 ok")
''')


def test_triton_kernels_build_for_sm90():
    # No GPU here, but Triton's compiler and ptxas run anyway: this catches what the interpreter
    # cannot (inline PTX, tl.dot layouts, register allocation) and checks the two rounding rules.
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton wheel without its bundled ptxas")
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.pop("QLORA_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", SM90_CHECK], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).parent.parent, timeout=600)
    assert result.returncode == 0 and "sm_90 ok" in result.stdout, result.stderr[-3000:]


def test_decode_step_compiles_to_one_graph():
    # One generation step of qlora's Llama (NF4 layers, KV cache): no host sync or data-dependent
    # host control may break it. With this growing cache each length recompiles (torch.cat changes
    # its shape); the static cache that replays as one graph is tests/test_generate_static.py's.
    from qlora.llama import KVCache, LlamaConfig, LlamaForCausalLM
    from qlora.model import prepare_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = prepare_model(LlamaForCausalLM(config), r=4, compute_dtype=torch.float32, verbose=False).eval()
    prompt, token = torch.randint(0, 96, (1, 5)), torch.tensor([[7]])
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(ids, cache):
        return model(ids, past_key_values=cache).logits

    with torch.no_grad():
        eager_cache, compiled_cache = KVCache(), KVCache()
        step(prompt, eager_cache)
        step(prompt, compiled_cache)
        want = step(token, eager_cache)
        got = torch.compile(step, fullgraph=True, backend=capture)(token, compiled_cache)
    torch.testing.assert_close(got, want)
    assert len(graphs) == 1 and len(compiled_cache) == 6
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert "qlora.nf4_linear" in targets
