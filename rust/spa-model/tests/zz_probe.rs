mod common;
use spa_model::*;
use std::time::Instant;
#[test]
fn probe() {
    let t = Instant::now();
    let base = common::base();
    eprintln!("load {:?}", t.elapsed());
    let ids = base.tokenizer().encode("The old ship sailed slowly across the grey sea while the sailors sang songs of home and of the long winter nights by the fire").unwrap();
    eprintln!("n ids {}", ids.len());
    let t = Instant::now();
    let mut c = base.new_cache();
    let out = base.forward(&ids, &mut c).unwrap();
    eprintln!("fwd all {:?}", t.elapsed());
    let t = Instant::now();
    let mut c = base.new_cache();
    for &i in &ids { base.forward(&[i], &mut c).unwrap(); }
    eprintln!("fwd each {:?}", t.elapsed());
    let long: Vec<u32> = ids.iter().cycle().take(256).cloned().collect();
    let t = Instant::now();
    let mut c = base.new_cache();
    let out2 = base.forward(&long, &mut c).unwrap();
    eprintln!("fwd 256 {:?}", t.elapsed());
    let t = Instant::now();
    let l = base.logits(&out2.hidden).unwrap();
    eprintln!("logits 256 {:?} {:?}", t.elapsed(), l.dims());
    let t = Instant::now();
    let v: Vec<Vec<f32>> = l.to_vec2().unwrap();
    eprintln!("to_vec2 {:?}", t.elapsed());
    let t = Instant::now();
    for r in &v { top_k(r, 64); }
    eprintln!("topk 256 {:?}", t.elapsed());
    let h: Vec<Vec<f32>> = out.hidden.to_vec2().unwrap();
    for m in [QuantMode::F32, QuantMode::Q8, QuantMode::Q4] {
        let t = Instant::now();
        let head = DeviceHead::from_base(base, m).unwrap();
        eprintln!("head {m:?} build {:?}", t.elapsed());
        let t = Instant::now();
        for x in &h { head.full(x).unwrap(); }
        eprintln!("head {m:?} full x{} {:?}", h.len(), t.elapsed());
    }
    let proj = DownProjection::random(base, 64, &(0..30).collect::<Vec<_>>(), 1).unwrap();
    let t = Instant::now();
    let z = proj.apply_taps(&out2.taps).unwrap();
    eprintln!("apply_taps 256 {:?}", t.elapsed());
    let plugin = SidePlugin::init(base, &proj, 1, 1.0).unwrap();
    let hh: Vec<Vec<f32>> = out2.hidden.to_vec2().unwrap();
    for m in [QuantMode::F32, QuantMode::Q8, QuantMode::Q4] {
        let net = SideNetwork::new(&plugin.weights, m, 2048).unwrap();
        let mut sc = net.new_cache();
        let t = Instant::now();
        for (zp, hp) in z.iter().zip(&hh) { net.step(zp, hp, &mut sc).unwrap(); }
        eprintln!("side {m:?} 256 steps {:?}", t.elapsed());
    }
}
