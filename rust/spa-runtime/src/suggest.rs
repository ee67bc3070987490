//! Next-word suggestions (the keyboard use case): the words a suggestion strip shows for the
//! text before the cursor.
//!
//! One stateless `POST /v1/features` round trip: the server runs the frozen base over the
//! context's token ids and returns the tapped states of every position plus the base's top-k
//! candidates for the next token; the device runs the personal side network and gate over those
//! states (quantized, as when generating) and ranks the candidates by the gate's mixture of the
//! side path and the base, `g · P_side + (1 - g) · P_base` (the distribution SPA training fits).
//! Because the LM head is linear, the side path's logit of candidate `t` is the base's logit plus
//! `head[t] · up(state)`, so the server never needs the side network and the device never needs
//! the base.
//!
//! The candidates are whole words (a token with a leading space and letters only) matching the
//! partly typed word, best first. This is the rule the keystroke-savings metric of
//! `spa-train` measures.

use crate::device::DeviceModel;
use crate::error::{Result, RuntimeError};
use crate::Client;
use spa_model::GateMode;
use spa_protocol::{decode_tensor, Limits};

/// Base candidates requested per suggestion (the server's limit is 64).
pub const SUGGEST_TOP_K: u32 = 64;

/// Most context tokens sent (the latest ones; the server's limit is 512).
pub const SUGGEST_MAX_CONTEXT: usize = 256;

/// Suggestions for one cursor position.
#[derive(Debug, Clone, PartialEq)]
pub struct Suggestions {
    /// Whole words, best first, each starting with the partly typed word.
    pub words: Vec<String>,
    /// The partly typed word they complete ("" at a word boundary).
    pub partial: String,
    /// The personal side path dominates the ranking (the gate's probability is above 0.5).
    pub side: bool,
    /// The gate's probability of the side path.
    pub p_side: f32,
    /// Context tokens the server saw.
    pub context_tokens: usize,
}

/// Splits the text before the cursor into the finished context and the partly typed word: the
/// trailing run of letters and apostrophes (empty after a space or punctuation).
///
/// ```
/// use spa_runtime::suggest::split_partial;
/// assert_eq!(split_partial("I love New Yo"), ("I love New", "Yo"));
/// assert_eq!(split_partial("I love "), ("I love", ""));
/// assert_eq!(split_partial("Hello,"), ("Hello,", ""));
/// ```
pub fn split_partial(text: &str) -> (&str, &str) {
    let cut = text
        .char_indices()
        .rev()
        .take_while(|(_, c)| is_word_char(*c))
        .last()
        .map(|(i, _)| i)
        .unwrap_or(text.len());
    (text[..cut].trim_end(), &text[cut..])
}

fn is_word_char(c: char) -> bool {
    c.is_alphabetic() || c == '\''
}

/// Up to `count` next-word suggestions for `text` (the text before the cursor).
///
/// Errors are those of the features request (network, key, limits) and of a malformed answer
/// ([`RuntimeError::Protocol`]); an empty text asks for the first word of a document.
pub async fn suggest(
    client: &Client,
    device: &DeviceModel,
    text: &str,
    count: usize,
) -> Result<Suggestions> {
    let (context, partial) = split_partial(text);
    let tok = &device.tokenizer;
    let mut ids = tok
        .encode_fragment(context)
        .map_err(|e| RuntimeError::Model(e.to_string()))?;
    if ids.len() > SUGGEST_MAX_CONTEXT {
        ids.drain(..ids.len() - SUGGEST_MAX_CONTEXT);
    }
    // A document start: BOS when the model has one, else its end-of-text id (what separates
    // documents in training).
    let start = tok.bos().or_else(|| tok.eos_ids().first().copied());
    if ids.is_empty() || tok.add_bos() {
        ids.insert(0, start.unwrap_or(0));
    }
    let n = ids.len();
    // The features answer lists candidates for every position but the last: one placeholder
    // token after the context makes the context's last position one of them. Causal attention
    // keeps it from changing anything before it.
    let mut req = ids.clone();
    req.push(start.unwrap_or(0));
    let resp = client.features(&req, SUGGEST_TOP_K).await?;
    let c = SUGGEST_TOP_K as usize + 1;
    let cfg = device.side.config();
    let n_taps = cfg.taps.len();
    let taps_t = resp
        .taps
        .as_ref()
        .ok_or_else(|| RuntimeError::Protocol("features answer without taps".into()))?;
    let taps = decode_tensor(taps_t, &Limits::default())?;
    if taps.rows != (n + 1) * n_taps
        || taps.cols != cfg.width
        || resp.cand_ids.len() != n * c
        || resp.cand_logits.len() != n * c
    {
        return Err(RuntimeError::Protocol(format!(
            "features answer of the wrong shape for {} tokens",
            n + 1
        )));
    }
    let mut cache = device.side.new_cache();
    let zeros = vec![0f32; cfg.base_hidden];
    let mut last = None;
    for p in 0..n {
        let z: Vec<Vec<f32>> = (0..n_taps)
            .map(|t| taps.row(p * n_taps + t).to_vec())
            .collect();
        last = Some(
            device
                .side
                .step(&z, &zeros, &mut cache)
                .map_err(|e| RuntimeError::Model(e.to_string()))?,
        );
    }
    let step = last.ok_or_else(|| RuntimeError::Protocol("empty context".into()))?;
    let row = (n - 1) * c;
    // The first k slots are the base's top-k (the last one is the placeholder or a pad).
    let cand = &resp.cand_ids[row..row + c - 1];
    let base = &resp.cand_logits[row..row + c - 1];
    if base.iter().any(|x| !x.is_finite()) {
        return Err(RuntimeError::Protocol("non-finite candidate logits".into()));
    }
    // The side path's logits: `step.hidden` is the side's correction alone (the base hidden
    // passed in was zero), and the head is linear.
    let side_logits = || -> Result<Vec<f32>> {
        let delta = device
            .head
            .shortlist(cand, &step.hidden)
            .map_err(|e| RuntimeError::Model(e.to_string()))?;
        Ok(base.iter().zip(&delta).map(|(b, d)| b + d).collect())
    };
    // Ranked by the gate's mixture of both paths (the distribution SPA training fits); a strip,
    // unlike generation, need not pick one path.
    let probs = match device.gate {
        GateMode::Learned => spa_model::gate_mixture(step.p_side, &side_logits()?, base),
        GateMode::AlwaysSide => spa_model::softmax(&side_logits()?),
        GateMode::AlwaysBase => spa_model::softmax(base),
    };
    let side = device.gate.use_side(step.p_side);
    let mut order: Vec<usize> = (0..cand.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut words: Vec<String> = Vec::new();
    for i in order {
        if words.len() == count {
            break;
        }
        if let Some(w) = device.tokenizer.whole_word(cand[i]) {
            if w.starts_with(partial) && !words.contains(&w) {
                words.push(w);
            }
        }
    }
    Ok(Suggestions {
        words,
        partial: partial.to_string(),
        side,
        p_side: step.p_side,
        context_tokens: n,
    })
}

#[cfg(test)]
mod tests {
    use super::split_partial;

    #[test]
    fn partial_word_split() {
        assert_eq!(split_partial(""), ("", ""));
        assert_eq!(split_partial("Yo"), ("", "Yo"));
        assert_eq!(split_partial("it's ok"), ("it's", "ok"));
        assert_eq!(split_partial("don'"), ("", "don'"));
        assert_eq!(split_partial("end.  "), ("end.", ""));
        assert_eq!(split_partial("naïve café"), ("naïve", "café"));
        assert_eq!(split_partial("x 42"), ("x 42", ""));
    }
}
