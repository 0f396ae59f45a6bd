//! Search-space distributions. Values are held internally as f64: the number itself for
//! floats and ints, the index of the choice for categoricals (as Optuna does).

use serde::{Deserialize, Serialize};

/// One parameter's distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Float {
        low: f64,
        high: f64,
        log: bool,
        step: Option<f64>,
    },
    Int {
        low: i64,
        high: i64,
        log: bool,
        step: i64,
    },
    /// Choices of any TOML value (numbers, strings, lists such as hidden sizes).
    Categorical { choices: Vec<toml::Value> },
}

impl Distribution {
    /// Checks the bounds; the message names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Distribution::Float {
                low,
                high,
                log,
                step,
            } => {
                if !(low.is_finite() && high.is_finite()) {
                    return Err("bounds must be finite numbers".into());
                }
                if low > high {
                    return Err(format!("low {low} > high {high}"));
                }
                if *log && *low <= 0.0 {
                    return Err(format!("log = true needs low > 0, got {low}"));
                }
                if let Some(s) = step {
                    if s.is_nan() || *s <= 0.0 || *log {
                        return Err("step must be > 0 and cannot be combined with log".into());
                    }
                }
                Ok(())
            }
            Distribution::Int {
                low,
                high,
                log,
                step,
            } => {
                if low > high {
                    return Err(format!("low {low} > high {high}"));
                }
                if *step < 1 {
                    return Err(format!("step must be >= 1, got {step}"));
                }
                if *log && (*low < 1 || *step != 1) {
                    return Err("log = true needs low >= 1 and step 1".into());
                }
                Ok(())
            }
            Distribution::Categorical { choices } => {
                if choices.is_empty() {
                    return Err("the list of choices is empty".into());
                }
                Ok(())
            }
        }
    }

    /// Whether the distribution has a single possible value.
    pub fn single(&self) -> bool {
        match self {
            Distribution::Float { low, high, .. } => low == high,
            Distribution::Int { low, high, .. } => low == high,
            Distribution::Categorical { choices } => choices.len() == 1,
        }
    }

    /// The external value for an internal one.
    pub fn to_value(&self, internal: f64) -> toml::Value {
        match self {
            Distribution::Float { .. } => toml::Value::Float(internal),
            Distribution::Int { .. } => toml::Value::Integer(internal.round() as i64),
            Distribution::Categorical { choices } => {
                choices[(internal as usize).min(choices.len() - 1)].clone()
            }
        }
    }

    /// Rounds a sampled internal value onto the distribution's grid and bounds.
    pub fn snap(&self, v: f64) -> f64 {
        match self {
            Distribution::Float {
                low,
                high,
                step: Some(s),
                ..
            } => {
                let k = ((v - low) / s).round();
                (low + k * s).clamp(*low, *high)
            }
            Distribution::Float { low, high, .. } => v.clamp(*low, *high),
            Distribution::Int {
                low, high, step, ..
            } => {
                let k = ((v - *low as f64) / *step as f64).round();
                (*low as f64 + k * *step as f64).clamp(*low as f64, *high as f64)
            }
            Distribution::Categorical { choices } => {
                v.round().clamp(0.0, (choices.len() - 1) as f64)
            }
        }
    }
}
