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
