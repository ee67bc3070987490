//! SPA on one machine: base + shared projection + side network + gate + device head, as a
//! [`Decoder`]. This is the reference the cloud/device split must reproduce token for token,
//! and what evaluation and `spa generate --side` use.

use crate::base::{argmax, BaseModel};
use crate::error::{Result, SpaError};
use crate::generate::{BaseDecoder, Decoder};
use crate::head::DeviceHead;
use crate::io;
use crate::linear::QuantMode;
use crate::projection::{DownProjection, PROJECTION_VERSION};
use crate::side::{SideCache, SideConfig, SideNetwork, SideWeights};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What side weights record about the base and projection they were made for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SideMeta {
    /// Side configuration.
    pub config: SideConfig,
    /// Base identity (sha256 of the GGUF).
    pub base: String,
    /// Projection scheme version.
    pub projection_version: u32,
    /// Projection fingerprint.
    pub projection: String,
}

/// Side weights bound to a base and projection: the personal "plugin".
#[derive(Debug, Clone, PartialEq)]
pub struct SidePlugin {
    /// f32 master weights.
    pub weights: SideWeights,
    /// Identity record.
    pub meta: SideMeta,
}

impl SidePlugin {
    /// A fresh plugin for `base` and `proj` (random blocks, `up_scale` as in [`SideWeights::init`]).
    pub fn init(base: &BaseModel, proj: &DownProjection, seed: u64, up_scale: f32) -> Result<Self> {
        let pm = proj.meta();
        let mut cfg = SideConfig::new(pm.hidden, base.config().n_layers, pm.width);
        cfg.taps = pm.taps.clone();
        cfg.validate(base.config().n_layers)?;
        let weights = SideWeights::init(cfg.clone(), seed, up_scale)?;
        Ok(Self {
            weights,
            meta: SideMeta {
                config: cfg,
                base: base.identity().to_string(),
                projection_version: pm.version,
                projection: proj.fingerprint().to_string(),
            },
        })
    }

    /// A fresh plugin from identity fields only (what a device learns from the server's
    /// manifest): base identity, base layer count, side shape and projection fingerprint.
    pub fn init_for(
        base_identity: &str,
        n_layers: usize,
        config: SideConfig,
        projection: &str,
        seed: u64,
        up_scale: f32,
    ) -> Result<Self> {
        config.validate(n_layers)?;
        Ok(Self {
            weights: SideWeights::init(config.clone(), seed, up_scale)?,
            meta: SideMeta {
                config,
                base: base_identity.to_string(),
                projection_version: PROJECTION_VERSION,
                projection: projection.to_string(),
            },
        })
    }

    /// Saves as safetensors with the metadata record (atomic write). The recorded
    /// configuration is the weights' (e.g. a gate threshold chosen after training).
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = SideMeta {
            config: self.weights.config.clone(),
            ..self.meta.clone()
        };
        let meta =
            serde_json::to_string(&meta).map_err(|e| SpaError::InvalidConfig(e.to_string()))?;
        io::save_f32(path, &self.weights.tensors, &meta)
    }

    /// Loads and checks shapes. Use [`SidePlugin::check_compatible`] before running it.
    pub fn load(path: &Path) -> Result<Self> {
        let (tensors, meta) = io::load_f32(path)?;
        let meta: SideMeta = serde_json::from_str(&meta)
            .map_err(|e| SpaError::safetensors(path, format!("bad metadata: {e}")))?;
        let weights = SideWeights {
            config: meta.config.clone(),
            tensors,
        };
        weights.check_shapes()?;
        Ok(Self { weights, meta })
    }

    /// Loads and verifies the plugin was made for this base and projection.
    pub fn load_for(path: &Path, base: &BaseModel, proj: &DownProjection) -> Result<Self> {
        let p = Self::load(path)?;
        p.check_compatible(base.identity(), proj)?;
        p.weights.config.validate(base.config().n_layers)?;
        Ok(p)
    }

    /// Fails with [`SpaError::MismatchedBase`] unless base identity, projection version and
    /// fingerprint all match.
    pub fn check_compatible(&self, base_identity: &str, proj: &DownProjection) -> Result<()> {
        if self.meta.base != base_identity
            || self.meta.projection_version != PROJECTION_VERSION
            || self.meta.projection != proj.fingerprint()
            || proj.meta().base != base_identity
        {
            return Err(SpaError::MismatchedBase {
                expected: format!("{}/{}", short(base_identity), proj.fingerprint()),
                found: format!("{}/{}", short(&self.meta.base), self.meta.projection),
                expected_projection: PROJECTION_VERSION,
                found_projection: self.meta.projection_version,
            });
        }
        Ok(())
    }
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

/// How the gate is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum GateMode {
    /// SPA: the classifier decides per position.
    #[default]
    Learned,
    /// Always the side path (the LST baseline).
    AlwaysSide,
    /// Always the base path.
    AlwaysBase,
}

impl GateMode {
    /// Whether a position takes the side path, given the gate's probability of it and the
    /// network's threshold ([`SideConfig::gate_threshold`](crate::SideConfig)).
    pub fn use_side(self, p_side: f32, threshold: f32) -> bool {
        match self {
            GateMode::Learned => p_side > threshold,
            GateMode::AlwaysSide => true,
            GateMode::AlwaysBase => false,
        }
    }
}

/// Per-generation counters of a [`SpaDecoder`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpaCounters {
    /// Positions decided.
    pub positions: usize,
    /// Positions where the gate chose the side path.
    pub side: usize,
    /// Positions where the side path's argmax differed from the base's.
    pub overrides: usize,
}

/// Base + side decoding in one process (full-vocabulary heads).
pub struct SpaDecoder<'a> {
    base: BaseDecoder<'a>,
    model: &'a BaseModel,
    proj: &'a DownProjection,
    side: &'a SideNetwork,
    head: &'a DeviceHead,
    cache: SideCache,
    gate: GateMode,
    /// Counters since creation.
    pub counters: SpaCounters,
}

impl<'a> SpaDecoder<'a> {
    /// A decoder with empty caches.
    pub fn new(
        model: &'a BaseModel,
        proj: &'a DownProjection,
        side: &'a SideNetwork,
        head: &'a DeviceHead,
        gate: GateMode,
    ) -> Result<Self> {
        if side.config().taps != proj.meta().taps || side.config().width != proj.meta().width {
            return Err(SpaError::InvalidConfig(
                "side network and projection disagree on taps/width".into(),
            ));
        }
        Ok(Self {
            base: model.decoder(),
            model,
            proj,
            side,
            head,
            cache: side.new_cache(),
            gate,
            counters: SpaCounters::default(),
        })
    }
}

impl Decoder for SpaDecoder<'_> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let out = self.model.forward(tokens, self.base.cache_mut())?;
        let z = self.proj.apply_taps(&out.taps)?;
        let hidden: Vec<Vec<f32>> = out.hidden.to_vec2()?;
        let mut last = None;
        for (zp, hp) in z.iter().zip(&hidden) {
            last = Some((self.side.step(zp, hp, &mut self.cache)?, hp));
        }
        let (step, h) = last.ok_or_else(|| SpaError::InvalidConfig("no tokens".into()))?;
        let use_side = self
            .gate
            .use_side(step.p_side, self.side.config().gate_threshold);
        let base_logits = self.head.full(h)?;
        self.counters.positions += 1;
        if use_side {
            let side_logits = self.head.full(&step.hidden)?;
            self.counters.side += 1;
            if argmax(&side_logits) != argmax(&base_logits) {
                self.counters.overrides += 1;
            }
            Ok(side_logits)
        } else {
            Ok(base_logits)
        }
    }
    fn fork(&self) -> Result<Self> {
        Ok(Self {
            base: self.base.fork()?,
            model: self.model,
            proj: self.proj,
            side: self.side,
            head: self.head,
            cache: self.cache.clone(),
            gate: self.gate,
            counters: self.counters.clone(),
        })
    }
    fn position(&self) -> usize {
        self.base.position()
    }
    fn truncate(&mut self, pos: usize) {
        self.base.truncate(pos);
        self.cache.truncate(pos);
    }
}

/// Builds the inference side network of a plugin in `mode` for `base`.
pub fn side_network(plugin: &SidePlugin, base: &BaseModel, mode: QuantMode) -> Result<SideNetwork> {
    SideNetwork::new(&plugin.weights, mode, base.max_positions())
}
