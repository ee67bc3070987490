#!/usr/bin/env python3
"""Independent numpy reference forward pass for Gemma-3-270m (GGUF, Q4_K_M).

What this is
------------
A self-contained re-implementation of the Gemma-3 text forward pass (as in llama.cpp's
gemma3 graph and Hugging Face's Gemma3ForCausalLM), reading weights directly from the GGUF
file, to produce the golden fixture ``rust/spa-model/tests/fixtures/gemma3_golden.json``
that ``rust/spa-model/tests/gemma.rs`` checks the Rust ``BaseModel`` against. It shares no
code with the Rust side.

* GGUF parsing and dequantization (Q5_0, Q4_K, Q6_K, Q8_0): the ``gguf`` pip package
  (``gguf.quants.dequantize``). The GGUF norm weights already include Gemma's ``+1``
  (llama.cpp's converter adds it; ``attn_norm`` is centred around 13, not 0), so they are
  used as stored.
* Forward pass in float64: embedding * sqrt(hidden) -> 18 x [RMSNorm, attention (q/k
  per-head RMSNorm, NeoX RoPE, scale 1/sqrt(head_dim)=1/16, GQA 4 q heads / 1 kv head,
  causal; local layers: sliding window 512 and RoPE base 1e4; every 6th layer (5, 11, 17):
  global, RoPE base 1e6), post-attention RMSNorm, residual, RMSNorm, GELU-tanh gated FFN,
  post-FFW RMSNorm, residual] -> final RMSNorm -> tied embedding as LM head. No soft-capping
  (Gemma 3 has none; the GGUF carries no softcapping keys).
* Tokenizer: SentencePiece BPE as llama.cpp runs it for ``tokenizer.ggml.model == "llama"``,
  written out here: control (type 3) and user-defined (type 4) tokens are split out of the raw
  text first (longest first), the remaining pieces get ' ' -> U+2581, then adjacent symbols
  (UTF-8 characters) are merged greedily by the *score* of the merged token (highest first,
  leftmost on ties); symbols that are not tokens fall back to <0xXX> byte tokens. BOS (id 2)
  is prepended (``add_bos_token = true``); no space prefix (``add_space_prefix = false``).
  ``--check-tokenizer`` cross-checks it against the ``sentencepiece`` library (a BPE
  ModelProto built from the same GGUF vocabulary) if that package is installed.

How to run
----------
    pip install gguf numpy            # optional: sentencepiece protobuf (for --check-tokenizer)
    python3 scripts/reference/gemma3_ref.py \\
        --gguf ~/.cache/spa-mobile/models/gemma-3-270m-q4_k_m.gguf \\
        --out rust/spa-model/tests/fixtures/gemma3_golden.json

    # greedy continuation only:
    python3 scripts/reference/gemma3_ref.py --gguf PATH --generate 16 --prompt "The capital of France is"

Takes about a minute on a laptop CPU and ~3 GB of RAM (the 262k x 640 embedding).
"""

import argparse
import hashlib
import heapq
import json
import math
import sys

import numpy as np

# A prompt of 769 tokens: past the 512-token sliding window of the local layers, so the
# window matters (without it the last-position logits move by up to 14).
LONG_PROMPT = " ".join(
    f"Day {i}: the ship sailed {i * 7 % 50 + 10} miles north and the crew counted "
    f"{i * 13 % 90 + 5} birds." for i in range(1, 36)
) + " On the last day the captain wrote in his log that"
DEFAULT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little girl who",
    LONG_PROMPT,
]
# Extra strings whose tokenization is fixed in the fixture (no forward pass).
TOKENIZER_ONLY = [
    "Hello world",
    "Hello\nworld!\n\nThe <b>bold</b> text.",
    "naïve café — 東京 😀 x=12345",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    " leading space and  double space",
]


# --------------------------------------------------------------------------
# GGUF access
# --------------------------------------------------------------------------
def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def load_tensor(reader, name):
    from gguf.quants import dequantize

    t = next(t for t in reader.tensors if t.name == name)
    arr = dequantize(t.data, t.tensor_type)
    # GGUF shape is (ne0, ne1) = (in, out); numpy rows are ne1.
    shape = tuple(int(x) for x in reversed(t.shape))
    return np.asarray(arr, dtype=np.float32).reshape(shape)


# --------------------------------------------------------------------------
# Tokenizer: SentencePiece BPE (llama.cpp "spm" session)
# --------------------------------------------------------------------------
class SpmTokenizer:
    def __init__(self, reader):
        self.tokens = field(reader, "tokenizer.ggml.tokens")
        self.scores = [float(s) for s in field(reader, "tokenizer.ggml.scores")]
        self.types = [int(t) for t in field(reader, "tokenizer.ggml.token_type")]
        self.bos = int(field(reader, "tokenizer.ggml.bos_token_id"))
        self.add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token"))
        self.add_space_prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix"))
        assert field(reader, "tokenizer.ggml.model") == "llama"
        self.index = {}
        for i, t in enumerate(self.tokens):
            self.index.setdefault(t, i)
        self.byte_tok = {}
        for i, (t, ty) in enumerate(zip(self.tokens, self.types)):
            if ty == 6:
                self.byte_tok[int(t[3:5], 16)] = i
        specials = [i for i, ty in enumerate(self.types) if ty in (3, 4) and self.tokens[i]]
        specials.sort(key=lambda i: (-len(self.tokens[i].encode()), i))
        self.specials = specials

    def partition(self, text):
        """Splits raw text into [str | int] fragments (ints = special token ids)."""
        frags = [text]
        for sid in self.specials:
            s = self.tokens[sid]
            out = []
            for f in frags:
                if isinstance(f, int) or s not in f:
                    out.append(f)
                    continue
                parts = f.split(s)
                for k, p in enumerate(parts):
                    if k:
                        out.append(sid)
                    if p:
                        out.append(p)
            frags = out
        return frags

    def spm(self, text):
        text = text.replace(" ", "\u2581")
        syms = [c.encode() for c in text]  # one UTF-8 character each
        n = len(syms)
        if n == 0:
            return []
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n)) + [-1]
        heap = []
        rev = {}

        def add(l, r):
            if l == -1 or r == -1:
                return
            s = syms[l] + syms[r]
            tid = self.index.get(s.decode("utf-8", "surrogatepass"))
            if tid is None:
                return
            heapq.heappush(heap, (-self.scores[tid], l, r, len(s)))
            rev[s] = (l, r, syms[l], syms[r])

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, l, r, size = heapq.heappop(heap)
            if not syms[l] or not syms[r] or len(syms[l]) + len(syms[r]) != size:
                continue
            syms[l] = syms[l] + syms[r]
            syms[r] = b""
            nxt[l] = nxt[r]
            if nxt[r] != -1:
                prev[nxt[r]] = l
            add(prev[l], l)
            add(l, nxt[l])
        out = []

        def emit(s):
            tid = self.index.get(s.decode("utf-8"))
            if tid is not None:
                out.append(tid)
                return
            if s in rev:
                _, _, a, b = rev[s]
                emit(a)
                emit(b)
                return
            out.extend(self.byte_tok[b] for b in s)

        i = 0
        while i != -1:
            emit(syms[i])
            i = nxt[i]
        return out

    def encode(self, text, bos=True):
        ids = [self.bos] if (bos and self.add_bos) else []
        prev_special = True
        for f in self.partition(text):
            if isinstance(f, int):
                ids.append(f)
                prev_special = True
            else:
                if self.add_space_prefix and prev_special:
                    f = " " + f
                ids.extend(self.spm(f))
                prev_special = False
        return ids

    def decode(self, ids):
        b = bytearray()
        for i in ids:
            if self.types[i] == 6:
                b.append(int(self.tokens[i][3:5], 16))
            else:
                b.extend(self.tokens[i].replace("\u2581", " ").encode())
        return b.decode("utf-8", "replace")


def sentencepiece_check(tok, texts):
    """Encodes texts with the sentencepiece library (BPE model from the GGUF vocab)."""
    try:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        print("sentencepiece not installed: skipping --check-tokenizer", file=sys.stderr)
        return None
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.vocab_size = len(tok.tokens)
    m.trainer_spec.unk_id = 3
    m.trainer_spec.bos_id = 2
    m.trainer_spec.eos_id = 1
    m.trainer_spec.pad_id = 0
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    tmap = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
            3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
            6: pb.ModelProto.SentencePiece.BYTE}
    for i, (t, s, ty) in enumerate(zip(tok.tokens, tok.scores, tok.types)):
        p = m.pieces.add()
        p.piece = t
        p.score = s
        p.type = pb.ModelProto.SentencePiece.UNKNOWN if i == 3 else tmap.get(ty, 1)
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    res = {}
    for t in texts:
        res[t] = [tok.bos] + sp.encode(t)
    return res


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class Gemma3:
    def __init__(self, path):
        import gguf

        self.path = path
        r = gguf.GGUFReader(path)
        self.reader = r
        a = field(r, "general.architecture")
        assert a == "gemma3", a
        kv = lambda k: field(r, f"gemma3.{k}")
        self.n_layers = int(kv("block_count"))
        self.d = int(kv("embedding_length"))
        self.nh = int(kv("attention.head_count"))
        self.nkv = int(kv("attention.head_count_kv"))
        self.hd = int(kv("attention.key_length"))
        self.eps = float(kv("attention.layer_norm_rms_epsilon"))
        self.theta_global = float(kv("rope.freq_base"))
        self.theta_local = 10000.0
        self.window = int(kv("attention.sliding_window"))
        self.scale = 1.0 / math.sqrt(self.hd)  # query_pre_attn_scalar = head_dim = 256
        self.tok = SpmTokenizer(r)
        self.embed = load_tensor(r, "token_embd.weight")  # (vocab, d) float32
        f64 = lambda n: load_tensor(r, n).astype(np.float64)
        self.layers = []
        for i in range(self.n_layers):
            p = lambda s: f64(f"blk.{i}.{s}.weight")
            self.layers.append({k: p(k) for k in [
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                "attn_k_norm", "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up",
                "ffn_down", "post_ffw_norm"]})
        self.out_norm = f64("output_norm.weight")

    def is_global(self, i):
        return (i + 1) % 6 == 0

    def rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, theta):
        # x: (heads, seq, hd); NeoX: rotate (x[i], x[i + hd/2]).
        seq, hd = x.shape[1], x.shape[2]
        half = hd // 2
        inv = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / hd)
        ang = np.arange(seq, dtype=np.float64)[:, None] * inv[None, :]
        c, s = np.cos(ang), np.sin(ang)
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)

    def forward(self, ids):
        """Returns (taps, final normed hidden), all positions."""
        seq = len(ids)
        x = self.embed[ids].astype(np.float64) * math.sqrt(self.d)
        taps = []
        qpos = np.arange(seq)[:, None]
        kpos = np.arange(seq)[None, :]
        causal = kpos <= qpos
        local = causal & (qpos - kpos < self.window)
        for i, L in enumerate(self.layers):
            h = self.rms(x, L["attn_norm"])
            q = (h @ L["attn_q"].T).reshape(seq, self.nh, self.hd).transpose(1, 0, 2)
            k = (h @ L["attn_k"].T).reshape(seq, self.nkv, self.hd).transpose(1, 0, 2)
            v = (h @ L["attn_v"].T).reshape(seq, self.nkv, self.hd).transpose(1, 0, 2)
            q = self.rms(q, L["attn_q_norm"])
            k = self.rms(k, L["attn_k_norm"])
            theta = self.theta_global if self.is_global(i) else self.theta_local
            q, k = self.rope(q, theta), self.rope(k, theta)
            mask = causal if self.is_global(i) else local
            rep = self.nh // self.nkv
            outs = []
            for hh in range(self.nh):
                kh, vh = k[hh // rep], v[hh // rep]
                s = (q[hh] @ kh.T) * self.scale
                s = np.where(mask, s, -np.inf)
                s = s - s.max(axis=-1, keepdims=True)
                p = np.exp(s)
                p /= p.sum(axis=-1, keepdims=True)
                outs.append(p @ vh)
            att = np.stack(outs, axis=1).reshape(seq, self.nh * self.hd)
            att = att @ L["attn_output"].T
            x = x + self.rms(att, L["post_attention_norm"])
            h = self.rms(x, L["ffn_norm"])
            f = gelu_tanh(h @ L["ffn_gate"].T) * (h @ L["ffn_up"].T)
            f = f @ L["ffn_down"].T
            x = x + self.rms(f, L["post_ffw_norm"])
            taps.append(x)
        return taps, self.rms(x, self.out_norm)

    def logits(self, h):
        """h: (d,) float64 -> (vocab,) float64, chunked over the vocabulary."""
        out = np.empty(self.embed.shape[0], dtype=np.float64)
        step = 16384
        for a in range(0, self.embed.shape[0], step):
            out[a:a + step] = self.embed[a:a + step].astype(np.float64) @ h
        return out

    def greedy(self, ids, n):
        ids = list(ids)
        new = []
        for _ in range(n):
            _, h = self.forward(ids)
            t = int(np.argmax(self.logits(h[-1])))
            new.append(t)
            ids.append(t)
        return new


def r4(x):
    return [round(float(v), 4) for v in x]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def make_fixture(model, prompts, n_greedy=8, sp_ids=None):
    out = {
        "meta": {
            "model": model.path.rsplit("/", 1)[-1],
            "gguf_sha256": sha256(model.path),
            "generator": "scripts/reference/gemma3_ref.py (numpy, float64 over gguf-dequantized "
                         "weights, full causal forward, no KV cache)",
            "embed_scale": math.sqrt(model.d),
            "attn_scale": model.scale,
            "rope": "neox (rotate x[i], x[i+hd/2]); base 1e6 on layers 5, 11, 17, 1e4 elsewhere",
            "sliding_window": model.window,
            "rms_eps": model.eps,
            "add_bos": model.tok.add_bos,
            "tokenizer": "SentencePiece BPE by token score (llama.cpp spm), specials split "
                         "first, byte fallback, BOS prepended",
            "tokenizer_cross_checked_with_sentencepiece": sp_ids is not None,
            "logits_rounding": "4 decimals",
            "numpy_version": np.__version__,
        },
        "tokenizer_cases": [],
        "prompts": [],
    }
    for t in TOKENIZER_ONLY + prompts:
        ids = model.tok.encode(t)
        # sentencepiece neither parses control tokens nor matches user-defined tokens on raw
        # text (llama.cpp does both), so only texts without either are compared.
        plain = all(isinstance(f, str) or model.tok.types[f] != 3 for f in model.tok.partition(t))
        if sp_ids is not None and t in sp_ids and plain and "  " not in t:
            assert sp_ids[t] == ids, (t, sp_ids[t], ids)
        out["tokenizer_cases"].append({"text": t, "token_ids": ids})
    for p in prompts:
        ids = model.tok.encode(p)
        taps, h = model.forward(ids)
        last = len(ids) - 1
        lg = model.logits(h[last])
        top = np.argsort(-lg)[:5]
        m = lg.max()
        lse = float(m + np.log(np.exp(lg - m).sum()))
        greedy = model.greedy(ids, n_greedy)
        entry = {
            "prompt": p,
            "token_ids": ids,
            "last": {
                "position": last,
                "top5": [{"id": int(i), "logit": round(float(lg[i]), 4)} for i in top],
                "logsumexp": round(lse, 4),
                "hidden_after_layer0_first8": r4(taps[0][last][:8]),
                "hidden_after_last_layer_first8": r4(taps[-1][last][:8]),
                "final_norm_hidden_first8": r4(h[last][:8]),
            },
            "greedy": {"ids": greedy, "text": model.tok.decode(greedy)},
        }
        print(f"{p!r}: ids {ids}\n  top5 {entry['last']['top5']}\n  greedy {entry['greedy']}",
              file=sys.stderr)
        out["prompts"].append(entry)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", help="write the golden fixture JSON here")
    ap.add_argument("--generate", type=int, default=0, metavar="N")
    ap.add_argument("--prompt", action="append")
    ap.add_argument("--check-tokenizer", action="store_true",
                    help="compare the tokenizer with the sentencepiece library")
    a = ap.parse_args()
    model = Gemma3(a.gguf)
    prompts = a.prompt or DEFAULT_PROMPTS
    sp_ids = None
    if a.check_tokenizer:
        texts = TOKENIZER_ONLY + prompts
        sp_ids = sentencepiece_check(model.tok, texts)
        if sp_ids is not None:
            for t in texts:
                mine = model.tok.encode(t)
                flag = "OK " if mine == sp_ids[t] else "DIFF"
                print(f"{flag} {t!r}\n  ours {mine}\n  spm  {sp_ids[t]}", file=sys.stderr)
    if a.generate:
        for p in prompts:
            ids = model.tok.encode(p)
            g = model.greedy(ids, a.generate)
            print(f"{p!r} -> {model.tok.decode(g)!r} {g}")
    if a.out:
        fx = make_fixture(model, prompts, sp_ids=sp_ids)
        with open(a.out, "w") as f:
            json.dump(fx, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
