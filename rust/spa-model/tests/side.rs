//! Side network, gate, shared down-projection and side-weight files, over real base activations
//! of the SmolLM2 base.

mod common;
use spa_model::{
    BaseModel, DownProjection, QuantMode, SideConfig, SideNetwork, SidePlugin, SideStep,
    SideWeights, SpaError,
};
use std::path::PathBuf;

const N_LAYERS: usize = 30;
const HIDDEN: usize = 576;

/// A file path under the system temp dir, unique per process and test; removed on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "spa-model-side-test-{}-{name}.safetensors",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&p);
        Self(p)
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Base forward of `text`: (projected taps `[pos][tap][width]`, final hidden `[pos][576]`).
type Inputs = (Vec<Vec<Vec<f32>>>, Vec<Vec<f32>>);

fn inputs(base: &BaseModel, proj: &DownProjection, text: &str) -> Inputs {
    let ids = base.tokenizer().encode(text).unwrap();
    let mut cache = base.new_cache();
    let out = base.forward(&ids, &mut cache).unwrap();
    let z = proj.apply_taps(&out.taps).unwrap();
    let h: Vec<Vec<f32>> = out.hidden.to_vec2().unwrap();
    assert_eq!(z.len(), ids.len());
    (z, h)
}

/// Runs every position through a fresh F32 network built from `w`.
fn run(w: &SideWeights, (z, h): &Inputs) -> Vec<SideStep> {
    let net = SideNetwork::new(w, QuantMode::F32, 512).unwrap();
    let mut cache = net.new_cache();
    z.iter()
        .zip(h)
        .map(|(zp, hp)| net.step(zp, hp, &mut cache).unwrap())
        .collect()
}

fn set_all(w: &mut SideWeights, name: &str, value: f32) {
    w.tensors
        .get_mut(name)
        .unwrap()
        .data
        .iter_mut()
        .for_each(|x| *x = value);
}

/// Replaces every matrix of block `i` with the one from another random initialisation.
fn reinit_block(w: &mut SideWeights, i: usize, seed: u64) {
    let other = SideWeights::init(w.config.clone(), seed, 1.0).unwrap();
    for (name, t) in other.tensors {
        if name.starts_with(&format!("blocks.{i}.w")) {
            w.tensors.insert(name, t);
        }
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn side_config_validation() {
    for width in [32, 64, 128] {
        SideConfig::new(HIDDEN, N_LAYERS, width)
            .validate(N_LAYERS)
            .unwrap_or_else(|e| panic!("width {width} rejected: {e}"));
    }
    for width in [0, 16, 72, 100] {
        assert!(
            matches!(
                SideConfig::new(HIDDEN, N_LAYERS, width).validate(N_LAYERS),
                Err(SpaError::InvalidConfig(_))
            ),
            "width {width} accepted"
        );
    }
    let with_taps = |taps: Vec<usize>| {
        let mut c = SideConfig::new(HIDDEN, N_LAYERS, 64);
        c.taps = taps;
        c.validate(N_LAYERS)
    };
    with_taps(vec![0, 10, 20, 29]).unwrap();
    with_taps(vec![29]).unwrap();
    for bad in [
        vec![],
        vec![10, 5],
        vec![3, 3],
        vec![0, 30],
        vec![31],
        vec![5, 29, 28],
    ] {
        assert!(
            matches!(with_taps(bad.clone()), Err(SpaError::InvalidConfig(_))),
            "taps {bad:?} accepted"
        );
    }
    let mut c = SideConfig::new(HIDDEN, N_LAYERS, 64);
    c.temperature = 0.0;
    assert!(matches!(
        c.validate(N_LAYERS),
        Err(SpaError::InvalidConfig(_))
    ));

    // A plugin cannot be made for a projection of an invalid width.
    let base = common::base();
    let proj = DownProjection::random(base, 72, &[0, 29], 1).unwrap();
    assert!(matches!(
        SidePlugin::init(base, &proj, 1, 0.0),
        Err(SpaError::InvalidConfig(_))
    ));
}

#[test]
fn shapes_for_widths_and_tap_sets() {
    let base = common::base();
    let text = "Waves broke against the harbour wall at dawn.";
    let tap_sets: [Vec<usize>; 3] = [(0..N_LAYERS).collect(), vec![0, 10, 20, 29], vec![29]];
    for width in [32, 64, 128] {
        for taps in &tap_sets {
            let proj = DownProjection::random(base, width, taps, 11).unwrap();
            assert_eq!(proj.meta().width, width);
            assert_eq!(&proj.meta().taps, taps);
            let plugin = SidePlugin::init(base, &proj, 5, 1.0).unwrap();
            assert_eq!(plugin.weights.config.taps, *taps);
            assert_eq!(plugin.weights.config.width, width);
            plugin.weights.check_shapes().unwrap();
            let n_params: usize = plugin.weights.tensors.values().map(|t| t.data.len()).sum();
            assert_eq!(n_params, plugin.weights.config.param_count());

            let (z, h) = inputs(base, &proj, text);
            for zp in &z {
                assert_eq!(zp.len(), taps.len());
                assert!(zp.iter().all(|v| v.len() == width));
            }
            let net =
                SideNetwork::new(&plugin.weights, QuantMode::F32, base.max_positions()).unwrap();
            let mut cache = net.new_cache();
            for (p, (zp, hp)) in z.iter().zip(&h).enumerate() {
                let s = net.step(zp, hp, &mut cache).unwrap();
                assert_eq!(s.state.len(), width);
                assert_eq!(s.hidden.len(), HIDDEN);
                assert!(
                    s.p_side > 0.0 && s.p_side < 1.0,
                    "p_side {} (width {width}, taps {taps:?}, pos {p})",
                    s.p_side
                );
                assert!(s.state.iter().chain(&s.hidden).all(|v| v.is_finite()));
                assert_eq!(cache.len(), p + 1);
            }
            // Quantized forms are smaller.
            let q8 = SideNetwork::new(&plugin.weights, QuantMode::Q8, 64).unwrap();
            let q4 = SideNetwork::new(&plugin.weights, QuantMode::Q4, 64).unwrap();
            assert!(q4.bytes() < q8.bytes() && q8.bytes() < net.bytes());

            // Wrong input shapes are errors, not panics.
            let mut c = net.new_cache();
            let mut short = z[0].clone();
            short.pop();
            if !short.is_empty() {
                assert!(matches!(
                    net.step(&short, &h[0], &mut c),
                    Err(SpaError::WrongShape { .. })
                ));
            }
            let mut narrow = z[0].clone();
            narrow[0].pop();
            assert!(matches!(
                net.step(&narrow, &h[0], &mut c),
                Err(SpaError::WrongShape { .. })
            ));
            assert!(matches!(
                net.step(&z[0], &h[0][..100], &mut c),
                Err(SpaError::WrongShape { .. })
            ));
            assert_eq!(c.len(), 0);
        }
    }
}

/// LST mixing `m_i = mu_i * z_i + (1 - mu_i) * s_{i-1}`, `mu_i = sigmoid(alpha_i / T)`.
///
/// Checkable consequences:
/// - mu = 1 for every block (alpha = +10, T = 0.1: sigmoid(100) rounds to exactly 1.0 in f32):
///   each block's input is its own tap only, so the output depends on the LAST block alone:
///   replacing block 0's weights leaves the output bit-identical, replacing the last block's
///   weights changes it.
/// - mu = 0.5 (alpha = 0): block 0 feeds forward, so replacing its weights changes the output.
/// - mu = 0 for every block (alpha = -10): the taps are ignored entirely (the side sees zeros),
///   so different taps give identical outputs, the side state is 0 and the hidden is the base's.
/// - mu really is sigmoid(alpha / T): with one block, (alpha_a, z) and (alpha_b, z * mu_a/mu_b)
///   give the same block input, hence the same output; and (alpha, T) ~ (alpha * k, T * k).
#[test]
fn lst_mixing_gate() {
    let base = common::base();
    let taps = [0, 10, 20, 29];
    let proj = DownProjection::random(base, 64, &taps, 3).unwrap();
    let plugin = SidePlugin::init(base, &proj, 4, 1.0).unwrap();
    let data = inputs(base, &proj, "The sailors mended the nets before the storm.");
    let other = inputs(base, &proj, "Children played football in the muddy park.");
    let n = data.0.len().min(other.0.len());
    let (data, other): (Inputs, Inputs) = (
        (data.0[..n].to_vec(), data.1[..n].to_vec()),
        // other taps, same base hidden: only the taps differ
        (other.0[..n].to_vec(), data.1[..n].to_vec()),
    );
    let last = taps.len() - 1;

    // mu = 1 everywhere.
    let mut w1 = plugin.weights.clone();
    set_all(&mut w1, "alpha", 10.0);
    let ref1 = run(&w1, &data);
    let mut w1_b0 = w1.clone();
    reinit_block(&mut w1_b0, 0, 99);
    assert_eq!(
        run(&w1_b0, &data),
        ref1,
        "mu = 1: block 0 must not influence the output"
    );
    let mut w1_bl = w1.clone();
    reinit_block(&mut w1_bl, last, 99);
    assert_ne!(
        run(&w1_bl, &data),
        ref1,
        "the last block must influence the output"
    );

    // mu = 0.5 everywhere: block 0 matters.
    let mut w5 = plugin.weights.clone();
    set_all(&mut w5, "alpha", 0.0);
    let ref5 = run(&w5, &data);
    let mut w5_b0 = w5.clone();
    reinit_block(&mut w5_b0, 0, 99);
    let changed = run(&w5_b0, &data);
    let d = max_abs_diff(&changed[n - 1].state, &ref5[n - 1].state);
    assert!(
        d > 1e-3,
        "mu = 0.5: block 0 should influence the output ({d})"
    );

    // mu = 0 everywhere: taps are ignored.
    let mut w0 = plugin.weights.clone();
    set_all(&mut w0, "alpha", -10.0);
    let a = run(&w0, &data);
    let b = run(&w0, &other);
    assert_eq!(a, b, "mu = 0: the side must ignore the taps");
    for (s, h) in a.iter().zip(&data.1) {
        assert!(s.state.iter().all(|&x| x == 0.0));
        assert_eq!(&s.hidden, h);
    }
    // ...whereas with mu = 0.5 the taps do matter.
    assert_ne!(run(&w5, &data), run(&w5, &other));

    // mu = sigmoid(alpha / T): single block.
    let proj1 = DownProjection::random(base, 64, &[29], 3).unwrap();
    let p1 = SidePlugin::init(base, &proj1, 4, 1.0).unwrap();
    let d1 = inputs(
        base,
        &proj1,
        "The sailors mended the nets before the storm.",
    );
    let mut wa = p1.weights.clone();
    set_all(&mut wa, "alpha", 0.0); // mu_a = 0.5
    let t = wa.config.temperature;
    let mut wb = p1.weights.clone();
    set_all(&mut wb, "alpha", t * 3f32.ln()); // mu_b = sigmoid(ln 3) = 0.75
    let scaled: Inputs = (
        d1.0.iter()
            .map(|zp| {
                zp.iter()
                    .map(|v| v.iter().map(|x| x * (0.5 / 0.75)).collect())
                    .collect()
            })
            .collect(),
        d1.1.clone(),
    );
    let ra = run(&wa, &d1);
    let rb = run(&wb, &scaled);
    let unscaled = run(&wb, &d1);
    let mut worst = 0f32;
    for (x, y) in ra.iter().zip(&rb) {
        worst = worst.max(max_abs_diff(&x.state, &y.state));
        worst = worst.max(max_abs_diff(&x.hidden, &y.hidden));
        assert!((x.p_side - y.p_side).abs() < 1e-5);
    }
    assert!(worst < 1e-4, "mu = sigmoid(alpha/T) check: {worst}");
    let gap = max_abs_diff(&ra[n - 1].state, &unscaled[n - 1].state);
    assert!(gap > 1e-2, "the check must be sensitive to mu ({gap})");
    // Same mu through (alpha * 10, T * 10).
    let mut wc = wb.clone();
    set_all(&mut wc, "alpha", t * 10.0 * 3f32.ln());
    wc.config.temperature = t * 10.0;
    let rc = run(&wc, &d1);
    for (x, y) in unscaled.iter().zip(&rc) {
        assert!(max_abs_diff(&x.state, &y.state) < 1e-4);
    }
}

#[test]
fn zero_up_projection_keeps_the_base_hidden() {
    let base = common::base();
    let proj = DownProjection::random(base, 64, &[0, 10, 20, 29], 1).unwrap();
    let plugin = SidePlugin::init(base, &proj, 1, 0.0).unwrap();
    assert!(plugin
        .weights
        .get("up")
        .unwrap()
        .data
        .iter()
        .all(|&x| x == 0.0));
    let (z, h) = inputs(base, &proj, "A quiet morning on the river.");
    for mode in [QuantMode::F32, QuantMode::Q8, QuantMode::Q4] {
        let net = SideNetwork::new(&plugin.weights, mode, 64).unwrap();
        let mut cache = net.new_cache();
        for (zp, hp) in z.iter().zip(&h) {
            let s = net.step(zp, hp, &mut cache).unwrap();
            assert_eq!(
                &s.hidden, hp,
                "{mode:?}: side hidden must equal the base hidden"
            );
            assert!(s.state.iter().any(|&x| x != 0.0), "the blocks still run");
        }
    }
    // With up_scale 1 the hidden moves.
    let p1 = SidePlugin::init(base, &proj, 1, 1.0).unwrap();
    let s = run(&p1.weights, &(z, h.clone()));
    assert!(max_abs_diff(&s[0].hidden, &h[0]) > 1e-2);
}

#[test]
fn side_cache_truncate_and_rerun() {
    let base = common::base();
    let proj = DownProjection::random(base, 64, &[0, 10, 20, 29], 2).unwrap();
    let plugin = SidePlugin::init(base, &proj, 2, 1.0).unwrap();
    let (z, h) = inputs(
        base,
        &proj,
        "Old ships slowly sailed across the grey winter sea.",
    );
    let (z2, h2) = inputs(
        base,
        &proj,
        "Bright lanterns hung along the busy quay tonight.",
    );
    assert!(z.len() >= 8 && z2.len() >= 8);
    for mode in [QuantMode::F32, QuantMode::Q8] {
        let net = SideNetwork::new(&plugin.weights, mode, 64).unwrap();
        let mut cache = net.new_cache();
        let first: Vec<SideStep> = (0..8)
            .map(|p| net.step(&z[p], &h[p], &mut cache).unwrap())
            .collect();
        assert_eq!(cache.len(), 8);
        cache.truncate(5);
        assert_eq!(cache.len(), 5);
        cache.truncate(9); // beyond the length: no-op
        assert_eq!(cache.len(), 5);
        // Same inputs again: identical steps.
        for p in 5..8 {
            let s = net.step(&z[p], &h[p], &mut cache).unwrap();
            assert_eq!(s, first[p], "{mode:?}: re-run of position {p}");
        }
        // Different inputs after a rollback == a fresh cache fed the same sequence.
        cache.truncate(5);
        let mut fresh = net.new_cache();
        for p in 0..5 {
            net.step(&z[p], &h[p], &mut fresh).unwrap();
        }
        for p in 5..8 {
            let a = net.step(&z2[p], &h2[p], &mut cache).unwrap();
            let b = net.step(&z2[p], &h2[p], &mut fresh).unwrap();
            assert_eq!(a, b, "{mode:?}: position {p} after rollback");
            assert_ne!(a, first[p]);
        }
        // Clones are independent; clear empties.
        let mut copy = cache.clone();
        copy.truncate(2);
        assert_eq!((copy.len(), cache.len()), (2, 8));
        cache.clear();
        assert!(cache.is_empty());
        let again = net.step(&z[0], &h[0], &mut cache).unwrap();
        assert_eq!(again, first[0]);
    }
}

#[test]
fn plugin_save_load_and_base_binding() {
    let base = common::base();
    let proj = DownProjection::random(base, 32, &[0, 10, 20, 29], 1).unwrap();
    let plugin = SidePlugin::init(base, &proj, 8, 0.5).unwrap();
    let f = TempPath::new("plugin");
    plugin.save(&f.0).unwrap();
    let loaded = SidePlugin::load(&f.0).unwrap();
    assert_eq!(
        loaded, plugin,
        "round trip must give identical weights and meta"
    );
    let bound = SidePlugin::load_for(&f.0, base, &proj).unwrap();
    assert_eq!(bound.weights, plugin.weights);
    // A gate threshold set on the weights after training is what the file records.
    let mut tuned = plugin.clone();
    tuned.weights.config.gate_threshold = 0.7;
    let t = TempPath::new("tuned");
    tuned.save(&t.0).unwrap();
    let back = SidePlugin::load(&t.0).unwrap();
    assert_eq!(back.weights.config.gate_threshold, 0.7);
    assert_eq!(back.meta.config.gate_threshold, 0.7);
    // The loaded network computes exactly what the original computes.
    let data = inputs(base, &proj, "Fog over the bay.");
    assert_eq!(run(&loaded.weights, &data), run(&plugin.weights, &data));

    // A different projection (other seed -> other fingerprint) is refused.
    let other = DownProjection::random(base, 32, &[0, 10, 20, 29], 2).unwrap();
    assert_ne!(other.fingerprint(), proj.fingerprint());
    match SidePlugin::load_for(&f.0, base, &other) {
        Err(SpaError::MismatchedBase { .. }) => {}
        r => panic!("expected MismatchedBase, got {r:?}"),
    }

    // A plugin recorded for another base is refused.
    let mut foreign = plugin.clone();
    foreign.meta.base = "0".repeat(64);
    let g = TempPath::new("foreign");
    foreign.save(&g.0).unwrap();
    assert!(
        SidePlugin::load(&g.0).is_ok(),
        "plain load does not check the base"
    );
    assert!(matches!(
        SidePlugin::load_for(&g.0, base, &proj),
        Err(SpaError::MismatchedBase { .. })
    ));
    // ...and one recorded for another projection scheme version.
    let mut old = plugin.clone();
    old.meta.projection_version += 1;
    assert!(matches!(
        old.check_compatible(base.identity(), &proj),
        Err(SpaError::MismatchedBase { .. })
    ));
    plugin.check_compatible(base.identity(), &proj).unwrap();
}

#[test]
fn pca_projection_whitens_and_round_trips() {
    let base = common::base();
    let texts: Vec<Vec<u32>> = [
        "The fishermen pulled their boats onto the sand as the tide went out slowly.",
        "In the small library, an old man read about the history of the northern islands.",
        "She packed bread, cheese and apples for the long walk over the green hills.",
    ]
    .iter()
    .map(|t| base.tokenizer().encode(t).unwrap())
    .collect();
    let n: usize = texts.iter().map(Vec::len).sum();
    assert!(n >= 40, "need enough positions for width 32, got {n}");
    let taps = [5, 29];
    let proj = DownProjection::pca(base, &texts, 32, &taps).unwrap();
    assert_eq!(proj.meta().method, format!("pca:{n}"));
    assert_eq!(proj.meta().width, 32);

    // Project the same data: [tap][component] -> values over all positions.
    let mut vals = vec![vec![Vec::new(); 32]; taps.len()];
    for t in &texts {
        let mut cache = base.new_cache();
        let out = base.forward(t, &mut cache).unwrap();
        for zp in proj.apply_taps(&out.taps).unwrap() {
            for (j, zt) in zp.iter().enumerate() {
                for (k, &v) in zt.iter().enumerate() {
                    vals[j][k].push(v as f64);
                }
            }
        }
    }
    for (j, layer) in taps.iter().enumerate() {
        let stats: Vec<(f64, f64)> = vals[j]
            .iter()
            .map(|v| {
                let m = v.iter().sum::<f64>() / v.len() as f64;
                let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
                (m, var)
            })
            .collect();
        eprintln!(
            "PCA tap {layer}: mean/var of components 0..8: {:?}; min/max var over 32: {:.3}/{:.3}",
            stats[..8]
                .iter()
                .map(|(m, v)| format!("{m:+.3}/{v:.3}"))
                .collect::<Vec<_>>(),
            stats.iter().map(|s| s.1).fold(f64::INFINITY, f64::min),
            stats.iter().map(|s| s.1).fold(0.0, f64::max),
        );
        for (k, (m, var)) in stats.iter().take(8).enumerate() {
            assert!(m.abs() < 0.1, "tap {layer} component {k}: mean {m}");
            assert!(
                (0.7..=1.3).contains(var),
                "tap {layer} component {k}: variance {var}"
            );
        }
        // The top components are (nearly) uncorrelated on the corpus they were fit on.
        let (a, b) = (&vals[j][0], &vals[j][1]);
        let cov = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - stats[0].0) * (y - stats[1].0))
            .sum::<f64>()
            / a.len() as f64;
        assert!(cov.abs() < 0.2, "tap {layer}: cov(c0, c1) = {cov}");
    }

    let f = TempPath::new("pca");
    proj.save(&f.0).unwrap();
    let back = DownProjection::load(&f.0).unwrap();
    assert_eq!(back.fingerprint(), proj.fingerprint());
    assert_eq!(back, proj);
    let h: Vec<f32> = (0..HIDDEN).map(|i| (i as f32 * 0.37).sin()).collect();
    assert_eq!(back.apply(1, &h).unwrap(), proj.apply(1, &h).unwrap());

    // Too few positions or too wide: InvalidConfig.
    let short = vec![texts[0][..5].to_vec()];
    assert!(matches!(
        DownProjection::pca(base, &short, 32, &[5]),
        Err(SpaError::InvalidConfig(_))
    ));
    assert!(matches!(
        DownProjection::pca(base, &texts, 640, &[5]),
        Err(SpaError::InvalidConfig(_))
    ));
}
