//! `spa`: the spa-mobile command line.

mod assets;
mod bench;
mod bench_device;
mod bench_fair;
mod bench_net;
mod bench_train;
mod demo;
mod serve;
mod train_cmd;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use spa_model::{generate, BaseModel, Decoder, GenerateParams, Sampling};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "spa",
    version,
    about = "spa-mobile: Side Plugin Adaptation, cloud base + on-device side network"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download assets (model, gemma, data, personal, all) into $SPA_HOME.
    Fetch {
        /// What to fetch.
        #[arg(default_value = "model")]
        what: Vec<String>,
    },
    /// Generate text with the base model, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Serve the base model over HTTPS.
    Serve(serve::ServeArgs),
    /// Chat with a running server through the device runtime.
    Chat(serve::ChatArgs),
    /// Local server + device runtime: held-out XSum articles answered by the base alone and by
    /// a trained SPA plugin (trained on first use, cached).
    Demo(demo::DemoArgs),
    /// Train a side network (SPA, LST or full separation) on a task.
    Train(train_cmd::TrainArgs),
    /// Reproduce the paper's Tables 1-3 (all methods, all tasks) and write results + report.
    Eval(train_cmd::EvalArgs),
    /// Personalize a side network on one author's text; next-word metrics before/after.
    Personalize(train_cmd::PersonalizeArgs),
    /// Keyboard demo in the terminal: next-word suggestions, base vs personalized.
    Keyboard(train_cmd::KeyboardArgs),
    /// Keystroke savings of the suggestion strip on an author's held-out text (base, + word cache).
    Keystrokes(train_cmd::KeystrokesArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The prompt.
    prompt: String,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// GGUF model (default: $SPA_MODEL or the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Sampling temperature (omit for greedy).
    #[arg(long)]
    temperature: Option<f32>,
    /// Top-k filter when sampling.
    #[arg(long)]
    top_k: Option<usize>,
    /// Top-p (nucleus) filter when sampling.
    #[arg(long)]
    top_p: Option<f32>,
    /// RNG seed when sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Beam search with this many beams.
    #[arg(long)]
    beam: Option<usize>,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Base decode/prefill speed, side step, heads, shortlist agreement, sizes.
    Model(bench::ModelBenchArgs),
    /// Rounds per token, bytes and latency per mode over an emulated RTT (real server + runtime).
    Rounds(bench_net::RoundsArgs),
    /// Server throughput with concurrent sessions.
    Serve(bench_net::ServeBenchArgs),
    /// Per-key fairness: one key's step latency alone and while another key floods steps.
    Fairness(bench_fair::FairnessArgs),
    /// Training cost: base prefill vs offline feature pass, training step time.
    Train(bench_train::TrainBenchArgs),
    /// The slim device: pack size, connect time, chat/suggest peak RSS (child processes).
    Device(bench_device::DeviceBenchArgs),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Fetch { what } => {
            let what: Vec<&str> = what.iter().map(String::as_str).collect();
            for (k, v) in assets::fetch(&what)? {
                println!("{k}={}", v.display());
            }
            Ok(())
        }
        Cmd::Generate(a) => generate_cmd(a),
        Cmd::Serve(a) => runtime()?.block_on(serve::serve(a)),
        Cmd::Chat(a) => runtime()?.block_on(serve::chat(a)),
        Cmd::Demo(a) => runtime()?.block_on(demo::demo(a)),
        Cmd::Train(a) => train_cmd::train_cmd(a),
        Cmd::Eval(a) => train_cmd::eval_cmd(a),
        Cmd::Personalize(a) => train_cmd::personalize_cmd(a),
        Cmd::Keyboard(a) => train_cmd::keyboard_cmd(a),
        Cmd::Keystrokes(a) => train_cmd::keystrokes_cmd(a),
        Cmd::Bench { what } => match what {
            BenchCmd::Model(a) => bench::model(a),
            BenchCmd::Rounds(a) => runtime()?.block_on(bench_net::rounds(a)),
            BenchCmd::Serve(a) => runtime()?.block_on(bench_net::serve(a)),
            BenchCmd::Fairness(a) => runtime()?.block_on(bench_fair::fairness(a)),
            BenchCmd::Train(a) => bench_train::train_bench(a),
            BenchCmd::Device(a) => runtime()?.block_on(bench_device::device(a)),
        },
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let path = assets::model_path(a.model.as_deref())?;
    let base = BaseModel::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let tok = base.tokenizer();
    let text = if a.chat {
        tok.chat_prompt(&a.prompt)
    } else {
        a.prompt.clone()
    };
    let ids = tok.encode(&text)?;
    let sampling = match (a.beam, a.temperature) {
        (Some(width), _) => Sampling::Beam {
            width,
            length_penalty: 1.0,
        },
        (None, Some(temperature)) => Sampling::Sample {
            temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        (None, None) => Sampling::Greedy,
    };
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling,
        stop_tokens: tok.eos_ids().to_vec(),
    };
    let mut stream = tok.stream();
    let mut stdout = std::io::stdout().lock();
    let mut dec = base.decoder();
    let t0 = std::time::Instant::now();
    let mut err = None;
    let out = generate(&mut dec, &ids, &params, |t| match stream.push(t) {
        Ok(s) => {
            let _ = write!(stdout, "{s}");
            let _ = stdout.flush();
            true
        }
        Err(e) => {
            err = Some(e);
            false
        }
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    writeln!(stdout)?;
    let dt = t0.elapsed().as_secs_f64();
    log::info!(
        "{} prompt + {} new tokens in {dt:.2}s ({:.1} tok/s), position {}",
        ids.len(),
        out.len(),
        out.len() as f64 / dt,
        dec.position()
    );
    Ok(())
}
