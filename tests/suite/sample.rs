//! `flow-opd sample` on a toy world pipeline: an image depends only on its prompt, seed and
//! model (sampled alone or in a batch, the PNG is the same), upscaling and file naming, and
//! errors that name the file at fault.

use crate::common;

use burn::backend::Flex;
use flow_opd::pipeline::generate::GenerateConfig;
use flow_opd::pipeline::world::save_pipeline_atomic;
use flow_opd::io::prompts::read_prompt_file;
use flow_opd::pipeline::sample::{SampleRequest, run_sample};

#[test]
fn an_image_is_the_same_alone_or_in_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("toy");
    save_pipeline_atomic(&common::toy_world_pipeline(4), &model).unwrap();
    let sampling = GenerateConfig { steps: 3, guidance: 2.0, ..Default::default() };
    let batch = SampleRequest {
        model: model.clone(),
        adapter: None,
        prompts: vec!["a red circle".into(), "a sign that says \"AB\"".into()],
        sampling: sampling.clone(),
        seed: 5,
        out: dir.path().join("batch"),
        scale: 2,
    };
    let paths = run_sample::<Flex>(&batch, &Default::default(), |_| {}).unwrap();
    assert_eq!(paths, [dir.path().join("batch/0000.png"), dir.path().join("batch/0001.png")]);
    let listing = std::fs::read_to_string(dir.path().join("batch/prompts.txt")).unwrap();
    assert_eq!(listing, "0000.png\t5\ta red circle\n0001.png\t6\ta sign that says \"AB\"\n");
    let alone = SampleRequest { prompts: vec!["a sign that says \"AB\"".into()], seed: 6, out: dir.path().join("alone.png"), ..batch };
    run_sample::<Flex>(&alone, &Default::default(), |_| {}).unwrap();
    let a = image::open(dir.path().join("batch/0001.png")).unwrap().to_rgb8();
    let b = image::open(dir.path().join("alone.png")).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), (64, 64), "32 px upscaled by 2");
    assert!(a == b, "same prompt and seed give the same image in or out of a batch");
    let first = image::open(dir.path().join("batch/0000.png")).unwrap().to_rgb8();
    assert!(first != a, "different prompts and seeds give different images");
}

#[test]
fn bad_inputs_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("prompts.txt");
    std::fs::write(&empty, "# only a comment\n\n").unwrap();
    let err = read_prompt_file(&empty).unwrap_err().to_string();
    assert!(err.contains("prompts.txt") && err.contains("no prompts"), "{err}");
    let request = SampleRequest {
        model: dir.path().join("no_such_model"),
        adapter: None,
        prompts: vec!["a red circle".into()],
        sampling: GenerateConfig::default(),
        seed: 0,
        out: dir.path().join("x.png"),
        scale: 1,
    };
    let err = run_sample::<Flex>(&request, &Default::default(), |_| {}).unwrap_err();
    assert!(err.contains("no_such_model"), "{err}");
    assert!(!dir.path().join("x.png").exists());
}
