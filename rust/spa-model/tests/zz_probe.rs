mod common;
use candle_core::{Device, Tensor};
use spa_model::*;
use std::time::Instant;
fn text() -> String {
    let s =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/quant.rs")).unwrap();
    let a = s.find("const TEXT: &str = \"\\\n").unwrap() + "const TEXT: &str = \"\\\n".len();
    let b = s[a..].find("\";").unwrap() + a;
    s[a..b].replace("\\\n", "")
}
fn mad(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
#[test]
fn probe() {
    let base = common::base();
    let ids = base.tokenizer().encode(&text()).unwrap();
    eprintln!("{} ids", ids.len());
    for ch in [32usize, 64, 128, 256] {
        let t = Instant::now();
        let mut c = base.new_cache();
        base.forward(&ids[..ch], &mut c).unwrap();
        eprintln!(
            "chunk {ch}: {:.1} ms/token",
            t.elapsed().as_secs_f64() * 1000.0 / ch as f64
        );
    }
    let n = 256;
    let mut c = base.new_cache();
    let out = base.forward(&ids[..n], &mut c).unwrap();
    let w = base.head_weight_f32().unwrap();
    let hid: Vec<Vec<f32>> = out.hidden.to_vec2().unwrap();
    let f32l = |rows: &[Vec<f32>]| -> Vec<Vec<f32>> {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 576), &Device::Cpu)
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let t = Instant::now();
    let refb = f32l(&hid);
    eprintln!("f32 matmul {n}: {:?}", t.elapsed());
    let t = Instant::now();
    let bl: Vec<Vec<f32>> = base.logits(&out.hidden).unwrap().to_vec2().unwrap();
    eprintln!("base.logits {n}: {:?}", t.elapsed());
    let cmp = |name: &str, a: &[Vec<f32>], b: &[Vec<f32>]| {
        let mut me = 0f32;
        let mut ag = 0;
        for (x, y) in a.iter().zip(b) {
            me = me.max(mad(x, y));
            ag += (argmax(x) == argmax(y)) as usize;
        }
        eprintln!(
            "{name}: max err {me:.3} agree {:.3}",
            ag as f64 / a.len() as f64
        );
    };
    cmp("base.logits vs f32 head (base hidden)", &bl, &refb);
    for m in [QuantMode::Q8, QuantMode::Q4] {
        let head = DeviceHead::from_base(base, m).unwrap();
        let l: Vec<Vec<f32>> = hid.iter().map(|h| head.full(h).unwrap()).collect();
        cmp(&format!("{m:?} head only, base hidden"), &l, &refb);
        if m == QuantMode::Q8 {
            cmp("Q8 head vs base.logits", &l, &bl);
        }
    }
    for taps in [(0..30).collect::<Vec<_>>(), vec![0, 10, 20, 29]] {
        for width in [64usize, 128] {
            let proj = DownProjection::random(base, width, &taps, 1).unwrap();
            let z = proj.apply_taps(&out.taps).unwrap();
            let plugin = SidePlugin::init(base, &proj, 1, 1.0).unwrap();
            let run = |m| {
                let net = SideNetwork::new(&plugin.weights, m, 4096).unwrap();
                let mut sc = net.new_cache();
                z.iter()
                    .zip(&hid)
                    .map(|(zp, hp)| net.step(zp, hp, &mut sc).unwrap().hidden)
                    .collect::<Vec<_>>()
            };
            let sf = run(QuantMode::F32);
            let delta_rms = (sf
                .iter()
                .zip(&hid)
                .map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>())
                .sum::<f32>()
                / (n * 576) as f32)
                .sqrt();
            let h_rms =
                (hid.iter().flatten().map(|x| x * x).sum::<f32>() / (n * 576) as f32).sqrt();
            eprintln!("taps {} width {width}: rms(side delta) {delta_rms:.3}, rms(base hidden) {h_rms:.3}", taps.len());
            let rf = f32l(&sf);
            let base_vs_side = rf
                .iter()
                .zip(&refb)
                .filter(|(a, b)| argmax(a) == argmax(b))
                .count();
            eprintln!("  side f32 argmax == base argmax: {}/{n}", base_vs_side);
            for m in [QuantMode::Q8, QuantMode::Q4] {
                let sq = run(m);
                let he = sq
                    .iter()
                    .zip(&sf)
                    .map(|(a, b)| mad(a, b))
                    .fold(0.0, f32::max);
                eprintln!("  {m:?} side hidden max err {he:.4}");
                cmp(&format!("  {m:?} side only (f32 head)"), &f32l(&sq), &rf);
                if taps.len() == 30 && width == 64 {
                    let head = DeviceHead::from_base(base, m).unwrap();
                    let l: Vec<Vec<f32>> = sf.iter().map(|h| head.full(h).unwrap()).collect();
                    cmp(&format!("  {m:?} head only (f32 side)"), &l, &rf);
                }
            }
        }
    }
}
