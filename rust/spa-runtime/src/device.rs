//! The device half: side network + gate + LM head (quantized), the personal vocabulary, and
//! the per-position decision rule shared by the speculative runtime and the local reference.

use crate::error::{Result, RuntimeError};
use spa_model::{
    DeviceAssets, DeviceHead, GateMode, PersonalVocab, QuantMode, SideCache, SideNetwork,
    SidePlugin, SpaTokenizer,
};
use spa_protocol::{decode_tensor, sampling, Limits, Manifest, PositionState};

/// Everything that runs on the phone.
#[derive(Debug)]
pub struct DeviceModel {
    /// Side network + gate.
    pub side: SideNetwork,
    /// Device LM head.
    pub head: DeviceHead,
    /// Personal vocabulary (always in the shortlist).
    pub personal: PersonalVocab,
    /// Gate policy (SPA, LST = always side, or base only).
    pub gate: GateMode,
    /// Tokenizer.
    pub tokenizer: SpaTokenizer,
    /// Base identity the side weights were made for.
    pub base_identity: String,
    /// Projection fingerprint the side weights were made for.
    pub projection: String,
}

/// Sampling settings carried by step requests (temperature 0 = greedy).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WireSampling {
    /// Softmax temperature (0: greedy).
    pub temperature: f32,
    /// Nucleus inside the top-k (0 or 1: off).
    pub top_p: f32,
    /// Seed of the position-keyed draws.
    pub seed: u64,
}

/// The device's decision at one draft position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Token to emit.
    pub token: u32,
    /// The gate chose the side path.
    pub side: bool,
    /// Probability of the side path.
    pub p_side: f32,
}

/// An untrained side network shaped by a server's manifest (its base, tapped layers, width
/// and projection): what a device runs before any personalization.
pub fn untrained_plugin(m: &Manifest) -> Result<SidePlugin> {
    let mut cfg =
        spa_model::SideConfig::new(m.hidden as usize, m.layers as usize, m.side_width as usize);
    cfg.taps = m.taps.iter().map(|&t| t as usize).collect();
    Ok(SidePlugin::init_for(
        &m.base_identity,
        m.layers as usize,
        cfg,
        &m.projection_fingerprint,
        1,
        0.0,
    )?)
}

impl DeviceModel {
    /// Assembles the device model from the base's device assets (tokenizer + head) and the
    /// personal plugin, quantized with `quant`. Fails with [`RuntimeError::Incompatible`] when
    /// the plugin was made for another base.
    pub fn new(
        assets: &DeviceAssets,
        plugin: &SidePlugin,
        quant: QuantMode,
        gate: GateMode,
        personal: PersonalVocab,
    ) -> Result<Self> {
        Self::assemble(
            &assets.identity,
            assets.config.context,
            &assets.tokenizer,
            || Ok(DeviceHead::from_weights(&assets.head, quant)?),
            plugin,
            quant,
            gate,
            personal,
        )
    }

    /// Assembles the device model from a device pack (its head is used as packed: `quant`
    /// applies to the side network) and the personal plugin. Fails with
    /// [`RuntimeError::Incompatible`] when the plugin was made for another base.
    pub fn from_pack(
        pack: &spa_model::DevicePack,
        plugin: &SidePlugin,
        quant: QuantMode,
        gate: GateMode,
        personal: PersonalVocab,
    ) -> Result<Self> {
        Self::assemble(
            &pack.identity,
            pack.config.context,
            &pack.tokenizer,
            || Ok(pack.head.clone()),
            plugin,
            quant,
            gate,
            personal,
        )
    }

    /// The device model from a device pack file fetched by [`crate::Client::device_pack`] and
    /// the personal plugin, checked against the server's manifest `manifest`. A pack that
    /// cannot be read (damaged since it was verified) is deleted, so that the next
    /// `device_pack` fetches it again, and its error is returned.
    pub fn from_pack_file(
        path: &std::path::Path,
        manifest: &spa_protocol::Manifest,
        plugin: &SidePlugin,
        quant: QuantMode,
        gate: GateMode,
        personal: PersonalVocab,
    ) -> Result<Self> {
        let pack = spa_model::DevicePack::load(path).inspect_err(|e| {
            log::warn!(
                "device pack {} unreadable ({e}); deleting it",
                path.display()
            );
            let _ = std::fs::remove_file(path);
        })?;
        let dev = Self::from_pack(&pack, plugin, quant, gate, personal)?;
        dev.check_manifest(manifest)?;
        Ok(dev)
    }

    /// The one assembly of [`DeviceModel::new`] and [`DeviceModel::from_pack`]: checks the
    /// plugin's base first (before the head is built), then the side network.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        identity: &str,
        context: usize,
        tokenizer: &spa_model::SpaTokenizer,
        head: impl FnOnce() -> Result<DeviceHead>,
        plugin: &SidePlugin,
        quant: QuantMode,
        gate: GateMode,
        personal: PersonalVocab,
    ) -> Result<Self> {
        if plugin.meta.base != identity {
            return Err(RuntimeError::Incompatible(
                "personal weights were made for another base model".into(),
            ));
        }
        Ok(Self {
            side: SideNetwork::new(&plugin.weights, quant, context.min(32_768))?,
            head: head()?,
            personal,
            gate,
            tokenizer: tokenizer.clone(),
            base_identity: identity.to_string(),
            projection: plugin.meta.projection.clone(),
        })
    }

    /// Checks that a server's manifest matches the weights held here.
    pub fn check_manifest(&self, m: &Manifest) -> Result<()> {
        let c = self.side.config();
        let taps: Vec<u32> = c.taps.iter().map(|&t| t as u32).collect();
        if m.base_identity != self.base_identity
            || m.projection_fingerprint != self.projection
            || m.side_width as usize != c.width
            || m.taps != taps
            || m.vocab as usize != self.head.vocab()
        {
            return Err(RuntimeError::Incompatible(format!(
                "server base {}../projection {} (width {}), device weights for {}../{} (width {})",
                &m.base_identity[..m.base_identity.len().min(12)],
                m.projection_fingerprint,
                m.side_width,
                &self.base_identity[..self.base_identity.len().min(12)],
                self.projection,
                c.width
            )));
        }
        Ok(())
    }

    /// Runs the side network over one position state from the server (appending to `cache`)
    /// and, for draft positions, decides the token. Non-draft (prompt) positions only extend the
    /// side cache and return `None`.
    pub fn process(
        &self,
        s: &PositionState,
        cache: &mut SideCache,
        limits: &Limits,
    ) -> Result<Option<Decision>> {
        self.process_with(s, cache, limits, &WireSampling::default())
    }

    /// [`DeviceModel::process`] with sampling: when `ws.temperature > 0` the server's drafts were
    /// sampled from `q`, and the side path uses the speculative-sampling rule (accept with
    /// probability min(1, p/q), else draw from norm(max(0, p - q))), so emitted tokens follow
    /// the SPA distribution `p` exactly.
    pub fn process_with(
        &self,
        s: &PositionState,
        cache: &mut SideCache,
        limits: &Limits,
        ws: &WireSampling,
    ) -> Result<Option<Decision>> {
        let c = self.side.config();
        let taps_t = s
            .taps
            .as_ref()
            .ok_or_else(|| RuntimeError::Protocol("position state without taps".into()))?;
        let taps = decode_tensor(taps_t, limits)?;
        if taps.rows != c.taps.len() || taps.cols != c.width {
            return Err(RuntimeError::Protocol(format!(
                "taps [{}, {}], expected [{}, {}]",
                taps.rows,
                taps.cols,
                c.taps.len(),
                c.width
            )));
        }
        let z: Vec<Vec<f32>> = (0..taps.rows).map(|r| taps.row(r).to_vec()).collect();
        if !s.is_draft {
            let zeros = vec![0f32; c.base_hidden];
            self.side.step(&z, &zeros, cache)?;
            return Ok(None);
        }
        let hidden = decode_tensor(
            s.hidden
                .as_ref()
                .ok_or_else(|| RuntimeError::Protocol("draft state without hidden".into()))?,
            limits,
        )?;
        if hidden.data.len() != c.base_hidden {
            return Err(RuntimeError::Protocol("hidden state of wrong size".into()));
        }
        let step = self.side.step(&z, &hidden.data, cache)?;
        let side = self
            .gate
            .use_side(step.p_side, self.side.config().gate_threshold);
        let token = if !side {
            s.draft_token
        } else if ws.temperature > 0.0 {
            let cands = self.personal.candidates(&s.topk_ids);
            let k = s.topk_ids.len();
            let lq = decode_tensor(
                s.topk_logits.as_ref().ok_or_else(|| {
                    RuntimeError::Protocol("sampled draft without top-k logits".into())
                })?,
                limits,
            )?;
            if lq.data.len() != k {
                return Err(RuntimeError::Protocol(
                    "top-k logits and ids differ in length".into(),
                ));
            }
            let mut q = sampling::distribution(&lq.data, ws.temperature, ws.top_p);
            q.resize(cands.len(), 0.0);
            let p = sampling::distribution(
                &self.head.shortlist(&cands, &step.hidden)?,
                ws.temperature,
                ws.top_p,
            );
            let d = s
                .topk_ids
                .iter()
                .position(|&t| t == s.draft_token)
                .ok_or_else(|| RuntimeError::Protocol("draft not among its top-k".into()))?;
            let mut rng = sampling::rng_for(ws.seed, s.position, 1);
            let accept = if q[d] > 0.0 {
                (p[d] / q[d]).min(1.0)
            } else {
                0.0
            };
            if rng.uniform() < accept {
                s.draft_token
            } else {
                let r: Vec<f32> = p.iter().zip(&q).map(|(a, b)| (a - b).max(0.0)).collect();
                if r.iter().sum::<f32>() > 0.0 {
                    cands[sampling::draw(&r, rng.uniform())]
                } else {
                    s.draft_token
                }
            }
        } else {
            let cands = self.personal.candidates(&s.topk_ids);
            self.head
                .shortlist_argmax(&cands, &step.hidden)?
                .ok_or_else(|| RuntimeError::Protocol("empty candidate list".into()))?
        };
        Ok(Some(Decision {
            token,
            side,
            p_side: step.p_side,
        }))
    }
}
