//! `spa train`, `spa eval` and `spa personalize` (spa-train on the real base and data).

use crate::assets;
use anyhow::{bail, Context, Result};
use spa_model::{BaseModel, DeviceAssets, DownProjection, SidePlugin};
use spa_train::data::{self, Split, Task};
use spa_train::eval::{self, EvalOptions, Profile};
use spa_train::features::{self, SeqSpec};
use spa_train::personalize::{self, LocalFeatures, PersonalizeConfig, UserTexts};
use spa_train::sidegrad::SideGraph;
use spa_train::train::{self, Method, TrainConfig};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Task: xsum | wikilingua | coqa | squad.
    #[arg(long, default_value = "xsum")]
    task: String,
    /// Method: spa | lst | full-separation.
    #[arg(long, default_value = "spa")]
    method: String,
    /// Side width (multiple of 32; the server's projection width).
    #[arg(long, default_value_t = 64)]
    width: usize,
    /// Training examples.
    #[arg(long, default_value_t = 200)]
    n_train: usize,
    /// Validation examples.
    #[arg(long, default_value_t = 24)]
    n_val: usize,
    /// Step budget.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Gate usage cost lambda.
    #[arg(long, default_value_t = 0.05)]
    usage_cost: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the trained side weights go (safetensors, loadable by the device runtime).
    #[arg(long, default_value = "side.safetensors")]
    out: PathBuf,
    /// Checkpoint directory (resumes when it holds a run with the same settings).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// GGUF model.
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// quick (< 15 min on 2 cores) or full (hours).
    #[arg(long, default_value = "quick")]
    profile: String,
    /// Run only this fraction of the profile's examples and steps (CI smoke runs).
    #[arg(long)]
    slice: Option<f64>,
    /// Results JSON.
    #[arg(long, default_value = "results/results.json")]
    json: PathBuf,
    /// Markdown report (plots are written next to it).
    #[arg(long, default_value = "results/report.md")]
    report: PathBuf,
    /// Skip LoRA / Adapter / full integration (they train through the base).
    #[arg(long)]
    skip_basegrad: bool,
    /// Only these tasks, in this order (comma-separated: xsum,wikilingua,coqa,squad)
    /// [default: the profile's].
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Skip Table 1's other side widths (SPA at 32 and 128); a later run without it adds them
    /// and reuses the finished runs.
    #[arg(long)]
    skip_table1: bool,
    /// Run files: one JSON per finished (task, method), skipped by a later run with the same
    /// settings, so an interrupted evaluation continues where it stopped
    /// [default: runs/<profile> next to --json].
    #[arg(long, value_name = "DIR")]
    runs: Option<PathBuf>,
    /// Rebuild the tables from the run files in DIR alone: nothing is trained or generated,
    /// and a (task, method) without a run of the current settings is left out.
    #[arg(long, value_name = "DIR", conflicts_with = "runs")]
    from_runs: Option<PathBuf>,
    /// Author of the personalization section (moby-dick | sotu:NAME | email; "none" skips).
    #[arg(long, default_value = "sotu:obama")]
    author: String,
    /// GGUF model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
pub struct PersonalizeArgs {
    /// The writer: moby-dick | sotu:NAME (e.g. sotu:obama) | email.
    #[arg(long, default_value = "sotu:obama")]
    author: String,
    /// Training steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Most training chunks (64 tokens each).
    #[arg(long, default_value_t = 400)]
    max_chunks: usize,
    /// Side width (the server's projection width).
    #[arg(long, default_value_t = 64)]
    width: usize,
    /// Where the personal weights go.
    #[arg(long, default_value = "personal.safetensors")]
    out: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// GGUF model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Every author of the keyboard study (sotu:obama holding out its last 2 addresses,
    /// moby-dick in chapter order, sotu:james_polk holding out his last address), each trained
    /// on the last --train-words words before its held-out text and measured on the first
    /// --heldout-words held-out words; writes --out-json.
    #[arg(long)]
    all_authors: bool,
    /// Hold out the author's last N documents (default: the last fifth of the text).
    #[arg(long)]
    hold_out_last: Option<usize>,
    /// Training text: the last N words before the held-out text (0: all of it).
    #[arg(long, default_value_t = 0)]
    train_words: usize,
    /// Held-out text: its first N words (0: all of it).
    #[arg(long, default_value_t = 0)]
    heldout_words: usize,
    /// Where --all-authors writes its JSON.
    #[arg(long, default_value = "results/personalization.json")]
    out_json: PathBuf,
    /// Train the side network only at word starts (the positions the strip is scored at).
    #[arg(long)]
    word_start_loss: bool,
}

/// The last `n` words of `texts` (0: all), cut at whitespace, documents kept apart.
fn last_words(texts: &[String], n: usize) -> Vec<String> {
    if n == 0 {
        return texts.to_vec();
    }
    let (_, tail) = personalize::split_tail(texts, 1.0, n);
    tail
}

/// The first `n` words of `texts` (0: all), documents kept apart.
fn first_words(texts: &[String], n: usize) -> Vec<String> {
    if n == 0 {
        return texts.to_vec();
    }
    let mut left = n;
    let mut out = Vec::new();
    for t in texts {
        if left == 0 {
            break;
        }
        let words: Vec<&str> = t.split_whitespace().collect();
        if words.len() <= left {
            left -= words.len();
            out.push(t.clone());
        } else {
            out.push(words[..left].join(" "));
            left = 0;
        }
    }
    out
}

fn count_words(texts: &[String]) -> usize {
    texts.iter().map(|t| t.split_whitespace().count()).sum()
}

/// Which text of an author trains and which is typed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TextSplit {
    pub(crate) hold_out_last: Option<usize>,
    pub(crate) train_words: usize,
    pub(crate) heldout_words: usize,
}

pub(crate) fn author_texts(author: &str, split: TextSplit) -> Result<UserTexts> {
    let mut text = data::load_author(&assets::spa_home(), author)?;
    if let Some(n) = split.hold_out_last {
        let mut all = std::mem::take(&mut text.train);
        all.append(&mut text.held_out);
        if n == 0 || n >= all.len() {
            bail!("--hold-out-last must be in 1..{}", all.len());
        }
        text.held_out = all.split_off(all.len() - n);
        text.train = all;
    }
    Ok(UserTexts {
        train: last_words(&text.train, split.train_words),
        held_out: first_words(&text.held_out, split.heldout_words),
    })
}

fn method(s: &str) -> Result<Method> {
    Ok(match s {
        "spa" => Method::Spa,
        "lst" => Method::Lst,
        "full-separation" | "full_separation" => Method::FullSeparation,
        _ => bail!("unknown method `{s}` (spa | lst | full-separation; LoRA/Adapter/full integration run in `spa eval`)"),
    })
}

/// Prompt + target token sequences of task examples (loss from the first target token).
pub(crate) fn task_specs(
    tok: &spa_model::SpaTokenizer,
    exs: &[data::Example],
) -> Result<Vec<SeqSpec>> {
    exs.iter()
        .map(|e| {
            let (prompt, target) = e.tokenize(tok)?;
            Ok(SeqSpec {
                loss_start: prompt.len(),
                tokens: prompt.into_iter().chain(target).collect(),
            })
        })
        .collect()
}

pub(crate) fn projection(base: &BaseModel, width: usize) -> Result<DownProjection> {
    let taps: Vec<usize> = (0..base.config().n_layers).collect();
    Ok(DownProjection::published(
        base,
        width,
        &taps,
        &assets::spa_home().join("projections"),
    )?)
}

pub fn train_cmd(a: TrainArgs) -> Result<()> {
    let task = Task::parse(&a.task)?;
    let m = method(&a.method)?;
    let model = assets::model_path(a.model.as_deref())?;
    let base = BaseModel::load(&model)?;
    let proj = projection(&base, a.width)?;
    let home = assets::spa_home();
    let all = data::load_task(&home, task, 200)?;
    let tok = base.tokenizer();
    let mk = |split, n| task_specs(tok, &data::take_split(&all, split, n));
    let (tr, va) = (mk(Split::Train, a.n_train)?, mk(Split::Val, a.n_val)?);
    let cache = home.join("work/cache");
    let p_tr = cache.join(format!(
        "train-{}-{}-w{}.safetensors",
        task.name(),
        tr.len(),
        a.width
    ));
    let p_va = cache.join(format!(
        "val-{}-{}-w{}.safetensors",
        task.name(),
        va.len(),
        a.width
    ));
    let ftr =
        features::load_or_compute(&base, &[&proj], 32, &tr, &[&p_tr], "train features", false)?;
    let fva = features::load_or_compute(&base, &[&proj], 32, &va, &[&p_va], "val features", false)?;
    let mut plugin = SidePlugin::init(&base, &proj, a.seed, 0.0)?;
    let graph = SideGraph::new(&plugin.weights, m.input(), base.head_weight_f32()?, a.seed)?;
    let cfg = TrainConfig {
        method: m,
        lr: a.lr,
        max_steps: a.steps,
        eval_every: (a.steps / 10).max(5),
        seed: a.seed,
        usage_cost: a.usage_cost,
        ..Default::default()
    };
    let pb = features::progress(a.steps as u64, "training", false);
    let r = train::train(
        &graph,
        &ftr[0].seqs,
        &fva[0].seqs,
        &cfg,
        a.checkpoint.as_deref(),
        &mut |p| {
            pb.set_position(p.step as u64);
            pb.set_message(format!(
                "loss {:.3} val {}",
                p.loss,
                p.val_loss.map(|v| format!("{v:.3}")).unwrap_or("-".into())
            ));
            true
        },
    )?;
    pb.finish_and_clear();
    let (w, _) = graph.to_weights()?;
    if m == Method::FullSeparation {
        log::warn!("full separation's input projection is not part of a device plugin; saving the side blocks only");
    }
    plugin.weights = w;
    let gate = if m.gated() {
        let (t, sweep) = train::choose_gate_threshold(&graph, &fva[0].seqs, &cfg)?;
        plugin.weights.config.gate_threshold = t;
        let at = |t: f32| sweep.iter().find(|p| p.threshold == t);
        match (at(t), at(0.5)) {
            (Some(c), Some(h)) => format!(
                "; gate threshold {t} chosen on validation (top-1 {:.1}% at {:.0}% side usage; 0.5 gives {:.1}% at {:.0}%)",
                100.0 * c.accuracy,
                100.0 * c.side_usage,
                100.0 * h.accuracy,
                100.0 * h.side_usage
            ),
            _ => format!("; gate threshold {t}"),
        }
    } else {
        String::new()
    };
    plugin.save(&a.out)?;
    println!(
        "{} on {}: validation {:.4} -> {:.4} in {} steps ({:.0} s); side usage {:.1}%, overrides {:.1}%{gate}; saved {}",
        m.name(),
        task.name(),
        r.initial.loss,
        r.best.loss,
        r.steps,
        r.seconds,
        100.0 * r.best.side_usage,
        100.0 * r.best.override_rate,
        a.out.display()
    );
    Ok(())
}

pub fn eval_cmd(a: EvalArgs) -> Result<()> {
    let mut profile = match a.profile.as_str() {
        "quick" => Profile::quick(),
        "full" => Profile::full(),
        p => bail!("unknown profile `{p}` (quick | full)"),
    };
    if let Some(s) = a.slice {
        if !(s > 0.0 && s <= 1.0) {
            bail!("--slice must be in (0, 1]");
        }
        profile = profile.slice(s);
    }
    if !a.tasks.is_empty() {
        profile.tasks = a
            .tasks
            .iter()
            .map(|t| spa_train::data::Task::parse(t))
            .collect::<std::result::Result<_, _>>()?;
    }
    if a.skip_table1 {
        profile.table1_tasks.clear();
    }
    let model = assets::model_path(a.model.as_deref())?;
    let home = assets::spa_home();
    let runs_dir = match (&a.from_runs, &a.runs) {
        (Some(d), _) | (None, Some(d)) => d.clone(),
        (None, None) => a
            .json
            .parent()
            .unwrap_or(std::path::Path::new(""))
            .join("runs")
            .join(&profile.name),
    };
    eprintln!("[runs] {}", runs_dir.display());
    let opts = EvalOptions {
        profile: profile.clone(),
        spa_home: home.clone(),
        model: model.clone(),
        work_dir: home.join("work"),
        skip_basegrad: a.skip_basegrad,
        quiet: a.quiet,
        runs_dir: Some(runs_dir),
        only_runs: a.from_runs.is_some(),
    };
    let mut results = eval::run(&opts, &mut |line| eprintln!("{line}"))?;
    eprintln!("[protocol] SPA rounds through the real HTTPS server + device runtime");
    let inputs = std::mem::take(&mut results.protocol_inputs);
    match crate::runtime()?.block_on(measure_rounds(&model, &profile, &inputs)) {
        Ok(rows) => {
            for inp in &inputs {
                let at_k = rows
                    .iter()
                    .find(|r| r.task == inp.task && r.k == serde_json::json!(profile.draft));
                if let Some(r) = at_k {
                    results.notes.push(format!(
                        "{}: SPA rounds/token through the real protocol (loopback TLS server, K = {}, first {} test prompts): {:.3}; simulated from the local trace on the same prompts: {:.3}.",
                        inp.task,
                        profile.draft,
                        inp.prompts.len(),
                        r.rounds_per_token,
                        inp.simulated_rounds_per_token
                    ));
                    results
                        .measured_rounds_per_token
                        .insert(inp.task.clone(), r.rounds_per_token);
                }
            }
            results.rounds = rows;
        }
        Err(e) => {
            log::error!("measuring rounds through the protocol failed: {e:#}");
            results.notes.push(format!(
                "rounds through the real protocol: not measured ({e})"
            ));
        }
    }
    if a.author != "none" {
        eprintln!("[personalization] {}", a.author);
        let cfg = PersonalizeConfig {
            steps: profile.steps.max(20),
            max_chunks: profile.n_train * 4,
            ..Default::default()
        };
        let split = TextSplit {
            hold_out_last: None,
            train_words: 0,
            heldout_words: 0,
        };
        match personalize_run(&model, &a.author, split, profile.width, &cfg, a.quiet) {
            Ok(r) => results.personalization = r.1,
            Err(e) => {
                log::error!("personalization failed: {e:#}");
                results.notes.push(format!("personalization: failed ({e})"));
            }
        }
    }
    for p in [&a.json, &a.report] {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
    }
    spa_model::io::atomic_write(&a.json, serde_json::to_string_pretty(&results)?.as_bytes())?;
    let md = spa_train::report::markdown(&results);
    spa_model::io::atomic_write(&a.report, md.as_bytes())?;
    let dir = a.report.parent().map(PathBuf::from).unwrap_or_default();
    spa_model::io::atomic_write(
        &dir.join("rouge_vs_rounds.svg"),
        spa_train::report::rouge_vs_rounds_svg(&results).as_bytes(),
    )?;
    spa_model::io::atomic_write(
        &dir.join("side_usage_by_position.svg"),
        spa_train::report::side_usage_svg(&results).as_bytes(),
    )?;
    println!("{md}");
    println!("wrote {} and {}", a.json.display(), a.report.display());
    Ok(())
}

/// Personalization as the device does it: features of the user's text from the base, then the
/// base is unloaded and training runs with only what the phone holds (tokenizer, head, side);
/// the peak RSS of that phase is the device-scale memory figure.
fn personalize_run(
    model: &std::path::Path,
    author: &str,
    split: TextSplit,
    width: usize,
    cfg: &PersonalizeConfig,
    quiet: bool,
) -> Result<(SidePlugin, serde_json::Value)> {
    let texts = author_texts(author, split)?;
    // The device's q8 head and tokenizer; the f32 head is dropped before the measured phase.
    let (dev_head, dev_tok) = {
        let a = DeviceAssets::load(model)?;
        (
            spa_model::DeviceHead::from_weights(&a.head, spa_model::QuantMode::Q8)?,
            a.tokenizer,
        )
    };
    let (plugin, feats, held, cache_input) = {
        let base = BaseModel::load(model)?;
        let proj = projection(&base, width)?;
        // The end of the training text validates (cache weight, shipping decision): the side
        // network trains on the rest.
        let (head_texts, _) = personalize::split_tail(&texts.train, 0.1, cfg.cache_tuning_words);
        let mut specs = personalize::chunk_texts(base.tokenizer(), &head_texts, cfg.chunk_tokens)?;
        specs.truncate(cfg.max_chunks);
        // The fast forward (the server's features up to float rounding, several times faster).
        let mut src = LocalFeatures {
            base: &base,
            proj: &proj,
            quiet,
            window_mode: spa_model::ForwardMode::Fast,
        };
        use spa_train::personalize::FeatureSource;
        let f = src.features(&specs, cfg.top_k)?;
        let tok = base.tokenizer();
        let h = personalize::strip_docs(&mut src, tok, &texts.held_out, true, true)?;
        let c = personalize::CacheInput::fetch(
            &mut src,
            tok,
            &texts.train,
            cfg.cache_tuning_words,
            true,
        )?;
        (SidePlugin::init(&base, &proj, cfg.seed, 0.0)?, f, h, c)
    }; // the base is dropped here
    spa_model::mem::release_free_heap();
    let reset = personalize::reset_peak_rss();
    let mut plugin = plugin;
    let pb = features::progress(cfg.steps as u64, "personalizing", quiet);
    let r = personalize::personalize_features(
        &mut plugin,
        &dev_head,
        &dev_tok,
        &feats,
        &held,
        Some(&cache_input),
        cfg,
        &mut |p| {
            pb.set_position(p.step as u64);
            pb.set_message(format!("personalizing, loss {:.3}", p.loss));
            true
        },
    )?;
    pb.finish_and_clear();
    let mut v = serde_json::to_value(&r)?;
    v["author"] = serde_json::json!(author);
    v["train_words"] = serde_json::json!(count_words(&texts.train));
    v["train_chunks"] = serde_json::json!(feats.len());
    v["held_out_words"] = serde_json::json!(r.before.words);
    v["peak_rss_scope"] = serde_json::json!(if reset {
        "process peak since the training phase began (base unloaded, freed heap returned to the OS), including memory the process already held (in spa eval: everything the evaluation left resident)"
    } else {
        "whole process (peak reset unavailable)"
    });
    v["keystroke_savings_gain_points"] =
        serde_json::json!(r.after.keystroke_savings - r.before.keystroke_savings);
    Ok((plugin, v))
}

/// The authors of `spa personalize --all-authors`: (author, documents held out at the end).
pub const STUDY_AUTHORS: [(&str, Option<usize>); 3] = [
    ("sotu:obama", Some(2)),
    ("moby-dick", None),
    ("sotu:james_polk", Some(1)),
];

/// One author's entry of results/personalization.json from a run's report.
fn study_entry(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::json;
    let d = &v["decision"];
    let pick = |m: &serde_json::Value| {
        json!({
            "keystroke_savings": m["keystroke_savings"],
            "top1": m["top1"],
            "top3": m["top3"],
            "perplexity": m["perplexity"],
            "side_usage": m["side_usage"],
        })
    };
    json!({
        "author": v["author"],
        "train_words": v["train_words"],
        "heldout_words": v["held_out_words"],
        "base": pick(&d["held_out"]["base"]),
        "cache": pick(&d["held_out"]["cache"]),
        "spa": pick(&d["held_out"]["spa"]),
        "spa_cache": pick(&d["held_out"]["spa_cache"]),
        "shipped": d["shipped"],
        "gain_points": d["gain_points"],
        "ci95_shipped_minus_base": d["ci95_minus_base"],
        "validation_words": d["validation_words"],
        "validation_savings": d["validation_savings"],
        "cache_weight": v["cache"]["weight"],
        "train_chunks": v["train_chunks"],
        "steps": v["train"]["steps"],
        "val_loss": [v["train"]["initial"]["loss"], v["train"]["best"]["loss"]],
        "train_seconds": v["train"]["seconds"],
        "peak_rss_bytes": v["peak_rss_bytes"],
    })
}

/// `[lo, hi]` of a JSON pair, two decimals.
fn ci_text(v: &serde_json::Value) -> String {
    let x = |i: usize| v[i].as_f64().unwrap_or(f64::NAN);
    format!("[{:+.2}, {:+.2}]", x(0), x(1))
}

fn all_authors_cmd(
    a: &PersonalizeArgs,
    model: &std::path::Path,
    cfg: &PersonalizeConfig,
) -> Result<()> {
    use serde_json::json;
    let t0 = std::time::Instant::now();
    let mut entries = Vec::new();
    for (author, hold) in STUDY_AUTHORS {
        eprintln!("[personalize] {author}");
        let split = TextSplit {
            hold_out_last: hold,
            train_words: a.train_words,
            heldout_words: a.heldout_words,
        };
        let (_, v) = personalize_run(model, author, split, a.width, cfg, a.json)?;
        let e = study_entry(&v);
        eprintln!(
            "[personalize] {author}: ships {} ({:+.2} points, 95% {})",
            e["shipped"],
            e["gain_points"].as_f64().unwrap_or(f64::NAN),
            ci_text(&e["ci95_shipped_minus_base"])
        );
        entries.push(e);
    }
    let peak = entries
        .iter()
        .filter_map(|e| e["peak_rss_bytes"].as_u64())
        .max();
    let train_s = entries
        .iter()
        .filter_map(|e| e["train_seconds"].as_f64())
        .fold(0.0f64, f64::max);
    let out = json!({
        "authors": entries,
        "peak_rss_bytes": peak,
        "train_seconds": train_s,
        "settings": {
            "steps": cfg.steps,
            "chunk_tokens": cfg.chunk_tokens,
            "max_chunks": cfg.max_chunks,
            "width": a.width,
            "train_words": a.train_words,
            "heldout_words": a.heldout_words,
            "validation": "the end of the training text (a tenth, at most 1,500 words): the word cache's weight is tuned and the shipped candidate chosen on it; the side network never trains on it",
            "peak_rss_bytes": "largest of the authors' training phases (base unloaded; the process's peak since the phase began)",
            "train_seconds": "longest of the authors' side-network trainings (wall)",
        },
        "seconds": t0.elapsed().as_secs_f64(),
    });
    if let Some(d) = a.out_json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    spa_model::io::atomic_write(&a.out_json, serde_json::to_string_pretty(&out)?.as_bytes())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:<18} {:>6} {:>6} {:>7} {:>7} {:>7} {:>9} {:>9} {:>16}",
            "author", "train", "held", "base", "cache", "spa", "spa+cache", "ships", "gain [95%]"
        );
        for e in out["authors"].as_array().into_iter().flatten() {
            let ks = |k: &str| e[k]["keystroke_savings"].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:<18} {:>6} {:>6} {:>6.1}% {:>6.1}% {:>6.1}% {:>8.1}% {:>9} {:>+6.2} {}",
                e["author"].as_str().unwrap_or(""),
                e["train_words"],
                e["heldout_words"],
                ks("base"),
                ks("cache"),
                ks("spa"),
                ks("spa_cache"),
                e["shipped"].as_str().unwrap_or(""),
                e["gain_points"].as_f64().unwrap_or(f64::NAN),
                ci_text(&e["ci95_shipped_minus_base"])
            );
        }
        println!("wrote {}", a.out_json.display());
    }
    Ok(())
}

pub fn personalize_cmd(a: PersonalizeArgs) -> Result<()> {
    let model = assets::model_path(a.model.as_deref())?;
    let cfg = PersonalizeConfig {
        steps: a.steps,
        max_chunks: a.max_chunks,
        word_start_loss: a.word_start_loss,
        ..Default::default()
    };
    if a.all_authors {
        return all_authors_cmd(&a, &model, &cfg);
    }
    let split = TextSplit {
        hold_out_last: a.hold_out_last,
        train_words: a.train_words,
        heldout_words: a.heldout_words,
    };
    let (plugin, v) = personalize_run(&model, &a.author, split, a.width, &cfg, a.json)?;
    plugin.save(&a.out)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let b = &v["before"];
    let af = &v["after"];
    let c = &v["cache"];
    println!(
        "author {} ({} training chunks, {} held-out words; word cache weight {})",
        a.author, v["train_chunks"], v["held_out_words"], c["weight"]
    );
    println!(
        "{:<22} {:>10} {:>12} {:>12} {:>14}",
        "held-out metric", "base", "personalized", "base+cache", "personal+cache"
    );
    for (k, label) in [
        ("top1", "next-word top-1 %"),
        ("top3", "next-word top-3 %"),
        ("keystroke_savings", "keystroke savings %"),
        ("perplexity", "perplexity"),
        ("side_usage", "side path used %"),
    ] {
        println!(
            "{:<22} {:>10.2} {:>12.2} {:>12.2} {:>14.2}",
            label,
            b[k].as_f64().unwrap_or(f64::NAN),
            af[k].as_f64().unwrap_or(f64::NAN),
            c["base_cache"][k].as_f64().unwrap_or(f64::NAN),
            c["spa_cache"][k].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(rss) = v["peak_rss_bytes"].as_u64() {
        println!(
            "peak RSS {:.0} MB ({})",
            rss as f64 / 1e6,
            v["peak_rss_scope"].as_str().unwrap_or("")
        );
    }
    println!("saved personal weights to {}", a.out.display());
    Ok(())
}

/// Runs the trained SPA plugins through a real loopback HTTPS server and the device runtime and
/// returns (measured, simulated) rounds per token per task.
/// SPA's trained plugins through a real loopback HTTPS server and the device runtime (trained
/// gate), on each task's first test prompts, at K = 4, 8, 16 and with the adaptive K, and at
/// K = 8 with int4 taps: one row per (task, policy).
async fn measure_rounds(
    model: &std::path::Path,
    profile: &Profile,
    inputs: &[eval::ProtocolInput],
) -> Result<Vec<eval::RoundsRow>> {
    use spa_runtime::{
        AdaptiveDraft, Client, ClientConfig, DeviceModel, Mode, RuntimeParams, SpaSession, TapBits,
    };
    use spa_server::{tls, AppState, Keys, ServerConfig};
    use std::sync::Arc;
    let mut out = Vec::new();
    if inputs.is_empty() {
        return Ok(out);
    }
    let base = Arc::new(BaseModel::load(model)?);
    let proj = Arc::new(projection(&base, profile.width)?);
    let cert = tls::dev_cert().map_err(anyhow::Error::msg)?;
    let state = Arc::new(AppState::new(
        base.clone(),
        proj,
        ServerConfig {
            keys: Keys::new(&["eval-key"]),
            ..ServerConfig::default()
        },
    ));
    let srv = spa_server::start(state, "127.0.0.1:0".parse()?, Some(&cert))
        .await
        .map_err(anyhow::Error::msg)?;
    let mut cfg = ClientConfig::new(srv.url(), "eval-key");
    cfg.extra_root_pem = Some(cert.cert_pem.clone());
    let client = Client::new(cfg)?;
    let assets_dev = DeviceAssets::load(model)?;
    let policies: [(serde_json::Value, u32, Option<AdaptiveDraft>, TapBits); 5] = [
        (4.into(), 4, None, TapBits::Int8),
        (8.into(), 8, None, TapBits::Int8),
        (16.into(), 16, None, TapBits::Int8),
        (
            "adaptive".into(),
            8,
            Some(AdaptiveDraft::default()),
            TapBits::Int8,
        ),
        (8.into(), 8, None, TapBits::Int4),
    ];
    for inp in inputs {
        let mut plugin = SidePlugin::load(&inp.plugin)?;
        if let Some(t) = inp.gate_threshold {
            plugin.weights.config.gate_threshold = t;
        }
        let dev = Arc::new(DeviceModel::new(
            &assets_dev,
            &plugin,
            spa_model::QuantMode::Q8,
            spa_model::GateMode::Learned,
            spa_model::PersonalVocab::default(),
        )?);
        dev.check_manifest(&client.manifest().await?)?;
        for (k, draft, adaptive, bits) in &policies {
            let params = RuntimeParams {
                tap_bits: *bits,
                max_tokens: inp.max_new,
                draft: *draft,
                adaptive_draft: *adaptive,
                top_k: profile.top_k as u32,
                stop_tokens: assets_dev.tokenizer.eos_ids().to_vec(),
                ..Default::default()
            };
            let mut sum = spa_runtime::GenerationStats::default();
            for p in &inp.prompts {
                let mut s = SpaSession::new(client.clone(), dev.clone(), Mode::Spa);
                let (_, st) = s.generate(p, &params, None, |_| true).await?;
                sum.tokens += st.tokens;
                sum.rounds += st.rounds;
                sum.bytes_down += st.bytes_down;
                sum.drafts_requested += st.drafts_requested;
                sum.decisions += st.decisions;
                sum.side_chosen += st.side_chosen;
                sum.overrides += st.overrides;
                s.reset().await;
            }
            let toks = sum.tokens.max(1) as f64;
            out.push(eval::RoundsRow {
                k: k.clone(),
                task: inp.task.clone(),
                rounds_per_token: sum.rounds as f64 / toks,
                bytes_down_per_token: sum.bytes_down as f64 / toks,
                mean_k: sum.drafts_requested as f64 / sum.rounds.max(1) as f64,
                side_usage_pct: 100.0 * sum.side_usage(),
                override_pct: 100.0 * sum.override_rate(),
                prompts: inp.prompts.len(),
                tokens: sum.tokens,
                tap_bits: bits.wire(),
            });
        }
    }
    srv.shutdown().await;
    Ok(out)
}

#[derive(clap::Args)]
pub struct KeyboardArgs {
    /// The writer whose held-out text is typed: moby-dick | sotu:NAME | email.
    #[arg(long, default_value = "sotu:obama")]
    author: String,
    /// Personal weights from `spa personalize` (trained now when absent).
    #[arg(long)]
    personal: Option<PathBuf>,
    /// Training steps when training now.
    #[arg(long, default_value_t = 120)]
    steps: usize,
    /// Words of held-out text to show.
    #[arg(long, default_value_t = 30)]
    words: usize,
    /// GGUF model.
    #[arg(long)]
    model: Option<PathBuf>,
}

/// `spa keyboard`: the keyboard demo in a terminal. The author's later text is "typed"; for
/// every word the suggestion strip of the base and of the personalized model are shown, and
/// the keystroke savings of both are measured over the held-out text.
pub fn keyboard_cmd(a: KeyboardArgs) -> Result<()> {
    use spa_train::personalize::WordEvent;
    let model = assets::model_path(a.model.as_deref())?;
    let width = 64;
    let plugin = match &a.personal {
        Some(p) => SidePlugin::load(p)?,
        None => {
            eprintln!(
                "training personal weights on {}'s earlier text ({} steps)...",
                a.author, a.steps
            );
            let cfg = PersonalizeConfig {
                steps: a.steps,
                ..Default::default()
            };
            let split = TextSplit {
                hold_out_last: None,
                train_words: 0,
                heldout_words: 0,
            };
            personalize_run(&model, &a.author, split, width, &cfg, false)?.0
        }
    };
    let base = BaseModel::load(&model)?;
    let proj = projection(&base, plugin.weights.config.width)?;
    plugin.check_compatible(base.identity(), &proj)?;
    let text = data::load_author(&assets::spa_home(), &a.author)?;
    let tok = base.tokenizer();
    // The first held-out document, as the SDK's strip sees it (whole vocabulary, 129-256
    // tokens of context).
    let held: Vec<String> = text.held_out.iter().take(1).cloned().collect();
    let mut src = LocalFeatures {
        base: &base,
        proj: &proj,
        quiet: true,
        window_mode: spa_model::ForwardMode::BatchInvariant,
    };
    let docs = personalize::strip_docs(&mut src, tok, &held, true, true)?;
    let head = spa_model::DeviceHead::from_base(&base, spa_model::QuantMode::Q8)?;
    let vocab = spa_runtime::WordVocab::shared(tok, base.identity());
    let dev_base = personalize::strip_device(&plugin, &head, tok, spa_model::GateMode::AlwaysBase)?;
    let dev_pers = personalize::strip_device(&plugin, &head, tok, spa_model::GateMode::Learned)?;
    let (mut ev_base, mut ev_pers): (Vec<WordEvent>, Vec<WordEvent>) = (Vec::new(), Vec::new());
    let mb = personalize::strip_metrics(&dev_base, &vocab, None, &docs, &mut |e| {
        ev_base.push(e.clone())
    })?;
    let mp = personalize::strip_metrics(&dev_pers, &vocab, None, &docs, &mut |e| {
        ev_pers.push(e.clone())
    })?;
    println!(
        "typing {}'s held-out text; suggestions shown before each word (* = hit)\n",
        a.author
    );
    println!("{:<14} {:<34} {:<34}", "word", "base", "personalized");
    let show = |e: &WordEvent| {
        e.suggestions
            .iter()
            .map(|s| {
                if *s == e.word {
                    format!("*{s}")
                } else {
                    s.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    for (b, p) in ev_base.iter().zip(&ev_pers).take(a.words) {
        println!("{:<14} {:<34} {:<34}", b.word, show(b), show(p));
    }
    println!(
        "\nover {} held-out words: keystroke savings base {:.1}% -> personalized {:.1}% ; top-3 {:.1}% -> {:.1}% ; top-1 {:.1}% -> {:.1}%",
        mb.words, mb.keystroke_savings, mp.keystroke_savings, mb.top3, mp.top3, mb.top1, mp.top1
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct KeystrokesArgs {
    /// The writer: moby-dick | sotu:NAME | email (earlier text trains the word cache, the last
    /// fifth is typed).
    #[arg(long, default_value = "sotu:obama")]
    author: String,
    /// Also measure the base with f16 hidden states (what the int8 hidden states cost).
    #[arg(long)]
    f16_check: bool,
    /// Skip the personal word cache.
    #[arg(long)]
    no_cache: bool,
    /// Hold out the author's last N documents (default: the last fifth of the text; for
    /// sotu:obama 2 = the 2015-2016 addresses).
    #[arg(long)]
    hold_out_last: Option<usize>,
    /// The base's fast offline forward pass (equal to the server's batch-invariant pass up to
    /// float rounding; several times faster).
    #[arg(long)]
    fast: bool,
    /// Also measure the base strip without word continuations (one-token words only, as
    /// before continuations existed).
    #[arg(long)]
    without_continuations: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// GGUF model.
    #[arg(long)]
    model: Option<PathBuf>,
}

/// `spa keystrokes`: the suggestion strip of the SDK (whole vocabulary, 129-256 tokens of
/// context) on an author's held-out text, the base alone and with the personal word cache
/// (learned from the earlier text, weight tuned on its end): top-1, top-3, keystroke savings.
pub fn keystrokes_cmd(a: KeystrokesArgs) -> Result<()> {
    use spa_model::{DeviceHead, GateMode, QuantMode, SideConfig};
    let model = assets::model_path(a.model.as_deref())?;
    let base = BaseModel::load(&model)?;
    let tok = base.tokenizer();
    let text = author_texts(
        &a.author,
        TextSplit {
            hold_out_last: a.hold_out_last,
            train_words: 0,
            heldout_words: 0,
        },
    )?;
    let t0 = std::time::Instant::now();
    let cfg = base.config();
    // The base alone runs no side network; an untrained one fills the device model.
    let plugin = SidePlugin::init_for(
        base.identity(),
        cfg.n_layers,
        SideConfig::new(cfg.hidden, cfg.n_layers, 64),
        "none",
        0,
        0.0,
    )?;
    let head = DeviceHead::from_base(&base, QuantMode::Q8)?;
    let device = personalize::strip_device(&plugin, &head, tok, GateMode::AlwaysBase)?;
    let vocab = spa_runtime::WordVocab::shared(tok, base.identity());
    let base = &base;
    let mode = if a.fast {
        spa_model::ForwardMode::Fast
    } else {
        spa_model::ForwardMode::BatchInvariant
    };
    let fetch = |f16: bool| {
        move |r: &personalize::WindowRequest<'_>| {
            personalize::local_window_features(base, None, r, f16, mode)
        }
    };
    eprintln!("base features of the held-out text...");
    let held = personalize::strip_docs_with(tok, &text.held_out, false, true, &mut fetch(false))?;
    let m_base = personalize::strip_metrics(&device, &vocab, None, &held, &mut |_| {})?;
    let mut out = serde_json::json!({
        "author": a.author,
        "held_out_words": m_base.words,
        "train_words": text.train.iter().map(|t| t.split_whitespace().count()).sum::<usize>(),
        "context": "129-256 tokens (whole text up to 256)",
        "forward": format!("{mode:?}"),
        "base": m_base,
    });
    if a.without_continuations {
        let held1 =
            personalize::strip_docs_with(tok, &text.held_out, false, false, &mut fetch(false))?;
        out["base_without_continuations"] = serde_json::to_value(personalize::strip_metrics(
            &device,
            &vocab,
            None,
            &held1,
            &mut |_| {},
        )?)?;
    }
    if a.f16_check {
        let held16 =
            personalize::strip_docs_with(tok, &text.held_out, false, true, &mut fetch(true))?;
        out["base_f16_hidden"] = serde_json::to_value(personalize::strip_metrics(
            &device,
            &vocab,
            None,
            &held16,
            &mut |_| {},
        )?)?;
    }
    if !a.no_cache {
        eprintln!("word cache: tuning on the end of the training text...");
        let (head_texts, tail) =
            personalize::split_tail(&text.train, 0.1, personalize::CACHE_TUNING_WORDS);
        let input = personalize::CacheInput {
            train: text.train.clone(),
            head: head_texts,
            tune_docs: personalize::strip_docs_with(tok, &tail, false, true, &mut fetch(false))?,
        };
        let (cache, _, words, keys) = personalize::build_word_cache(&device, &vocab, &input)?;
        let m = personalize::strip_metrics(&device, &vocab, Some(&cache), &held, &mut |_| {})?;
        out["cache"] = serde_json::json!({
            "weight": cache.weight,
            "tuning_words": words,
            "keys_per_weight": spa_runtime::words::WEIGHT_GRID.iter().zip(&keys)
                .map(|(w, k)| serde_json::json!({"weight": w, "keys": k})).collect::<Vec<_>>(),
            "distinct_words": cache.len(),
            "metrics": m,
        });
    }
    out["seconds"] = serde_json::json!(t0.elapsed().as_secs_f64());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{}: {} held-out words, suggestion strip of 3 over the whole vocabulary",
        a.author, m_base.words
    );
    println!(
        "{:<28} {:>10} {:>8} {:>8}",
        "", "keystrokes", "top-1", "top-3"
    );
    let row = |label: &str, m: &serde_json::Value| {
        println!(
            "{:<28} {:>9.1}% {:>7.1}% {:>7.1}%",
            label,
            m["keystroke_savings"].as_f64().unwrap_or(f64::NAN),
            m["top1"].as_f64().unwrap_or(f64::NAN),
            m["top3"].as_f64().unwrap_or(f64::NAN)
        )
    };
    row("base", &out["base"]);
    if a.f16_check {
        row("base, f16 hidden states", &out["base_f16_hidden"]);
    }
    if !a.no_cache {
        row(
            &format!("base + word cache (λ {})", out["cache"]["weight"]),
            &out["cache"]["metrics"],
        );
    }
    Ok(())
}
