"""make eval (bench/eval.py) on the CPU: the --quick path end to end on a random-weights stand-in of the
embedded model (byte tokenizer, held-out ids from this repository's own files, so it runs on a clean
checkout), then the properties its numbers must have whatever the weights."""
import json
import math
import os

import numpy as np
import pytest

import model as M
from bench import eval as ev
from kernels.topk import topk
from weights.make_model import corpus


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("eval") / "ckpt")
    ev.write_stand_in(folder)
    cfg, model, ckpt = M.load(folder, "cpu", progress=False)
    return folder, cfg, model


@pytest.fixture(scope="module")
def quick(stand_in, tmp_path_factory):
    folder = stand_in[0]
    out = tmp_path_factory.mktemp("eval-out")
    assert ev.main(["--ckpt", folder, "--device", "cpu", "--quick", "--out", str(out)]) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def budget_of(cfg):
    sel = M.Selector(cfg, "hisa")
    return sel.B * sel.m


# --- the --quick run ----------------------------------------------------------------------------------

def test_quick_writes_every_section(stand_in, quick):
    _, cfg, _ = stand_in
    out, r = quick
    assert r["card"] == "cpu" and r["quick"] and r["tokens"] > 0 and r["seconds"] > 0
    with open(out / "results.md") as f:
        md = f.read()
    for title in ("## 1. Selection overlap", "## 2. Needle in a haystack", "## 3. Perplexity", "## 4. HISA's sensitivity"):
        assert title in md, f"results.md lacks {title!r}"
    try:
        import matplotlib  # noqa: F401
        assert (out / "niah.png").exists() and (out / "overlap.png").exists()
    except ImportError:
        assert not (out / "niah.png").exists()

    # quick grid: HISA's budget m*B and twice it
    budget = budget_of(cfg)
    nh = r["niah"]
    assert nh["lengths"] == [budget, 2 * budget] and len(nh["depths"]) == 3
    for mode in M.INDEXERS:
        acc, dig = np.asarray(nh["accuracy"][mode]), np.asarray(nh["digit_accuracy"][mode])
        assert acc.shape == dig.shape == (len(nh["lengths"]), len(nh["depths"])), mode
        assert ((0 <= acc) & (acc <= dig) & (dig <= 1)).all(), mode  # a key read back is all its digits right
        ppl = r["perplexity"]["ppl"][mode]
        assert len(ppl) == len(r["perplexity"]["lengths"]) and all(1 < p < 10 * cfg.vocab_size for p in ppl), (mode, ppl)

    K, L = cfg.index_topk, cfg.num_hidden_layers
    for name, o in r["overlap"].items():
        assert len(o["layer_mean"]) == len(o["layer_min"]) == L and all(n > 0 for n in o["rows"]), name
        for row in o["layer_mean"] + o["layer_min"] + [o["mean"], o["min"]]:
            assert len(row) == len(o["lengths"]) and all(0 <= x <= 1 for x in row), (name, row)
        assert all(lo <= mean for lo, mean in zip(o["min"], o["mean"]))

    sens = r["sensitivity"]
    assert sens["budget"] == budget
    assert [c["B"] for c in sens["configs"]] == [max(1, K // 32), max(1, K // 16), max(1, K // 8)]
    for c in sens["configs"]:
        assert c["B"] * c["m"] == budget and len(c["niah"]) == len(nh["depths"])
        assert len(c["ppl"]) == len([n for n in r["perplexity"]["lengths"] if n > budget])


def test_hisa_is_dsa_up_to_its_budget_and_prunes_beyond(stand_in, quick):
    """SPEC §6: while a query sees at most m*B keys HISA keeps every block, so its set is DSA's: IoU 1
    in every bin up to the budget, and identical perplexity and pass-key answers at those lengths.
    Beyond, HISA prunes (IoU < 1 on random weights) and block-sparse differs from DSA everywhere."""
    _, cfg, _ = stand_in
    _, r = quick
    budget = budget_of(cfg)
    for name, o in r["overlap"].items():
        for n, mean, low in zip(o["lengths"], o["mean"], o["min"]):
            if name != "block" and n <= budget:
                assert mean == low == 1.0, (name, n, mean, low)
    default = f"hisa B={r['settings']['hisa']['B']} m={r['settings']['hisa']['m']}"
    assert r["overlap"][default]["mean"][-1] < 1  # the last bin lies beyond the budget
    assert max(r["overlap"]["block"]["mean"]) < 1
    pp, nh = r["perplexity"], r["niah"]
    for i, n in enumerate(pp["lengths"]):
        if n <= budget:
            assert pp["ppl"]["hisa"][i] == pp["ppl"]["dsa"][i], n
    for i, n in enumerate(nh["lengths"]):
        if n <= budget:
            assert nh["digit_accuracy"]["hisa"][i] == nh["digit_accuracy"]["dsa"][i], n


def test_dense_perplexity_is_exp_mean_nll_computed_apart(stand_in, quick):
    """results.json's dense perplexity at the first length, recomputed from the same held-out windows with
    one forward per window and a float64 log-softmax."""
    folder, cfg, model = stand_in
    _, r = quick
    pp, s = r["perplexity"], r["settings"]
    streams = corpus.TokenStream.from_arrays(ev.load_heldout(folder))
    total, count = 0.0, 0
    for wins in ev.heldout_windows(streams, pp["lengths"][0], s["windows"], s["seed"]).values():
        for ids in wins:
            logits = M.xp_to_numpy(model.forward(ids[:-1], model.new_cache(len(ids)), M.Selector(cfg, "dense"),
                                                 all_logits=True)).astype(np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            total -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
            count += len(ids) - 1
    want = math.exp(total / count)
    assert abs(pp["ppl"]["dense"][0] - want) <= 1e-5 * want, (pp["ppl"]["dense"][0], want)


# --- the pieces ---------------------------------------------------------------------------------------

def test_overlap_is_set_iou():
    rng = np.random.default_rng(0)
    S, K = 200, 16
    ends = np.arange(S - 40, S, dtype=np.int32)
    scores = rng.standard_normal((40, S)).astype(np.float32)
    d = topk(scores, K, lengths=ends)
    assert (ev.overlap(d, d, S) == 1).all()
    assert (ev.overlap(d[:, ::-1].copy(), d, S) == 1).all()  # sets, not orders
    a = topk(rng.standard_normal((40, S)).astype(np.float32), K, lengths=ends)
    a[:, :3] = -1                                             # padding is no position
    got = ev.overlap(a, d, S)
    for t in range(40):
        x, y = set(a[t][a[t] >= 0].tolist()), set(d[t].tolist())
        assert got[t] == pytest.approx(len(x & y) / len(x | y)), t


def test_probe_attends_as_dsa_and_a_budget_past_the_context_gives_iou_1(stand_in):
    _, cfg, model = stand_in
    ids = np.asarray([0] + list(np.random.default_rng(3).integers(6, 262, 299)), np.int32)
    want = model.prefill(ids, model.new_cache(len(ids)), M.Selector(cfg, "dsa"), chunk=128, all_logits=True)
    K = cfg.index_topk
    probe = ev.Probe(cfg, {"wide": (4, 128), "narrow": (2, 8)}, 2, [100, 200, 300])  # 4*128 > 300 keys
    cache = model.new_cache(len(ids))
    probe.start(cache)
    got = model.prefill(ids, cache, probe, chunk=128, all_logits=True)
    probe.flush()
    assert np.array_equal(got, want)
    o = probe.results()
    assert o["wide"]["mean"] == o["wide"]["min"] == [1.0, 1.0, 1.0]
    assert max(o["narrow"]["mean"]) <= 0.5  # 2*8 = 16 candidates against DSA's K = 32: IoU <= 16/32
    assert o["wide"]["rows"] == [100 - 50, 100, 100] and o["block"]["m"] == K // 2


@pytest.mark.parametrize("chunk", [7, 64, 1000])
@pytest.mark.parametrize("mode", ["dense", "dsa"])
def test_passkey_scoring_is_teacher_forced_argmax(stand_in, chunk, mode):
    """The predictions at the key's positions equal the argmax of one forward over the whole document,
    whatever the chunks (7 puts the key across a chunk boundary)."""
    folder, cfg, model = stand_in
    from weights.tokenizer import Tokenizer
    streams = corpus.TokenStream.from_arrays(ev.load_heldout(folder))
    pieces = corpus.Pieces.build(Tokenizer(os.path.join(folder, "tokenizer.json")))
    ids, [(a, b)] = corpus.passkey_doc(np.random.default_rng(5), streams, pieces, 200, corpus.FILLER, depth=0.3)
    full = model.forward(ids[:b - 1], model.new_cache(b - 1), M.Selector(cfg, mode), all_logits=True)
    got = ev.passkey_predictions(model, ids, (a, b), M.Selector(cfg, mode), chunk)
    assert got.shape == (b - a,) and np.array_equal(got, M.xp_to_numpy(full[a - 1:b - 1]).argmax(-1))


def test_nll_does_not_depend_on_the_chunk(stand_in):
    _, cfg, model = stand_in
    ids = np.asarray([0] + list(np.random.default_rng(4).integers(6, 262, 150)), np.int32)
    one, n = ev.nll(model, ids, M.Selector(cfg, "dsa"), 1000)
    many, n2 = ev.nll(model, ids, M.Selector(cfg, "dsa"), 33)
    assert n == n2 == 150 and abs(one - many) <= 1e-5 * one


def test_missing_heldout_is_an_error(stand_in, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in os.listdir(stand_in[0]):
        if name != "heldout.npz":
            os.symlink(os.path.join(stand_in[0], name), folder / name)
    assert ev.main(["--ckpt", str(folder), "--device", "cpu", "--quick", "--out", str(tmp_path / "o")]) == 2
    assert "heldout.npz: missing" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--lengths", "1k"], "--lengths '1k': comma-separated whole numbers"),
    (["--lengths", "20"], "length 20 is too short for a pass-key document"),
    (["--depths", "0.5,1.5"], "--depths [0.5, 1.5]: each in [0, 1]"),
    (["--ppl-lengths", "1"], "lengths [1]: at least 2 tokens"),
    (["--docs", "0"], "--docs 0: at least 1"),
    (["--windows", "-1"], "--windows -1: at least 1"),
    (["--chunk", "0"], "--chunk 0: at least 1"),
    (["--seed", "-2"], "--seed -2: at least 0"),
    (["--sens-length", "0"], "--sens-length 0: at least 2"),
])
def test_bad_grid_is_an_error(stand_in, tmp_path, capsys, args, needle):
    """A grid value out of range is refused with one line before any measurement (each once ran for minutes
    or ended in a traceback from inside numpy or the corpus)."""
    out = tmp_path / "o"
    assert ev.main(["--ckpt", stand_in[0], "--device", "cpu", "--quick", "--out", str(out), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_replot_without_results_is_an_error(tmp_path, capsys):
    assert ev.main(["--replot", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
