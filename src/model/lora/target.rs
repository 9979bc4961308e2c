//! The linear layers of an MMDiT block a LoRA adapter can wrap, named by their diffusers keys.

use std::fmt;
use std::str::FromStr;

/// A linear layer inside `transformer_blocks.{i}` that can carry a LoRA adapter, named after
/// its diffusers key relative to the block (what PEFT's `target_modules` lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    ToQ,
    ToK,
    ToV,
    ToOut,
    AddQProj,
    AddKProj,
    AddVProj,
    ToAddOut,
    Attn2ToQ,
    Attn2ToK,
    Attn2ToV,
    Attn2ToOut,
    FfIn,
    FfOut,
    FfContextIn,
    FfContextOut,
}

impl LoraTarget {
    /// Every target, in a fixed order (the index of [`LoraTarget::index`]).
    pub const ALL: [LoraTarget; 16] = [
        Self::ToQ,
        Self::ToK,
        Self::ToV,
        Self::ToOut,
        Self::AddQProj,
        Self::AddKProj,
        Self::AddVProj,
        Self::ToAddOut,
        Self::Attn2ToQ,
        Self::Attn2ToK,
        Self::Attn2ToV,
        Self::Attn2ToOut,
        Self::FfIn,
        Self::FfOut,
        Self::FfContextIn,
        Self::FfContextOut,
    ];

    /// Flow-GRPO's (and the paper's) target list: the joint-attention projections of both
    /// streams (docs/reference.md section 5). `attn2` and the feed-forwards are not adapted.
    pub const FLOW_GRPO: [LoraTarget; 8] = [
        Self::ToQ,
        Self::ToK,
        Self::ToV,
        Self::ToOut,
        Self::AddQProj,
        Self::AddKProj,
        Self::AddVProj,
        Self::ToAddOut,
    ];

    /// Position in [`LoraTarget::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|t| *t == self).expect("ALL lists every target")
    }

    /// The diffusers key of the layer relative to its block, e.g. `attn.to_out.0`.
    pub fn key(self) -> &'static str {
        match self {
            Self::ToQ => "attn.to_q",
            Self::ToK => "attn.to_k",
            Self::ToV => "attn.to_v",
            Self::ToOut => "attn.to_out.0",
            Self::AddQProj => "attn.add_q_proj",
            Self::AddKProj => "attn.add_k_proj",
            Self::AddVProj => "attn.add_v_proj",
            Self::ToAddOut => "attn.to_add_out",
            Self::Attn2ToQ => "attn2.to_q",
            Self::Attn2ToK => "attn2.to_k",
            Self::Attn2ToV => "attn2.to_v",
            Self::Attn2ToOut => "attn2.to_out.0",
            Self::FfIn => "ff.net.0.proj",
            Self::FfOut => "ff.net.2",
            Self::FfContextIn => "ff_context.net.0.proj",
            Self::FfContextOut => "ff_context.net.2",
        }
    }
}

impl fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

impl FromStr for LoraTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|t| t.key() == s).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|t| t.key()).collect();
            format!("unknown LoRA target `{s}` (expected one of: {})", known.join(", "))
        })
    }
}

/// Splits a diffusers module path `transformer_blocks.{i}.{target}` into block and target.
pub fn parse_module_path(path: &str) -> Option<(usize, LoraTarget)> {
    let rest = path.strip_prefix("transformer_blocks.")?;
    let (index, target) = rest.split_once('.')?;
    Some((index.parse().ok()?, target.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_are_distinct() {
        for t in LoraTarget::ALL {
            assert_eq!(t.key().parse::<LoraTarget>().unwrap(), t);
            assert_eq!(LoraTarget::ALL[t.index()], t);
        }
        assert_eq!(parse_module_path("transformer_blocks.12.attn.to_out.0"), Some((12, LoraTarget::ToOut)));
        assert_eq!(parse_module_path("transformer_blocks.3.attn2.to_q"), Some((3, LoraTarget::Attn2ToQ)));
        assert_eq!(parse_module_path("proj_out"), None);
        assert!("attn.to_x".parse::<LoraTarget>().unwrap_err().contains("attn.to_x"));
    }
}
