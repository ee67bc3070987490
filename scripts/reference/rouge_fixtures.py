#!/usr/bin/env python3
"""Golden fixtures for the Rust ROUGE-L in rust/spa-train/src/rouge.rs.

What this is
------------
Scores text pairs with Google's ``rouge-score`` package exactly as the paper's
metric is usually computed::

    RougeScorer(["rougeL"], use_stemmer=True).score(reference, candidate)["rougeL"]

and stems a word list with NLTK's ``PorterStemmer()`` (default mode
NLTK_EXTENSIONS, the stemmer rouge-score uses). The Rust test
``rust/spa-train/tests/rouge.rs`` compares its precision / recall / F1,
tokens and stems to these values.

The pairs are built from REAL text, the BIG-bench gem/xsum task (targets and
article inputs): each target paired with another target, with a word-shuffled
copy of itself, with a truncated copy, with a randomly edited copy, with the
first sentence of its article and with the first few sentences of its
article; plus hand-written edge cases (empty strings, punctuation only,
unicode, numbers, repeated words, stemmer stress words).

The fixture carries the BIG-bench canary string (field ``canary``) because it
holds short excerpts of BIG-bench text.

How to run
----------
    python3 scripts/reference/rouge_fixtures.py \
        --task ~/.cache/spa-mobile/data/bigbench/benchmark_tasks/gem/xsum/task.json \
        --out rust/spa-train/tests/fixtures/rouge_fixtures.json

``rouge-score`` and ``nltk`` are pip-installed if missing. Deterministic
(seeded); runs in a few seconds.
"""

import argparse
import collections
import importlib
import json
import os
import random
import re
import subprocess
import sys


def ensure_packages():
    """Imports rouge_score and nltk, pip-installing them first if missing."""
    missing = []
    for module, package in (("rouge_score", "rouge-score"), ("nltk", "nltk")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", *missing])


ensure_packages()

import nltk  # noqa: E402
from importlib.metadata import version  # noqa: E402
from nltk.stem import porter  # noqa: E402
from rouge_score import rouge_scorer  # noqa: E402
from rouge_score import tokenize as rs_tokenize  # noqa: E402

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
STEMMER = porter.PorterStemmer()

# Hand-written edge cases: (reference, candidate).
EDGE_PAIRS = [
    ("", ""),
    ("", "the cat sat on the mat"),
    ("the cat sat on the mat", ""),
    ("!!! ... ???", "the cat"),
    ("--- ,,, ;;;", "*** &&& ###"),
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("The Cat SAT on the Mat.", "the cat sat on the mat"),
    ("the cat sat on the mat", "the mat sat on the cat"),
    ("a b c d e f g", "g f e d c b a"),
    ("the the the the", "the"),
    ("the", "the the the the"),
    ("police police police arrested", "police arrested police"),
    ("He was running generously", "he runs generous"),
    ("relational conditional rational", "relate condition rational"),
    ("caresses ponies ties caress cats", "caress poni ti caress cat"),
    ("agreed feed plastered bled motoring sing", "agree feed plaster bled motor sing"),
    ("hopping tanned falling hissing fizzed failing filing", "hop tan fall hiss fizz fail file"),
    ("happiness happy hopefulness goodness", "happi hope good"),
    ("Café naïve résumé — déjà vu", "cafe naive resume deja vu"),
    ("Ünïcödé “quotes” and ‘apostrophes’ — em-dash", "unicode quotes and apostrophes em dash"),
    ("日本語のテキスト and English", "english and 日本語"),
    ("Straße ΣΊΣΥΦΟΣ Ωμέγα", "strasse sisyfos omega"),
    ("The \u212aelvin sign and \u0130stanbul", "the kelvin sign and istanbul"),
    ("In 2023, 1,250 people paid £37.5m (about $45.2m).", "1250 people paid 37 5m in 2023"),
    ("covid-19 cases rose 3.5% in 2020/21", "covid 19 cases rose 3 5 in 2020 21"),
    ("1990s 80s 3rd 21st 2nd-quarter", "the 1990s and the 80s"),
    ("don't can't won't it's O'Neill's", "do not can not it s o neill s"),
    ("e-mail e.g. i.e. U.S.A. U.K.", "email eg ie usa uk"),
    ("tab\tseparated\nnew\r\nlines  and   spaces", "tab separated new lines and spaces"),
    ("yyyy yyy syzygy toy boy enjoy enjoying", "syzygi toi enjoy"),
    ("skies dying lying tying news innings outings cannings", "sky die lie tie news inning outing canning"),
    ("proceed exceed succeed proceeding exceeded", "proceed exceed succeed"),
    ("flies dies spied died cries", "fli die spi die cri"),
    ("generalization generalizations generally general", "gener gener gener gener"),
    ("electrical electricity electrician", "electr electr electrician"),
    ("archaeology geology theology", "archaeolog geolog theolog"),
    ("controlling controlled roll rolling", "control roll"),
    ("a", "a"),
    ("I", "i"),
    ("x y z", "x y z w"),
]

STRESS_WORDS = [
    "generously", "generous", "relational", "conditional", "rational", "caresses", "ponies",
    "ties", "caress", "cats", "agreed", "feed", "plastered", "bled", "motoring", "sing",
    "conflated", "troubled", "sized", "hopping", "tanned", "falling", "hissing", "fizzed",
    "failing", "filing", "happy", "happiness", "sky", "skies", "valenci", "hesitanci",
    "digitizer", "conformabli", "radicalli", "differentli", "vileli", "analogousli",
    "vietnamization", "predication", "operator", "feudalism", "decisiveness", "hopefulness",
    "callousness", "formaliti", "sensitiviti", "sensibiliti", "triplicate", "formative",
    "formalize", "electriciti", "electrical", "hopeful", "goodness", "revival", "allowance",
    "inference", "airliner", "gyroscopic", "adjustable", "defensible", "irritant",
    "replacement", "adjustment", "dependent", "adoption", "homologou", "communism", "activate",
    "angulariti", "homologous", "effective", "bowdlerize", "probate", "rate", "cease",
    "controll", "roll", "dying", "lying", "tying", "news", "innings", "inning", "outings",
    "outing", "cannings", "canning", "howe", "proceed", "exceed", "succeed", "flies", "dies",
    "spied", "died", "cries", "enjoy", "enjoyment", "spy", "fly", "try", "syzygy", "toy",
    "yyyy", "yyy", "yy", "y", "ay", "by", "you", "youth", "yearly", "archaeology", "geology",
    "theology", "philology", "fulli", "hopefulli", "generalli", "radicallies", "ab", "is",
    "a", "as", "at", "ed", "ing", "eed", "ies", "sses", "ss", "s", "1990s", "3rd", "21st",
    "123", "covid19", "mp3", "b2b", "abc123ing", "ational", "tional", "ization", "logi",
    "agreements", "oed", "ied", "bied", "ling", "ating", "izing", "bling", "eeds", "bleed",
    "Generously", "RELATIONAL", "Caresses", "ÉCOLE", "naïve", "İstanbul", "\u212aelvin",
]


def shuffled(words, rng):
    words = list(words)
    rng.shuffle(words)
    return " ".join(words)


def edited(words, rng):
    """Drops, duplicates and swaps a few words."""
    out = []
    for w in words:
        r = rng.random()
        if r < 0.15:
            continue
        out.append(w)
        if r > 0.9:
            out.append(w)
    if len(out) > 3:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


def sentences(text):
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", text)]
    return [p for p in parts if p]


def clip(text, limit):
    """Cuts text at a word boundary to at most `limit` characters."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def score(reference, candidate, kind):
    s = SCORER.score(reference, candidate)["rougeL"]
    return {
        "kind": kind,
        "reference": reference,
        "candidate": candidate,
        "precision": s.precision,
        "recall": s.recall,
        "f1": s.fmeasure,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--task",
        default=os.path.expanduser("~/.cache/spa-mobile/data/bigbench/benchmark_tasks/gem/xsum/task.json"),
    )
    ap.add_argument("--out", default="rust/spa-train/tests/fixtures/rouge_fixtures.json")
    ap.add_argument("--per-kind", type=int, default=45, help="pairs per XSum pairing kind")
    ap.add_argument("--words", type=int, default=2000, help="distinct XSum words to stem")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()

    with open(args.task, encoding="utf-8") as f:
        task = json.load(f)
    examples = task["examples"]
    rng = random.Random(args.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)

    pairs = [score(r, c, "edge") for r, c in EDGE_PAIRS]
    n = args.per_kind
    chosen = [examples[i] for i in order[: 6 * n]]
    for k, ex in enumerate(chosen):
        target = ex["target"].strip()
        words = target.split()
        group = k // n
        if group == 0:
            other = chosen[(k + 1) % len(chosen)]["target"].strip()
            pairs.append(score(target, other, "other_target"))
        elif group == 1:
            pairs.append(score(target, shuffled(words, rng), "shuffled"))
        elif group == 2:
            keep = max(1, int(len(words) * rng.uniform(0.3, 0.8)))
            pairs.append(score(target, " ".join(words[:keep]), "truncated"))
        elif group == 3:
            pairs.append(score(target, edited(words, rng), "edited"))
        elif group == 4:
            first = sentences(ex["input"])[0]
            pairs.append(score(target, clip(first, 400), "input_first_sentence"))
        else:
            lead = " ".join(sentences(ex["input"])[:3])
            pairs.append(score(clip(lead, 500), target, "input_lead3_as_reference"))

    # Tokenizer golden output (with stemming) for the edge cases and some XSum pairs.
    tok_texts = []
    for p in pairs[: len(EDGE_PAIRS) + 30]:
        tok_texts.extend([p["reference"], p["candidate"]])
    seen = set()
    tokenize = []
    for t in tok_texts:
        if t in seen:
            continue
        seen.add(t)
        tokenize.append({"text": t, "tokens": SCORER._tokenizer.tokenize(t)})

    # Word list: frequent and random distinct words of the whole XSum text (inputs and
    # targets), after rouge-score's lowercase/alphanumeric tokenization without stemming.
    counts = collections.Counter()
    for ex in examples:
        counts.update(rs_tokenize.tokenize(ex["input"] + " " + ex["target"], None))
    by_freq = [w for w, _ in counts.most_common()]
    half = args.words // 2
    frequent = by_freq[:half]
    rest = by_freq[half:]
    rng.shuffle(rest)
    words = sorted(set(frequent + rest[: args.words - len(frequent)]))
    stems = [[w, STEMMER.stem(w)] for w in STRESS_WORDS]
    stems += [[w, STEMMER.stem(w)] for w in words if w not in STRESS_WORDS]

    n_pairs = len(pairs)
    mean = {
        key: sum(p[key] for p in pairs) / n_pairs for key in ("precision", "recall", "f1")
    }
    fixture = {
        "canary": task["canary"],
        "source": "BIG-bench gem/xsum (targets and inputs) + hand-written edge cases",
        "generator": "scripts/reference/rouge_fixtures.py",
        "rouge_score_version": version("rouge-score"),
        "nltk_version": nltk.__version__,
        "scorer": "RougeScorer(['rougeL'], use_stemmer=True).score(reference, candidate)['rougeL']",
        "pairs": pairs,
        "corpus_mean": mean,
        "tokenize": tokenize,
        "stems": stems,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        # One list element per line: small and diff-friendly.
        def dumps(value):
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

        f.write("{\n")
        items = list(fixture.items())
        for i, (key, value) in enumerate(items):
            end = ",\n" if i + 1 < len(items) else "\n"
            if isinstance(value, list):
                body = ",\n".join(dumps(v) for v in value)
                f.write(f"{dumps(key)}:[\n{body}\n]{end}")
            else:
                f.write(f"{dumps(key)}:{dumps(value)}{end}")
        f.write("}\n")
    changed = sum(1 for w, s in stems if w != s)
    print(
        f"wrote {args.out}: {n_pairs} pairs, {len(tokenize)} tokenize cases, "
        f"{len(stems)} stems ({changed} changed by the stemmer), "
        f"mean F1 {mean['f1']:.4f}, {os.path.getsize(args.out)} bytes"
    )


if __name__ == "__main__":
    main()
