"""Write the trained model in the released DeepSeek-V3.2 layout (SPEC section 2), with the trainer's
logits for a few fixed inputs, which the engine must reproduce.

    python -m weights.make_model.export [--run weights/make_model/runs/main] [--out weights/dsv32-small]

The folder holds config.json (model_type deepseek_v32, quantization_config), model.safetensors
(exactly the tensors of weights.random_checkpoint.tensor_shapes: linear weights F8_E4M3 with F32
128x128 weight_scale_inv, norms, gate, indexer weights_proj and k_norm, embeddings and lm_head BF16,
the experts' score-correction bias F32), tokenizer.json and reference_logits.npz.

reference_logits.npz: the trainer's torch model (train.py), run in float64 on the CPU with the
weights read back from model.safetensors (so dequantised exactly as the engine does), in four modes:
{dense, dsa} attention x {float, fp8} numerics (fp8: c_kv and the indexer's q, k through e4m3 as in
the engine's default precision). Ties in top-k go to the lower position, as in the engine. For each
input it stores the logits of the last LAST positions (and, in DSA modes, each layer's selected
positions for them); `meta` (JSON) gives the modes, inputs and tolerances (see TOLERANCE), checked by
check_reference (tests/test_trained_export.py). Torch is imported to make the file, not to check it.
"""
import argparse
import json
import os
import shutil
import sys

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import model as engine  # noqa: E402
from kernels.fp8 import dequant_weight_reference  # noqa: E402
from weights.checkpoint import Checkpoint  # noqa: E402
from weights.random_checkpoint import V32_FIELDS, quantize_fp8_blocks, tensor_shapes  # noqa: E402
from weights.safetensors import write_safetensors  # noqa: E402
from weights.tokenizer import Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(ROOT, "weights", "dsv32-small")
MODES = [("dense", "float"), ("dsa", "float"), ("dense", "fp8"), ("dsa", "fp8")]
LAST = 4  # logits kept per input: the last positions, which see the most context
REFERENCE_TEXT = "The history of the Roman Empire covers the history of ancient Rome from the fall of the Roman Republic"
# max |engine - reference| / max |reference| allowed per mode. The reference is float64, the engine
# float32: in dense-float mode they differ by rounding only. But two steps are
# discontinuous: a top-k choice between near-tied keys (DSA), and an e4m3 rounding of a value that
# lies within float32 rounding of a rounding boundary (fp8: c_kv and the indexer's q, k). Either may
# fall the other way in one of the two; one such flip moves logits by ~1e-4 to 1e-2 of their range
# (measured on random weights). A wrong formula moves them by O(1). DSA modes also compare the
# selected sets of the last positions, layer by layer (mean intersection over union).
TOLERANCE = {"dense-float": 2e-5, "dsa-float": 5e-3, "dense-fp8": 2e-2, "dsa-fp8": 2e-2}
MIN_IOU = 0.98

# the exporter's scales are amax / 448, not powers of two: no "scale_fmt" (V32_FIELDS says ue8m0)
CONFIG_EXTRA = dict(V32_FIELDS, attention_bias=False, num_nextn_predict_layers=0,
                    quantization_config={k: v for k, v in V32_FIELDS["quantization_config"].items() if k != "scale_fmt"})


def config_json(cfg_dict):
    return dict(CONFIG_EXTRA, **cfg_dict)


def load_trained(run):
    """(config dict, {name: float32 numpy}) of a training run: full.pt or compact/, the later step."""
    import torch
    full, compact = os.path.join(run, "full.pt"), os.path.join(run, "compact", "state.json")
    c_state = json.load(open(compact)) if os.path.exists(compact) else None
    if os.path.exists(full):
        ck = torch.load(full, map_location="cpu", weights_only=False)
        if c_state is None or ck["state"]["step"] >= c_state["step"]:
            return ck["state"]["config"], {k: v.float().numpy() for k, v in ck["model"].items()}, ck["state"]["step"]
    if c_state is None:
        raise SystemExit(f"{run}: no full.pt and no compact/state.json")
    print(f"{run}: exporting the compact checkpoint's bf16 weights (full.pt, on the GPU machine, holds the "
          f"fp32 weights the fp8-aware stage quantised; an e4m3 rounding may differ here)", file=sys.stderr)
    weights = {}
    for i in range(c_state["shards"]):
        shard = torch.load(os.path.join(run, "compact", f"shard-{i:02d}.pt"), map_location="cpu")
        weights.update({k[2:]: v.float().numpy() for k, v in shard.items() if k.startswith("w.")})
    return c_state["config"], weights, c_state["step"]


def write_folder(weights, cfg_dict, tokenizer_path, out):
    """config.json, model.safetensors (released layout), tokenizer.json."""
    config = config_json(cfg_dict)
    shapes = tensor_shapes(config)
    missing = sorted(set(n for n in shapes if not n.endswith("_scale_inv")) - set(weights))
    extra = sorted(set(weights) - set(shapes))
    if missing or extra:
        raise SystemExit(f"trained weights do not match the released layout: missing {missing[:3]}, extra {extra[:3]}")
    tensors = {}
    for name, (shape, kind) in shapes.items():
        if name.endswith(".weight_scale_inv"):
            continue
        w = np.asarray(weights[name], np.float32)
        if tuple(w.shape) != tuple(shape):
            raise SystemExit(f"{name}: trained shape {w.shape}, the layout wants {shape}")
        if kind == "fp8":
            bits, scale_inv = quantize_fp8_blocks(w)
            tensors[name] = ("F8_E4M3", bits)
            tensors[name[: -len("weight")] + "weight_scale_inv"] = scale_inv
        else:
            tensors[name] = w.astype(ml_dtypes.bfloat16 if kind == "bf16" else np.float32)
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"), dict(sorted(tensors.items())), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copyfile(tokenizer_path, os.path.join(out, "tokenizer.json"))
    return out


def read_back(folder):
    """{name: float64 numpy} of the exported tensors, dequantised as the engine's loader does."""
    ckpt = Checkpoint(folder)
    out = {}
    for name, (shape, kind) in tensor_shapes(ckpt.config).items():
        if name.endswith(".weight_scale_inv"):
            continue
        if kind == "fp8":
            w = dequant_weight_reference(np.asarray(ckpt.get(name)), np.asarray(ckpt.get(name + "_scale_inv"), np.float32))
        else:
            w = np.asarray(ckpt.get(name), np.float32)
        out[name] = w.astype(np.float64)
    return out


def reference_inputs(cfg, tokenizer, data_folder=None, seed=0):
    """{name: ids}: a short text, and two inputs of 2.5 index_topk tokens (so DSA really selects): a
    pass-key prompt cut before its answer (random ids without a corpus) and random ids."""
    rng = np.random.default_rng(seed)
    L = int(2.5 * cfg.index_topk)
    inputs = {"text": [cfg.bos_token_id] + tokenizer.encode(REFERENCE_TEXT)}
    if data_folder and os.path.exists(os.path.join(data_folder, "pieces.json")):
        from weights.make_model import corpus
        stream, pieces = corpus.TokenStream(data_folder, "val"), corpus.Pieces.load(data_folder)
        ids, answers = corpus.passkey_doc(rng, stream, pieces, L, {"wiki": 1.0}, depth=0.3)
        inputs["passkey"] = [int(i) for i in ids[:answers[0][0]]]
    else:
        inputs["passkey"] = [cfg.bos_token_id] + [int(i) for i in rng.integers(6, cfg.vocab_size, L - 1)]
    inputs["random"] = [cfg.bos_token_id] + [int(i) for i in rng.integers(6, cfg.vocab_size, L - 1)]
    return inputs


def torch_model(folder):
    """train.py's model in float64 with the weights as the engine reads them."""
    import torch
    from weights.make_model import train
    cfg_dict = json.load(open(os.path.join(folder, "config.json")))
    cfg = engine.Config.from_dict(cfg_dict)
    model = train.Transformer(cfg).double().eval()
    weights = read_back(folder)
    state = {k: torch.from_numpy(weights[k]) for k in model.state_dict()}
    model.load_state_dict(state)
    return cfg, model


def write_reference(folder, data_folder=None):
    """reference_logits.npz: the trainer's logits for reference_inputs in each of MODES."""
    import torch
    from weights.make_model import train
    cfg, model = torch_model(folder)
    inputs = reference_inputs(cfg, Tokenizer(os.path.join(folder, "tokenizer.json")), data_folder)
    arrays = {}
    for name, ids in inputs.items():
        arrays[f"ids/{name}"] = np.asarray(ids, np.int32)
        x = torch.tensor([ids])
        for attention, numerics in MODES:
            mode = f"{attention}-{numerics}"
            num = train.Numerics(sparse=attention == "dsa", fp8=numerics == "fp8", exact=True)
            with torch.no_grad():
                logits = model(x, num)[0, -LAST:]
            arrays[f"logits/{name}/{mode}"] = logits.float().numpy()
            if num.selected:  # each layer's selected positions for the last rows, ascending, -1 padded
                sel = np.full((len(num.selected), LAST, cfg.index_topk), -1, np.int16)
                for l, keep in enumerate(num.selected):
                    for r, row in enumerate(keep[0, -LAST:].numpy()):
                        where = np.flatnonzero(row)
                        sel[l, r, :len(where)] = where
                arrays[f"selected/{name}/{mode}"] = sel
    meta = {"modes": [f"{a}-{n}" for a, n in MODES], "inputs": list(inputs), "last": LAST,
            "tolerance": TOLERANCE, "min_iou": MIN_IOU,
            "measure": "max |engine - reference| / max |reference| over the stored logits of one input and mode; "
                       "for DSA also the mean IoU of the selected sets of the stored rows over layers",
            "reference": "weights/make_model/train.py in float64 on the CPU, weights read back from model.safetensors"}
    arrays["meta"] = np.array(json.dumps(meta))
    path = os.path.join(folder, "reference_logits.npz")
    np.savez_compressed(path, **arrays)
    return path


class RecordingSelector:
    """An engine Selector that keeps what it returns, layer after layer."""

    def __init__(self, selector):
        self.selector, self.seen = selector, []

    def __call__(self, *args):
        selected = self.selector(*args)
        self.seen.append(selected)
        return selected


def iou(a, b):
    """Mean intersection over union of -1-padded index rows."""
    scores = []
    for x, y in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])):
        x, y = set(x[x >= 0].tolist()), set(y[y >= 0].tolist())
        scores.append(len(x & y) / max(len(x | y), 1))
    return float(np.mean(scores))


def check_reference(folder):
    """Run the engine (numpy, CPU) on reference_logits.npz's inputs in each mode. Returns a list of
    dicts: input, mode, err = max |engine - reference| / max |reference|, tol, and for DSA modes the
    mean IoU of the selected sets and its minimum."""
    ref = np.load(os.path.join(folder, "reference_logits.npz"))
    meta = json.loads(str(ref["meta"]))
    results, models = [], {}
    for mode in meta["modes"]:
        attention, numerics = mode.split("-")
        if numerics not in models:
            models[numerics] = engine.load(folder, "cpu", numerics, progress=False)[:2]
        cfg, model = models[numerics]
        for name in meta["inputs"]:
            ids = [int(i) for i in ref[f"ids/{name}"]]
            selector = RecordingSelector(engine.Selector(cfg, attention))
            cache = model.new_cache(len(ids))
            got = model.prefill(ids, cache, selector, chunk=len(ids), all_logits=True)[-meta["last"]:]
            want = ref[f"logits/{name}/{mode}"].astype(np.float64)
            r = {"input": name, "mode": mode, "err": float(np.abs(got - want).max() / np.abs(want).max()),
                 "tol": meta["tolerance"][mode]}
            if f"selected/{name}/{mode}" in ref:
                mine = np.stack([s[-meta["last"]:] for s in selector.seen])
                r["iou"], r["min_iou"] = iou(mine, ref[f"selected/{name}/{mode}"]), meta["min_iou"]
            results.append(r)
    return results


def failures(results):
    return [r for r in results if not (r["err"] <= r["tol"] and r.get("iou", 1.0) >= r.get("min_iou", 1.0))]


def write_heldout(folder, data_folder):
    """heldout.npz beside the model: each source's validation token ids (never trained on), for the
    evaluation (`make eval`) and the model card, so a checkout without the corpus can still measure."""
    from weights.make_model import corpus
    stream = corpus.TokenStream(data_folder, "val")
    path = os.path.join(folder, "heldout.npz")
    np.savez_compressed(path, **{name: np.asarray(a, np.uint16) for name, a in stream.arrays.items()})
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description="Export a training run in the released DeepSeek-V3.2 layout.")
    ap.add_argument("--run", default=os.path.join(HERE, "runs", "main"))
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--data", default=os.path.join(HERE, "data", "tokens"), help="token folder (tokenizer.json, pieces)")
    ap.add_argument("--no-check", action="store_true", help="skip running the engine against the reference")
    ap.add_argument("--no-export", action="store_true", help="check the folder --out as it is")
    ap.add_argument("--heldout-only", action="store_true", help="only (re)write --out/heldout.npz from --data")
    args = ap.parse_args(argv)
    if args.heldout_only:
        print(f"wrote {write_heldout(args.out, args.data)}", file=sys.stderr)
        return
    if not args.no_export:
        cfg_dict, weights, step = load_trained(args.run)
        write_folder(weights, cfg_dict, os.path.join(args.data, "tokenizer.json"), args.out)
        write_reference(args.out, args.data)
        write_heldout(args.out, args.data)
        size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
        print(f"wrote {args.out} from step {step} of {args.run}: {size / 1e6:.1f} MB", file=sys.stderr)
        if size > 40e6:
            print(f"warning: {size / 1e6:.1f} MB is over the 40 MB the repository allows", file=sys.stderr)
    if not args.no_check:
        results = check_reference(args.out)
        bad = failures(results)
        for r in results:
            sel = f", selection IoU {r['iou']:.4f}" if "iou" in r else ""
            print(f"  engine vs trainer  {r['input']:<8} {r['mode']:<12} max-rel {r['err']:.2e} "
                  f"(tolerance {r['tol']:.0e}){sel}{'  FAIL' if r in bad else ''}", file=sys.stderr)


if __name__ == "__main__":
    main()
