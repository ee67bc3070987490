//! The device pack: what the phone needs from the base model, and nothing more.
//!
//! The device never runs the base; it tokenizes, scores candidates with the tied LM head and
//! checks that the server serves the base and projection its side weights were made for. A
//! device pack carries exactly that, in one immutable safetensors file:
//!
//! - tensor `head` (`U8`, `[vocab, row_bytes]`): the LM head rows quantized to ggml q8_0 (34
//!   bytes per 32 values: an f16 scale, then 32 int8) or q4_0 (18 bytes per 32 values);
//! - tensor `base_metadata` (`U8`, `[n]`): a GGUF file without tensors holding the base's
//!   tokenizer (`tokenizer.*`, with the chat template) and hyper-parameters
//!   (`general.architecture`, `<arch>.*`), read by the same code as the base GGUF;
//! - `__metadata__`: `format` ([`PACK_FORMAT`]), `base_identity` (sha256 of the base GGUF),
//!   `projection_fingerprint`, `head_quant` (`q8_0` | `q4_0`), `vocab`, `hidden`.
//!
//! SmolLM2-135M: ~32 MB at q8_0 (the base GGUF is 98 MB). The server builds it once
//! ([`build_device_pack`]) and serves it at `GET /v1/device-pack`; the device checks its
//! sha256 against the manifest before [`DevicePack::load`].

use crate::config::BaseConfig;
use crate::error::{Result, SpaError};
use crate::gguf::GgufFile;
use crate::head::DeviceHead;
use crate::linear::QuantMode;
use crate::qmat::QRows;
use crate::tokenizer::SpaTokenizer;
use candle_core::quantized::gguf_file;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// `format` of a device pack's metadata.
pub const PACK_FORMAT: &str = "spa-device-pack/1";
/// Largest safetensors header a pack may have (the header is JSON of two tensors).
const MAX_HEADER: u64 = 1 << 20;
/// Largest embedded base metadata (tokenizer + hyper-parameters), bytes.
const MAX_BASE_METADATA: usize = 64 << 20;

/// What a device needs from the base, loaded from a pack.
#[derive(Debug)]
pub struct DevicePack {
    /// Tokenizer (with the chat template).
    pub tokenizer: SpaTokenizer,
    /// The base's hyper-parameters (vocabulary, hidden size, context).
    pub config: BaseConfig,
    /// Base identity (sha256 of the base GGUF).
    pub identity: String,
    /// Fingerprint of the projection the server publishes with this base.
    pub projection: String,
    /// The quantized tied LM head.
    pub head: DeviceHead,
    /// Its quantization.
    pub head_quant: QuantMode,
}

fn quant_name(q: QuantMode) -> Result<&'static str> {
    match q {
        QuantMode::Q8 => Ok("q8_0"),
        QuantMode::Q4 => Ok("q4_0"),
        QuantMode::F32 => Err(SpaError::InvalidConfig(
            "a device pack's head is q8 or q4".into(),
        )),
    }
}

/// Builds the device pack of the base GGUF `base` for a server publishing the projection
/// `projection_fingerprint`, its head quantized with `quant` (q8 or q4). Returns the file's
/// bytes (write them atomically; their sha256 is the pack's identity).
pub fn build_device_pack(
    base: &GgufFile,
    projection_fingerprint: &str,
    quant: QuantMode,
) -> Result<Vec<u8>> {
    let content = base.content();
    let config = BaseConfig::from_gguf(content)?;
    let arch = match content.metadata.get("general.architecture") {
        Some(gguf_file::Value::String(s)) => s.clone(),
        _ => return Err(SpaError::gguf(base.path(), "no general.architecture")),
    };
    // The tokenizer and the hyper-parameters, as a GGUF without tensors.
    let mut keys: Vec<&String> = content
        .metadata
        .keys()
        .filter(|k| {
            k.as_str() == "general.architecture"
                || k.starts_with("tokenizer.")
                || k.starts_with(&format!("{arch}."))
        })
        .collect();
    keys.sort();
    let meta: Vec<(&str, &gguf_file::Value)> = keys
        .iter()
        .map(|k| (k.as_str(), &content.metadata[*k]))
        .collect();
    let mut base_meta = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut base_meta, &meta, &[])?;
    let mut base_meta = base_meta.into_inner();
    // The tensors are laid out by name, `base_metadata` first: padding it to a multiple of 64
    // bytes puts the head's blocks on an aligned offset, so the device maps them in place
    // (GGUF readers ignore bytes after the last tensor info).
    base_meta.resize(base_meta.len().next_multiple_of(64), 0);
    let name = if base.has("output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    let head = base
        .tensor(name, &[config.vocab, config.hidden])?
        .dequantize(&candle_core::Device::Cpu)?;
    let rows = QRows::from_tensor(&head, quant)?;
    drop(head);
    let blocks = rows
        .block_bytes()
        .ok_or_else(|| SpaError::InvalidConfig("unquantized head".into()))?;
    let row_bytes = QRows::row_bytes(config.hidden, quant).unwrap_or(0);
    let mut md = HashMap::new();
    md.insert("format".to_string(), PACK_FORMAT.to_string());
    md.insert("base_identity".to_string(), base.identity().to_string());
    md.insert(
        "projection_fingerprint".to_string(),
        projection_fingerprint.to_string(),
    );
    md.insert("head_quant".to_string(), quant_name(quant)?.to_string());
    md.insert("vocab".to_string(), config.vocab.to_string());
    md.insert("hidden".to_string(), config.hidden.to_string());
    let st = |e: safetensors::SafeTensorError| SpaError::InvalidConfig(format!("device pack: {e}"));
    let views = vec![
        (
            "head",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::U8,
                vec![config.vocab, row_bytes],
                blocks,
            )
            .map_err(st)?,
        ),
        (
            "base_metadata",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::U8,
                vec![base_meta.len()],
                &base_meta,
            )
            .map_err(st)?,
        ),
    ];
    safetensors::serialize(views, Some(md)).map_err(st)
}

#[derive(serde::Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

impl DevicePack {
    /// Loads a pack (check its sha256 first: [`DevicePack::load_verified`]). Every size,
    /// offset and field is checked: a damaged or foreign file is a
    /// [`SpaError::CorruptSafetensors`], never a crash or a wrong model. The head is read
    /// straight into its quantized buffer (no f32 copy).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |m: &str| SpaError::safetensors(path, m);
        let mut f = std::fs::File::open(path).map_err(|e| SpaError::MissingFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let io = |e: std::io::Error| SpaError::safetensors(path, format!("read: {e}"));
        let file_len = f.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n)
            .map_err(|_| bad("shorter than a header"))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || 8 + n > file_len {
            return Err(bad("header size out of range"));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(io)?;
        let mut header: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(&format!("header: {e}")))?;
        let md: HashMap<String, String> = header
            .remove("__metadata__")
            .and_then(|m| serde_json::from_value(m).ok())
            .ok_or_else(|| bad("no metadata"))?;
        let get = |k: &str| {
            md.get(k)
                .map(String::as_str)
                .ok_or_else(|| bad(&format!("no {k} in the metadata")))
        };
        if get("format")? != PACK_FORMAT {
            return Err(bad(&format!(
                "not a device pack of format {PACK_FORMAT} (got {})",
                get("format")?
            )));
        }
        let head_quant = match get("head_quant")? {
            "q8_0" => QuantMode::Q8,
            "q4_0" => QuantMode::Q4,
            other => return Err(bad(&format!("unknown head quantization {other}"))),
        };
        let num = |k: &str| -> Result<usize> {
            get(k)?
                .parse::<usize>()
                .ok()
                .filter(|&v| v > 0 && v <= 1 << 24)
                .ok_or_else(|| bad(&format!("{k} out of range")))
        };
        let (vocab, hidden) = (num("vocab")?, num("hidden")?);
        if hidden % 32 != 0 {
            return Err(bad("hidden size not a multiple of 32"));
        }
        let data_start = 8 + n;
        let entry = |name: &str, shape: &[usize]| -> Result<(u64, u64)> {
            let e: Entry = header
                .get(name)
                .cloned()
                .and_then(|v| serde_json::from_value(v).ok())
                .ok_or_else(|| bad(&format!("no tensor {name}")))?;
            let len: u64 = shape.iter().map(|&d| d as u64).product();
            let (a, b) = e.data_offsets;
            if e.dtype != "U8"
                || e.shape != shape
                || b < a
                || b - a != len
                || data_start.checked_add(b).is_none_or(|end| end > file_len)
            {
                return Err(bad(&format!(
                    "tensor {name} of the wrong type, shape or extent"
                )));
            }
            Ok((data_start + a, len))
        };
        let row_bytes = QRows::row_bytes(hidden, head_quant).unwrap_or(0);
        let (head_at, _) = entry("head", &[vocab, row_bytes])?;
        let meta_len = header
            .get("base_metadata")
            .and_then(|v| v.get("shape"))
            .and_then(|s| s.get(0))
            .and_then(|s| s.as_u64())
            .filter(|&l| l as usize <= MAX_BASE_METADATA)
            .ok_or_else(|| bad("base metadata missing or too large"))?
            as usize;
        let (meta_at, _) = entry("base_metadata", &[meta_len])?;
        let mut meta = vec![0u8; meta_len];
        f.seek(SeekFrom::Start(meta_at)).map_err(io)?;
        f.read_exact(&mut meta).map_err(io)?;
        let g = GgufFile::from_bytes(path, meta)?;
        let config = BaseConfig::from_gguf(g.content())?;
        let tokenizer = SpaTokenizer::from_gguf(g.content())?;
        if config.vocab != vocab || config.hidden != hidden || tokenizer.vocab_size() != vocab {
            return Err(bad(
                "the base metadata and the head disagree on the vocabulary",
            ));
        }
        // The head is read in place from a read-only mapping of the file: its pages are the
        // file's, loaded on first use and droppable by the OS under pressure, instead of 30 MB
        // of the app's own memory. A head that is not aligned for its blocks (a pack written
        // before the builder padded the metadata) is read into memory instead.
        // SAFETY: the mapping is read-only and the pack is immutable: it is written once under
        // another name and renamed into place, never modified (a new pack is a new file).
        let map = unsafe { memmap2::Mmap::map(&f) }
            .ok()
            .map(std::sync::Arc::new);
        let mapped = match map {
            Some(m) => QRows::map_blocks(m, head_at as usize, vocab, hidden, head_quant)
                .map_err(|e| bad(&format!("head: {e}")))?,
            None => None,
        };
        let rows = match mapped {
            Some(rows) => rows,
            None => {
                f.seek(SeekFrom::Start(head_at)).map_err(io)?;
                QRows::read_blocks(&mut f, vocab, hidden, head_quant)
                    .map_err(|e| bad(&format!("head: {e}")))?
            }
        };
        // The tokenizer's construction left ~10 MB of freed temporaries in the heap.
        crate::mem::release_free_heap();
        Ok(Self {
            tokenizer,
            config,
            identity: get("base_identity")?.to_string(),
            projection: get("projection_fingerprint")?.to_string(),
            head: DeviceHead::from_rows(rows),
            head_quant,
        })
    }

    /// [`DevicePack::load`] after checking that the file's sha256 is `sha256` (hex): a
    /// flipped byte anywhere is a [`SpaError::CorruptSafetensors`].
    pub fn load_verified(path: impl AsRef<Path>, sha256: &str) -> Result<Self> {
        let path = path.as_ref();
        let got = sha256_file(path)?;
        if got != sha256 {
            return Err(SpaError::safetensors(
                path,
                format!("sha256 {got} != expected {sha256}"),
            ));
        }
        Self::load(path)
    }
}

/// sha256 (hex) of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).map_err(|e| SpaError::MissingFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| SpaError::safetensors(path, format!("read: {e}")))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
