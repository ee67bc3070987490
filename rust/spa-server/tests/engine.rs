//! What the candle engine declares ([`BaseEngine::batch_invariant`]) checked against what it
//! computes on the real SmolLM2 model: a sequence fed in uneven steps, alone, gives bit for bit
//! the states of the same tokens re-prefilled in one step beside another sequence.

mod common;

use spa_server::{BaseEngine, CandleEngine, EngineOutput};

/// Every tap (per layer) and the final state of `outs`, concatenated over the rows (positions).
fn rows(outs: &[EngineOutput]) -> (Vec<Vec<f32>>, Vec<f32>) {
    let layers = outs[0].base.taps.len();
    let taps = (0..layers)
        .map(|l| {
            outs.iter()
                .flat_map(|o| o.base.taps[l].to_vec2::<f32>().unwrap().concat())
                .collect()
        })
        .collect();
    let hidden = outs
        .iter()
        .flat_map(|o| o.base.hidden.to_vec2::<f32>().unwrap().concat())
        .collect();
    (taps, hidden)
}

#[test]
fn candle_declares_batch_invariance_and_keeps_it() {
    let base = common::world().base.clone();
    let e = CandleEngine::new(base.clone());
    assert!(e.batch_invariant());
    let tok = |s: &str| base.tokenizer().encode(s).unwrap();
    let text =
        tok("The sea was calm that morning, and the old harbour lay quiet under a pale sky. Gulls");
    assert!(text.len() >= 20, "{} tokens", text.len());

    // Alone: a prompt, then rounds of 1, 5, 2 tokens and the rest, as a session's steps are.
    let mut alone = e.new_sequence().unwrap();
    let mut steps = Vec::new();
    let mut at = 0;
    for n in [8, 1, 5, 2, text.len() - 16] {
        steps.push(e.forward(&text[at..at + n], alone.as_mut()).unwrap());
        at += n;
    }
    assert_eq!(alone.len(), text.len());

    // A re-prefill: the same tokens in one step, in a batch with another sequence that
    // already holds cells (so the cache and the batch differ from the lone run).
    let mut other = e.new_sequence().unwrap();
    e.forward(&tok("def fibonacci(n):"), other.as_mut())
        .unwrap();
    let mut again = e.new_sequence().unwrap();
    let next = tok(" return n");
    let mut jobs: Vec<(&[u32], &mut (dyn spa_server::Sequence + 'static))> =
        vec![(&next, other.as_mut()), (&text, again.as_mut())];
    let outs = e.forward_batch(&mut jobs).unwrap();
    let once = outs.into_iter().nth(1).unwrap();

    let (taps_a, hidden_a) = rows(&steps);
    let (taps_b, hidden_b) = rows(std::slice::from_ref(&once));
    assert_eq!(taps_a.len(), base.config().n_layers);
    for (l, (a, b)) in taps_a.iter().zip(&taps_b).enumerate() {
        assert!(a == b, "layer {l}: taps differ between steps and one batch");
    }
    assert!(hidden_a == hidden_b, "final states differ");
    assert_eq!(hidden_a.len(), text.len() * base.config().hidden);
}
