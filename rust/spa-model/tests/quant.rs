//! Quantized device components (side network + LM head in q8_0 / q4_0) against the f32
//! reference over 1,024 positions of real English text run through the real base, and the
//! candidate shortlist (base top-64 + personal vocabulary) against the full head.
//!
//! Findings (SmolLM2-135M, see the assertions for the numbers):
//! - q8_0 head: re-quantizing the GGUF's Q8_0 embedding is lossless; its whole error comes from
//!   candle's q8_0 x q8_0 dot product quantizing the *activations* (the final hidden state has
//!   outliers up to |x| ~ 42), argmax agreement with f32 ~0.99.
//! - q4_0 head: 4-bit weights lose a lot (argmax agreement ~0.76 on the base's own hidden
//!   states): keep the head in q8_0 on the device even when the side blocks are q4_0.

mod common;
use candle_core::{Device, Tensor};
use spa_model::{
    argmax, top_k, DeviceHead, DownProjection, PersonalVocab, QuantMode, SideNetwork, SidePlugin,
    SideStep,
};
use std::sync::OnceLock;
use std::time::Instant;

/// Plain English written for this test (no third-party text).
const TEXT: &str = "\
The sea has always been a road as much as a barrier. Long before there were maps of any \
accuracy, people living along the coast learned to read the colour of the water, the shape of \
the clouds and the flight of birds, and they used what they learned to guess where land might \
lie beyond the horizon. A small boat with a patched sail could carry a family, a few goats and a \
basket of seed grain to an island that no one in their village had ever seen. Many of those \
journeys ended in failure, but enough of them succeeded that almost every habitable island in \
the world was eventually reached by sailors in open boats.

Shipbuilding grew out of that long habit of risk. The first hulls were hollowed logs or frames \
of wood covered with hides, light enough to drag onto a beach at night. Later builders learned \
to fit planks edge to edge and to fasten them with wooden pegs, and later still they raised a \
keel and ribs first and nailed the planks to that skeleton. Each change made ships larger and \
stronger, and each larger ship needed a bigger crew, more food, more fresh water and a deeper \
harbour. Towns grew up around the best anchorages, and the merchants who lived there became \
rich by moving grain, wine, timber, salt and cloth from places where these things were cheap to \
places where they were scarce.

Life on board a sailing ship was hard and often dull. The crew worked in watches of four hours, \
day and night, so that someone was always at the helm and someone was always looking out for \
rocks, shoals and other vessels. Between storms there were long days of mending ropes, scraping \
the deck, pumping out the water that leaked through the seams and hauling on lines whenever the \
wind shifted. The food was salted meat, hard biscuit, dried peas and whatever fish could be \
caught over the side. When the weather turned bad, everyone was called on deck to take in sail, \
and men climbed high into the rigging while the masts swung through the sky like the arms of a \
clock that had gone mad.

Navigation was a matter of patience and arithmetic. A navigator who could not see the coast \
estimated the ship's position by keeping careful track of its speed, its heading and the time \
that had passed. Speed was measured by throwing a log over the stern on a line with knots tied \
at regular intervals and counting how many knots ran out while a small sand glass emptied. The \
heading came from the compass, and the time from the ship's bell, which was struck every half \
hour. At noon on a clear day the navigator measured the height of the sun above the horizon to \
find the latitude, but for centuries there was no reliable way to find the longitude, and many \
ships were lost because their officers believed they were far from land when they were not.

The problem of longitude was finally solved by a clock. If a ship carried a timepiece that kept \
the time of its home port accurately for months, the navigator could compare that time with \
the local time found from the sun and work out how far east or west the ship had travelled. \
Building such a clock was extremely difficult, because the motion of the ship, the changes of \
temperature and the damp salt air all disturbed the delicate mechanism. A carpenter who had \
taught himself to make clocks spent most of his life on the task, and his fourth attempt, a \
large watch no bigger than a saucer, lost only a few seconds on a voyage across the ocean.

Steam changed everything again. A ship driven by an engine could keep a schedule, sail against \
the wind and pass through calm seas where a sailing vessel would have drifted for weeks. The \
first steamships burned enormous amounts of coal and still carried masts and sails in case the \
engine failed, but within a few decades iron hulls, screw propellers and better boilers made \
them faster and cheaper than any clipper. Coaling stations were built on remote islands along \
the main routes, and telegraph cables were laid across the sea floor, so that a merchant in one \
country could order a cargo from another and know within days that it had been loaded.

Today most of the goods that people buy travel for part of their journey in steel boxes stacked \
on the decks of enormous container ships. A single vessel can carry thousands of those boxes, \
and it is run by a crew smaller than that of an old fishing schooner. The captain plans the \
route with satellite positions, weather forecasts and electronic charts, and the engine room is \
watched by computers that raise an alarm at the first sign of trouble. Yet the sea itself has \
not changed. Waves still rise in winter storms higher than a house, fog still hides the coast, \
and every sailor still keeps a careful watch, because the water that carries the ship can also \
break it.

On a quiet evening in harbour, an old sailor might sit on the wall by the lighthouse and watch \
the small boats come home. He would notice which of them rode low with a good catch and which \
came in light, which skipper cut the corner too fine by the rocks and which waited for the \
tide. He had learned all of that slowly, over many years and many voyages, and he would tell \
anyone who asked that the sea teaches patience to those who listen and punishes those who \
think they have nothing left to learn.";

const WIDTH: usize = 64;
/// Base chunks (independent sequences, fresh cache each). 128 rather than 256: the Q4_1 kernel
/// is ~1.6x faster per token at 128 rows here, and the base pass dominates this test's time.
const CHUNK: usize = 128;
/// Positions used (8 chunks of 128).
const POSITIONS: usize = 1024;
/// Positions of the per-component breakdown (side only / head only).
const BREAKDOWN: usize = 256;

/// The base pass over TEXT, shared by the tests of this binary.
struct Corpus {
    ids: Vec<u32>,
    /// Final normed base hidden per position.
    hidden: Vec<Vec<f32>>,
    /// Projected taps (random projection, seed 1, all 30 layers) per position.
    z: Vec<Vec<Vec<f32>>>,
    /// Top-64 ids of the base logits (`base.logits`: what the server sends) per position.
    base_top: Vec<Vec<u32>>,
    proj: DownProjection,
}

fn corpus() -> &'static Corpus {
    static C: OnceLock<Corpus> = OnceLock::new();
    C.get_or_init(|| {
        let base = common::base();
        let t0 = Instant::now();
        let all = base.tokenizer().encode(TEXT).unwrap();
        assert!(all.len() >= POSITIONS, "TEXT has only {} tokens", all.len());
        let ids = all[..POSITIONS].to_vec();
        let taps: Vec<usize> = (0..base.config().n_layers).collect();
        let proj = DownProjection::random(base, WIDTH, &taps, 1).unwrap();
        let (mut hidden, mut z, mut base_top) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in ids.chunks(CHUNK) {
            let mut cache = base.new_cache();
            let out = base.forward(chunk, &mut cache).unwrap();
            z.extend(proj.apply_taps(&out.taps).unwrap());
            let logits: Vec<Vec<f32>> = base.logits(&out.hidden).unwrap().to_vec2().unwrap();
            base_top.extend(logits.iter().map(|l| top_k(l, 64)));
            hidden.extend(out.hidden.to_vec2::<f32>().unwrap());
        }
        eprintln!(
            "base pass over {} tokens in chunks of {CHUNK} (forward, projection, base logits): {:.1?}",
            ids.len(),
            t0.elapsed()
        );
        Corpus {
            ids,
            hidden,
            z,
            base_top,
            proj,
        }
    })
}

/// Runs the side network over the corpus, restarting the side cache at every base chunk (the
/// base chunks are independent sequences).
fn side_steps(net: &SideNetwork, c: &Corpus) -> Vec<SideStep> {
    let mut out = Vec::with_capacity(c.ids.len());
    let mut cache = net.new_cache();
    for (p, (zp, hp)) in c.z.iter().zip(&c.hidden).enumerate() {
        if p % CHUNK == 0 {
            cache.clear();
        }
        out.push(net.step(zp, hp, &mut cache).unwrap());
    }
    out
}

/// Full-vocabulary f32 logits for a batch of hidden states via one matmul with the
/// dequantized head `[vocab, hidden]` (the same numbers as `DeviceHead::full` in f32, checked
/// below, but batched: the per-vector f32 path costs ~35 ms per position in this profile).
fn f32_logits(w: &Tensor, rows: &[&[f32]]) -> Vec<Vec<f32>> {
    let d = rows[0].len();
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    let x = Tensor::from_vec(flat, (rows.len(), d), &Device::Cpu).unwrap();
    x.matmul(&w.t().unwrap()).unwrap().to_vec2().unwrap()
}

/// f32 logits of `rows` in batches of 128.
fn f32_logits_all(w: &Tensor, rows: &[&[f32]]) -> Vec<Vec<f32>> {
    rows.chunks(128).flat_map(|c| f32_logits(w, c)).collect()
}

fn hid(steps: &[SideStep]) -> Vec<Vec<f32>> {
    steps.iter().map(|x| x.hidden.clone()).collect()
}

fn as_refs(v: &[Vec<f32>]) -> Vec<&[f32]> {
    v.iter().map(Vec::as_slice).collect()
}

/// The f32 side path (up_scale 1.0, seed 1) over the corpus and its full-vocabulary f32
/// logits: the reference of the quantization test and the up_scale-1 case of the shortlist
/// test (computed once per binary).
struct SideRef {
    steps: Vec<SideStep>,
    logits: Vec<Vec<f32>>,
}

fn side_ref() -> &'static SideRef {
    static R: OnceLock<SideRef> = OnceLock::new();
    R.get_or_init(|| {
        let base = common::base();
        let c = corpus();
        let plugin = SidePlugin::init(base, &c.proj, 1, 1.0).unwrap();
        let net = SideNetwork::new(&plugin.weights, QuantMode::F32, base.max_positions()).unwrap();
        let steps = side_steps(&net, c);
        let w = base.head_weight_f32().unwrap();
        let rows: Vec<&[f32]> = steps.iter().map(|s| s.hidden.as_slice()).collect();
        let logits = f32_logits_all(&w, &rows);
        SideRef { steps, logits }
    })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logit error statistics of a quantized path against the f32 reference.
#[derive(Default, Debug)]
struct Stats {
    n: usize,
    max_err: f32,
    sum_mean_err: f64,
    agree: usize,
}

impl Stats {
    fn add(&mut self, got: &[f32], want: &[f32]) {
        self.n += 1;
        self.max_err = self.max_err.max(max_abs_diff(got, want));
        self.sum_mean_err += got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs() as f64)
            .sum::<f64>()
            / got.len() as f64;
        self.agree += usize::from(argmax(got) == argmax(want));
    }
    fn agreement(&self) -> f64 {
        self.agree as f64 / self.n as f64
    }
    fn mean_err(&self) -> f64 {
        self.sum_mean_err / self.n as f64
    }
    fn report(&self, what: &str) {
        eprintln!(
            "{what}: max |logit err| {:.3}, mean |logit err| {:.4}, argmax agreement {:.4} ({}/{})",
            self.max_err,
            self.mean_err(),
            self.agreement(),
            self.agree,
            self.n
        );
    }
}

#[test]
fn quantized_side_and_head_track_f32() {
    let base = common::base();
    let c = corpus();
    let n = c.ids.len();
    assert!(n >= 1000, "need >= 1,000 positions, got {n}");
    let t0 = Instant::now();
    let plugin = SidePlugin::init(base, &c.proj, 1, 1.0).unwrap();
    let side = |m| SideNetwork::new(&plugin.weights, m, base.max_positions()).unwrap();
    // Same seed and scale as `side_ref`, so the same weights.
    let SideRef {
        steps: steps_f32,
        logits: reference,
    } = side_ref();
    let steps_q8 = side_steps(&side(QuantMode::Q8), c);
    let steps_q4 = side_steps(&side(QuantMode::Q4), c);
    // The side path is non-trivial: it moves the hidden state (rms of the shift ~1.0 against a
    // base hidden rms of ~1.8) and changes the argmax at most positions.
    let moved = steps_f32
        .iter()
        .zip(&c.hidden)
        .map(|(s, h)| max_abs_diff(&s.hidden, h))
        .fold(0.0, f32::max);
    assert!(moved > 0.1, "side path should change the hidden ({moved})");

    let w = base.head_weight_f32().unwrap();
    let head_f32 = DeviceHead::from_base(base, QuantMode::F32).unwrap();
    let head_q8 = DeviceHead::from_base(base, QuantMode::Q8).unwrap();
    let head_q4 = DeviceHead::from_base(base, QuantMode::Q4).unwrap();
    assert!(head_q4.bytes() < head_q8.bytes() && head_q8.bytes() < head_f32.bytes());

    // The batched f32 reference equals DeviceHead::full in f32 (spot checks).
    for p in [0, n / 2, n - 1] {
        let want = f32_logits(&w, &[&steps_f32[p].hidden]).pop().unwrap();
        let got = head_f32.full(&steps_f32[p].hidden).unwrap();
        let d = max_abs_diff(&want, &got);
        assert!(d < 1e-3, "f32 head vs batched reference at {p}: {d}");
    }

    // 1) The device path: quantized side + quantized head, all positions.
    let (h_q8, h_q4) = (hid(&steps_q8), hid(&steps_q4));
    let (mut c8, mut c4) = (Stats::default(), Stats::default());
    for (p, r) in reference.iter().enumerate() {
        c8.add(&head_q8.full(&h_q8[p]).unwrap(), r);
        c4.add(&head_q4.full(&h_q4[p]).unwrap(), r);
    }
    c8.report(&format!("q8_0 side + q8_0 head vs f32, {n} positions"));
    c4.report(&format!("q4_0 side + q4_0 head vs f32, {n} positions"));

    // 2) Breakdown on the first BREAKDOWN positions: side only (f32 head) ...
    let k = BREAKDOWN;
    let (mut s8, mut s4) = (Stats::default(), Stats::default());
    let l8 = f32_logits_all(&w, &as_refs(&h_q8[..k]));
    let l4 = f32_logits_all(&w, &as_refs(&h_q4[..k]));
    for p in 0..k {
        s8.add(&l8[p], &reference[p]);
        s4.add(&l4[p], &reference[p]);
    }
    s8.report(&format!("q8_0 side only (f32 head), {k} positions"));
    s4.report(&format!("q4_0 side only (f32 head), {k} positions"));
    // ... and head only, on the base's own final hidden states (no side).
    let base_ref = f32_logits_all(&w, &as_refs(&c.hidden[..k]));
    let (mut b8, mut b4) = (Stats::default(), Stats::default());
    for (h, r) in c.hidden[..k].iter().zip(&base_ref) {
        b8.add(&head_q8.full(h).unwrap(), r);
        b4.add(&head_q4.full(h).unwrap(), r);
    }
    b8.report(&format!("q8_0 head only (base hidden), {k} positions"));
    b4.report(&format!("q4_0 head only (base hidden), {k} positions"));
    eprintln!("side runs + heads + comparison: {:.1?}", t0.elapsed());

    // Measured here (x86_64 AVX2; width 64, all 30 taps, up_scale 1.0, seed 1; 1,024 positions
    // in chunks of 128 for side+head, the first 256 for the breakdown; two runs whose base
    // kernels differed slightly, which moves the side inputs and so these figures a little):
    //   q8 side+head: max 0.57-0.58, mean 0.050-0.052, agreement 0.969-0.987
    //   q4 side+head: max 7.0-8.1,   mean 0.62-0.63,   agreement 0.734-0.769
    //   q8 side only: max 0.20-0.22, mean 0.023, agreement 0.977-0.988
    //   q4 side only: max 1.9-2.1,   mean 0.19,  agreement 0.914-0.922
    //   q8 head only: max 0.40, mean 0.046, agreement 0.988
    //   q4 head only: max 6.1,  mean 0.53,  agreement 0.758
    // Bounds: errors ~2x the measured values, agreement a few points below the measured rate.
    // q8 end to end is at or just under the hoped-for 0.98 (the q8 errors of a random side and
    // of the head add up), hence 0.94; q4 does not reach 0.90 because the q4_0 head alone
    // agrees only ~76% with f32.
    let check = |s: &Stats, what: &str, max_err: f32, mean_err: f64, agree: f64| {
        assert!(
            s.max_err < max_err,
            "{what}: max error {} >= {max_err}",
            s.max_err
        );
        assert!(
            s.mean_err() < mean_err,
            "{what}: mean error {} >= {mean_err}",
            s.mean_err()
        );
        assert!(
            s.agreement() >= agree,
            "{what}: agreement {} < {agree}",
            s.agreement()
        );
    };
    check(&c8, "q8 side+head", 1.2, 0.1, 0.94);
    check(&s8, "q8 side only", 0.4, 0.05, 0.95);
    check(&b8, "q8 head only", 0.8, 0.09, 0.97);
    check(&c4, "q4 side+head", 16.0, 1.3, 0.65);
    check(&s4, "q4 side only", 4.0, 0.4, 0.85);
    check(&b4, "q4 head only", 12.0, 1.1, 0.65);
    for (a, b) in [(&c8, &c4), (&s8, &s4), (&b8, &b4)] {
        assert!(a.max_err < b.max_err && a.agreement() > b.agreement());
    }
}

#[test]
fn shortlist_finds_the_full_head_argmax() {
    let base = common::base();
    let c = corpus();
    let n = c.ids.len();
    let personal = PersonalVocab::from_tokens([c.ids.as_slice()], 64);
    assert_eq!(personal.ids().len(), 64);
    let w = base.head_weight_f32().unwrap();
    let head = DeviceHead::from_base(base, QuantMode::F32).unwrap();
    let mut rates = Vec::new();
    // up_scale 0: computed here; up_scale 1: the shared f32 reference.
    let plugin0 = SidePlugin::init(base, &c.proj, 1, 0.0).unwrap();
    let net0 = SideNetwork::new(&plugin0.weights, QuantMode::F32, base.max_positions()).unwrap();
    let steps0 = side_steps(&net0, c);
    let logits0 = f32_logits_all(&w, &as_refs(&hid(&steps0)));
    let r1 = side_ref();
    for (up_scale, steps, logits) in [(0.0f32, &steps0, &logits0), (1.0, &r1.steps, &r1.logits)] {
        let mut hits = 0usize;
        let mut in_base_top = 0usize;
        for (p, full) in logits.iter().enumerate() {
            let cands = personal.candidates(&c.base_top[p]);
            assert!(cands.len() >= 64 && cands.len() <= 128);
            assert_eq!(&cands[..64], c.base_top[p].as_slice());
            let best = argmax(full).unwrap() as u32;
            let got = head.shortlist_argmax(&cands, &steps[p].hidden).unwrap();
            hits += usize::from(got == Some(best));
            in_base_top += usize::from(c.base_top[p].contains(&best));
        }
        let rate = hits as f64 / n as f64;
        eprintln!(
            "shortlist (base top-64 + 64 personal ids), up_scale {up_scale}: shortlist argmax == \
             full argmax at {rate:.4} ({hits}/{n}); full argmax inside base top-64 alone: {:.4}",
            in_base_top as f64 / n as f64
        );
        rates.push(rate);
    }
    // up_scale 0: the side hidden IS the base hidden, so the shortlist is built for exactly
    // this distribution and must almost always contain its argmax (measured 1.0).
    assert!(
        rates[0] >= 0.99,
        "up_scale 0 shortlist agreement {}",
        rates[0]
    );
    // A random (untrained) side with up_scale 1 moves the logits far from the base's (its
    // argmax differs from the base's at ~70% of positions), yet measured ~0.95: reported, and
    // only loosely bounded.
    assert!(
        rates[1] >= 0.8,
        "up_scale 1 shortlist agreement {}",
        rates[1]
    );
}
