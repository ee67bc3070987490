//! Task data (DESIGN.md section 4): BIG-bench XSum, WikiLingua (stand-in for CNN/DailyMail),
//! CoQA and SQuAD-shifts (stand-in for SciQ), and personal text (one author), with the
//! deterministic hash split and the prompt formats.
//!
//! Prompt formats (the chat template of the instruct base, `SpaTokenizer::chat_prompt`):
//! - summarization (xsum, wikilingua): `"Summarize the following text in one sentence.\n\n{text}"`
//! - CoQA: `"Answer the question about the story briefly.\n\nStory: {story}\n\n{Q/A history}Q: {q}"`
//! - SQuAD: `"Answer the question with a short span from the text.\n\nText: {context}\n\nQuestion: {q}"`
//!
//! Source texts are cut to a word budget (`max_words`) so prompts stay a few hundred tokens.

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// An evaluation task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// BIG-bench gem/xsum (1,001 BBC article / one-sentence summary pairs).
    Xsum,
    /// BIG-bench gem/wikilingua_en: the stand-in for CNN/DailyMail (no CNN/DM references ship).
    Wikilingua,
    /// BIG-bench CoQA (conversational QA with free-form answers).
    Coqa,
    /// BIG-bench squad_shifts (extractive QA): the stand-in for SciQ (no SciQ ships).
    Squad,
}

impl Task {
    /// All tasks, in table order.
    pub const ALL: [Task; 4] = [Task::Xsum, Task::Wikilingua, Task::Coqa, Task::Squad];

    /// Short name used in files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Task::Xsum => "xsum",
            Task::Wikilingua => "wikilingua",
            Task::Coqa => "coqa",
            Task::Squad => "squad",
        }
    }

    /// The paper's column this task stands for.
    pub fn paper_column(self) -> &'static str {
        match self {
            Task::Xsum => "XSum",
            Task::Wikilingua => "CNN/DM (stand-in: WikiLingua)",
            Task::Coqa => "CoQA",
            Task::Squad => "SciQ (stand-in: SQuAD-shifts)",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Result<Task> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                TrainError::Config(format!("unknown task `{s}` (xsum|wikilingua|coqa|squad)"))
            })
    }

    /// Tokens generated at evaluation (summaries are longer than QA answers).
    pub fn max_new_tokens(self) -> usize {
        match self {
            Task::Xsum | Task::Wikilingua => 50,
            Task::Coqa | Task::Squad => 24,
        }
    }
}

/// Train / validation / test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// 80 %.
    Train,
    /// 10 %.
    Val,
    /// 10 % (never used for tuning).
    Test,
}

/// Deterministic split by a hash of the example id: sha256(id) mod 10 -> 0..7 train, 8 val,
/// 9 test.
pub fn split_of(id: &str) -> Split {
    let h = Sha256::digest(id.as_bytes());
    match h[0] % 10 {
        8 => Split::Val,
        9 => Split::Test,
        _ => Split::Train,
    }
}

/// One prompt / reference pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Stable id (source id, plus the turn for QA).
    pub id: String,
    /// Task.
    pub task: Task,
    /// User message (wrapped in the chat template before tokenizing).
    pub prompt: String,
    /// Reference output.
    pub reference: String,
}

/// Longest reference kept for training (tokens, before the end-of-turn token).
pub const MAX_TARGET_TOKENS: usize = 60;

impl Example {
    /// Split of this example.
    pub fn split(&self) -> Split {
        split_of(&self.id)
    }

    /// Token ids of the prompt (in the chat template) and of the target (the reference cut to
    /// [`MAX_TARGET_TOKENS`], then the end-of-turn token).
    pub fn tokenize(&self, tok: &spa_model::SpaTokenizer) -> Result<(Vec<u32>, Vec<u32>)> {
        let prompt = tok.encode(&tok.chat_prompt(&self.prompt))?;
        let mut target = tok.encode_fragment(&self.reference)?;
        target.truncate(MAX_TARGET_TOKENS);
        target.extend(tok.eos_ids().first().copied());
        Ok((prompt, target))
    }
}

fn cut_words(text: &str, max_words: usize) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() <= max_words {
        words.join(" ")
    } else {
        words[..max_words].join(" ")
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|e| {
        TrainError::Data(format!(
            "{}: {e} (fetch the data with `scripts/fetch-assets.sh data`)",
            path.display()
        ))
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| TrainError::Data(format!("{}: not valid JSON: {e}", path.display())))
}

fn s(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Directory of the BIG-bench tasks under `spa_home`.
pub fn bigbench_dir(spa_home: &Path) -> PathBuf {
    spa_home.join("data/bigbench/benchmark_tasks")
}

/// Loads every example of `task` (all splits), source texts cut to `max_words` words.
pub fn load_task(spa_home: &Path, task: Task, max_words: usize) -> Result<Vec<Example>> {
    let dir = bigbench_dir(spa_home);
    let mut out = Vec::new();
    match task {
        Task::Xsum | Task::Wikilingua => {
            let file = if task == Task::Xsum {
                "gem/xsum/task.json"
            } else {
                "gem/wikilingua_en/task.json"
            };
            let v = read_json(&dir.join(file))?;
            let exs = v["examples"]
                .as_array()
                .ok_or_else(|| TrainError::Data(format!("{file}: no examples")))?;
            for (i, e) in exs.iter().enumerate() {
                let id = e["comment"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or(format!("{}-{i}", task.name()));
                out.push(Example {
                    id,
                    task,
                    prompt: format!(
                        "Summarize the following text in one sentence.\n\n{}",
                        cut_words(s(&e["input"]), max_words)
                    ),
                    reference: s(&e["target"]).trim().to_string(),
                });
            }
        }
        Task::Coqa => {
            let v = read_json(&dir.join("coqa_conversational_question_answering/coqa.test.json"))?;
            let stories = v["data"]
                .as_array()
                .ok_or_else(|| TrainError::Data("coqa: no data".into()))?;
            for st in stories {
                let story = cut_words(s(&st["story"]), max_words);
                let sid = s(&st["id"]);
                let (qs, ans) = (
                    st["questions"].as_array().cloned().unwrap_or_default(),
                    st["answers"].as_array().cloned().unwrap_or_default(),
                );
                let mut history = String::new();
                // The first three turns of each story: keeps prompts short and examples varied.
                for (turn, (q, a)) in qs.iter().zip(&ans).take(3).enumerate() {
                    let (q, a) = (s(&q["input_text"]).trim(), s(&a["input_text"]).trim());
                    out.push(Example {
                        id: format!("coqa-{sid}-{turn}"),
                        task,
                        prompt: format!(
                            "Answer the question about the story briefly.\n\nStory: {story}\n\n{history}Q: {q}"
                        ),
                        reference: a.to_string(),
                    });
                    history.push_str(&format!("Q: {q}\nA: {a}\n"));
                }
            }
        }
        Task::Squad => {
            let v = read_json(&dir.join("squad_shifts/new_wiki_v1.0.json"))?;
            let arts = v["data"]
                .as_array()
                .ok_or_else(|| TrainError::Data("squad: no data".into()))?;
            for a in arts {
                for p in a["paragraphs"].as_array().into_iter().flatten() {
                    let ctx = cut_words(s(&p["context"]), max_words);
                    // One question per paragraph keeps contexts diverse.
                    if let Some(q) = p["qas"].as_array().and_then(|q| q.first()) {
                        let ans = q["answers"]
                            .as_array()
                            .and_then(|a| a.first())
                            .map(|a| s(&a["text"]).trim().to_string())
                            .unwrap_or_default();
                        if ans.is_empty() {
                            continue;
                        }
                        out.push(Example {
                            id: format!("squad-{}", s(&q["id"])),
                            task,
                            prompt: format!(
                                "Answer the question with a short span from the text.\n\nText: {ctx}\n\nQuestion: {}",
                                s(&q["question"]).trim()
                            ),
                            reference: ans,
                        });
                    }
                }
            }
        }
    }
    if out.is_empty() {
        return Err(TrainError::Data(format!(
            "task {} has no examples",
            task.name()
        )));
    }
    Ok(out)
}

/// The first `n` examples of `split` (in file order, which the hash split has shuffled).
pub fn take_split(examples: &[Example], split: Split, n: usize) -> Vec<Example> {
    examples
        .iter()
        .filter(|e| e.split() == split)
        .take(n)
        .cloned()
        .collect()
}

/// One author's personal text, split by time: the texts in date order, the last 20 % (by
/// characters) held out. `author` is `moby-dick`, `sotu:<name>` (e.g. `sotu:obama`, matching
/// the State of the Union file names) or `email` (the spam-assassin "ham" messages' bodies).
#[derive(Debug, Clone)]
pub struct AuthorText {
    /// Author label.
    pub author: String,
    /// Earlier text: training.
    pub train: Vec<String>,
    /// Later text: held out.
    pub held_out: Vec<String>,
}

/// Loads an author's documents in chronological order and holds out the last fifth.
pub fn load_author(spa_home: &Path, author: &str) -> Result<AuthorText> {
    let base = spa_home.join("data/personal");
    let mut docs: Vec<(String, String)> = Vec::new();
    let read_dir = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| {
                TrainError::Data(format!(
                    "{}: {e} (fetch with `scripts/fetch-assets.sh personal`)",
                    d.display()
                ))
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        v.sort();
        Ok(v)
    };
    if author == "moby-dick" {
        let dir = base.join("moby-dick");
        let mut chapters: Vec<(usize, PathBuf)> = read_dir(&dir)?
            .into_iter()
            .filter_map(|p| {
                let n = p
                    .file_stem()?
                    .to_str()?
                    .strip_prefix("chapter_")?
                    .parse()
                    .ok()?;
                Some((n, p))
            })
            .collect();
        chapters.sort();
        for (n, p) in chapters {
            docs.push((format!("chapter {n}"), read_text(&p)?));
        }
    } else if let Some(name) = author.strip_prefix("sotu:") {
        for p in read_dir(&base.join("sotu"))? {
            let f = p
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or("")
                .to_string();
            if f.ends_with(".txt") && f.contains(name) {
                docs.push((f, read_text(&p)?));
            }
        }
    } else if author == "email" {
        for sub in ["easy-ham-1", "easy-ham-2"] {
            for p in read_dir(&base.join("spam-assassin").join(sub))? {
                if let Ok(t) = read_text(&p) {
                    // Drop the headers: the body starts after the first blank line.
                    if let Some(i) = t.find("\n\n") {
                        let body = t[i + 2..].trim();
                        if body.len() > 200 && !body.contains("<html") {
                            docs.push((p.display().to_string(), body.to_string()));
                        }
                    }
                }
            }
        }
    } else {
        return Err(TrainError::Config(format!(
            "unknown author `{author}` (moby-dick | sotu:<name> | email)"
        )));
    }
    if docs.len() < 2 {
        return Err(TrainError::Data(format!(
            "author `{author}`: need at least 2 documents, found {}",
            docs.len()
        )));
    }
    let total: usize = docs.iter().map(|d| d.1.len()).sum();
    let mut acc = 0;
    let (mut train, mut held_out) = (Vec::new(), Vec::new());
    for (_, t) in docs {
        if acc < total * 4 / 5 {
            acc += t.len();
            train.push(t);
        } else {
            held_out.push(t);
        }
    }
    if held_out.is_empty() {
        held_out.push(train.pop().unwrap_or_default());
    }
    Ok(AuthorText {
        author: author.to_string(),
        train,
        held_out,
    })
}

fn read_text(p: &Path) -> Result<String> {
    let b = std::fs::read(p).map_err(|e| TrainError::Data(format!("{}: {e}", p.display())))?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_and_roughly_80_10_10() {
        let ids: Vec<String> = (0..2000).map(|i| format!("ex-{i}")).collect();
        let n = |s| ids.iter().filter(|i| split_of(i) == s).count();
        assert_eq!(split_of("ex-1"), split_of("ex-1"));
        let (tr, va, te) = (n(Split::Train), n(Split::Val), n(Split::Test));
        assert_eq!(tr + va + te, 2000);
        assert!((1500..1700).contains(&tr), "{tr}");
        assert!(
            (150..260).contains(&va) && (150..260).contains(&te),
            "{va} {te}"
        );
    }

    #[test]
    fn cut_words_keeps_a_prefix() {
        assert_eq!(cut_words("a  b\nc d", 3), "a b c");
        assert_eq!(cut_words("a b", 3), "a b");
    }
}
