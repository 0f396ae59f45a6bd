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
