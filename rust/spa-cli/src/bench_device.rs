//! `spa bench device`: what the slim device costs, measured against a real HTTPS server on
//! loopback (started in this process; random projection, so the start is fast). Every device
//! figure comes from a child process (this binary, `--child MODE`) that holds nothing but the
//! device half, so its peak resident memory is the device's:
//!
//! - `pack_bytes`: the device pack's size;
//! - `connect_ms_cold`: manifest + downloading the pack + loading it, into an empty directory;
//! - `connect_ms_cached`: the same with the pack already there (its sha256 is checked);
//! - `chat_peak_rss_bytes`: connect (cached) and one 64-token greedy answer;
//! - `suggest_peak_rss_bytes`: connect (cached) and 20 suggestion strips along a sentence;
//! - `connect_peak_rss_bytes`: the cached connect alone;
//! - `chat_rss_anon_bytes` / `suggest_rss_anon_bytes`: the child's resident *anonymous* memory
//!   at the end (Linux `RssAnon`: heap, stacks; not the pages of mapped files such as the
//!   pack's head, which the OS can drop and re-read). Close to what iOS counts against an app
//!   extension's limit (its "footprint" leaves out clean file-backed pages);
//! - `side_step_us_q8`: one position of the q8 side network (width 64, 30 taps), mean of 256;
//! - `q8_argmax_agreement` / `q4_argmax_agreement`: how often the quantized head's argmax is
//!   the f32 head's, over the base's final hidden states of 512 tokens of Moby-Dick.
//!
//! With `--personalize-words N`, a fifth child personalizes as the SDK's `Personalizer` does
//! (features from the server, training over the pack's q8 head, the shipping decision) on the
//! last N words of Moby-Dick before its held-out chapters, and reports
//! `personalize_peak_rss_bytes` and `personalize_seconds`. The server's projection is random
//! here, so the figures are memory and time, not quality.
//!
//! Loopback only (no emulated RTT or bandwidth): connect times are CPU, disk and TLS cost.

use crate::serve::{device_pack, pack_device, untrained_plugin};
use anyhow::{bail, Context, Result};
use spa_model::QuantMode;
use spa_runtime::{Client, ClientConfig, DeviceModel, Mode, RuntimeParams, SpaSession, Suggester};
use spa_server::{tls, AppState, Keys, ServerConfig};
use spa_train::personalize::{personalize, PersonalizeConfig, PersonalizeReport, RemoteFeatures};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct DeviceBenchArgs {
    /// Quantization of the pack's head: q8 or q4.
    #[arg(long, default_value = "q8")]
    pack: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also measure a personalization on this many words of Moby-Dick (0: skip; the study's
    /// size is 21500 words, ~10-20 minutes here).
    #[arg(long, default_value_t = 0)]
    personalize_words: usize,
    /// Internal: run one device measurement (connect | chat | suggest) and print it as JSON.
    #[arg(long, hide = true)]
    child: Option<String>,
    #[arg(long, hide = true)]
    url: Option<String>,
    #[arg(long, hide = true)]
    ca: Option<PathBuf>,
    #[arg(long, hide = true)]
    dir: Option<PathBuf>,
}

const KEY: &str = "bench-device-key";

async fn connect(
    url: &str,
    ca: &Path,
    dir: &Path,
) -> Result<(Client, spa_protocol::Manifest, Arc<DeviceModel>)> {
    let mut cfg = ClientConfig::new(url, KEY);
    cfg.extra_root_pem = Some(std::fs::read_to_string(ca)?);
    let client = Client::new(cfg)?;
    let m = client.manifest().await?;
    let plugin = untrained_plugin(&m)?;
    let dev = pack_device(&client, &m, &plugin, QuantMode::Q8, dir, &mut |_, _| {}).await?;
    Ok((client, m, Arc::new(dev)))
}

async fn child(
    mode: &str,
    url: &str,
    ca: &Path,
    dir: &Path,
    personalize_words: usize,
) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    let (client, m, dev) = connect(url, ca, dir).await?;
    let connect_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut extra = serde_json::json!({});
    match mode {
        "connect" => {}
        "chat" => {
            let params = RuntimeParams {
                max_tokens: 64,
                draft: 8,
                stop_tokens: Vec::new(), // the full 64 tokens
                ..Default::default()
            };
            let prompt = dev.tokenizer.encode(
                &dev.tokenizer
                    .chat_prompt("Write a short story about a lighthouse keeper."),
            )?;
            let mut s = SpaSession::new(client.clone(), dev.clone(), Mode::Spa);
            let (toks, _) = s.generate(&prompt, &params, None, |_| true).await?;
            if toks.len() != 64 {
                bail!("chat answered {} tokens, not 64", toks.len());
            }
            s.reset().await;
        }
        "suggest" => {
            let text =
                "The old lighthouse keeper climbed the stairs every evening to light the lamp";
            let strip = Suggester::new(&dev);
            let mut n = 0;
            for (i, _) in text.char_indices().filter(|(_, c)| *c == ' ') {
                for cut in [i + 1, i + 2] {
                    if n < 20 && cut <= text.len() {
                        strip.suggest(&client, &dev, &text[..cut], 3).await?;
                        n += 1;
                    }
                }
            }
            if n != 20 {
                bail!("{n} suggestion strips, not 20");
            }
        }
        "personalize" => {
            let texts = crate::train_cmd::author_texts(
                "moby-dick",
                crate::train_cmd::TextSplit {
                    hold_out_last: None,
                    train_words: personalize_words,
                    heldout_words: (personalize_words / 10).max(200),
                },
            )?;
            let handle = tokio::runtime::Handle::current();
            let cfg = PersonalizeConfig {
                max_chunks: 1000,
                ..Default::default()
            };
            let steps = cfg.steps;
            let t = Instant::now();
            let (c, d) = (client.clone(), dev.clone());
            let report = tokio::task::spawn_blocking(move || -> Result<PersonalizeReport> {
                let mut plugin = untrained_plugin(&m)?;
                let mut src = RemoteFeatures {
                    client: &c,
                    handle,
                    n_taps: m.taps.len(),
                    width: m.side_width as usize,
                };
                Ok(personalize(
                    &mut plugin,
                    &d.head,
                    &d.tokenizer,
                    &mut src,
                    &texts,
                    &cfg,
                    &mut |_| true,
                )?)
            })
            .await??;
            extra = serde_json::json!({
                "seconds": t.elapsed().as_secs_f64(),
                "steps": steps,
                "train_tokens": report.train_tokens,
            });
        }
        other => bail!("unknown child mode {other}"),
    }
    Ok(serde_json::json!({
        "extra": extra,
        "connect_ms": connect_ms,
        "peak_rss_bytes": spa_train::personalize::peak_rss_bytes().unwrap_or(0),
        "rss_anon_bytes": spa_train::personalize::proc_status_bytes("RssAnon:").unwrap_or(0),
    }))
}

fn run_child(
    mode: &str,
    url: &str,
    ca: &Path,
    dir: &Path,
    personalize_words: usize,
) -> Result<serde_json::Value> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "device", "--child", mode, "--url", url])
        .arg(format!("--personalize-words={personalize_words}"))
        .arg("--ca")
        .arg(ca)
        .arg("--dir")
        .arg(dir)
        .output()
        .context("starting the device child process")?;
    if !out.status.success() {
        bail!(
            "device child {mode} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(line.trim())?)
}

/// `spa bench device`.
pub async fn device(a: DeviceBenchArgs) -> Result<()> {
    if let Some(mode) = &a.child {
        let (url, ca, dir) = match (&a.url, &a.ca, &a.dir) {
            (Some(u), Some(c), Some(d)) => (u, c, d),
            _ => bail!("--child needs --url, --ca and --dir"),
        };
        println!("{}", child(mode, url, ca, dir, a.personalize_words).await?);
        return Ok(());
    }
    let quant = QuantMode::parse(&a.pack)?;
    let (base, proj) = crate::serve::load_server_parts(None, 64, "random:7")?;
    let pack = device_pack(None, base.identity(), proj.fingerprint(), quant)?;
    let pack_bytes = pack.len();
    // Side step cost on this machine, from the same device model the children build.
    let side_step_us = {
        let plugin = spa_model::SidePlugin::init(&base, &proj, 1, 0.0)?;
        let side = spa_model::SideNetwork::new(&plugin.weights, QuantMode::Q8, 1024)?;
        let c = side.config().clone();
        let taps: Vec<Vec<f32>> = (0..c.taps.len())
            .map(|t| {
                (0..c.width)
                    .map(|i| ((t * 31 + i * 7) % 13) as f32 / 13.0 - 0.5)
                    .collect()
            })
            .collect();
        let zeros = vec![0f32; c.base_hidden];
        let mut cache = side.new_cache();
        side.step(&taps, &zeros, &mut cache)?; // warm-up
        let n = 256;
        let t = Instant::now();
        for _ in 0..n {
            side.step(&taps, &zeros, &mut cache)?;
        }
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    // Does the quantized head pick the same next token as the f32 head? Real final hidden
    // states of the base over the start of Moby-Dick (512 positions).
    let agreement = {
        let text = std::fs::read_to_string(
            crate::assets::spa_home().join("data/personal/moby-dick/chapter_1.txt"),
        )
        .unwrap_or_else(|_| "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world. ".repeat(8));
        let mut ids = base.tokenizer().encode(&text)?;
        ids.truncate(512);
        let out = base.forward(&ids, &mut base.new_cache())?;
        let hidden: Vec<Vec<f32>> = out.hidden.to_vec2()?;
        let f32_head = spa_model::DeviceHead::from_base(&base, QuantMode::F32)?;
        let mut agree = serde_json::Map::new();
        for (name, q) in [("q8", QuantMode::Q8), ("q4", QuantMode::Q4)] {
            let h = spa_model::DeviceHead::from_base(&base, q)?;
            let same = hidden
                .iter()
                .filter(|x| {
                    spa_model::argmax(&h.full(x).unwrap_or_default())
                        == spa_model::argmax(&f32_head.full(x).unwrap_or_default())
                })
                .count();
            agree.insert(
                format!("{name}_argmax_agreement"),
                serde_json::json!(same as f64 / hidden.len().max(1) as f64),
            );
        }
        agree.insert("argmax_positions".into(), serde_json::json!(hidden.len()));
        agree
    };
    let tmp = std::env::temp_dir().join(format!("spa-bench-device-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let cert = tls::dev_cert().map_err(anyhow::Error::msg)?;
    let ca = tmp.join("ca.pem");
    std::fs::write(&ca, &cert.cert_pem)?;
    let cfg = ServerConfig {
        keys: Keys::new(&[KEY]),
        ..ServerConfig::default()
    };
    let state = Arc::new(AppState::new(base, proj, cfg).with_device_pack(pack));
    let srv = spa_server::start(state, "127.0.0.1:0".parse()?, Some(&cert))
        .await
        .map_err(anyhow::Error::msg)?;
    let url = srv.url();
    let dir = tmp.join("pack");
    // Children run one at a time and block; keep the server's runtime free.
    let (u, c, d) = (url.clone(), ca.clone(), dir.clone());
    let words = a.personalize_words;
    let results = tokio::task::spawn_blocking(move || -> Result<Vec<serde_json::Value>> {
        let mut modes = vec!["connect", "connect", "chat", "suggest"];
        if words > 0 {
            modes.push("personalize");
        }
        modes
            .iter()
            .map(|m| run_child(m, &u, &c, &d, words))
            .collect()
    })
    .await??;
    srv.shutdown().await;
    let _ = std::fs::remove_dir_all(&tmp);
    let f = |i: usize, k: &str| results[i][k].as_f64().unwrap_or(f64::NAN);
    let mut v = serde_json::json!({
        "pack_quant": a.pack,
        "pack_bytes": pack_bytes,
        "connect_ms_cold": f(0, "connect_ms"),
        "connect_ms_cached": f(1, "connect_ms"),
        "chat_peak_rss_bytes": f(2, "peak_rss_bytes") as u64,
        "suggest_peak_rss_bytes": f(3, "peak_rss_bytes") as u64,
        "connect_peak_rss_bytes": f(1, "peak_rss_bytes") as u64,
        "chat_rss_anon_bytes": f(2, "rss_anon_bytes") as u64,
        "suggest_rss_anon_bytes": f(3, "rss_anon_bytes") as u64,
        "side_step_us_q8": side_step_us,
        "network": "loopback HTTPS, no emulated RTT or bandwidth",
    });
    for (k, x) in agreement {
        v[k] = x;
    }
    if let Some(p) = results.get(4) {
        v["personalize_words"] = serde_json::json!(words);
        v["personalize_peak_rss_bytes"] = p["peak_rss_bytes"].clone();
        v["personalize_seconds"] = p["extra"]["seconds"].clone();
        v["personalize_steps"] = p["extra"]["steps"].clone();
        v["personalize_train_tokens"] = p["extra"]["train_tokens"].clone();
    }
    if a.json {
        println!("{v}");
    } else {
        println!(
            "device pack ({}): {:.1} MB\nconnect: {:.0} ms cold (download), {:.0} ms cached\n\
             peak RSS: connect {:.1} MB, chat (64 tokens) {:.1} MB, suggest (20 strips) {:.1} MB\n\
             anonymous (heap) memory at the end: chat {:.1} MB, suggest {:.1} MB\nside step (q8): {:.0} us\n\
             head argmax agreement with f32 over {} positions: q8 {:.2}%, q4 {:.2}%",
            a.pack,
            pack_bytes as f64 / 1e6,
            f(0, "connect_ms"),
            f(1, "connect_ms"),
            f(1, "peak_rss_bytes") / 1e6,
            f(2, "peak_rss_bytes") / 1e6,
            f(3, "peak_rss_bytes") / 1e6,
            f(2, "rss_anon_bytes") / 1e6,
            f(3, "rss_anon_bytes") / 1e6,
            side_step_us,
            v["argmax_positions"],
            100.0 * v["q8_argmax_agreement"].as_f64().unwrap_or(f64::NAN),
            100.0 * v["q4_argmax_agreement"].as_f64().unwrap_or(f64::NAN),
        );
        if words > 0 {
            println!(
                "personalization ({words} words, {} steps, features from the server): peak RSS {:.1} MB, {:.0} s",
                v["personalize_steps"],
                v["personalize_peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
                v["personalize_seconds"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    Ok(())
}
