//! Batched forward passes (several sessions in one call) equal separate forward passes.

mod common;

#[test]
fn forward_batch_equals_separate_forwards() {
    let base = common::base();
    let tok = base.tokenizer();
    let a = tok.encode("The capital of France is").unwrap();
    let b = tok
        .encode("Once upon a time, there was a little girl who")
        .unwrap();
    // Separate: a prefill each, then one decode token each.
    let (mut ca, mut cb) = (base.new_cache(), base.new_cache());
    let ra = base.forward(&a, &mut ca).unwrap();
    let rb = base.forward(&b, &mut cb).unwrap();
    let ra2 = base.forward(&[7042], &mut ca).unwrap();
    let rb2 = base.forward(&[5732], &mut cb).unwrap();
    // Batched, with the sequences at different positions and lengths.
    let (mut da, mut db) = (base.new_cache(), base.new_cache());
    let outs = base
        .forward_batch(&mut [(&a[..], &mut da), (&b[..], &mut db)])
        .unwrap();
    let outs2 = base
        .forward_batch(&mut [(&[7042u32][..], &mut da), (&[5732u32][..], &mut db)])
        .unwrap();
    assert_eq!((da.len(), db.len()), (ca.len(), cb.len()));
    let close = |x: &candle_core::Tensor, y: &candle_core::Tensor| {
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-3, "max diff {d}");
    };
    for (sep, bat) in [
        (&ra, &outs[0]),
        (&rb, &outs[1]),
        (&ra2, &outs2[0]),
        (&rb2, &outs2[1]),
    ] {
        close(&sep.hidden, &bat.hidden);
        close(&sep.taps[0], &bat.taps[0]);
        close(&sep.taps[29], &bat.taps[29]);
    }
    // An invalid job is refused without touching the others' caches.
    let mut dc = base.new_cache();
    assert!(base
        .forward_batch(&mut [(&[1_000_000u32][..], &mut dc)])
        .is_err());
    assert_eq!(dc.len(), 0);
}

/// The forward pass is batch-invariant: a prompt prefilled in one call gives bit-identical
/// states to the same tokens fed one at a time, and to the same call batched with another
/// session. Re-prefilling an evicted session therefore continues with exactly the same tokens.
#[test]
fn prefill_is_bit_identical_to_incremental_decoding() {
    let base = common::base();
    let ids = base
        .tokenizer()
        .encode("The harbour master walked slowly along the quay, writing each name")
        .unwrap();
    let mut full = base.new_cache();
    let a = base.forward(&ids, &mut full).unwrap();
    let mut inc = base.new_cache();
    let mut last = None;
    for &t in &ids {
        last = Some(base.forward(&[t], &mut inc).unwrap());
    }
    let b = last.unwrap();
    let n = ids.len();
    let row = |t: &candle_core::Tensor, i: usize| t.get(i).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        row(&a.hidden, n - 1),
        row(&b.hidden, 0),
        "final hidden state"
    );
    for l in [0, 14, 29] {
        assert_eq!(row(&a.taps[l], n - 1), row(&b.taps[l], 0), "tap {l}");
    }
    // Batched with another sequence: still identical.
    let other = base
        .tokenizer()
        .encode("Photosynthesis is the process")
        .unwrap();
    let (mut c1, mut c2) = (base.new_cache(), base.new_cache());
    let outs = base
        .forward_batch(&mut [(&other[..], &mut c1), (&ids[..], &mut c2)])
        .unwrap();
    assert_eq!(row(&outs[1].hidden, n - 1), row(&a.hidden, n - 1));
}

/// The fast forward of the offline feature pass (matrix attention, dense f32 products) equals
/// the batch-invariant forward up to float rounding: on a prompt prefilled from an empty cache and on a chunk
/// appended after a cached prefix, every tap and the final state agree within 1e-3 (relative to
/// the largest magnitude), and the LM head's argmax agrees at every position.
#[test]
fn fast_forward_matches_batch_invariant_forward() {
    use spa_model::ForwardMode;
    let base = common::base();
    let ids = base
        .tokenizer()
        .encode(
            "The harbour master walked slowly along the quay, writing each name in his book, \
             while the gulls circled the masts and the tide came in over the stones.",
        )
        .unwrap();
    let split = ids.len() / 3;
    let run = |mode: ForwardMode| {
        let mut cache = base.new_cache();
        let first = base.forward_with(&ids[..split], &mut cache, mode).unwrap();
        let rest = base.forward_with(&ids[split..], &mut cache, mode).unwrap();
        (first, rest)
    };
    let (r1, r2) = run(ForwardMode::BatchInvariant);
    let (m1, m2) = run(ForwardMode::Fast);
    let rel = |x: &candle_core::Tensor, y: &candle_core::Tensor| {
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let m = x
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        d / m.max(1e-6)
    };
    for (r, m) in [(&r1, &m1), (&r2, &m2)] {
        for l in 0..r.taps.len() {
            let e = rel(&r.taps[l], &m.taps[l]);
            assert!(e < 1e-3, "tap {l}: relative difference {e}");
        }
        assert!(rel(&r.hidden, &m.hidden) < 1e-3);
        let a: Vec<Vec<f32>> = base.logits(&r.hidden).unwrap().to_vec2().unwrap();
        let b: Vec<Vec<f32>> = base.logits_fast(&m.hidden).unwrap().to_vec2().unwrap();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(spa_model::argmax(x), spa_model::argmax(y), "position {i}");
        }
    }
}
