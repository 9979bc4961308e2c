//! The `sd35_medium` preset builds exactly the parameters of the real SD3.5-Medium checkpoint:
//! names and shapes one to one with `tests/data/sd35_medium_transformer_keys.tsv` (copied from
//! the checkpoint's header), 2,469,663,936 values. The model is built lazily, so no weight is
//! allocated.

use std::collections::BTreeMap;

use flow_opd::Backend;
use flow_opd::model::MmditConfig;
use flow_opd::model::weights::manifest;

fn reference() -> BTreeMap<String, Vec<usize>> {
    let text = include_str!("../data/sd35_medium_transformer_keys.tsv");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (key, shape) = line.split_once('\t').expect("key<TAB>shape");
            let dims = shape
                .trim_matches(|c| c == '(' || c == ')')
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|d| d.parse().unwrap())
                .collect();
            (key.to_string(), dims)
        })
        .collect()
}

fn check<B: Backend>(device: &B::Device) {
    let model = MmditConfig::sd35_medium().init::<B>(device);
    let specs = manifest::<B, _>(&model);
    let ours: BTreeMap<String, Vec<usize>> = specs.iter().map(|s| (s.key.clone(), s.torch_shape.clone())).collect();
    assert_eq!(ours.len(), specs.len(), "duplicate keys");
    let reference = reference();
    let missing: Vec<_> = reference.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !reference.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}\nextra {extra:?}");
    for (key, shape) in &reference {
        assert_eq!(&ours[key], shape, "{key}");
    }
    let values: usize = specs.iter().map(|s| s.numel()).sum();
    assert_eq!(values, 2_469_663_936);
    assert_eq!(reference.len(), 909);
}

#[cfg(feature = "flex")]
#[test]
fn sd35_medium_preset_matches_the_checkpoint_key_list() {
    check::<burn::backend::Flex>(&Default::default());
}
