//! The device pack against the base GGUF it was built from: same tokenizer, same head rows as
//! the device built from the GGUF, its size; and every kind of damage is a typed error.

mod common;
use spa_model::pack::sha256_file;
use spa_model::{
    build_device_pack, DeviceAssets, DeviceHead, DevicePack, GgufFile, QuantMode, SpaError,
};
use std::path::PathBuf;

struct TempFile(PathBuf);

impl TempFile {
    fn with(name: &str, bytes: &[u8]) -> Self {
        let p = std::env::temp_dir().join(format!("spa-pack-test-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        Self(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn pack_holds_the_tokenizer_and_head_of_its_base_and_rejects_damage() {
    let gguf = GgufFile::read(common::model_path()).unwrap();
    let bytes = build_device_pack(&gguf, "proj-test", QuantMode::Q8).unwrap();
    let assets = DeviceAssets::load(common::model_path()).unwrap();
    // SmolLM2-135M: 49,152 x 576 head at q8_0 (34 bytes per 32 values) plus the tokenizer.
    let head_bytes = 49_152 * 576 / 32 * 34;
    assert!(
        bytes.len() > head_bytes && bytes.len() < head_bytes + 4_000_000,
        "{}",
        bytes.len()
    );
    eprintln!(
        "device pack: {} bytes (base GGUF {} bytes)",
        bytes.len(),
        std::fs::metadata(common::model_path()).unwrap().len()
    );
    let f = TempFile::with("ok.spapack", &bytes);
    let sha = sha256_file(&f.0).unwrap();
    let p = DevicePack::load_verified(&f.0, &sha).unwrap();
    assert_eq!(p.identity, assets.identity);
    assert_eq!(p.projection, "proj-test");
    assert_eq!(p.config.vocab, assets.config.vocab);
    assert_eq!(p.config.context, assets.config.context);
    assert_eq!(p.head_quant, QuantMode::Q8);
    // The same tokens, chat markers and head rows as the device built from the GGUF.
    for text in [
        "The capital of France is Paris.",
        "naïve café, 12345 \u{1F600}\n\tx",
        "",
    ] {
        assert_eq!(
            p.tokenizer.encode(text).unwrap(),
            assets.tokenizer.encode(text).unwrap()
        );
    }
    assert_eq!(p.tokenizer.eos_ids(), assets.tokenizer.eos_ids());
    // The chat template came along: a later turn closes the model's turn first.
    assert_eq!(
        p.tokenizer.chat_turn("Hi", false),
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        p.tokenizer.chat_turn("Hi", true),
        p.tokenizer.chat_prompt("Hi")
    );
    let from_gguf = DeviceHead::from_weights(&assets.head, QuantMode::Q8).unwrap();
    assert_eq!(p.head.rows().block_bytes(), from_gguf.rows().block_bytes());
    // The builder aligns the head, so the device reads it in place from the file.
    assert!(p.head.rows().is_mapped());
    let x: Vec<f32> = (0..576)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    assert_eq!(p.head.full(&x).unwrap(), from_gguf.full(&x).unwrap());
    // A flipped byte anywhere fails the sha256 check.
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    let f2 = TempFile::with("flipped.spapack", &flipped);
    assert!(matches!(
        DevicePack::load_verified(&f2.0, &sha),
        Err(SpaError::CorruptSafetensors { .. })
    ));
    // Damage the loader itself must catch (a file whose hash nobody checked).
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len])
        .unwrap()
        .to_string();
    let with_header = |h: &str| {
        let mut h = h.to_string();
        while h.len() < header_len {
            h.push(' ');
        }
        assert_eq!(h.len(), header_len, "test header edit changed its length");
        let mut b = bytes.clone();
        b[8..8 + header_len].copy_from_slice(h.as_bytes());
        b
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() - 1000].to_vec()),
        ("header only", bytes[..8 + header_len].to_vec()),
        ("empty", Vec::new()),
        ("huge header size", {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
        (
            "foreign format",
            with_header(&header.replace("spa-device-pack/1", "spa-device-pack/9")),
        ),
        ("wrong quant", with_header(&header.replace("q8_0", "q2_k"))),
        (
            "vocab mismatch",
            with_header(&header.replace("\"vocab\":\"49152\"", "\"vocab\":\"49151\"")),
        ),
        ("not json", with_header(&header.replacen('{', "[", 1))),
    ];
    for (what, b) in cases {
        let f = TempFile::with("bad.spapack", &b);
        match DevicePack::load(&f.0) {
            Err(SpaError::CorruptSafetensors { .. }) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    assert!(matches!(
        DevicePack::load("/nonexistent/pack.spapack"),
        Err(SpaError::MissingFile { .. })
    ));
}

#[test]
fn q4_pack_is_about_half_the_size() {
    let gguf = GgufFile::read(common::model_path()).unwrap();
    let q8 = build_device_pack(&gguf, "p", QuantMode::Q8).unwrap();
    let q4 = build_device_pack(&gguf, "p", QuantMode::Q4).unwrap();
    assert!(q4.len() * 10 < q8.len() * 6, "{} vs {}", q4.len(), q8.len());
    let f = TempFile::with("q4.spapack", &q4);
    let p = DevicePack::load(&f.0).unwrap();
    assert_eq!(p.head_quant, QuantMode::Q4);
    assert_eq!(p.head.vocab(), 49_152);
}
