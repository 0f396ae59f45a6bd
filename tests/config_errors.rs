//! Bad input gives one clear line on stderr and a non-zero exit, never a panic.

mod common;
use common::*;

use std::path::Path;

/// Runs `wick train` on a config written to a temp dir and returns its stderr.
fn fails(config: &str, extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.toml");
    std::fs::write(&path, config).unwrap();
    fails_at(&path, extra)
}

fn fails_at(path: &Path, extra: &[&str]) -> String {
    let o = wick()
        .arg("train")
        .arg(path)
        .args(["--run-dir"])
        .arg(path.with_extension("run"))
        .args(extra)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit 2\nstdout: {out}\nstderr: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

const OK_DATA: &str = "[data]\npath = \"data/sklearn/iris.csv\"\n";

#[test]
fn unknown_key_names_line_and_suggests() {
    let e = fails(
        &format!("{OK_DATA}[train]\nepochs = 3\nbatchsize = 8\n"),
        &[],
    );
    assert!(
        e.contains("bad.toml:5:1: unknown key `batchsize` in [train]; did you mean `batch_size`?"),
        "{e}"
    );
    let e = fails(&format!("{OK_DATA}[optim]\nlearning_rate = 0.1\n"), &[]);
    assert!(e.contains("unknown key `learning_rate` in [optim]"), "{e}");
    // The table that holds the unknown name, also inside an inline table or at the top.
    let e = fails(
        &format!("{OK_DATA}[train]\nearly_stopping = {{ patiense = 3 }}\n"),
        &[],
    );
    assert!(
        e.contains("unknown key `patiense` in [train.early_stopping]"),
        "{e}"
    );
    let e = fails(OK_DATA, &["--set", "foo.bar=1"]);
    assert!(e.contains("unknown key `foo` at the top level"), "{e}");
    let e = fails(OK_DATA, &["--set", "optim.lrr=0.1"]);
    assert!(
        e.contains("--set optim.lrr=0.1: unknown key `lrr` in [optim]; did you mean `lr`?"),
        "{e}"
    );
}

#[test]
fn wrong_type_says_what_is_expected() {
    let e = fails(&format!("{OK_DATA}[train]\nepochs = \"ten\"\n"), &[]);
    assert!(
        e.contains(":4:10: `train.epochs`: invalid type: string \"ten\""),
        "{e}"
    );
    assert!(e.contains("expected"), "{e}");
    let e = fails(&format!("{OK_DATA}[model]\nhidden = 64\n"), &[]);
    assert!(
        e.contains("`model.hidden`: invalid type: integer `64`"),
        "{e}"
    );
}

#[test]
fn missing_data_file_names_the_key_and_paths() {
    let e = fails("[data]\npath = \"nope/missing.csv\"\n", &[]);
    assert!(
        e.contains("`data.path` = \"nope/missing.csv\": no such file or shard directory"),
        "{e}"
    );
    let e = fails("[train]\nepochs = 3\n", &[]);
    assert!(
        e.contains("bad.toml: the file is missing the required section [data]"),
        "{e}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let o = wick()
        .args(["train"])
        .arg(tmp.path().join("absent.toml"))
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("absent.toml: cannot read the config file"),
        "{err}"
    );
}

#[test]
fn out_of_range_values_are_rejected() {
    let e = fails(&format!("{OK_DATA}[optim]\nlr = -0.1\n"), &[]);
    assert!(
        e.contains("`optim.lr` = -0.1: expected a positive number"),
        "{e}"
    );
    let e = fails(OK_DATA, &["--set", "train.batch_size=0"]);
    assert!(
        e.contains("`train.batch_size` = 0: expected a positive batch size"),
        "{e}"
    );
    let e = fails(OK_DATA, &["--set", "train.save_every=0"]);
    assert!(
        e.contains("`train.save_every` = 0: expected a positive number of epochs"),
        "{e}"
    );
    for (shape, want) in [
        (
            None,
            "data.random_shift = 2 needs image-shaped samples, but each sample is a vector of 4 values",
        ),
        (
            Some("model.input_shape=[1,2,3]"),
            "a [1, 2, 3] image holds 6 values but a sample has 4; fix model.input_shape",
        ),
        (
            Some("model.input_shape=[1,2,2]"),
            "data.random_shift = 2 would move 2x2 images out of the frame",
        ),
    ] {
        let mut args = vec!["--set", "data.random_shift=2"];
        args.extend(shape.iter().flat_map(|s| ["--set", s]));
        let e = fails(OK_DATA, &args);
        assert!(e.contains(want) && e.contains("iris.csv"), "{e}");
    }
    // A value from --set is blamed on the --set, not on the file.
    let e = fails(OK_DATA, &["--set", "train.batch_size=0"]);
    assert!(
        e.contains("bad.toml: --set train.batch_size=0: `train.batch_size` = 0"),
        "{e}"
    );
    let e = fails(OK_DATA, &["--set", "train.log_every=0"]);
    assert!(
        e.contains("`train.log_every` = 0: expected a positive number of steps"),
        "{e}"
    );
    let e = fails(OK_DATA, &["--set", "run.output_dir=\"\""]);
    assert!(
        e.contains("`run.output_dir` = \"\": expected a non-empty"),
        "{e}"
    );
    // Too long for a timer (was a panic converting it to a Duration).
    let e = fails(
        OK_DATA,
        &[
            "--set",
            "dist.backend=\"mpi\"",
            "--set",
            "dist.timeout_s=1e300",
        ],
    );
    assert!(
        e.contains("`dist.timeout_s` = ") && e.contains("up to 2592000 (30 days)"),
        "{e}"
    );
    // A monitor the data's task does not report (iris is classification; the config leaves
    // the task to the data) is refused before a run directory is made, so a retry with the
    // same --run-dir is not told that it already holds a run.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, OK_DATA).unwrap();
    for _ in 0..2 {
        let e = fails_at(&cfg, &["--set", "train.monitor=\"eval_mse\""]);
        assert!(
            e.contains("train.monitor = \"eval_mse\" is not reported"),
            "{e}"
        );
        assert!(!cfg.with_extension("run").exists());
    }
    // Too large for this machine's memory (the process used to be killed for memory).
    let e = fails(OK_DATA, &["--set", "model.hidden=[1048576, 1048576]"]);
    assert!(
        e.contains("makes an MLP of 1099521064963 parameters") && e.contains("use narrower"),
        "{e}"
    );
    let e = fails(OK_DATA, &["--set", "model.dropout=1.5"]);
    assert!(e.contains("`model.dropout` = 1.5"), "{e}");
    let e = fails(OK_DATA, &["--set", "train.monitor=\"eval_acc\""]);
    assert!(e.contains("did you mean \"eval_accuracy\"?"), "{e}");
    let e = fails(&format!("{OK_DATA}[optim]\nkind = \"adam\"\n"), &[]);
    assert!(
        e.contains(
            "`optim.kind` = \"adam\" is not one of \"sgd\", \"adamw\"; did you mean \"adamw\"?"
        ),
        "{e}"
    );
}

#[test]
fn empty_csv_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.csv");
    std::fs::write(&empty, "").unwrap();
    let header_only = tmp.path().join("header.csv");
    std::fs::write(&header_only, "a,b,target\n").unwrap();
    // One label value for every row: not silently a regression on a constant.
    let constant = tmp.path().join("constant.csv");
    std::fs::write(&constant, "a,target\n1,0\n2,0\n3,0\n").unwrap();
    for (f, want) in [
        (&empty, "the file is empty"),
        (&header_only, "no data rows"),
        (&constant, "the label column holds a single value (0)"),
    ] {
        let e = fails(&format!("[data]\npath = \"{}\"\n", f.display()), &[]);
        assert!(
            e.contains(&f.display().to_string()) && e.contains(want),
            "{e}"
        );
    }
}

#[test]
fn missing_label_column_lists_columns_and_suggests() {
    let e = fails(
        "[data]\npath = \"data/sklearn/iris.csv\"\nlabel = \"targets\"\n",
        &[],
    );
    assert!(
        e.contains("iris.csv: no label column `targets` (data.label)"),
        "{e}"
    );
    assert!(e.contains("did you mean `target`?"), "{e}");
}

#[test]
fn non_numeric_feature_names_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("bad.csv");
    std::fs::write(&f, "a,b,target\n1,2,x\n3,oops,y\n").unwrap();
    let e = fails(
        &format!("[data]\npath = \"{}\"\ntest_fraction = 0.5\n", f.display()),
        &[],
    );
    assert!(
        e.contains("line 3, column `b`: expected a number, got \"oops\""),
        "{e}"
    );
}

#[test]
fn resume_of_a_non_run_is_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let o = wick()
        .args(["train", "--resume"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("not a wick run directory"), "{err}");
}

#[test]
fn duplicate_header_and_bad_regression_labels_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dup = tmp.path().join("dup.csv");
    std::fs::write(&dup, "a,a,target\n1,2,x\n3,4,y\n").unwrap();
    let e = fails(&format!("[data]\npath = \"{}\"\n", dup.display()), &[]);
    assert!(e.contains("names column `a` twice"), "{e}");
    let reg = tmp.path().join("reg.csv");
    let test = tmp.path().join("reg_test.csv");
    std::fs::write(&reg, "a,target\n1,0.5\n2,1.5\n3,2.5\n").unwrap();
    std::fs::write(&test, "a,target\n1,0.5\n2,oops\n").unwrap();
    let e = fails(
        &format!(
            "[data]\npath = \"{}\"\ntest_path = \"{}\"\ntask = \"regression\"\n",
            reg.display(),
            test.display()
        ),
        &[],
    );
    assert!(
        e.contains("reg_test.csv: line 3: the label \"oops\" is not a finite number"),
        "{e}"
    );
}

#[test]
fn resume_refuses_changed_data() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("iris.csv");
    std::fs::copy(root().join("data/sklearn/iris.csv"), &csv).unwrap();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\npath = \"{}\"\n[train]\nepochs = 2\n",
            csv.display()
        ),
    )
    .unwrap();
    let run = tmp.path().join("run");
    let o = wick()
        .arg("train")
        .arg(&cfg)
        .arg("--run-dir")
        .arg(&run)
        .arg("-q")
        .output()
        .unwrap();
    assert!(o.status.success());
    let changed = std::fs::read_to_string(&csv)
        .unwrap()
        .replacen("5.1,3.5", "5.2,3.5", 1);
    std::fs::write(&csv, changed).unwrap();
    let o = wick()
        .args(["train", "--resume"])
        .arg(&run)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("the data differs from what this run was trained on"),
        "{err}"
    );
}

/// A --run-dir that is a file: the OS error once (it used to be printed twice), and the fix.
#[test]
fn a_run_dir_that_is_a_file_is_named_once_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("afile");
    std::fs::write(&file, "").unwrap();
    let o = wick()
        .arg("train")
        .arg(root().join("configs/iris_mlp.toml"))
        .arg("--run-dir")
        .arg(&file)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot create the run directory"), "{err}");
    assert!(err.contains("choose another --run-dir"), "{err}");
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}

/// Output closed early (`wick runs DIR | head -1`): no panic, whatever the exit status.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let o = wick()
            .args(["train", "configs/iris_mlp.toml", "--quiet"])
            .args(["--set", "train.epochs=1", "--run-dir"])
            .arg(tmp.path().join(format!("r{i}")))
            .current_dir(root())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o).1);
    }
    let mut child = wick()
        .arg("runs")
        .arg(tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before anything is written
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
}
