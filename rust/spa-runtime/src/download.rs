//! Fetching the device pack (`GET /v1/device-pack`) into app storage: resumable, verified,
//! atomic.
//!
//! - The pack is kept as `<dir>/<sha256>.spapack`. A cached file is used only after its sha256
//!   matches the manifest's (a damaged one is deleted and fetched again).
//! - Bytes arrive in `<dir>/<sha256>.part`; an interrupted download (network error, app
//!   killed) resumes from the part's length with `Range: bytes=<len>-`. A server that answers
//!   200 instead of 206 restarts the part.
//! - When complete, the part's sha256 is checked and it is renamed over the final name (a
//!   crash leaves either no pack or the whole pack, never a half one). A wrong hash deletes the
//!   part and is a [`RuntimeError::Protocol`] error; packs of other hashes in `dir` are removed.

use crate::client::Client;
use crate::error::{Result, RuntimeError};
use spa_protocol::Manifest;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// File extension of a cached device pack.
pub const PACK_EXT: &str = "spapack";

/// Longest a download request may run before it is retried from where it stopped.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

fn storage(what: &str, e: std::io::Error) -> RuntimeError {
    RuntimeError::Config(format!("device pack storage: {what}: {e}"))
}

impl Client {
    /// The device pack of the server whose manifest is `m`, in `dir` (created if needed):
    /// the cached file when its sha256 matches, else downloaded (resuming a part left by an
    /// earlier attempt). `progress(done, total)` is called as bytes arrive (and once with
    /// `done == total` for a cached pack). Transport errors are retried `max_attempts` times,
    /// each attempt resuming where the last one stopped.
    pub async fn device_pack(
        &self,
        m: &Manifest,
        dir: &Path,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<PathBuf> {
        let (sha, total) = (m.device_pack_sha256.as_str(), m.device_pack_bytes);
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) || total == 0 {
            return Err(RuntimeError::Incompatible(
                "the server publishes no device pack (give the SDK the base model file instead)"
                    .into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| storage("creating the directory", e))?;
        let path = dir.join(format!("{sha}.{PACK_EXT}"));
        let part = dir.join(format!("{sha}.part"));
        if path.is_file() {
            if hash_of(&path).await? == sha {
                progress(total, total);
                return Ok(path);
            }
            log::warn!("cached device pack is damaged; downloading it again");
            std::fs::remove_file(&path).map_err(|e| storage("removing a damaged pack", e))?;
        }
        let attempts = self.cfg.max_attempts.max(1);
        let mut delay = self.cfg.backoff;
        let mut attempt = 1;
        loop {
            match self.download_into(&part, total, progress).await {
                Ok(()) => break,
                Err(e) if e.is_retryable() && attempt < attempts => {
                    log::warn!("device pack download interrupted ({e}); resuming in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                Err(RuntimeError::Transport { message, .. }) => {
                    return Err(RuntimeError::Transport {
                        attempts: attempt,
                        message,
                    })
                }
                Err(e) => return Err(e),
            }
        }
        let got = hash_of(&part).await?;
        if got != sha {
            let _ = std::fs::remove_file(&part);
            return Err(RuntimeError::Protocol(format!(
                "device pack sha256 {got} != the manifest's {sha}"
            )));
        }
        std::fs::File::open(&part)
            .and_then(|f| f.sync_all())
            .and_then(|_| std::fs::rename(&part, &path))
            .map_err(|e| storage("saving the pack", e))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        // Packs of other bases / versions are dead weight now.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                let stale = p != path
                    && p.extension().is_some_and(|x| x == PACK_EXT || x == "part")
                    && p.file_stem().is_some_and(|s| s.len() == 64);
                if stale {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        Ok(path)
    }

    /// One attempt: appends the missing bytes of the pack to `part`.
    async fn download_into(
        &self,
        part: &Path,
        total: u64,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<()> {
        let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if have >= total {
            // Complete (the caller checks it) or longer than the pack: start over.
            if have == total {
                return Ok(());
            }
            std::fs::remove_file(part).map_err(|e| storage("removing a bad part", e))?;
            have = 0;
        }
        let url = format!("{}/v1/device-pack", self.cfg.base_url);
        let mut rb = self
            .http
            .get(&url)
            .bearer_auth(&self.cfg.api_key)
            .timeout(DOWNLOAD_TIMEOUT.max(self.cfg.timeout));
        if have > 0 {
            rb = rb.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        self.traffic
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let transport = crate::client::transport_error;
        let mut resp = rb.send().await.map_err(transport)?;
        let status = resp.status();
        let append = match status {
            reqwest::StatusCode::PARTIAL_CONTENT if have > 0 => {
                let want = format!("bytes {have}-");
                let ok = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with(&want) && v.ends_with(&format!("/{total}")));
                if !ok {
                    return Err(RuntimeError::Protocol(
                        "device pack: the server resumed at another offset".into(),
                    ));
                }
                true
            }
            reqwest::StatusCode::OK => {
                if resp.content_length().is_some_and(|l| l != total) {
                    return Err(RuntimeError::Incompatible(
                        "the served device pack is not the manifest's (size differs)".into(),
                    ));
                }
                false
            }
            reqwest::StatusCode::RANGE_NOT_SATISFIABLE => {
                let _ = std::fs::remove_file(part);
                return Err(RuntimeError::Protocol(
                    "device pack: the server refused the resume offset".into(),
                ));
            }
            reqwest::StatusCode::UNAUTHORIZED => return Err(RuntimeError::Unauthorized),
            reqwest::StatusCode::NOT_FOUND => {
                return Err(RuntimeError::Incompatible(
                    "the server publishes no device pack".into(),
                ))
            }
            s if s.is_server_error() => {
                return Err(RuntimeError::Transport {
                    attempts: 1,
                    message: format!("HTTP {s}"),
                })
            }
            s => return Err(RuntimeError::BadRequest(format!("device pack: HTTP {s}"))),
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(part)
            .map_err(|e| storage("opening the part", e))?;
        let mut done = if append { have } else { 0 };
        progress(done, total);
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if done + chunk.len() as u64 > total {
                drop(f);
                let _ = std::fs::remove_file(part);
                return Err(RuntimeError::Protocol(
                    "device pack: the server sent more bytes than the manifest says".into(),
                ));
            }
            f.write_all(&chunk)
                .map_err(|e| storage("writing the part", e))?;
            done += chunk.len() as u64;
            self.traffic
                .down
                .fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
            progress(done, total);
        }
        if done < total {
            return Err(RuntimeError::Transport {
                attempts: 1,
                message: format!("device pack: connection closed at {done} of {total} bytes"),
            });
        }
        Ok(())
    }
}

/// sha256 of a file, on a blocking thread.
async fn hash_of(path: &Path) -> Result<String> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || spa_model::pack::sha256_file(&p))
        .await
        .map_err(|_| RuntimeError::Model("hashing the device pack panicked".into()))?
        .map_err(RuntimeError::from)
}
