//! Next-word suggestions over the real protocol: the real SmolLM2 base behind a TLS server on
//! loopback, the device's side network, gate and full-vocabulary head on the client.

mod common;

use spa_model::GateMode;
use spa_protocol::{decode_tensor, FeaturesRequest, Limits};
use spa_runtime::{suggest, RuntimeError, Suggester};
use std::sync::atomic::Ordering::Relaxed;

/// The f32 base's next-token distribution after `ids` (a fresh forward pass).
fn base_probs(ids: &[u32]) -> Vec<f32> {
    let w = common::world();
    let mut cache = w.base.new_cache();
    let out = w.base.forward(ids, &mut cache).unwrap();
    let last = out.hidden.narrow(0, ids.len() - 1, 1).unwrap();
    let logits: Vec<f32> = w
        .base
        .logits(&last)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    spa_model::softmax(&logits)
}

/// The strip's rule computed independently in f32 (f32 head, f32 hidden states, a fresh
/// forward pass per continuation): every one-token word by its probability, except that the
/// base's 8 most likely word-start tokens keep only the mass of the word ending there and give
/// `P(first) P(piece | first)` to their 16 most likely word pieces. Whole words starting with
/// `partial`, best first.
fn reference_words(context: &str, partial: &str, count: usize) -> Vec<String> {
    let w = common::world();
    let tok = w.base.tokenizer();
    let ids = tok.encode_fragment(context).unwrap();
    let p = base_probs(&ids);
    let mut score: std::collections::HashMap<String, f32> = Default::default();
    let mut starts: Vec<u32> = Vec::new();
    for id in 0..p.len() as u32 {
        if let Some(word) = tok.whole_word(id) {
            score.entry(word).or_insert(p[id as usize]);
            starts.push(id);
        }
    }
    starts.sort_by(|a, b| p[*b as usize].total_cmp(&p[*a as usize]));
    for &first in &starts[..spa_runtime::words::CONTINUATIONS] {
        let word = tok.whole_word(first).unwrap();
        let mut ext = ids.clone();
        ext.push(first);
        let p2 = base_probs(&ext);
        let (mut goes_on, mut pieces) = (0f32, Vec::new());
        for (id, &q) in p2.iter().enumerate() {
            let text = tok.decode(&[id as u32]).unwrap();
            if !text.starts_with(' ') && text.starts_with(|c: char| c.is_alphabetic() || c == '\'')
            {
                goes_on += q;
                if text.chars().all(char::is_alphabetic) && tok.whole_word(id as u32).is_none() {
                    pieces.push((text, q));
                }
            }
        }
        *score.get_mut(&word).unwrap() = p[first as usize] * (1.0 - goes_on);
        pieces.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (piece, q) in pieces
            .into_iter()
            .take(spa_runtime::words::CONTINUATION_PIECES)
        {
            *score.entry(format!("{word}{piece}")).or_insert(0.0) += p[first as usize] * q;
        }
    }
    let mut ranked: Vec<(String, f32)> = score
        .into_iter()
        .filter(|(w, _)| w.starts_with(partial))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked.into_iter().take(count).map(|(w, _)| w).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suggestions_rank_the_whole_vocabulary_and_follow_the_side_network() {
    let (srv, state) = common::start_server(common::server_config()).await;
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
        // The strip (q8 head, int8 hidden states) agrees with the f32 rule on the best word
        // and shows only words of its top ten.
        let want = reference_words(context, partial, 10);
        let got = suggest(&client, &base_only, text, 3).await.unwrap();
        eprintln!("{text:?}: base {:?} (f32 reference {want:?})", got.words);
        assert_eq!(got.words.len(), 3, "{text:?}");
        assert_eq!(got.words[0], want[0], "{text:?}");
        assert!(got.words.iter().all(|w| want.contains(w)), "{text:?}");
        assert_eq!(got.partial, partial);
        assert!(!got.side && got.requested);

        let spa = suggest(&client, &learned, text, 3).await.unwrap();
        let side = suggest(&client, &side_only, text, 3).await.unwrap();
        eprintln!(
            "{text:?}: gate {:?} (p_side {:.2}), side only {:?}",
            spa.words, spa.p_side, side.words
        );
        assert!(side.side && side.words.iter().all(|w| w.starts_with(partial)));
        assert_eq!(spa.side, spa.p_side > 0.5);
        assert!((0.0..=1.0).contains(&spa.p_side));
        differ += usize::from(side.words != got.words);
    }
    assert!(differ > 0, "the side network changed no suggestion");

    // A typed letter re-ranks the last context's words without a request; a new word asks the
    // server, and the side states kept for the shared prefix give what a fresh strip gives.
    let strip = Suggester::new(&learned);
    let a = strip
        .suggest(&client, &learned, "The capital of France is ", 3)
        .await
        .unwrap();
    let bytes = state.metrics.bytes_in.load(Relaxed);
    let b = strip
        .suggest(&client, &learned, "The capital of France is P", 3)
        .await
        .unwrap();
    assert!(a.requested && !b.requested);
    assert_eq!(
        state.metrics.bytes_in.load(Relaxed),
        bytes,
        "a letter asked the server"
    );
    assert!(!b.words.is_empty() && b.words.iter().all(|w| w.starts_with('P')));
    let longer = "The capital of France is Paris and the capital of Italy is ";
    let c = strip.suggest(&client, &learned, longer, 3).await.unwrap();
    let fresh = suggest(&client, &learned, longer, 3).await.unwrap();
    assert!(c.requested);
    assert_eq!(c.words, fresh.words);
    assert!((c.p_side - fresh.p_side).abs() < 1e-5);

    // An empty field asks for a first word; a long text keeps 129-256 tokens of context.
    let first = suggest(&client, &learned, "", 3).await.unwrap();
    assert_eq!(first.context_tokens, 1);
    assert!(!first.words.is_empty());
    let long = "the sea and the ship and the whale ".repeat(60);
    let s = suggest(&client, &learned, &long, 3).await.unwrap();
    assert!(
        (129..=spa_runtime::suggest::SUGGEST_MAX_CONTEXT).contains(&s.context_tokens),
        "{}",
        s.context_tokens
    );
    assert_eq!(s.words.len(), 3);

    // A wrong key is a typed error.
    let bad = common::client(&srv.url(), "wrong-key");
    assert!(matches!(
        suggest(&bad, &learned, "Hello ", 3).await,
        Err(RuntimeError::Unauthorized)
    ));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_answer_hidden_states_and_taps_from_a_position() {
    let (srv, _state) = common::start_server(common::server_config()).await;
    let client = common::client(&srv.url(), common::KEY);
    let w = common::world();
    let ids = w
        .base
        .tokenizer()
        .encode_fragment("Call me Ishmael. Some years ago")
        .unwrap();
    let n = ids.len();
    let full = client.features(&ids, 4).await.unwrap();
    assert!(full.hidden.is_none());
    let r = client
        .features_with(&FeaturesRequest {
            tokens: ids.clone(),
            top_k: 0,
            hidden_positions: vec![(n - 1) as u32, 2],
            taps_from: (n - 3) as u32,
            ..Default::default()
        })
        .await
        .unwrap();
    // No candidate lists; taps of the last three positions only, equal to those of a full
    // answer; the hidden states of the positions asked for, in that order.
    assert!(r.cand_ids.is_empty() && r.cand_logits.is_empty());
    let lim = Limits::default();
    let taps = decode_tensor(r.taps.as_ref().unwrap(), &lim).unwrap();
    let all = decode_tensor(full.taps.as_ref().unwrap(), &lim).unwrap();
    let n_taps = all.rows / n;
    assert_eq!(taps.rows, 3 * n_taps);
    assert_eq!(taps.data[..], all.data[(n - 3) * n_taps * all.cols..]);
    let hidden = decode_tensor(r.hidden.as_ref().unwrap(), &lim).unwrap();
    let mut cache = w.base.new_cache();
    let want: Vec<Vec<f32>> = w
        .base
        .forward(&ids, &mut cache)
        .unwrap()
        .hidden
        .to_vec2()
        .unwrap();
    assert_eq!((hidden.rows, hidden.cols), (2, want[0].len()));
    for (row, p) in [(0, n - 1), (1, 2)] {
        let amax = want[p].iter().fold(0f32, |m, x| m.max(x.abs()));
        for (a, b) in hidden.row(row).iter().zip(&want[p]) {
            assert!((a - b).abs() <= amax / 127.0, "int8 hidden state off");
        }
    }
    // Continuations: at each position asked, the base's most likely word-start tokens in
    // order, and the hidden state after each equal to a fresh pass over the extended text.
    let tok = w.base.tokenizer();
    let r = client
        .features_with(&FeaturesRequest {
            tokens: ids.clone(),
            continuations: 3,
            continuation_positions: vec![(n - 1) as u32, 2],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.hidden.is_none());
    let ch = decode_tensor(r.cont_hidden.as_ref().unwrap(), &lim).unwrap();
    assert_eq!((r.cont_ids.len(), ch.rows), (6, 6));
    for (k, p) in [(0, n - 1), (1, 2)] {
        let probs = base_probs(&ids[..=p]);
        let mut starts: Vec<u32> = (0..probs.len() as u32)
            .filter(|&t| tok.whole_word(t).is_some())
            .collect();
        starts.sort_by(|a, b| probs[*b as usize].total_cmp(&probs[*a as usize]));
        assert_eq!(r.cont_ids[k * 3..k * 3 + 3], starts[..3], "position {p}");
        for j in 0..3 {
            let mut ext = ids[..=p].to_vec();
            ext.push(r.cont_ids[k * 3 + j]);
            let mut cache = w.base.new_cache();
            let h = w
                .base
                .forward(&ext, &mut cache)
                .unwrap()
                .hidden
                .to_vec2::<f32>()
                .unwrap();
            let want = h.last().unwrap();
            let amax = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (a, b) in ch.row(k * 3 + j).iter().zip(want) {
                assert!((a - b).abs() <= amax / 100.0, "continuation state off");
            }
        }
    }
    // Too many continuations, or a position past the end, are refused.
    assert!(matches!(
        client
            .features_with(&FeaturesRequest {
                tokens: ids.clone(),
                continuations: 17,
                continuation_positions: vec![0],
                ..Default::default()
            })
            .await,
        Err(RuntimeError::Limit(_))
    ));
    // Positions past the end are refused.
    for bad in [
        FeaturesRequest {
            tokens: ids.clone(),
            continuations: 2,
            continuation_positions: vec![n as u32],
            ..Default::default()
        },
        FeaturesRequest {
            tokens: ids.clone(),
            hidden_positions: vec![n as u32],
            ..Default::default()
        },
        FeaturesRequest {
            tokens: ids.clone(),
            taps_from: n as u32,
            ..Default::default()
        },
    ] {
        assert!(matches!(
            client.features_with(&bad).await,
            Err(RuntimeError::BadRequest(_))
        ));
    }
    srv.shutdown().await;
}
