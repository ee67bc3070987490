//! The unsafe part of the llama.cpp engine: every call into `llama-cpp-sys-2` is here.
//!
//! Invariants (what makes the `unsafe` blocks sound):
//! - [`Context`] owns one `llama_model` and one `llama_context` made from it, freed once in
//!   `Drop` (context before model). Neither pointer is ever null after [`Context::load`].
//! - llama.cpp contexts are not thread-safe: [`Context`] is `Send` but not `Sync`, and every
//!   method takes `&mut self`, so the engine keeps it in a `Mutex` and only one thread at a
//!   time calls into it.
//! - The evaluation callback's user data points at the [`Capture`] boxed inside the same
//!   `Context`: the box never moves (only its contents change) and lives as long as the
//!   context, and the callback runs only inside `llama_decode`, on the thread that called it,
//!   while that thread holds `&mut Context`.
//! - The `llama_batch` is allocated by `llama_batch_init` for `n_batch` tokens and one sequence
//!   id per token; [`Context::decode`] never fills more than that.

use llama_cpp_sys_2 as sys;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::sync::Once;

/// Settings of the llama.cpp context (see [`super::LlamaCppConfig`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ContextParams {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_seq_max: u32,
    pub n_threads: i32,
    pub n_gpu_layers: i32,
    /// Run llama.cpp's LM head; without it the graph stops after `result_norm`.
    pub head: bool,
}

/// Tensors captured during one `llama_decode`: every layer's output (`l_out-<layer>`) and the
/// final norm (`result_norm`), rows appended in batch order (one row of `n_embd` per output
/// token; every token of our batches is an output).
#[derive(Debug, Default)]
pub(crate) struct Capture {
    pub layers: Vec<Vec<f32>>,
    pub norm: Vec<f32>,
    /// Set when a tensor could not be read (wrong type or layout): the decode's results are
    /// not used.
    pub error: Option<String>,
    /// Stop the graph once `result_norm` is captured: the LM head (`result_output`, the last
    /// node) is not computed.
    pub stop_at_norm: bool,
}

impl Capture {
    fn reset(&mut self, n_layer: usize) {
        self.layers.resize_with(n_layer, Vec::new);
        self.layers.iter_mut().for_each(Vec::clear);
        self.norm.clear();
        self.error = None;
    }
}

/// What the callback wants: `Some(Some(layer))` for `l_out-<layer>`, `Some(None)` for
/// `result_norm`, `None` for anything else.
fn wanted(name: &[u8]) -> Option<Option<usize>> {
    if name == b"result_norm" {
        return Some(None);
    }
    let rest = name.strip_prefix(b"l_out-")?;
    std::str::from_utf8(rest).ok()?.parse().ok().map(Some)
}

/// `ggml_backend_sched_eval_callback`: with `ask`, says whether `t` is wanted; without, copies
/// a computed wanted tensor into the [`Capture`] at `user_data`. Continues the graph, except
/// after `result_norm` when [`Capture::stop_at_norm`] is set: returning false there ends the
/// graph's computation (ggml's scheduler stops at that node; `llama_decode` still succeeds,
/// and its logits buffer, never read then, holds whatever was there).
unsafe extern "C" fn eval_callback(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user_data: *mut c_void,
) -> bool {
    // SAFETY: llama.cpp passes a valid tensor; its name is a NUL-terminated array.
    let tensor = unsafe { &*t };
    let name = unsafe { CStr::from_ptr(tensor.name.as_ptr()) }.to_bytes();
    let Some(which) = wanted(name) else {
        return !ask;
    };
    if ask {
        return true;
    }
    // SAFETY: user_data is the context's boxed Capture (module invariants).
    let cap = unsafe { &mut *(user_data as *mut Capture) };
    if tensor.type_ != sys::GGML_TYPE_F32 || !unsafe { sys::ggml_is_contiguous(t) } {
        cap.error = Some(format!(
            "tensor {} is not contiguous f32",
            String::from_utf8_lossy(name)
        ));
        return true;
    }
    let n = unsafe { sys::ggml_nbytes(t) } / 4;
    let dst = match which {
        Some(layer) => match cap.layers.get_mut(layer) {
            Some(d) => d,
            None => return true,
        },
        None => &mut cap.norm,
    };
    let start = dst.len();
    dst.resize(start + n, 0.0);
    // SAFETY: dst has room for n f32 = ggml_nbytes(t) bytes from `start`; the tensor is
    // computed (ask == false) and readable through its backend buffer.
    unsafe {
        sys::ggml_backend_tensor_get(t, dst[start..].as_mut_ptr() as *mut c_void, 0, n * 4);
    }
    !(which.is_none() && cap.stop_at_norm)
}

/// llama.cpp's log lines go to the `log` crate (debug; warnings and errors as such).
unsafe extern "C" fn log_callback(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let msg = msg.trim_end();
    if msg.is_empty() {
        return;
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => log::error!(target: "llama.cpp", "{msg}"),
        sys::GGML_LOG_LEVEL_WARN => log::warn!(target: "llama.cpp", "{msg}"),
        _ => log::debug!(target: "llama.cpp", "{msg}"),
    }
}

/// A loaded model and its context (module invariants).
#[derive(Debug)]
pub(crate) struct Context {
    model: *mut sys::llama_model,
    ctx: *mut sys::llama_context,
    /// The CPU worker threads, kept across decodes (without one, ggml starts and joins threads
    /// for every graph piece, and the evaluation callback cuts each decode into ~31 pieces).
    threadpool: *mut sys::ggml_threadpool,
    batch: sys::llama_batch,
    n_batch: usize,
    capture: Box<Capture>,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
}

// SAFETY: the pointers are owned by this value and used only through `&mut self` (one thread
// at a time); llama.cpp contexts may move between threads.
unsafe impl Send for Context {}

/// Why a decode failed.
#[derive(Debug)]
pub(crate) enum DecodeError {
    /// No room in the KV cache (llama_decode returned 1).
    NoKvSlot,
    /// Any other failure.
    Other(String),
}

impl Context {
    /// Loads the GGUF at `path` and makes a context with `p`.
    pub fn load(path: &Path, p: ContextParams) -> Result<Self, String> {
        static INIT: Once = Once::new();
        INIT.call_once(|| {
            // SAFETY: plain global initialisation, once.
            unsafe {
                sys::llama_log_set(Some(log_callback), std::ptr::null_mut());
                sys::llama_backend_init();
            }
        });
        let cpath = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| format!("model path {} contains NUL", path.display()))?;
        // SAFETY: default params are plain data; the path is NUL-terminated.
        let model = unsafe {
            let mut mp = sys::llama_model_default_params();
            mp.n_gpu_layers = p.n_gpu_layers;
            sys::llama_model_load_from_file(cpath.as_ptr(), mp)
        };
        if model.is_null() {
            return Err(format!("llama.cpp could not load {}", path.display()));
        }
        let mut capture = Box::<Capture>::default();
        // SAFETY: model is valid; cb_eval_user_data points at the boxed capture, which the
        // returned Context owns (module invariants).
        let ctx = unsafe {
            let mut cp = sys::llama_context_default_params();
            cp.n_ctx = p.n_ctx;
            cp.n_batch = p.n_batch;
            cp.n_ubatch = p.n_batch;
            cp.n_seq_max = p.n_seq_max;
            cp.n_threads = p.n_threads;
            cp.n_threads_batch = p.n_threads;
            cp.kv_unified = true;
            cp.no_perf = true;
            cp.cb_eval = Some(eval_callback);
            cp.cb_eval_user_data = capture.as_mut() as *mut Capture as *mut c_void;
            sys::llama_init_from_model(model, cp)
        };
        if ctx.is_null() {
            // SAFETY: model is valid and not used after this.
            unsafe { sys::llama_model_free(model) };
            return Err(format!(
                "llama.cpp could not make a context ({} KV cells, {} sequences)",
                p.n_ctx, p.n_seq_max
            ));
        }
        // SAFETY: ctx is valid; the pool outlives it (freed after the context in Drop). poll = 0:
        // idle workers sleep instead of spinning, since the server shares its cores.
        let threadpool = unsafe {
            let mut tp = sys::ggml_threadpool_params_default(p.n_threads);
            tp.poll = 0;
            let pool = sys::ggml_threadpool_new(&mut tp);
            if !pool.is_null() {
                sys::llama_attach_threadpool(ctx, pool, pool);
            }
            pool
        };
        // SAFETY: model is valid.
        let (n_layer, n_embd, n_vocab, n_ctx_train) = unsafe {
            (
                sys::llama_model_n_layer(model),
                sys::llama_model_n_embd(model),
                sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(model)),
                sys::llama_model_n_ctx_train(model),
            )
        };
        // SAFETY: allocates n_batch tokens with one sequence id each.
        let batch = unsafe { sys::llama_batch_init(p.n_batch as i32, 0, 1) };
        let n_layer = n_layer.max(0) as usize;
        capture.reset(n_layer);
        capture.stop_at_norm = !p.head;
        Ok(Self {
            model,
            ctx,
            threadpool,
            batch,
            n_batch: p.n_batch as usize,
            capture,
            n_layer,
            n_embd: n_embd.max(0) as usize,
            n_vocab: n_vocab.max(0) as usize,
            n_ctx_train: n_ctx_train.max(0) as usize,
        })
    }

    /// Largest number of tokens one [`Context::decode`] takes.
    pub fn n_batch(&self) -> usize {
        self.n_batch
    }

    /// Removes positions `from..` of sequence `seq` (`from = 0`: all of it).
    pub fn seq_rm(&mut self, seq: i32, from: usize) {
        // SAFETY: ctx is valid; removing a range of a sequence always succeeds for a KV cache.
        unsafe {
            let mem = sys::llama_get_memory(self.ctx);
            sys::llama_memory_seq_rm(mem, seq, from as i32, -1);
        }
    }

    /// Decodes `tokens` (`(token, position, sequence)`, at most [`Context::n_batch`]), every
    /// one an output; returns the captured taps and norms (one row per token, in order) and
    /// the logits of the positions in `logits_of` (indices into `tokens`), or no logits at all
    /// when the context runs without its LM head ([`ContextParams::head`]).
    pub fn decode(
        &mut self,
        tokens: &[(u32, usize, i32)],
        logits_of: &[usize],
    ) -> Result<(&Capture, Vec<Vec<f32>>), DecodeError> {
        if tokens.is_empty() || tokens.len() > self.n_batch {
            return Err(DecodeError::Other(format!(
                "a decode takes 1..={} tokens, got {}",
                self.n_batch,
                tokens.len()
            )));
        }
        self.capture.reset(self.n_layer);
        // SAFETY: the batch arrays hold n_batch entries (and one seq id each); we fill
        // tokens.len() <= n_batch of them.
        let rc = unsafe {
            let b = &mut self.batch;
            for (i, &(tok, pos, seq)) in tokens.iter().enumerate() {
                *b.token.add(i) = tok as i32;
                *b.pos.add(i) = pos as i32;
                *b.n_seq_id.add(i) = 1;
                *(*b.seq_id.add(i)) = seq;
                *b.logits.add(i) = 1;
            }
            b.n_tokens = tokens.len() as i32;
            sys::llama_decode(self.ctx, *b)
        };
        match rc {
            0 => {}
            1 => return Err(DecodeError::NoKvSlot),
            rc => return Err(DecodeError::Other(format!("llama_decode returned {rc}"))),
        }
        if let Some(e) = &self.capture.error {
            return Err(DecodeError::Other(e.clone()));
        }
        let rows = tokens.len() * self.n_embd;
        if let Some(l) = self.capture.layers.iter().position(|l| l.len() != rows) {
            return Err(DecodeError::Other(format!(
                "captured {} values of layer {l}, expected {rows}",
                self.capture.layers[l].len()
            )));
        }
        if self.capture.norm.len() != rows {
            return Err(DecodeError::Other(format!(
                "captured {} values of result_norm, expected {rows}",
                self.capture.norm.len()
            )));
        }
        let mut logits = Vec::with_capacity(logits_of.len());
        if self.capture.stop_at_norm {
            return Ok((&self.capture, logits));
        }
        for &i in logits_of {
            // SAFETY: every token was an output; i < tokens.len(); the row has n_vocab floats
            // and stays valid until the next decode (we copy it out now).
            let row = unsafe {
                let p = sys::llama_get_logits_ith(self.ctx, i as i32);
                if p.is_null() {
                    return Err(DecodeError::Other(format!("no logits for output {i}")));
                }
                std::slice::from_raw_parts(p, self.n_vocab).to_vec()
            };
            logits.push(row);
        }
        Ok((&self.capture, logits))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: each was made once in `load` and is freed once here: the context (detached
        // from its thread pool) before the pool and the model.
        unsafe {
            sys::llama_batch_free(self.batch);
            if !self.threadpool.is_null() {
                sys::llama_detach_threadpool(self.ctx);
            }
            sys::llama_free(self.ctx);
            if !self.threadpool.is_null() {
                sys::ggml_threadpool_free(self.threadpool);
            }
            sys::llama_model_free(self.model);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wanted;

    #[test]
    fn callback_names() {
        assert_eq!(wanted(b"l_out-0"), Some(Some(0)));
        assert_eq!(wanted(b"l_out-29"), Some(Some(29)));
        assert_eq!(wanted(b"result_norm"), Some(None));
        assert_eq!(wanted(b"l_out-x"), None);
        assert_eq!(wanted(b"attn_norm-3"), None);
        assert_eq!(wanted(b"result_output"), None);
    }
}
