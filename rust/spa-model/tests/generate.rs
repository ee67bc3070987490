//! Decoding on the real base: seeded sampling, greedy equivalences, beam search against greedy
//! on its own objective, stop tokens, parameter validation, and the one-process SPA decoder
//! (base + projection + side + gate + device head).

mod common;
use spa_model::generate::Sampler;
use spa_model::{
    argmax, generate, BaseModel, Decoder, DeviceHead, DownProjection, GateMode, GenerateParams,
    QuantMode, Sampling, SideNetwork, SidePlugin, SpaDecoder, SpaError,
};

fn ids(text: &str) -> Vec<u32> {
    common::base().tokenizer().encode(text).unwrap()
}

fn params(max_tokens: usize, sampling: Sampling) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling,
        stop_tokens: Vec::new(),
    }
}

fn sample(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> Sampling {
    Sampling::Sample {
        temperature,
        top_k,
        top_p,
        seed,
    }
}

fn greedy(prompt: &[u32], n: usize) -> Vec<u32> {
    let base = common::base();
    generate(
        &mut base.decoder(),
        prompt,
        &GenerateParams::greedy(n),
        |_| true,
    )
    .unwrap()
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// log P(tokens | prompt) by teacher forcing through a fresh decoder.
fn seq_logprob(base: &BaseModel, prompt: &[u32], tokens: &[u32]) -> f64 {
    let mut dec = base.decoder();
    let mut logits = dec.feed(prompt).unwrap();
    let mut lp = 0.0;
    for (i, &t) in tokens.iter().enumerate() {
        lp += log_softmax(&logits)[t as usize];
        if i + 1 < tokens.len() {
            logits = dec.feed(&[t]).unwrap();
        }
    }
    lp
}

#[test]
fn seeded_sampling_is_reproducible() {
    let base = common::base();
    let prompt = ids("Once upon a time");
    let run = |seed| {
        let out = generate(
            &mut base.decoder(),
            &prompt,
            &params(20, sample(1.0, None, None, seed)),
            |_| true,
        )
        .unwrap();
        assert_eq!(out.len(), 20);
        out
    };
    let a = run(7);
    let b = run(7);
    let c = run(8);
    eprintln!(
        "seed 7: {:?}\nseed 8: {:?}",
        base.tokenizer().decode(&a).unwrap(),
        base.tokenizer().decode(&c).unwrap()
    );
    assert_eq!(a, b, "same seed, same output");
    assert_ne!(a, c, "different seeds should give different samples");
    // At temperature 1 over 20 tokens the sample is (very likely) not the greedy path.
    assert_ne!(a, greedy(&prompt, 20));
}

#[test]
fn top_k_1_and_tiny_top_p_sampling_equal_greedy() {
    let prompt = ids("The quick brown fox");
    let want = greedy(&prompt, 12);
    let base = common::base();
    for (what, s) in [
        ("top_k 1", sample(1.0, Some(1), None, 3)),
        ("top_k 1, hot", sample(5.0, Some(1), None, 4)),
        ("top_p 1e-4", sample(1.0, None, Some(1e-4), 5)),
    ] {
        let out = generate(&mut base.decoder(), &prompt, &params(12, s), |_| true).unwrap();
        assert_eq!(out, want, "{what}");
    }
}

/// The sampler's distribution and draws, on synthetic logits (no model).
#[test]
fn sampler_distribution_and_frequencies() {
    let logits = [2.0f32, 1.0, 0.0, -1.0, f32::NEG_INFINITY, f32::NAN];
    let softmax = |xs: &[f32]| {
        let e: Vec<f64> = xs.iter().map(|&x| (x as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect::<Vec<_>>()
    };
    let p = softmax(&logits[..4]);
    let s = Sampler::new(sample(1.0, None, None, 0));
    let d = s.distribution(&logits);
    assert_eq!(d.len(), 4, "non-finite logits are never sampled");
    for (i, (id, q)) in d.iter().enumerate() {
        assert_eq!(*id, i as u32);
        assert!((*q as f64 - p[i]).abs() < 1e-6);
    }
    // Temperature 0.5 == logits * 2.
    let d = Sampler::new(sample(0.5, None, None, 0)).distribution(&logits);
    let p2 = softmax(&[4.0, 2.0, 0.0, -2.0]);
    for (i, (_, q)) in d.iter().enumerate() {
        assert!((*q as f64 - p2[i]).abs() < 1e-6);
    }
    // top_k 2 renormalises the two best.
    let d = Sampler::new(sample(1.0, Some(2), None, 0)).distribution(&logits);
    assert_eq!(d.len(), 2);
    assert!((d[0].1 as f64 - p[0] / (p[0] + p[1])).abs() < 1e-6);
    // top_p: p = [0.644, 0.237, 0.087, 0.032]; 0.75 needs the first two, 0.9 the first three.
    let d = Sampler::new(sample(1.0, None, Some(0.75), 0)).distribution(&logits);
    assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
    let d = Sampler::new(sample(1.0, None, Some(0.9), 0)).distribution(&logits);
    assert_eq!(d.len(), 3);
    // Draw frequencies follow the distribution.
    let mut s = Sampler::new(sample(1.0, None, None, 42));
    let n = 20_000;
    let mut counts = [0usize; 6];
    for _ in 0..n {
        counts[s.sample(&logits).unwrap() as usize] += 1;
    }
    assert_eq!(counts[4] + counts[5], 0);
    for i in 0..4 {
        let f = counts[i] as f64 / n as f64;
        assert!(
            (f - p[i]).abs() < 0.015,
            "id {i}: frequency {f} vs p {}",
            p[i]
        );
    }
    // Greedy picks the argmax.
    let mut g = Sampler::new(Sampling::Greedy);
    assert_eq!(g.sample(&[0.1, 3.0, 2.9]).unwrap(), 1);
}

#[test]
fn beam_search_is_not_worse_than_greedy() {
    let base = common::base();
    let prompt = ids("The capital of France is");
    let n = 6;
    let g = greedy(&prompt, n);
    let beam = generate(
        &mut base.decoder(),
        &prompt,
        &params(
            n,
            Sampling::Beam {
                width: 3,
                length_penalty: 1.0,
            },
        ),
        |_| true,
    )
    .unwrap();
    let text = base.tokenizer().decode(&beam).unwrap();
    assert!(!text.trim().is_empty());
    assert_eq!(
        beam.len(),
        n,
        "no stop tokens: every beam has max_tokens tokens"
    );
    let (lb, lg) = (
        seq_logprob(base, &prompt, &beam),
        seq_logprob(base, &prompt, &g),
    );
    eprintln!(
        "greedy {:?} log p = {lg:.4}; beam(3) {text:?} log p = {lb:.4}",
        base.tokenizer().decode(&g).unwrap()
    );
    // Beam search keeps the 3 best prefixes at each step; at equal lengths its result should
    // score at least as well as greedy under the model (not a theorem for every prompt: the
    // greedy prefix can be pruned, but it holds here and any regression would show).
    assert!(lb >= lg - 1e-4, "beam {lb} < greedy {lg}");

    // Width 1 is exactly greedy.
    let beam1 = generate(
        &mut base.decoder(),
        &prompt,
        &params(
            n,
            Sampling::Beam {
                width: 1,
                length_penalty: 1.0,
            },
        ),
        |_| true,
    )
    .unwrap();
    assert_eq!(beam1, g);
}

#[test]
fn stop_tokens_and_callback_end_generation() {
    let base = common::base();
    let prompt = ids("The capital of France is");
    let g = greedy(&prompt, 3);
    assert_eq!(g.len(), 3);
    let with_stop = |stop: Vec<u32>| {
        let p = GenerateParams {
            stop_tokens: stop,
            ..GenerateParams::greedy(8)
        };
        generate(&mut base.decoder(), &prompt, &p, |_| true).unwrap()
    };
    // The id greedy produces at step 2 as a stop token: one token comes out.
    assert_eq!(with_stop(vec![g[1]]), vec![g[0]]);
    // Stopping on the very first token: nothing comes out.
    assert_eq!(with_stop(vec![g[0]]), Vec::<u32>::new());
    // Beam search honours stop tokens too.
    let p = GenerateParams {
        stop_tokens: vec![g[1]],
        ..params(
            8,
            Sampling::Beam {
                width: 1,
                length_penalty: 1.0,
            },
        )
    };
    assert_eq!(
        generate(&mut base.decoder(), &prompt, &p, |_| true).unwrap(),
        vec![g[0]]
    );
    // The callback can stop generation after the first token.
    let mut seen = Vec::new();
    let out = generate(
        &mut base.decoder(),
        &prompt,
        &GenerateParams::greedy(8),
        |t| {
            seen.push(t);
            false
        },
    )
    .unwrap();
    assert_eq!((out, seen), (vec![g[0]], vec![g[0]]));
}

#[test]
fn invalid_parameters_are_rejected() {
    let base = common::base();
    let prompt = ids("Hello");
    let bad = [
        ("temperature 0", params(4, sample(0.0, None, None, 1))),
        ("temperature < 0", params(4, sample(-1.0, None, None, 1))),
        (
            "temperature NaN",
            params(4, sample(f32::NAN, None, None, 1)),
        ),
        ("top_p 1.5", params(4, sample(1.0, None, Some(1.5), 1))),
        ("top_p 0", params(4, sample(1.0, None, Some(0.0), 1))),
        ("top_k 0", params(4, sample(1.0, Some(0), None, 1))),
        (
            "beam width 0",
            params(
                4,
                Sampling::Beam {
                    width: 0,
                    length_penalty: 1.0,
                },
            ),
        ),
    ];
    for (what, p) in bad {
        assert!(
            matches!(p.validate(), Err(SpaError::InvalidConfig(_))),
            "{what}"
        );
        let mut dec = base.decoder();
        assert!(
            matches!(
                generate(&mut dec, &prompt, &p, |_| true),
                Err(SpaError::InvalidConfig(_))
            ),
            "{what}"
        );
        assert_eq!(dec.position(), 0, "{what}: nothing was run");
    }
    assert!(matches!(
        generate(&mut base.decoder(), &[], &GenerateParams::greedy(4), |_| {
            true
        }),
        Err(SpaError::InvalidConfig(_))
    ));
    params(4, sample(1.0, Some(40), Some(0.9), 1))
        .validate()
        .unwrap();
}

/// Side components for the SPA decoder tests.
struct Spa {
    proj: DownProjection,
    head: DeviceHead,
}

fn spa_parts() -> Spa {
    let base = common::base();
    let taps: Vec<usize> = (0..base.config().n_layers).collect();
    Spa {
        proj: DownProjection::random(base, 64, &taps, 1).unwrap(),
        head: DeviceHead::from_base(base, QuantMode::Q8).unwrap(),
    }
}

fn side_net(parts: &Spa, up_scale: f32, gate_bias: Option<[f32; 2]>) -> SideNetwork {
    let base = common::base();
    let mut plugin = SidePlugin::init(base, &parts.proj, 1, up_scale).unwrap();
    if let Some(b) = gate_bias {
        plugin.weights.tensors.get_mut("gate.bias").unwrap().data = b.to_vec();
    }
    SideNetwork::new(&plugin.weights, QuantMode::Q8, 256).unwrap()
}

#[test]
fn spa_decoder_gate_modes() {
    let base = common::base();
    let parts = spa_parts();
    let prompt = ids("Once upon a time, there was a little girl who");
    let n = 8;
    let want = greedy(&prompt, n);
    let run = |net: &SideNetwork, gate: GateMode| {
        let mut dec = SpaDecoder::new(base, &parts.proj, net, &parts.head, gate).unwrap();
        let out = generate(&mut dec, &prompt, &GenerateParams::greedy(n), |_| true).unwrap();
        assert_eq!(out.len(), n);
        // One decision per feed: the prompt, then every generated token but the last.
        assert_eq!(dec.counters.positions, n);
        assert_eq!(dec.position(), prompt.len() + n - 1);
        (out, dec.counters.clone())
    };
    let random = side_net(&parts, 1.0, None);
    let zero_up = side_net(&parts, 0.0, None);

    // Base path only: exactly the base's greedy tokens.
    let (out, c) = run(&random, GateMode::AlwaysBase);
    assert_eq!(out, want, "AlwaysBase");
    assert_eq!((c.side, c.overrides), (0, 0));

    // Side path with a zero up-projection: the side hidden is the base hidden.
    let (out, c) = run(&zero_up, GateMode::AlwaysSide);
    assert_eq!(out, want, "AlwaysSide with up_scale 0");
    assert_eq!((c.side, c.overrides), (n, 0));

    // A random, non-zero side on every position.
    let (out, c) = run(&random, GateMode::AlwaysSide);
    eprintln!(
        "random side (up_scale 1): {:?}, counters {c:?}",
        base.tokenizer().decode(&out).unwrap()
    );
    assert_eq!(c.side, c.positions);
    assert!(
        c.overrides > 0,
        "a random side should override the base somewhere"
    );
    assert_ne!(out, want);

    // Learned gate: the gate bias decides (p_side = sigmoid(b1 - b0 + ...)).
    let always = side_net(&parts, 1.0, Some([-30.0, 30.0]));
    let (_, c) = run(&always, GateMode::Learned);
    assert_eq!(c.side, n, "gate biased to the side");
    let never = side_net(&parts, 1.0, Some([30.0, -30.0]));
    let (out, c) = run(&never, GateMode::Learned);
    assert_eq!(c.side, 0, "gate biased to the base");
    assert_eq!(out, want);

    // Side and projection must agree.
    let other = DownProjection::random(base, 32, &[29], 1).unwrap();
    assert!(matches!(
        SpaDecoder::new(base, &other, &random, &parts.head, GateMode::Learned),
        Err(SpaError::InvalidConfig(_))
    ));
}

#[test]
fn spa_decoder_fork_and_truncate() {
    let base = common::base();
    let parts = spa_parts();
    let net = side_net(&parts, 1.0, None);
    let prompt = ids("The harbour master said");
    let (x, y, z) = (ids(" yes")[0], ids(" no")[0], ids(" again")[0]);
    let new =
        || SpaDecoder::new(base, &parts.proj, &net, &parts.head, GateMode::AlwaysSide).unwrap();
    let fresh = |tail: &[u32]| {
        let mut d = new();
        let mut l = d.feed(&prompt).unwrap();
        for &t in tail {
            l = d.feed(&[t]).unwrap();
        }
        l
    };
    let close = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(u, v)| (u - v).abs())
            .fold(0f32, f32::max)
            < 1e-3
    };

    let mut a = new();
    a.feed(&prompt).unwrap();
    let mut b = a.fork().unwrap();
    // Interleaved writes at the same position: a deep fork keeps them apart.
    let ly = a.feed(&[y]).unwrap();
    let lx = b.feed(&[x]).unwrap();
    let lz = a.feed(&[z]).unwrap();
    assert!(close(&ly, &fresh(&[y])));
    assert!(close(&lx, &fresh(&[x])));
    assert!(close(&lz, &fresh(&[y, z])));
    assert_ne!(argmax(&lx), None);
    // Rolling back and taking the other branch equals the fork's branch.
    a.truncate(prompt.len());
    assert_eq!(a.position(), prompt.len());
    let lx2 = a.feed(&[x]).unwrap();
    assert!(close(&lx2, &lx));
    assert_eq!(b.position(), prompt.len() + 1);
}
