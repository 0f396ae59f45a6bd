//! Evaluation metrics: loss, accuracy and macro-F1 for classification; MSE and MAE for
//! regression.

use std::collections::BTreeMap;

use crate::data::Targets;

/// Named metric values, e.g. `eval_accuracy`, sorted by name.
pub type Metrics = BTreeMap<String, f64>;

/// Whether larger values of metric `name` are better.
pub fn higher_is_better(name: &str) -> bool {
    !(name.ends_with("loss") || name.ends_with("mse") || name.ends_with("mae"))
}

/// Cross-entropy, accuracy and macro-F1 of `logits` (`n × c`, row-major) against classes.
pub fn classification(logits: &[f32], c: usize, y: &[u32]) -> Metrics {
    let n = y.len();
    let mut loss = 0f64;
    let mut correct = 0usize;
    let mut tp = vec![0usize; c];
    let mut fp = vec![0usize; c];
    let mut fneg = vec![0usize; c];
    for (row, &t) in logits.chunks_exact(c).zip(y) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        loss += lse - row[t as usize] as f64;
        let pred = argmax(row);
        if pred == t as usize {
            correct += 1;
            tp[pred] += 1;
        } else {
            fp[pred] += 1;
            fneg[t as usize] += 1;
        }
    }
    // Macro-F1 over the classes present in the labels or the predictions (as scikit-learn).
    let mut f1_sum = 0f64;
    let mut classes = 0usize;
    for k in 0..c {
        if tp[k] + fp[k] + fneg[k] == 0 {
            continue;
        }
        classes += 1;
        let denom = 2 * tp[k] + fp[k] + fneg[k];
        f1_sum += 2.0 * tp[k] as f64 / denom as f64;
    }
    let mut m = Metrics::new();
    m.insert("loss".into(), loss / n as f64);
    m.insert("accuracy".into(), correct as f64 / n as f64);
    m.insert(
        "f1".into(),
        if classes == 0 {
            0.0
        } else {
            f1_sum / classes as f64
        },
    );
    m
}

/// MSE (the loss) and MAE of predictions against targets.
pub fn regression(pred: &[f32], y: &[f32]) -> Metrics {
    let n = y.len().max(1) as f64;
    let (mut se, mut ae) = (0f64, 0f64);
    for (&p, &t) in pred.iter().zip(y) {
        let e = p as f64 - t as f64;
        se += e * e;
        ae += e.abs();
    }
    let mut m = Metrics::new();
    m.insert("loss".into(), se / n);
    m.insert("mse".into(), se / n);
    m.insert("mae".into(), ae / n);
    m
}

/// Metrics of model outputs (`n × outputs`) against `targets`.
pub fn evaluate(out: &[f32], outputs: usize, targets: &Targets) -> Metrics {
    match targets {
        Targets::Classes(y) => classification(out, outputs, y),
        Targets::Values(y) => regression(out, y),
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Softmax of one row of logits.
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_matches_sklearn() {
        // sklearn.metrics.f1_score([0,0,1,1,2,2],[0,1,1,1,2,0],average="macro") = 0.6555...
        let preds = [0usize, 1, 1, 1, 2, 0];
        let y = [0u32, 0, 1, 1, 2, 2];
        let mut logits = vec![0f32; 18];
        for (i, &p) in preds.iter().enumerate() {
            logits[i * 3 + p] = 5.0;
        }
        let m = classification(&logits, 3, &y);
        assert!((m["f1"] - 0.655_555_555_6).abs() < 1e-6, "{}", m["f1"]);
        assert!((m["accuracy"] - 4.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn regression_metrics() {
        let m = regression(&[1.0, 2.0], &[0.0, 4.0]);
        assert_eq!(m["mse"], 2.5);
        assert_eq!(m["mae"], 1.5);
    }
}
