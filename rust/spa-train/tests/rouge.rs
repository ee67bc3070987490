//! ROUGE-L against the Python `rouge-score` package (0.1.2) and NLTK's Porter stemmer.
//!
//! The fixture is written by `scripts/reference/rouge_fixtures.py` from BIG-bench XSum text and
//! hand-written edge cases; every value in it was computed by the Python packages.

use serde::Deserialize;
use spa_train::rouge::{corpus_mean, porter_stem, rouge_l, tokenize, RougeScore};

#[derive(Deserialize)]
struct Pair {
    kind: String,
    reference: String,
    candidate: String,
    precision: f64,
    recall: f64,
    f1: f64,
}

#[derive(Deserialize)]
struct TokenizeCase {
    text: String,
    tokens: Vec<String>,
}

#[derive(Deserialize)]
struct Fixture {
    rouge_score_version: String,
    pairs: Vec<Pair>,
    corpus_mean: RougeScore,
    tokenize: Vec<TokenizeCase>,
    stems: Vec<(String, String)>,
}

/// The package's values are reproduced exactly (same integer LCS, same f64 operations); the
/// tolerance only absorbs JSON float printing.
const TOL: f64 = 1e-12;

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rouge_fixtures.json"
    );
    let text = std::fs::read_to_string(path).expect("read rouge fixture");
    serde_json::from_str(&text).expect("parse rouge fixture")
}

#[test]
fn rouge_l_matches_rouge_score_on_all_pairs() {
    let fx = fixture();
    assert_eq!(fx.rouge_score_version, "0.1.2");
    assert!(fx.pairs.len() >= 300, "only {} pairs", fx.pairs.len());
    let mut failures = Vec::new();
    let mut nonzero = 0;
    for (i, p) in fx.pairs.iter().enumerate() {
        let s = rouge_l(&p.reference, &p.candidate);
        if s.f1 > 0.0 && s.f1 < 1.0 {
            nonzero += 1;
        }
        let ok = (s.precision - p.precision).abs() < TOL
            && (s.recall - p.recall).abs() < TOL
            && (s.f1 - p.f1).abs() < TOL;
        if !ok {
            failures.push(format!(
                "#{i} ({}) ref={:?} cand={:?}: rust {:?} vs python P={} R={} F={}",
                p.kind, p.reference, p.candidate, s, p.precision, p.recall, p.f1
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The fixture exercises partial matches, not only 0 and 1.
    assert!(nonzero >= 250, "only {nonzero} pairs with 0 < F1 < 1");
}

#[test]
fn every_pairing_kind_is_present() {
    let fx = fixture();
    for kind in [
        "edge",
        "other_target",
        "shuffled",
        "truncated",
        "edited",
        "input_first_sentence",
        "input_lead3_as_reference",
    ] {
        assert!(
            fx.pairs.iter().filter(|p| p.kind == kind).count() >= 30,
            "kind {kind}"
        );
    }
}

#[test]
fn corpus_mean_matches_python_mean() {
    let fx = fixture();
    let scores: Vec<RougeScore> = fx
        .pairs
        .iter()
        .map(|p| rouge_l(&p.reference, &p.candidate))
        .collect();
    let mean = corpus_mean(&scores).expect("non-empty corpus");
    assert!((mean.precision - fx.corpus_mean.precision).abs() < TOL);
    assert!((mean.recall - fx.corpus_mean.recall).abs() < TOL);
    assert!((mean.f1 - fx.corpus_mean.f1).abs() < TOL);
    let pairs = fx
        .pairs
        .iter()
        .map(|p| (p.reference.as_str(), p.candidate.as_str()));
    assert_eq!(spa_train::rouge::rouge_l_corpus(pairs), Some(mean));
}

#[test]
fn tokenize_matches_rouge_score_tokenizer() {
    let fx = fixture();
    assert!(fx.tokenize.len() >= 80);
    for case in &fx.tokenize {
        assert_eq!(tokenize(&case.text), case.tokens, "text {:?}", case.text);
    }
}

#[test]
fn porter_stem_matches_nltk_on_word_list() {
    let fx = fixture();
    assert!(fx.stems.len() >= 2000, "only {} words", fx.stems.len());
    let changed = fx.stems.iter().filter(|(w, s)| w != s).count();
    assert!(
        changed >= 500,
        "only {changed} words changed by the stemmer"
    );
    let failures: Vec<String> = fx
        .stems
        .iter()
        .filter_map(|(word, expected)| {
            let got = porter_stem(word);
            (&got != expected).then(|| format!("{word:?}: rust {got:?}, nltk {expected:?}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn argument_order_is_reference_then_candidate() {
    // Precision is over the candidate, recall over the reference.
    let s = rouge_l("a b c d", "a b");
    assert_eq!((s.precision, s.recall), (1.0, 0.5));
}
