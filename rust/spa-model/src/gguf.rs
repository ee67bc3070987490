//! The one GGUF reader: opens a file, checks that every tensor's data lies inside it before
//! anything is read, and hands out tensors checked against the shape the caller expects.
//!
//! The base model, the device's assets and the trainers that run through the base all read
//! GGUF files through [`GgufFile`], so a damaged file (truncated, a flipped dimension, a
//! header that points past the end) is a [`SpaError::CorruptGguf`] or a
//! [`SpaError::WrongShape`] everywhere, never an out-of-bounds read, an overflow panic or an
//! allocation the size of a corrupt dimension.

use crate::base::sha256_hex;
use crate::error::{Result, SpaError};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QTensor;
use candle_core::Device;
use std::io::Cursor;
use std::path::{Path, PathBuf};

/// A GGUF file read into memory, its header parsed and every tensor's extent checked.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    bytes: Vec<u8>,
    content: Content,
    identity: String,
}

impl GgufFile {
    /// Reads and checks `path`.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| SpaError::MissingFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(path, bytes)
    }

    /// Reads `path` and checks its sha256 first: a flipped byte anywhere is reported as corrupt.
    pub fn read_verified(path: impl AsRef<Path>, sha256: &str) -> Result<Self> {
        let f = Self::read(path)?;
        if f.identity != sha256 {
            return Err(SpaError::gguf(
                &f.path,
                format!("sha256 {} != expected {sha256}", f.identity),
            ));
        }
        Ok(f)
    }

    /// Parses `bytes` (named `path` in errors) and checks that every tensor lies inside them.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let identity = sha256_hex(&bytes);
        let content =
            Content::read(&mut Cursor::new(&bytes[..])).map_err(|e| SpaError::gguf(path, e))?;
        check_extents(path, &content, bytes.len() as u64)?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            content,
            identity,
        })
    }

    /// The parsed header (metadata and tensor infos).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// sha256 of the whole file (the base identity).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Path the file was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file has a tensor named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Tensor `name`, which must have shape `expected`.
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| SpaError::gguf(&self.path, format!("tensor {name} is missing")))?;
        // Checked before reading, so a wrong-but-valid shape never allocates its data.
        if info.shape.dims() != expected {
            return Err(SpaError::WrongShape {
                name: name.to_string(),
                expected: expected.to_vec(),
                got: info.shape.dims().to_vec(),
            });
        }
        let mut cur = Cursor::new(&self.bytes[..]);
        self.content
            .tensor(&mut cur, name, &Device::Cpu)
            .map_err(|e| SpaError::gguf(&self.path, format!("tensor {name}: {e}")))
    }
}

/// Every tensor's data must lie inside the file (truncation check before any read), with
/// checked arithmetic: a damaged dimension is an error, not an overflow panic.
fn check_extents(path: &Path, content: &Content, file_len: u64) -> Result<()> {
    for (name, info) in content.tensor_infos.iter() {
        let n = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                SpaError::gguf(path, format!("tensor {name}: element count overflows"))
            })?;
        let bs = info.ggml_dtype.block_size();
        if n % bs != 0 {
            return Err(SpaError::gguf(
                path,
                format!("tensor {name}: {n} elements not a multiple of block {bs}"),
            ));
        }
        let size = ((n / bs) as u64).checked_mul(info.ggml_dtype.type_size() as u64);
        let end = size.and_then(|size| {
            content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|x| x.checked_add(size))
        });
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(SpaError::gguf(
                    path,
                    format!(
                    "tensor {name} extends past the end of the file ({file_len} bytes): truncated?"
                ),
                ))
            }
        }
    }
    Ok(())
}
