"""The small trained model's pipeline (weights/make_model): the synthetic retrieval documents, the
tokenizer trainer, the trainer's torch model against the engine, and the shipped model against the
logits its trainer recorded.

The torch tests skip where torch is missing (CI, the engine's .venv); run them with the training
environment: .venv-train/bin/python -m pytest -q tests/test_trained_export.py
"""
import json
import os
import types

import numpy as np
import pytest

from kernels import fp8 as engine_fp8
from weights.make_model import corpus, export
from weights.random_checkpoint import quantize_fp8_blocks, random_tensor
from weights.tokenizer import SPECIAL_TOKENS, Tokenizer, build_byte_tokenizer

try:
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed here; run with "
                                 ".venv-train/bin/python -m pytest tests/test_trained_export.py")


# --- synthetic retrieval documents (numpy only) -------------------------------------------------------

DIGITS = list(range(10, 20))


def fake_data(seed=0):
    """A token stream of random ids that include the digit ids (so keys can collide with the filler
    and must be redrawn), and made-up sentence pieces."""
    rng = np.random.default_rng(seed)
    stream = corpus.TokenStream.from_arrays({"text": rng.integers(6, 40, 50_000).astype(np.uint16)})
    parts = {k: [list(map(int, rng.integers(40, 100, 3 + i))) for i, _ in enumerate(v)]
             for k, v in corpus.Pieces.TEXT.items()}
    names = [[100 + i, 200 + i] for i in range(30)]
    return stream, corpus.Pieces({"digits": DIGITS, "parts": parts, "names": names})


@pytest.mark.parametrize("seed", range(20))
def test_passkey_doc_hides_the_key_once_and_asks_for_it(seed):
    stream, pieces = fake_data()
    ids, answers = corpus.passkey_doc(np.random.default_rng(seed), stream, pieces, 300, {"text": 1.0})
    assert len(ids) == 300 and ids[0] == corpus.BOS and ids[-1] == corpus.EOS
    [(a, b)] = answers
    key = list(ids[a:b])
    assert len(key) == 5 and all(k in DIGITS for k in key) and key[0] != DIGITS[0]
    # the answer is the key: the needle says it once before the question, nowhere else
    n0, n1 = pieces.parts["needle"]
    assert corpus.contains(ids[:a], key) == 1
    assert corpus.contains(ids[:a], n0 + key + n1) == 1
    q0, q1 = pieces.parts["question"]
    assert list(ids[a - len(q0):a]) == q0 and list(ids[b:b + len(q1)]) == q1 and b + len(q1) == 299


def test_passkey_doc_depth_and_determinism():
    stream, pieces = fake_data()
    n0 = pieces.parts["needle"][0]
    first, _ = corpus.passkey_doc(np.random.default_rng(1), stream, pieces, 200, {"text": 1.0}, depth=0.0)
    assert list(first[1:1 + len(n0)]) == n0  # depth 0: right after BOS
    again, _ = corpus.passkey_doc(np.random.default_rng(1), stream, pieces, 200, {"text": 1.0}, depth=0.0)
    other, _ = corpus.passkey_doc(np.random.default_rng(2), stream, pieces, 200, {"text": 1.0}, depth=0.0)
    assert np.array_equal(first, again) and not np.array_equal(first, other)


@pytest.mark.parametrize("seed", range(10))
def test_kv_doc_answers_are_the_facts_values(seed):
    stream, pieces = fake_data()
    ids, answers = corpus.kv_doc(np.random.default_rng(seed), stream, pieces, 400, {"text": 1.0}, n_facts=6, n_asked=3)
    assert len(ids) == 400 and len(answers) == 3
    f0, f1, f2 = pieces.parts["fact"]
    a0, a1, a2, _ = pieces.parts["ask"]
    questions_start = min(a for a, _ in answers)
    for a, b in answers:
        value = list(ids[a:b])
        # the question names the fact; the fact with that name, once before the questions, has this value
        name = list(ids[a - len(a2) - 2:a - len(a2)])
        assert list(ids[a - len(a2):a]) == a2
        head = ids[:questions_start - len(a0 + name + a1 + name + a2)]
        assert corpus.contains(head, f0 + name + f1 + value + f2) == 1
        assert corpus.contains(head, value) == 1


@pytest.mark.parametrize("seed", range(10))
def test_copy_doc_repeats_its_spans(seed):
    stream, _ = fake_data()
    spans = {"text": 1, "shuffled": 1, "uniform": 1}
    ids, answers = corpus.copy_doc(np.random.default_rng(seed), stream, 512, {"text": 1.0}, span=(8, 24), spans=spans,
                                   vocab=300)
    assert len(ids) == 512 and ids[0] == corpus.BOS and answers
    for a, b in answers:
        span = list(ids[a - 1:b])  # the repeat; its first token is not predictable, so a - 1 starts it
        assert 8 <= len(span) <= 24
        assert corpus.contains(ids[:a - 1], span) >= 1  # said before
    again, _ = corpus.copy_doc(np.random.default_rng(seed), stream, 512, {"text": 1.0}, span=(8, 24), spans=spans,
                               vocab=300)
    assert np.array_equal(ids, again)


@pytest.mark.parametrize("seed", range(10))
def test_repeat_doc_says_each_span_several_times_in_a_row(seed):
    stream, _ = fake_data()
    ids, answers = corpus.repeat_doc(np.random.default_rng(seed), stream, 256, {"text": 1.0}, span=(4, 12),
                                     repeats=(2, 4), spans={"shuffled": 1, "uniform": 1}, vocab=300)
    assert len(ids) == 256 and ids[0] == corpus.BOS and answers
    for a, b in answers:
        m = b - a + 1
        assert 4 <= m <= 12 and np.array_equal(ids[a - 1:b], ids[a - 1 - m:b - m])  # the block said just before


def test_tokenizer_training_is_deterministic(tmp_path):
    from weights.make_model.tokenizer import train_tokenizer
    text = tmp_path / "text.txt"
    text.write_text("The pass key is 12345. Remember it.\n" * 50 + "def f(x):\n    return x + 1\n" * 50
                    + "Shall I compare thee to a summer's day?\n" * 50)
    a = train_tokenizer([str(text)], str(tmp_path / "a.json"), vocab=300)
    b = train_tokenizer([str(text)], str(tmp_path / "b.json"), vocab=300)
    assert open(a, "rb").read() == open(b, "rb").read()
    tok = Tokenizer(a)
    assert tok.vocab_size == 300 and [tok.token_id(s) for s in SPECIAL_TOKENS] == list(range(6))
    s = "Remember it: 40912 is the key. ünïcode"
    assert tok.decode(tok.encode(s)) == s
    assert [tok.decode([i]) for i in tok.encode("key is 409")][-3:] == ["4", "0", "9"]  # one token per digit
    assert tok.encode_chat("hi")[:2] == [0, 2] and tok.encode_chat("hi")[-2:] == [3, 5]


# --- the trainer's model against the engine (torch) ----------------------------------------------------

def tiny_config():
    from weights.make_model import train
    return dict(train.SMOKE_CONFIG, vocab_size=320, index_topk=32, max_position_embeddings=256)


@needs_torch
def test_fp8_roundings_match_the_engine():
    from weights.make_model import train
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 256)) * np.exp2(rng.integers(-14, 12, (64, 1)))).astype(np.float32)
    got = train.e4m3_round(torch.from_numpy(x)).numpy()
    assert np.array_equal(got, engine_fp8.e4m3_round(x))
    assert np.array_equal(train.fp8_roundtrip(torch.from_numpy(x), 128).numpy(), engine_fp8.fp8_roundtrip(x, 128))
    w = rng.standard_normal((200, 300)).astype(np.float32)  # ragged 128-blocks on both sides
    bits, scale_inv = quantize_fp8_blocks(w)
    want = engine_fp8.dequant_weight_reference(bits, scale_inv)
    assert np.array_equal(train.fp8_weight_roundtrip(torch.from_numpy(w)).numpy(), want)


def describe(results):
    return "engine vs trainer: " + "; ".join(
        f"{r['input']} {r['mode']}: max-rel {r['err']:.2e} (tolerance {r['tol']:.0e})"
        + (f", IoU {r['iou']:.4f} (at least {r['min_iou']})" if "iou" in r else "") for r in results)


def random_export(folder, seed=0):
    """The trainer's model with random weights of O(1) activations (as the random checkpoint's), so
    indexer scores are far apart and a wrong selection would show; exported with its reference logits."""
    from weights.make_model import train
    cfg_dict = tiny_config()
    model = train.build_model(train.config_of(cfg_dict), seed)
    weights = {name: random_tensor(name, tuple(t.shape), seed) for name, t in model.state_dict().items()}
    tok = build_byte_tokenizer(os.path.join(folder, "byte_tokenizer.json"))
    export.write_folder(weights, cfg_dict, tok, folder)
    export.write_reference(folder)
    return folder


@needs_torch
def test_engine_reproduces_the_trainer_in_every_mode(tmp_path):
    folder = random_export(str(tmp_path))
    results = export.check_reference(folder)
    assert len(results) == len(export.MODES) * 3
    assert not export.failures(results), describe(export.failures(results))
    # with these weights no near-tie falls differently: everything agrees to float32 rounding
    assert max(r["err"] for r in results) < 1e-5, describe(results)
    assert min(r["iou"] for r in results if "iou" in r) == 1.0
    # DSA really selects on these inputs (longer than index_topk), and fp8 changes the numbers
    ref = np.load(os.path.join(folder, "reference_logits.npz"))
    for name in ("passkey", "random"):
        dense, dsa = ref[f"logits/{name}/dense-float"], ref[f"logits/{name}/dsa-float"]
        assert np.abs(dense - dsa).max() > 1e-3 * np.abs(dense).max()
        assert np.abs(dsa - ref[f"logits/{name}/dsa-fp8"]).max() > 0


@needs_torch
def test_export_has_the_released_layout(tmp_path):
    from weights.checkpoint import Checkpoint
    from weights.random_checkpoint import DTYPE_OF_KIND, tensor_shapes
    folder = random_export(str(tmp_path))
    ckpt = Checkpoint(folder)
    assert ckpt.config["model_type"] == "deepseek_v32"
    assert ckpt.config["quantization_config"]["weight_block_size"] == [128, 128]
    shapes = tensor_shapes(ckpt.config)
    assert set(ckpt.names()) == set(shapes)
    for name, (shape, kind) in shapes.items():
        dtype, got = ckpt.info(name)
        assert (dtype, tuple(got)) == (DTYPE_OF_KIND[kind], tuple(shape)), name


def tiny_args(run, **kw):
    return types.SimpleNamespace(**dict(dict(run=run, data=None, device="cpu", seed=0, time_budget=0, reserve=0,
                                             max_steps=None, eval_every=1000, log_every=1000, save_every=0,
                                             copy_to=None), **kw))


@needs_torch
def test_training_resumes_exactly_from_full_checkpoint(tmp_path):
    from weights.make_model import train
    cfg = tiny_config()
    recipe = [train.Stage("a", steps=2, seq_len=128, batch=2, micro=1, lr=1e-3, kl_rows=8, mix={"text": 0.5, "passkey": 0.5},
                          kv_facts=2),
              train.Stage("b", steps=2, seq_len=128, batch=2, micro=2, lr=1e-3, kl_rows=8, sparse=True, fp8=True,
                          mix={"copy": 0.5, "kv": 0.5}, copy_gap=(0, 8), kv_facts=2)]
    torch.set_num_threads(1)
    straight, _ = train.train(tiny_args(str(tmp_path / "straight")), recipe, cfg)
    os.makedirs(tmp_path / "split")
    train.train(tiny_args(str(tmp_path / "split"), max_steps=3), recipe, cfg)
    resumed, state = train.train(tiny_args(str(tmp_path / "split")), recipe, cfg)
    assert state["step"] == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # the compact form (carried between device calls) loads and holds the weights to bf16
    model = train.build_model(train.config_of(cfg), 1)
    opt = train.make_optimizer(model, 1e-3)
    os.remove(tmp_path / "split" / "full.pt")
    state, cold = train.load_checkpoint(str(tmp_path / "split"), model, opt, torch.device("cpu"))
    assert cold and state["step"] == 4
    w = dict(model.named_parameters())["model.layers.0.self_attn.q_a_proj.weight"]
    want = dict(resumed.named_parameters())["model.layers.0.self_attn.q_a_proj.weight"]
    assert torch.allclose(w, want, rtol=2 ** -8, atol=0)
    v = opt.state[w]["exp_avg_sq"]
    assert v.shape == w.shape and (v >= 0).all()


def test_log8_codes_keep_adam_second_moment_within_ten_percent():
    if torch is None:
        pytest.skip("torch is not installed here")
    from weights.make_model import train
    v = torch.exp2(torch.empty(10_000).uniform_(-40, 0, generator=torch.Generator().manual_seed(0)))
    v[:10] = 0
    code, lo, hi = train.encode_log8(v)
    back = train.decode_log8(code, lo, hi)
    assert (back[:10] == 0).all()
    assert ((back[10:] / v[10:]).log2().abs() <= (hi - lo) / 254 / 2 + 1e-6).all()


# --- the shipped model (no torch) --------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(os.path.join(export.DEFAULT_OUT, "reference_logits.npz")),
                    reason=f"{os.path.relpath(export.DEFAULT_OUT)} is not exported yet (weights/make_model/README.md)")
def test_shipped_model_reproduces_its_trainer():
    folder = export.DEFAULT_OUT
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert size < 40e6, f"{folder} holds {size / 1e6:.1f} MB, over 40 MB"
    meta = json.loads(str(np.load(os.path.join(folder, "reference_logits.npz"))["meta"]))
    assert set(meta["modes"]) == {"dense-float", "dsa-float", "dense-fp8", "dsa-fp8"}
    results = export.check_reference(folder)
    assert not export.failures(results), describe(export.failures(results))
