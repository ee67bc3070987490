#!/usr/bin/env python3
"""Independent numpy reference forward pass for SmolLM2-135M-Instruct (GGUF).

What this is
------------
A self-contained, deliberately simple re-implementation of the llama-architecture
forward pass used by SmolLM2-135M-Instruct, reading weights *directly* from the
GGUF file (Q4_1 matrices, Q8_0 tied embedding, F32 norms). It exists to produce
a small golden fixture (``golden_logits.json``) that the Rust implementation in
``rust/spa-model`` is tested against. It shares no code with the Rust side.

* GGUF parsing: the ``gguf`` pip package is used only to locate tensors and read
  metadata. Dequantization (Q4_1, Q8_0) is implemented here in numpy
  (``--check-dequant`` cross-checks it against ``gguf.quants.dequantize``).
* Forward pass in float64: token embedding -> 30 x [RMSNorm, GQA attention with
  RoPE, residual, RMSNorm, SwiGLU FFN, residual] -> final RMSNorm -> tied LM head.
* RoPE uses the llama.cpp "normal" mode (LLAMA_ROPE_TYPE_NORM, what llama.cpp
  uses for the llama arch): rotated pairs are (x[2i], x[2i+1]), because
  convert_hf_to_gguf permutes the HF q/k weights into that layout. The
  alternative (NeoX, pairs (x[i], x[i+d/2])) can be selected with
  ``--rope-mode neox`` to demonstrate that it gives wrong output.
* Tokenizer: GPT-2 byte-level BPE rebuilt with the ``tokenizers`` package from
  ``tokenizer.ggml.tokens`` / ``tokenizer.ggml.merges``; pre-tokenizer
  Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
  use_regex=True)] (= llama.cpp pre-type "smollm"); ByteLevel decoder. Control
  tokens (token_type == 3) are registered as special tokens. No BOS is prepended
  (tokenizer.ggml.add_bos_token = false).

How to run
----------
    pip install gguf numpy tokenizers
    python3 scripts/reference/smollm2_ref.py \
        --gguf ~/.cache/spa-mobile/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out rust/spa-model/tests/fixtures/golden_logits.json

    # print greedy continuations instead (no fixture written):
    python3 scripts/reference/smollm2_ref.py --gguf PATH --generate 16 \
        --prompt "The capital of France is"

Runtime is a few tens of seconds on a laptop CPU (weights are dequantized to
float64, ~1.1 GB RAM).
"""

import argparse
import hashlib
import json
import sys

import numpy as np

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little girl who",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number',
]

QK = 32  # block size for Q4_1 and Q8_0


# --------------------------------------------------------------------------
# Dequantization (own implementation)
# --------------------------------------------------------------------------
def dequant_q4_1(raw: np.ndarray, n_cols: int) -> np.ndarray:
    """raw: uint8 (rows, n_cols/32*20). Block: f16 d, f16 m, 16 bytes nibbles.
    Value j (0..15) = low nibble of byte j, value j+16 = high nibble of byte j.
    x = d*q + m."""
    rows = raw.shape[0]
    nb = n_cols // QK
    blk = raw.reshape(rows, nb, 20)
    d = blk[:, :, 0:2].copy().view(np.float16).astype(np.float64)  # (rows,nb,1)
    m = blk[:, :, 2:4].copy().view(np.float16).astype(np.float64)
    qs = blk[:, :, 4:20]
    lo = (qs & 0x0F).astype(np.float64)
    hi = (qs >> 4).astype(np.float64)
    q = np.concatenate([lo, hi], axis=2)  # (rows,nb,32)
    return (d * q + m).reshape(rows, n_cols)


def dequant_q8_0(raw: np.ndarray, n_cols: int) -> np.ndarray:
    """raw: uint8 (rows, n_cols/32*34). Block: f16 d, 32 x int8. x = d*q."""
    rows = raw.shape[0]
    nb = n_cols // QK
    blk = raw.reshape(rows, nb, 34)
    d = blk[:, :, 0:2].copy().view(np.float16).astype(np.float64)
    q = blk[:, :, 2:34].copy().view(np.int8).astype(np.float64)
    return (d * q).reshape(rows, n_cols)


def load_tensor(t) -> np.ndarray:
    """Return a float64 array with numpy shape (ne1, ne0) == (out, in)."""
    ne = [int(x) for x in t.shape]  # GGUF order: ne0 (contiguous) first
    name = t.tensor_type.name
    if name == "F32":
        a = np.asarray(t.data, dtype=np.float32).astype(np.float64)
        return a.reshape(list(reversed(ne)))
    raw = np.asarray(t.data, dtype=np.uint8)
    n_cols = ne[0]
    rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
    raw = raw.reshape(rows, -1)
    if name == "Q4_1":
        return dequant_q4_1(raw, n_cols)
    if name == "Q8_0":
        return dequant_q8_0(raw, n_cols)
    raise NotImplementedError(f"tensor type {name} ({t.name})")


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
class Model:
    def __init__(self, path: str, rope_mode: str = "normal"):
        from gguf import GGUFReader

        self.path = path
        r = GGUFReader(path)
        self.reader = r
        f = r.fields

        def kv(key):
            return f[key].contents()

        arch = kv("general.architecture")
        assert arch == "llama", arch
        self.n_layer = int(kv("llama.block_count"))
        self.n_embd = int(kv("llama.embedding_length"))
        self.n_ff = int(kv("llama.feed_forward_length"))
        self.n_head = int(kv("llama.attention.head_count"))
        self.n_head_kv = int(kv("llama.attention.head_count_kv"))
        self.eps = float(kv("llama.attention.layer_norm_rms_epsilon"))
        self.rope_theta = float(kv("llama.rope.freq_base"))
        self.head_dim = self.n_embd // self.n_head
        self.n_rot = int(kv("llama.rope.dimension_count")) if "llama.rope.dimension_count" in f else self.head_dim
        assert self.n_rot == self.head_dim
        self.rope_mode = rope_mode
        self.meta = {k: kv(k) for k in f if k.startswith(("tokenizer.ggml.bos", "tokenizer.ggml.eos",
                                                           "tokenizer.ggml.pre", "tokenizer.ggml.model",
                                                           "tokenizer.ggml.add_"))}

        tensors = {t.name: t for t in r.tensors}
        self.tensor_types = {t.name: t.tensor_type.name for t in r.tensors}
        self.tok_embd = load_tensor(tensors["token_embd.weight"])  # (vocab, n_embd)
        self.out_norm = load_tensor(tensors["output_norm.weight"])
        if "output.weight" in tensors:
            self.lm_head = load_tensor(tensors["output.weight"])
        else:
            self.lm_head = self.tok_embd  # tied
        self.layers = []
        for i in range(self.n_layer):
            g = lambda n: load_tensor(tensors[f"blk.{i}.{n}.weight"])
            self.layers.append(dict(
                attn_norm=g("attn_norm"), wq=g("attn_q"), wk=g("attn_k"), wv=g("attn_v"),
                wo=g("attn_output"), ffn_norm=g("ffn_norm"), w_gate=g("ffn_gate"),
                w_up=g("ffn_up"), w_down=g("ffn_down")))
        self.tokenizer = build_tokenizer(r)

    # ---- building blocks ----
    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        """x: (T, H, D); pos: (T,)"""
        D = self.head_dim
        i = np.arange(D // 2, dtype=np.float64)
        inv_freq = self.rope_theta ** (-2.0 * i / D)  # (D/2,)
        ang = pos[:, None].astype(np.float64) * inv_freq[None, :]  # (T, D/2)
        cos = np.cos(ang)[:, None, :]
        sin = np.sin(ang)[:, None, :]
        out = np.empty_like(x)
        if self.rope_mode == "normal":  # llama.cpp NORM: pairs (2i, 2i+1)
            x0, x1 = x[..., 0::2], x[..., 1::2]
            out[..., 0::2] = x0 * cos - x1 * sin
            out[..., 1::2] = x0 * sin + x1 * cos
        elif self.rope_mode == "neox":  # pairs (i, i+D/2)
            x0, x1 = x[..., : D // 2], x[..., D // 2:]
            out[..., : D // 2] = x0 * cos - x1 * sin
            out[..., D // 2:] = x0 * sin + x1 * cos
        else:
            raise ValueError(self.rope_mode)
        return out

    def forward(self, ids):
        """Full (non-cached) causal forward over token ids.
        Returns logits (T, vocab) and a dict of intermediate residual streams."""
        ids = np.asarray(ids, dtype=np.int64)
        T = len(ids)
        H, Hkv, D = self.n_head, self.n_head_kv, self.head_dim
        grp = H // Hkv
        pos = np.arange(T)
        x = self.tok_embd[ids].copy()  # (T, n_embd)
        mask = np.triu(np.full((T, T), -np.inf), k=1)
        residuals = []
        for L in self.layers:
            h = self.rmsnorm(x, L["attn_norm"])
            q = (h @ L["wq"].T).reshape(T, H, D)
            k = (h @ L["wk"].T).reshape(T, Hkv, D)
            v = (h @ L["wv"].T).reshape(T, Hkv, D)
            q = self.rope(q, pos)
            k = self.rope(k, pos)
            att_out = np.empty((T, H, D))
            for hh in range(H):
                kh = hh // grp  # GQA: query head hh uses kv head hh // (H/Hkv)
                s = (q[:, hh, :] @ k[:, kh, :].T) / np.sqrt(D) + mask
                s = s - s.max(axis=-1, keepdims=True)
                p = np.exp(s)
                p /= p.sum(axis=-1, keepdims=True)
                att_out[:, hh, :] = p @ v[:, kh, :]
            x = x + att_out.reshape(T, H * D) @ L["wo"].T
            h = self.rmsnorm(x, L["ffn_norm"])
            g = h @ L["w_gate"].T
            u = h @ L["w_up"].T
            act = g / (1.0 + np.exp(-g)) * u  # SiLU(gate) * up
            x = x + act @ L["w_down"].T
            residuals.append(x.copy())
        hn = self.rmsnorm(x, self.out_norm)
        logits = hn @ self.lm_head.T
        return logits, {"residuals": residuals, "final_norm": hn}

    def greedy(self, ids, n):
        ids = list(ids)
        out = []
        for _ in range(n):
            logits, _ = self.forward(ids)
            t = int(np.argmax(logits[-1]))
            out.append(t)
            ids.append(t)
        return out


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------
def build_tokenizer(reader):
    from tokenizers import Tokenizer, AddedToken, decoders, models, pre_tokenizers

    f = reader.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    merges = f["tokenizer.ggml.merges"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [tokens[i] for i, t in enumerate(types) if t == 3]  # CONTROL
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


# --------------------------------------------------------------------------
# Fixture
# --------------------------------------------------------------------------
def r4(x):
    return round(float(x), 4)


def logsumexp(v):
    m = np.max(v)
    return m + np.log(np.sum(np.exp(v - m)))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_fixture(model, prompts, n_greedy=8):
    tok = model.tokenizer
    entries = []
    for p in prompts:
        ids = tok.encode(p, add_special_tokens=False).ids
        logits, aux = model.forward(ids)
        T = len(ids)
        positions = []
        for t in range(max(0, T - 3), T):
            top = np.argsort(-logits[t], kind="stable")[:5]
            positions.append({
                "position": t,
                "top5": [{"id": int(i), "logit": r4(logits[t, i])} for i in top],
            })
        last = {
            "logsumexp": r4(logsumexp(logits[-1])),
            "final_norm_hidden_first8": [r4(v) for v in aux["final_norm"][-1, :8]],
            "hidden_after_layer0_first8": [r4(v) for v in aux["residuals"][0][-1, :8]],
            f"hidden_after_layer{model.n_layer - 1}_first8": [r4(v) for v in aux["residuals"][-1][-1, :8]],
        }
        g = model.greedy(ids, n_greedy)
        entries.append({
            "prompt": p,
            "token_ids": [int(i) for i in ids],
            "last_positions": positions,
            "last": last,
            "greedy": {"ids": g, "text": tok.decode(g, skip_special_tokens=False)},
        })
        print(f"{p!r} -> {tok.decode(g, skip_special_tokens=False)!r}", file=sys.stderr)
    meta = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": sha256(model.path),
        "generator": "scripts/reference/smollm2_ref.py (numpy, float64, full causal forward, no KV cache)",
        "rope_mode": "normal (llama.cpp LLAMA_ROPE_TYPE_NORM: rotate pairs (x[2i], x[2i+1]), "
                     "inv_freq_i = theta^(-2i/head_dim))",
        "rope_theta": model.rope_theta,
        "rms_eps": model.eps,
        "head_dim": model.head_dim,
        "add_bos": False,
        "tokenizer": "BPE(vocab=tokenizer.ggml.tokens, merges=tokenizer.ggml.merges); pre_tokenizer="
                     "Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)]; "
                     "decoder=ByteLevel",
        "logits_rounding": "4 decimals",
        "numpy_version": np.__version__,
    }
    return {"meta": meta, "prompts": entries}


def check_dequant(model):
    from gguf.quants import dequantize

    worst = 0.0
    for t in model.reader.tensors:
        if t.tensor_type.name in ("Q4_1", "Q8_0") and (t.name.startswith(("blk.0.", "blk.29.", "token_embd"))):
            ref = dequantize(t.data, t.tensor_type).astype(np.float64)
            mine = load_tensor(t)
            err = float(np.max(np.abs(ref.reshape(mine.shape) - mine)))
            worst = max(worst, err)
            print(f"{t.name:28s} {t.tensor_type.name} max|diff|={err:.3g}", file=sys.stderr)
    print(f"dequant worst abs diff vs gguf.quants: {worst:.3g}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", help="write golden fixture JSON here")
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="greedy-decode N tokens for each prompt and print the text")
    ap.add_argument("--prompt", action="append", help="prompt(s) for --generate (default: fixture prompts)")
    ap.add_argument("--rope-mode", choices=["normal", "neox"], default="normal")
    ap.add_argument("--check-dequant", action="store_true",
                    help="cross-check own dequantization against gguf.quants.dequantize")
    args = ap.parse_args()

    model = Model(args.gguf, rope_mode=args.rope_mode)
    if args.check_dequant:
        check_dequant(model)
    if args.generate:
        for p in args.prompt or DEFAULT_PROMPTS:
            ids = model.tokenizer.encode(p, add_special_tokens=False).ids
            g = model.greedy(ids, args.generate)
            print(f"prompt ids: {ids}")
            print(f"generated ids: {g}")
            print(repr(p + model.tokenizer.decode(g, skip_special_tokens=False)))
    if args.out:
        fx = make_fixture(model, DEFAULT_PROMPTS)
        with open(args.out, "w") as fh:
            json.dump(fx, fh, indent=1, ensure_ascii=False)
            fh.write("\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
