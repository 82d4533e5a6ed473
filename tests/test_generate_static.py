"""The static KV cache and the compiled decode step: the same tokens as the growing cache and the
no-cache reference, one graph for every token (no recompile, no host sync inside), one-line errors."""
import pytest
import torch
from torch._dynamo.utils import counters

from qlora.decoding import Decoder, TokenReader, generate_ids, next_token, sampling_noise, select_tokens
from qlora.errors import UserError
from qlora.generate import generate
from qlora.kv_cache import StaticKVCache
from qlora.llama import LlamaConfig, LlamaForCausalLM, build_model
from qlora.model import prepare_model
from hf_families import one_thread  # noqa: F401 (tiny models: one torch thread, no spin-waits on a busy runner)
from test_generate import greedy_reference

CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def nf4_llama(dtype=torch.float32, seed=0):
    """qlora's Llama with NF4 layers and LoRA adapters (B random, so they count), in eval mode."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    for p in model.parameters():
        p.data.normal_(0, 0.3)  # norms and embedding too: not the all-ones init
    model = prepare_model(model.to(dtype), r=4, compute_dtype=dtype, verbose=False).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return model


class GraphCapture:
    """A torch.compile backend that keeps the FX graphs Dynamo hands it and runs them eagerly."""

    def __init__(self):
        self.graphs, self.inputs = [], []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        self.inputs.append(example_inputs)
        return gm.forward

    def cache_writes(self) -> int:
        """What CUDA graphs (cudagraph trees) need to replay one graph without copies or skips: every
        tensor input but the token has a static address (weights, NF4 buffers, the cache), and every
        in-place write lands on one of those. Returns the number of in-place writes."""
        (graph,), (values,) = self.graphs, self.inputs
        inputs = {node.name: value for node, value in zip(graph.graph.nodes, values) if node.op == "placeholder"}
        static = {name for name, value in inputs.items() if hasattr(value, "_dynamo_static_input_type")}
        moving = [value for name, value in inputs.items() if isinstance(value, torch.Tensor) and name not in static]
        assert len(moving) == 1 and moving[0].shape == (1, 1) and moving[0].dtype == torch.long, moving
        written = [node for node in graph.graph.nodes
                   if node.op == "call_method" and node.target in ("index_copy_", "add_", "copy_")]
        assert all(node.args[0].op == "placeholder" and node.args[0].name in static for node in written)
        return len(written)

    def targets(self) -> set[str]:
        return {str(node.target) for gm in self.graphs for node in gm.graph.nodes
                if node.op in ("call_function", "call_method")}

    def host_reads(self) -> set[str]:
        """Ops that bring a device value to the host (a sync on CUDA, and no CUDA graph around it)."""
        return {t for t in self.targets() if t in ("item", "tolist", "__int__", "__bool__")
                or "local_scalar_dense" in t or "synchronize" in t}


def test_static_cache_in_chunks_gives_the_full_forward_logits_and_masks_unwritten_slots():
    model = build_model(LlamaConfig(**CONFIG), device="cpu", dtype=torch.float32).eval()
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    ids = torch.randint(0, 96, (2, 11))
    cache = StaticKVCache.for_model(model, max_length=16, batch_size=2)
    for buffer in (*cache.keys, *cache.values):
        buffer.fill_(1e3)  # slots not yet written must not be attended to: large values would show
    with torch.no_grad():
        full = model(ids).logits
        parts = [model(ids[:, a:b], past_key_values=cache).logits for a, b in ((0, 5), (5, 9), (9, 10), (10, 11))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert len(cache) == 11 and int(cache.length) == 11
    assert not (cache.keys[0][:, :, :11] == 1e3).any() and (cache.keys[0][:, :, 11:] == 1e3).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_greedy_equals_the_growing_cache_and_the_no_cache_reference(dtype):
    model = nf4_llama(dtype)
    prompt = torch.randint(0, 96, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    dynamic = list(generate_ids(model, prompt, 10))
    static = list(generate_ids(model, prompt, 10, cache_implementation="static"))
    assert static == dynamic == greedy_reference(model, prompt, 10)
    assert len(set(static)) > 2  # not one token repeated


def test_full_static_cache_is_one_clear_error():
    model = build_model(LlamaConfig(**CONFIG), device="cpu", dtype=torch.float32).eval()
    cache = StaticKVCache.for_model(model, max_length=8)
    with torch.no_grad():
        model(torch.ones(1, 6, dtype=torch.long), past_key_values=cache)
        with pytest.raises(ValueError) as error:
            model(torch.ones(1, 3, dtype=torch.long), past_key_values=cache)
    message = str(error.value)
    assert "\n" not in message and "[1, 2, 8, 16]" in message and "6 positions written, 3 more" in message
    assert len(cache) == 6 and int(cache.length) == 6  # nothing written by the refused call
    with pytest.raises(ValueError, match=r"max_length 65 must be in 1\.\.64"):
        StaticKVCache.for_model(model, max_length=65)
    with pytest.raises(ValueError, match=r"cache_implementation must be one of"):
        Decoder(model, 8, cache_implementation="paged")


def test_compiled_decode_step_is_one_graph_with_no_recompile_and_no_host_sync():
    model = nf4_llama()
    prompt = torch.randint(0, 96, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    eager = list(generate_ids(model, prompt, 10, cache_implementation="static"))
    capture = GraphCapture()
    torch._dynamo.config.error_on_recompile = True
    try:
        compiled = list(generate_ids(model, prompt, 10, compile={"backend": capture}))
        # A new generation, a prompt of another length: the cache length is bucketed, so the step is reused.
        again = list(generate_ids(model, prompt[:4], 6, compile={"backend": capture}))
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert compiled == eager
    assert again == list(generate_ids(model, prompt[:4], 6))
    assert len(capture.graphs) == 1 and counters["stats"]["unique_graphs"] == 1  # fullgraph: one graph, no breaks
    targets = capture.targets()
    assert "qlora.nf4_linear" in targets
    # Grouped-query attention (4 query heads on 2 kv heads) reads the cache as it is: no per-token copy
    # of the whole preallocated K and V for each query head.
    assert CONFIG["num_attention_heads"] > CONFIG["num_key_value_heads"]
    assert not {t for t in targets if "repeat_interleave" in t or "expand" in t}, targets
    assert not capture.host_reads()
    assert capture.cache_writes() == 2 * CONFIG["num_hidden_layers"] + 1  # keys, values, the length


@pytest.mark.parametrize("new, total", [(1, 37), (5, 37), (37, 37)])
def test_grouped_query_attention_equals_expanded_kv(new, total):
    # Query head h reads kv head h // 4, as transformers' repeat_kv gives it; float64 against the
    # expanded reference, for a decode step, a chunk after a cache, a prefill, and the static cache's mask.
    from qlora.kv_cache import attention, causal_attention

    g = torch.Generator().manual_seed(new)
    q = torch.randn(2, 8, new, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, total, 16, generator=g, dtype=torch.float64) for _ in range(2))
    allowed = torch.ones(new, total, dtype=torch.bool).tril(total - new)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                            attn_mask=allowed)
    torch.testing.assert_close(causal_attention(q, k, v), want, rtol=1e-12, atol=1e-12)
    allowed[:, -3:] = False  # unwritten slots of a static cache
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                            attn_mask=allowed)
    torch.testing.assert_close(attention(q, k, v, allowed), want, rtol=1e-12, atol=1e-12)


def test_a_host_read_inside_a_step_would_be_seen():
    # The check the test above leans on: torch 2.13 traces int(tensor) into the graph (as .item()) even
    # with fullgraph=True, so the graph itself is searched.
    def host_read(logits):
        return torch.tensor(int(logits.argmax()))

    capture = GraphCapture()
    torch.compile(host_read, fullgraph=True, backend=capture)(torch.randn(5))
    assert capture.host_reads() == {"item"}


def test_compiled_sampling_reproduces_the_eager_samples_with_the_seed():
    model = nf4_llama()
    prompt = [3, 1, 4, 1, 5]

    def sample(**options):
        return list(generate_ids(model, prompt, 8, temperature=0.9, top_p=0.95,
                                 generator=torch.Generator().manual_seed(11), **options))

    eager = sample()
    assert eager == sample(cache_implementation="static") == sample(compile={"backend": "eager"})
    assert eager != list(generate_ids(model, prompt, 8))  # it did sample


@pytest.mark.parametrize("ahead", [True, False], ids=["cuda", "cpu"])
def test_read_order_overlaps_on_cuda_and_times_truthfully_elsewhere(monkeypatch, ahead):
    # On CUDA step t+1 is queued before token t is read (a stop token costs one extra step); where a step
    # runs when called, each token is read before the next step (else the prefill timing takes a step).
    model = nf4_llama()
    events = []
    real_step = Decoder.step
    monkeypatch.setattr(Decoder, "step", lambda self, token: events.append("step") or real_step(self, token))
    monkeypatch.setattr(TokenReader, "__init__", lambda self, device: setattr(self, "cuda", ahead))
    monkeypatch.setattr(TokenReader, "queue", lambda self, token: token)
    monkeypatch.setattr(TokenReader, "read", lambda self, pending: events.append("read") or int(pending.view(-1)[0]))
    tokens = list(generate_ids(model, [1, 2, 3], 4))
    assert events == (["step", "read"] * 3 + ["read"] if ahead else ["read", "step"] * 3 + ["read"])
    events.clear()
    assert list(generate_ids(model, [1, 2, 3], 4, stop_ids=(tokens[1],)))[-1] == tokens[1]
    assert events == (["step", "read", "step", "read"] if ahead else ["read", "step", "read"])


def test_compiled_sampling_with_a_quantised_lm_head_and_a_batch_of_two():
    # The vocabulary comes from the logits (a quantised lm_head's weight is packed bytes), and the static
    # cache takes the prompt's batch.
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model = prepare_model(model, r=4, compute_dtype=torch.float32, skip=(), verbose=False).eval()
    assert model.lm_head.weight.shape[0] != CONFIG["vocab_size"]
    decoder = Decoder(model, 12, temperature=0.9, generator=torch.Generator().manual_seed(3),
                      compile={"backend": "eager"})
    token = decoder.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    for _ in range(3):
        token = decoder.step(token)
        assert token.shape == (2, 1) and int(token.max()) < CONFIG["vocab_size"]


def multinomial_next_token(logits, temperature, top_p, generator):
    """The sampler as it was before tokens stayed on the device (torch.multinomial over the nucleus)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    sorted_probs = sorted_probs * ((sorted_probs.cumsum(-1) - sorted_probs) < top_p)
    return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])


def test_device_sampler_draws_what_multinomial_drew_from_the_same_seed():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 2
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9), (1.5, 0.5)):
        for seed in range(20):
            old, new = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            assert [next_token(row, temperature, top_p, new) for row in logits] == \
                   [multinomial_next_token(row, temperature, top_p, old) for row in logits]


def test_device_sampler_follows_the_nucleus_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    temperature, top_p, draws = 0.8, 0.8, 20000
    probs = torch.softmax(logits / temperature, -1).double()
    nucleus = int(((probs.cumsum(-1) - probs) < top_p).sum())  # logits are sorted: the first `nucleus` tokens
    expected = torch.zeros_like(probs)
    expected[:nucleus] = probs[:nucleus] / probs[:nucleus].sum()
    noise = sampling_noise(torch.Size((draws, 6)), torch.device("cpu"), torch.Generator().manual_seed(3))
    tokens = select_tokens(logits.expand(draws, 6), noise, torch.tensor(temperature), torch.tensor(top_p))
    frequency = torch.bincount(tokens.view(-1), minlength=6).double() / draws
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert 2 < nucleus < 6 and (frequency[nucleus:] == 0).all()
    assert ((frequency - expected).abs() <= 4 * sigma + 1e-12).all(), (frequency, expected)


def test_generate_with_a_seed_reproduces_its_samples():
    from qlora.tokenizer import ByteTokenizer

    config = dict(CONFIG, vocab_size=259)
    torch.manual_seed(0)
    model = build_model(LlamaConfig(**config), device="cpu", dtype=torch.float32).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    runs = [generate("ab", model=model, tokenizer=ByteTokenizer(), max_new_tokens=8, temperature=1.0, seed=seed,
                     cache_implementation=cache).token_ids for seed, cache in ((5, "dynamic"), (5, "static"), (6, "static"))]
    assert runs[0] == runs[1] != runs[2]


def test_transformers_model_compiles_with_its_static_cache_and_sliding_windows_are_refused():
    pytest.importorskip("transformers")
    from hf_families import tiny_model  # noqa: F811

    from qlora.tokenizer import ByteTokenizer

    model = prepare_model(tiny_model("qwen2"), r=4, compute_dtype=torch.float32, verbose=False).eval()
    prompt = [5, 9, 2, 7, 1, 8]
    capture = GraphCapture()
    torch._dynamo.config.error_on_recompile = True
    try:
        compiled = list(generate_ids(model, prompt, 8, compile={"backend": capture}))
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert compiled == list(generate_ids(model, prompt, 8)) == greedy_reference(model, prompt, 8)
    assert len(capture.graphs) == 1 and "qlora.nf4_linear" in capture.targets()
    assert capture.cache_writes() >= 2 * 2 and not capture.host_reads()  # keys and values of both layers

    gemma2 = tiny_model("gemma2")
    with pytest.raises(UserError) as error:
        generate("ab", model=gemma2, tokenizer=ByteTokenizer(), max_new_tokens=4, compile=True)
    assert "\n" not in str(error.value) and "'gemma2' has sliding-window layers" in str(error.value)


def test_cli_compile_and_static_cache_flags_give_the_default_text(capsys, monkeypatch):
    import sys

    from qlora import decoding
    from qlora.cli import main
    from qlora.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = build_model(LlamaConfig(**dict(CONFIG, vocab_size=259)), device="cpu", dtype=torch.float32).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    monkeypatch.setattr(sys.modules["qlora.generate"], "load", lambda *args: (model, ByteTokenizer(), None))
    # The eager backend keeps the test quick; inductor's reduce-overhead is what --compile asks for.
    assert decoding.compile_options(True) == {"mode": "reduce-overhead", "fullgraph": True}
    compiles, caches, real_new_cache = [], [], decoding.new_cache
    monkeypatch.setattr(decoding, "compile_options",
                        lambda compile: compiles.append(compile) or {"backend": "eager", "fullgraph": True})
    monkeypatch.setattr(decoding, "new_cache", lambda *args: caches.append(real_new_cache(*args)) or caches[-1])
    outputs = []
    for flags in ([], ["--compile"], ["--cache-implementation", "static"]):
        assert main(["generate", "--prompt", "ab", "--max-new-tokens", "6", *flags]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) > len("ab\n")
    assert compiles == [True] and [type(c).__name__ for c in caches] == ["KVCache", "StaticKVCache", "StaticKVCache"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3", "gemma", "gemma2", "gpt2"])
def test_transformers_families_give_the_same_tokens_with_their_static_cache(family, dtype):
    pytest.importorskip("transformers")
    from hf_families import tiny_model  # noqa: F811

    model = prepare_model(tiny_model(family, dtype), r=4, compute_dtype=dtype, verbose=False).eval()
    prompt = [5, 9, 2, 7, 1, 8]
    static = list(generate_ids(model, prompt, 8, cache_implementation="static"))
    assert static == list(generate_ids(model, prompt, 8)) == greedy_reference(model, prompt, 8)


def test_compiled_generations_reuse_one_cache_and_never_share_it():
    # A kept cache (same addresses) lets CUDA graphs replay for the next generate(); two generations
    # running at once must not write into the same one.
    from qlora import decoding

    model = nf4_llama()
    prompt = [3, 1, 4, 1, 5]
    want = list(generate_ids(model, prompt, 6))
    options = dict(compile={"backend": "eager"})
    assert list(generate_ids(model, prompt, 6, **options)) == want
    (_, first) = decoding._kept_caches[model]
    assert list(generate_ids(model, prompt[:3], 6, **options)) == list(generate_ids(model, prompt[:3], 6))
    assert decoding._kept_caches[model][1] is first and not first._qlora_in_use  # same bucket: reused, released
    a, b = generate_ids(model, prompt, 6, **options), generate_ids(model, prompt, 6, **options)
    together = [(next(a), next(b)) for _ in range(6)]  # interleaved: each needs its own cache
    assert [x for x, _ in together] == want and [y for _, y in together] == want
    assert not first._qlora_in_use  # released with the last token
    early = generate_ids(model, prompt, 6, **options)
    next(early)
    assert first._qlora_in_use
    early.close()  # stopping early releases it
    assert not first._qlora_in_use
