//! Parameter names: Burn module paths <-> diffusers keys, and the list of parameters a model
//! has (its manifest), gathered without materialising any weight.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use crate::Backend;

/// The diffusers key of a Burn parameter path. Burn field names equal diffusers' except where
/// a Python name is not a Rust identifier or Burn names a parameter differently:
/// `to_out` -> `to_out.0`, `linear_in` -> `net.0.proj`, `linear_out` -> `net.2`,
/// RMSNorm `gamma` -> `weight`.
pub fn burn_path_to_diffusers_key(path: &str) -> String {
    path.split('.')
        .map(|segment| match segment {
            "to_out" => "to_out.0",
            "linear_in" => "net.0.proj",
            "linear_out" => "net.2",
            "gamma" => "weight",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// One parameter of a model: where it sits in Burn, its diffusers key and its shape as stored
/// in a PyTorch file (Linear weights `[out, in]`; Burn keeps `[in, out]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub burn_path: String,
    pub key: String,
    pub torch_shape: Vec<usize>,
    /// A 2-D Linear weight, transposed between PyTorch and Burn.
    pub linear_weight: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.torch_shape.iter().product()
    }
}

/// Every float parameter of `module` in visiting order, with diffusers keys.
pub fn manifest<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamSpec> {
    let mut visitor = ManifestVisitor { path: Vec::new(), containers: Vec::new(), specs: Vec::new() };
    module.visit(&mut visitor);
    visitor.specs
}

struct ManifestVisitor {
    path: Vec<String>,
    containers: Vec<String>,
    specs: Vec<ParamSpec>,
}

impl<B: Backend> ModuleVisitor<B> for ManifestVisitor {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.containers.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let burn_path = self.path.join(".");
        let mut shape = param.lazy_shape().to_vec();
        let in_linear = self
            .containers
            .iter()
            .rev()
            .find(|c| c.starts_with("Struct:") || c.starts_with("Enum:"))
            .is_some_and(|c| c == "Struct:Linear");
        let linear_weight = in_linear && self.path.last().is_some_and(|n| n == "weight") && D == 2;
        if linear_weight {
            shape.reverse();
        }
        self.specs.push(ParamSpec {
            key: burn_path_to_diffusers_key(&burn_path),
            burn_path,
            torch_shape: shape,
            linear_weight,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_only_the_non_identifier_segments() {
        assert_eq!(
            burn_path_to_diffusers_key("transformer_blocks.3.attn.to_out.weight"),
            "transformer_blocks.3.attn.to_out.0.weight"
        );
        assert_eq!(
            burn_path_to_diffusers_key("transformer_blocks.0.ff_context.linear_in.bias"),
            "transformer_blocks.0.ff_context.net.0.proj.bias"
        );
        assert_eq!(burn_path_to_diffusers_key("transformer_blocks.1.attn2.norm_k.gamma"), "transformer_blocks.1.attn2.norm_k.weight");
        assert_eq!(burn_path_to_diffusers_key("proj_out.weight"), "proj_out.weight");
    }
}
