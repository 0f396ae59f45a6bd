//! The library API: a custom candle model trains with wick's trainer, reproducibly.

#[path = "../examples/custom_model.rs"]
mod custom_model;

mod common;

#[test]
fn a_custom_model_trains_reproducibly() {
    std::env::set_current_dir(common::root()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let a = custom_model::run(&tmp.path().join("a")).unwrap();
    let b = custom_model::run(&tmp.path().join("b")).unwrap();
    assert_eq!(a.model, "residual-net");
    assert!(
        a.final_metrics["eval_accuracy"] >= 0.9,
        "{:?}",
        a.final_metrics
    );
    assert_eq!(a.final_metrics, b.final_metrics);
    assert_eq!(
        common::sha256(&common::weights(&tmp.path().join("a"))),
        common::sha256(&common::weights(&tmp.path().join("b")))
    );
    // Names are the candle-nn (= PyTorch) ones, sorted.
    let names: Vec<String> = {
        let bytes = std::fs::read(common::weights(&tmp.path().join("a"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut n: Vec<String> = st.names().into_iter().map(String::from).collect();
        n.sort();
        n
    };
    assert_eq!(
        names,
        [
            "block.bias",
            "block.weight",
            "head.bias",
            "head.weight",
            "input.bias",
            "input.weight"
        ]
    );
}

#[test]
fn a_custom_model_quantizes_through_the_same_trait() {
    use wick::model::{Model, ModelCtx};
    std::env::set_current_dir(common::root()).unwrap();
    let cfg = wick::config::load(std::path::Path::new("configs/iris_mlp.toml"), &[]).unwrap();
    let (train, eval, schema) = wick::data::load_split(&cfg.data, cfg.run.seed).unwrap();
    let model = custom_model::ResidualNet::new(3, schema.input_dim, 32, schema.outputs()).unwrap();
    let x =
        candle_core::Tensor::from_vec(eval.x.clone(), (eval.n, eval.d), &candle_core::Device::Cpu)
            .unwrap();
    let run = |m: &dyn Model| -> Vec<f32> {
        m.forward(&x, &mut ModelCtx::eval())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let before = run(&model);
    let cfg = wick::quant::QuantConfig {
        mode: wick::quant::QuantMode::Static,
        max_error: 1.0,
        ..Default::default()
    };
    let report =
        wick::quant::quantize(&model, &cfg, Some(&train as &dyn wick::data::Source)).unwrap();
    assert_eq!(report.quantized(), 3, "{report:?}");
    let after = run(&model);
    assert_ne!(before, after, "the int8 path ran");
    let e = wick::quant::rel_error(&before, &after);
    assert!(e < 0.05, "int8 output error {e}");
}
