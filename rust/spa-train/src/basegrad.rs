//! Baselines that need gradients through the frozen base (LoRA, Adapter, full integration).
