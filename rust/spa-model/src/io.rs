//! Safetensors I/O for f32 tensor sets with a JSON metadata record, written atomically
//! (temp file + fsync + rename), so a crash or full disk never leaves a half-written file.

use crate::error::{Result, SpaError};
use crate::side::F32Tensor;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// Metadata key under which the JSON record is stored.
pub const META_KEY: &str = "spa.meta";

/// Writes `tensors` and `meta` (JSON) to `path` atomically.
pub fn save_f32(path: &Path, tensors: &BTreeMap<String, F32Tensor>, meta: &str) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, b, s)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| SpaError::safetensors(path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut info = HashMap::new();
    info.insert(META_KEY.to_string(), meta.to_string());
    let buf =
        safetensors::serialize(views, Some(info)).map_err(|e| SpaError::safetensors(path, e))?;
    atomic_write(path, &buf)
}

/// Writes `data` to `path` via a temporary file in the same directory and a rename.
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(res?)
}

/// Reads an f32 safetensors file: returns the tensors and the JSON metadata string.
pub fn load_f32(path: &Path) -> Result<(BTreeMap<String, F32Tensor>, String)> {
    let bytes = std::fs::read(path).map_err(|e| SpaError::MissingFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let (_, md) = SafeTensors::read_metadata(&bytes).map_err(|e| SpaError::safetensors(path, e))?;
    let meta = md
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY).cloned())
        .ok_or_else(|| SpaError::safetensors(path, format!("no `{META_KEY}` metadata record")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| SpaError::safetensors(path, e))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(SpaError::safetensors(
                path,
                format!("tensor {name} is {:?}, expected F32", view.dtype()),
            ));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if data.iter().any(|x| !x.is_finite()) {
            return Err(SpaError::safetensors(
                path,
                format!("tensor {name} holds NaN or infinity"),
            ));
        }
        out.insert(
            name,
            F32Tensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok((out, meta))
}
