//! Parsing run files and `--set` overrides into a [`Config`], with errors that point at the
//! file, line and key, and suggest the closest valid name.

use std::path::Path;

use serde::Deserialize;

use super::Config;
use crate::{Error, Result};

/// Reads, parses, overrides and validates a run file.
///
/// `overrides` are `key.path=value` strings as given to `--set`; the value is parsed as a TOML
/// value (`0.01`, `[128, 64]`, `true`, `"text"`), and a bare word is taken as a string.
pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Config(format!(
            "{}: cannot read the config file: {e}; check the path (configs/ holds examples)",
            path.display()
        ))
    })?;
    let origin = path.display().to_string();
    let mut cfg = load_str(&text, &origin, overrides)?;
    let base = path.parent().unwrap_or(Path::new("."));
    super::validate::resolve_and_validate(&mut cfg, &origin, base)
        .map_err(|e| blame_override(e, &origin, overrides))?;
    Ok(cfg)
}

/// A validation error about a key that `--set` gave: the error names that `--set`, not only
/// the file (whose own value was replaced).
fn blame_override(e: Error, origin: &str, overrides: &[String]) -> Error {
    let Error::Config(msg) = e else { return e };
    let set = overrides.iter().rev().find(|ov| {
        parse_override(ov).is_ok_and(|(key, _)| msg.contains(&format!("`{}`", key.join("."))))
    });
    match (set, msg.strip_prefix(&format!("{origin}: "))) {
        (Some(ov), Some(rest)) => Error::Config(format!("{origin}: --set {ov}: {rest}")),
        _ => Error::Config(msg),
    }
}

/// Validates a config built in code (paths resolve against the working directory).
pub fn validate(cfg: &mut Config, origin: &str) -> Result<()> {
    super::validate::resolve_and_validate(cfg, origin, Path::new("."))
}

/// Parses config text (named `origin` in errors) and applies overrides, without validation.
pub fn load_str(text: &str, origin: &str, overrides: &[String]) -> Result<Config> {
    let cfg: Config = toml::from_str(text).map_err(|e| toml_error(origin, text, &e))?;
    let is_bert = |t: &toml::Table| {
        t.get("model")
            .and_then(|m| m.get("kind"))
            .and_then(|k| k.as_str())
            == Some("bert")
    };
    if overrides.is_empty() && cfg.model.kind != super::ModelKind::Bert {
        return Ok(cfg);
    }
    let mut table: toml::Table = toml::from_str(text).map_err(|e| toml_error(origin, text, &e))?;
    for ov in overrides {
        let (key, value) = parse_override(ov)?;
        set_path(&mut table, &key, value)
            .map_err(|msg| Error::Config(format!("--set {ov}: {msg}")))?;
        // Deserialize after each override so that an error is blamed on the right one.
        Config::deserialize(table.clone())
            .map_err(|e| Error::Config(format!("--set {ov}: {}", explain(e.message(), &key))))?;
    }
    if is_bert(&table) {
        recipe_defaults(&mut table, BERT_RECIPE);
    }
    Config::deserialize(table).map_err(|e| Error::Config(format!("{origin}: {}", e.message())))
}

/// The Hugging Face Trainer's fine-tuning recipe, the defaults of `model.kind = "bert"`:
/// AdamW at 5e-5 with weight decay 0.01 except on biases and layer norms, a linear warm-up
/// over the first 10% of steps then linear decay, and gradient clipping at 1.0.
const BERT_RECIPE: &[(&str, &str, &str)] = &[
    ("optim", "kind", "\"adamw\""),
    ("optim", "lr", "5e-5"),
    ("optim", "no_decay", "[\"bias\", \"LayerNorm.weight\"]"),
    ("schedule", "kind", "\"linear\""),
    ("schedule", "warmup_ratio", "0.1"),
    ("train", "clip_norm", "1.0"),
];

/// Sets each `(section, key, value)` of `recipe` that the file does not set.
fn recipe_defaults(table: &mut toml::Table, recipe: &[(&str, &str, &str)]) {
    for (section, key, value) in recipe {
        let sec = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if let Some(sec) = sec.as_table_mut() {
            if !sec.contains_key(*key) {
                let v: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                    .expect("recipe values are valid TOML")["v"]
                    .clone();
                sec.insert(key.to_string(), v);
            }
        }
    }
}

/// Splits `a.b.c=value` and parses the value as TOML (bare words become strings). Keys use
/// TOML's dotted-key syntax, so a segment with a dot is quoted: `tune.space."optim.lr"=...`.
pub fn parse_override(s: &str) -> Result<(Vec<String>, toml::Value)> {
    let Some((key, raw)) = s.split_once('=') else {
        return Err(Error::Config(format!(
            "--set {s}: expected KEY=VALUE, e.g. --set optim.lr=0.01"
        )));
    };
    let (key, raw) = (key.trim(), raw.trim());
    let doc = toml::from_str::<toml::Table>(&format!("{key} = {raw}")).or_else(|_| {
        let quoted = toml::Value::String(raw.to_string()).to_string();
        toml::from_str::<toml::Table>(&format!("{key} = {quoted}"))
    });
    let Ok(mut table) = doc else {
        return Err(Error::Config(format!(
            "--set {s}: `{key}` is not a key path; write it as section.key, e.g. train.epochs (quote parts with dots: tune.space.\"optim.lr\")"
        )));
    };
    // The key's own segments (parsed with a plain value), then the same walk in the document.
    let mut segments = 0;
    let mut probe =
        toml::from_str::<toml::Table>(&format!("{key} = 0")).expect("the key parsed above");
    while let Some((_, v)) = probe.into_iter().next() {
        segments += 1;
        match v {
            toml::Value::Table(t) => probe = t,
            _ => break,
        }
    }
    let mut path = Vec::new();
    loop {
        let (k, v) = table.into_iter().next().expect("one key was parsed");
        path.push(k);
        match v {
            toml::Value::Table(t) if path.len() < segments => table = t,
            v => return Ok((path, v)),
        }
    }
}

fn set_path(
    table: &mut toml::Table,
    key: &[String],
    value: toml::Value,
) -> std::result::Result<(), String> {
    let (last, parents) = key.split_last().expect("non-empty key");
    let mut cur = table;
    for (i, part) in parents.iter().enumerate() {
        let entry = cur
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{}` is a value, not a section", key[..=i].join(".")))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

/// Turns a toml/serde error into one line: `file:line:col: message`.
fn toml_error(origin: &str, text: &str, e: &toml::de::Error) -> Error {
    let msg = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return Error::Config(format!("{origin}: {msg}"));
    };
    if msg.starts_with("missing field `data`") {
        // Every section but [data] has defaults, so only [data] can be missing.
        let name = "data";
        return Error::Config(format!(
            "{origin}: the file is missing the required section [{name}]"
        ));
    }
    let (line, col) = line_col(text, span.start);
    let line_text = text.lines().nth(line - 1).unwrap_or("");
    let section = section_at(text, line);
    let key_on_line = line_text
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let full_key = match (&section, &key_on_line) {
        (Some(s), Some(k)) => format!("{s}.{k}"),
        (None, Some(k)) => k.clone(),
        (Some(s), None) => s.clone(),
        (None, None) => String::new(),
    };
    let key_parts: Vec<String> = full_key.split('.').map(str::to_string).collect();
    let explained = explain(&msg, &key_parts);
    Error::Config(format!("{origin}:{line}:{col}: {explained}"))
}

/// Rewrites serde's messages into what a user needs: the key, what is expected, the fix.
fn explain(msg: &str, key: &[String]) -> String {
    let key_str = key.join(".");
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let valid = backticked(expected);
        // The table that holds the unknown name: the key path up to it, or the whole path
        // when the name is inside the value (`--set data.image={size=0}`, an inline table).
        let table = match key.iter().position(|k| k == name) {
            Some(i) => &key[..i],
            None => key,
        };
        let section = if table.is_empty() {
            " at the top level".to_string()
        } else {
            format!(" in [{}]", table.join("."))
        };
        return match closest(name, &valid) {
            Some(s) => format!("unknown key `{name}`{section}; did you mean `{s}`?"),
            None => format!(
                "unknown key `{name}`{section}; valid keys are {}",
                valid
                    .iter()
                    .map(|v| format!("`{v}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
    }
    if let Some(rest) = msg.strip_prefix("unknown variant `") {
        let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let valid = backticked(expected);
        let hint = closest(name, &valid)
            .map(|s| format!("; did you mean \"{s}\"?"))
            .unwrap_or_default();
        return format!(
            "`{key_str}` = \"{name}\" is not one of {}{hint}",
            valid
                .iter()
                .map(|v| format!("\"{v}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or(rest);
        let section = if key_str.is_empty() {
            "the file".to_string()
        } else {
            format!("[{key_str}]")
        };
        return format!("{section} is missing the required key `{name}`");
    }
    if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
        let msg = msg
            .replace("expected f64", "expected a number")
            .replace("expected u64", "expected a non-negative integer")
            .replace("expected usize", "expected a non-negative integer")
            .replace("expected f32", "expected a number")
            .replace("expected a boolean", "expected true or false");
        return if key_str.is_empty() {
            msg
        } else {
            format!("`{key_str}`: {msg}")
        };
    }
    if key_str.is_empty() {
        msg.to_string()
    } else {
        format!("`{key_str}`: {msg}")
    }
}

fn backticked(s: &str) -> Vec<String> {
    s.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, v)| v.to_string())
        .collect()
}

/// The valid name closest to `name`, if it is close enough to be a likely typo.
pub(crate) fn closest(name: &str, valid: &[String]) -> Option<String> {
    // Case does not count: `"Relu"` is `"relu"`, not `"gelu"`.
    let name = name.to_lowercase();
    valid
        .iter()
        .map(|v| (strsim::jaro_winkler(&name, &v.to_lowercase()), v))
        .filter(|(score, _)| *score >= 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, v)| v.clone())
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

/// The `[section]` header in force at 1-based `line`.
fn section_at(text: &str, line: usize) -> Option<String> {
    text.lines()
        .take(line)
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .map(|s| s.trim_matches('[').trim().to_string())
        })
        .last()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str, ov: &[&str]) -> String {
        let ov: Vec<String> = ov.iter().map(|s| s.to_string()).collect();
        load_str(text, "t.toml", &ov).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_suggests_the_closest() {
        let e = err("[data]\npath = \"x.csv\"\n[train]\nbatchsize = 3\n", &[]);
        assert_eq!(
            e,
            "t.toml:4:1: unknown key `batchsize` in [train]; did you mean `batch_size`?"
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = err("[data]\npath = \"x.csv\"\n[optim]\nlr = \"fast\"\n", &[]);
        assert!(e.starts_with("t.toml:4:6: `optim.lr`: invalid type"), "{e}");
        assert!(e.contains("expected a number"), "{e}");
    }

    #[test]
    fn suggestions_ignore_case() {
        let valid: Vec<String> = ["relu", "gelu", "tanh"].map(String::from).to_vec();
        assert_eq!(closest("Relu", &valid).as_deref(), Some("relu"));
        assert_eq!(closest("TANH", &valid).as_deref(), Some("tanh"));
    }

    #[test]
    fn bad_variant_suggests() {
        let e = err("[data]\npath = \"x.csv\"\n[optim]\nkind = \"adamm\"\n", &[]);
        assert!(e.contains("did you mean \"adamw\"?"), "{e}");
    }

    #[test]
    fn overrides_apply_and_are_checked() {
        let text = "[data]\npath = \"x.csv\"\n";
        let cfg = load_str(
            text,
            "t",
            &[
                "optim.lr=0.5".into(),
                "model.hidden=[8, 4]".into(),
                "run.name=abc".into(),
            ],
        )
        .unwrap();
        assert_eq!(cfg.optim.lr, 0.5);
        assert_eq!(cfg.model.hidden, vec![8, 4]);
        assert_eq!(cfg.run.name, "abc");
        let e = err(text, &["optim.lrr=0.1"]);
        assert_eq!(
            e,
            "--set optim.lrr=0.1: unknown key `lrr` in [optim]; did you mean `lr`?"
        );
        let e = err(text, &["optim.lr"]);
        assert!(e.contains("expected KEY=VALUE"), "{e}");
        let (path, v) = parse_override(r#"tune.space."optim.lr"={ float = [0.1, 1.0] }"#).unwrap();
        assert_eq!(path, ["tune", "space", "optim.lr"]);
        assert!(v.as_table().unwrap().contains_key("float"));
        let (path, v) = parse_override("run.name=exp 1").unwrap();
        assert_eq!(
            (path, v.as_str()),
            (vec!["run".to_string(), "name".to_string()], Some("exp 1"))
        );
    }
}
