//! Next-word suggestions over the real protocol: the real SmolLM2 base behind a TLS server on
//! loopback, the device's side network and gate on the client.

mod common;

use spa_model::GateMode;
use spa_runtime::{suggest, RuntimeError};

/// The base's own answer: its top-64 next tokens after `context`, as whole words starting with
/// `partial`, best first (what the strip must show with the side path off).
fn reference_words(context: &str, partial: &str, count: usize) -> Vec<String> {
    let w = common::world();
    let tok = w.base.tokenizer();
    let ids = tok.encode_fragment(context).unwrap();
    let mut cache = w.base.new_cache();
    let out = w.base.forward(&ids, &mut cache).unwrap();
    let last = out.hidden.narrow(0, ids.len() - 1, 1).unwrap();
    let logits: Vec<f32> = w
        .base
        .logits(&last)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut words = Vec::new();
    for id in spa_model::top_k(&logits, 64) {
        let s = tok.decode(&[id]).unwrap();
        let Some(word) = s.strip_prefix(' ') else {
            continue;
        };
        if !word.is_empty()
            && word.chars().all(|c| c.is_alphabetic() || c == '\'')
            && word.starts_with(partial)
            && !words.iter().any(|x| x == word)
        {
            words.push(word.to_string());
        }
        if words.len() == count {
            break;
        }
    }
    words
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suggestions_follow_the_base_and_the_side_network() {
    let (srv, _state) = common::start_server(common::server_config()).await;
    let client = common::client(&srv.url(), common::KEY);
    let base_only = common::device(GateMode::AlwaysBase, &[]);
    let learned = common::device(GateMode::Learned, &[]);
    let side_only = common::device(GateMode::AlwaysSide, &[]);

    let contexts = [
        ("The capital of France is ", "The capital of France is", ""),
        (
            "I went to the store to buy some ",
            "I went to the store to buy some",
            "",
        ),
        (
            "The capital of France is P",
            "The capital of France is",
            "P",
        ),
        (
            "I went to the store to buy some f",
            "I went to the store to buy some",
            "f",
        ),
    ];
    let mut differ = 0;
    for (text, context, partial) in contexts {
        let want = reference_words(context, partial, 3);
        let got = suggest(&client, &base_only, text, 3).await.unwrap();
        eprintln!("{text:?}: base {:?}", got.words);
        assert_eq!(got.words, want, "{text:?}");
        assert_eq!(got.partial, partial);
        assert!(!got.side);
        assert!(!want.is_empty(), "{text:?}: the base suggests nothing");

        let spa = suggest(&client, &learned, text, 3).await.unwrap();
        let side = suggest(&client, &side_only, text, 3).await.unwrap();
        eprintln!(
            "{text:?}: gate {:?} (p_side {:.2}), side only {:?}",
            spa.words, spa.p_side, side.words
        );
        assert!(side.side && side.words.iter().all(|w| w.starts_with(partial)));
        assert_eq!(spa.side, spa.p_side > 0.5);
        assert!((0.0..=1.0).contains(&spa.p_side));
        // Every suggestion is one of the base's top-64 candidates.
        let pool = reference_words(context, partial, 64);
        for w in spa.words.iter().chain(&side.words) {
            assert!(
                pool.contains(w),
                "{w:?} is not a base candidate after {text:?}"
            );
        }
        differ += usize::from(side.words != got.words);
    }
    assert!(differ > 0, "the side network changed no suggestion");

    // An empty field asks for a first word; a long text keeps its last 256 tokens.
    let first = suggest(&client, &learned, "", 3).await.unwrap();
    assert_eq!(first.context_tokens, 1);
    assert!(!first.words.is_empty());
    let long = "the sea and the ship and the whale ".repeat(60);
    let s = suggest(&client, &learned, &long, 3).await.unwrap();
    assert_eq!(s.context_tokens, spa_runtime::suggest::SUGGEST_MAX_CONTEXT);
    assert_eq!(s.words.len(), 3);

    // A wrong key is a typed error.
    let bad = common::client(&srv.url(), "wrong-key");
    assert!(matches!(
        suggest(&bad, &learned, "Hello ", 3).await,
        Err(RuntimeError::Unauthorized)
    ));
    srv.shutdown().await;
}
