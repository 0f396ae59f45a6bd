//! Image folders and labelled text: packing, the image pipeline, training on images, and
//! text errors that name the line.

mod common;
use common::*;

use std::path::Path;

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// Writes the first `n` Fashion-MNIST test images as a class-folder tree (PNG and JPEG mixed).
fn fashion_folder(root: &Path, n: usize) -> bool {
    let src = Path::new(FASHION).join("t10k-images-idx3-ubyte.gz");
    if !require_asset(
        src.is_file(),
        "Fashion-MNIST (Debian dataset-fashion-mnist)",
    ) {
        return false;
    }
    let images = wick::data::pack::read_idx(&src).unwrap();
    let labels =
        wick::data::pack::read_idx(&Path::new(FASHION).join("t10k-labels-idx1-ubyte.gz")).unwrap();
    for i in 0..n {
        let dir = root.join(format!("class{}", labels.data[i]));
        std::fs::create_dir_all(&dir).unwrap();
        let img = image::GrayImage::from_raw(28, 28, images.data[i * 784..(i + 1) * 784].to_vec())
            .unwrap();
        let ext = if i % 2 == 0 { "png" } else { "jpg" };
        img.save(dir.join(format!("{i:05}.{ext}"))).unwrap();
    }
    true
}

#[test]
fn an_image_folder_packs_and_trains_through_the_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("folder");
    if !fashion_folder(&folder, 2000) {
        return;
    }
    let shards = tmp.path().join("shards");
    let o = wick()
        .args(["data", "pack", "images"])
        .arg(&folder)
        .arg("--out")
        .arg(&shards)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    let o = wick()
        .args(["data", "verify"])
        .arg(&shards)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    let o = wick()
        .args(["data", "inspect"])
        .arg(&shards)
        .output()
        .unwrap();
    let (out, _) = text(&o);
    assert!(
        out.contains("image        u8   variable") && out.contains("class0"),
        "{out}"
    );

    let cfg = tmp.path().join("img.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[data]
path = "{}"
[data.image]
resize = [32, 32]
crop = [28, 28]
random_crop = true
hflip = true
channels = 1
mean = [0.286]
std = [0.353]
[model]
hidden = [128]
[train]
epochs = 8
batch_size = 32
"#,
            shards.display()
        ),
    )
    .unwrap();
    let run = train(cfg.to_str().unwrap(), &tmp.path().join("run"), &[]);
    let acc = final_metric(&run, "eval_accuracy");
    assert!(acc > 0.7, "accuracy {acc} on 400 held-out images");
    // Augmented training is reproducible too, with 2 threads.
    let again = train(
        cfg.to_str().unwrap(),
        &tmp.path().join("again"),
        &["--threads", "2"],
    );
    assert_eq!(sha256(&weights(&run)), sha256(&weights(&again)));
}

#[test]
fn augmentation_is_keyed_by_sample_and_epoch() {
    use wick::data::image::{ImageConfig, ImageSource};
    use wick::data::{Augment, ShardSet, Source};
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("folder");
    if !fashion_folder(&folder, 64) {
        return;
    }
    let shards = tmp.path().join("shards");
    wick::data::image::pack_image_folder(&folder, &shards, None, 1 << 20, &|_, _| ()).unwrap();
    let cfg = ImageConfig {
        resize: Some([32, 32]),
        crop: Some([24, 24]),
        random_crop: true,
        hflip: true,
        channels: 1,
        mean: vec![0.5],
        std: vec![0.5],
    };
    let src = ImageSource::new(
        ShardSet::open(&shards, true).unwrap(),
        "image",
        "label",
        cfg,
    )
    .unwrap();
    let dev = candle_core::Device::Cpu;
    let idx: Vec<u32> = (0..64).rev().collect();
    let get = |threads: usize, epoch: u64, idx: &[u32]| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                src.gather_augmented(idx, Some(Augment { seed: 1, epoch }), &dev)
                    .unwrap()
                    .x
                    .to_vec2::<f32>()
                    .unwrap()
            })
    };
    let a = get(1, 0, &idx);
    assert_eq!(a, get(2, 0, &idx), "thread count changes the batch");
    assert_ne!(a, get(1, 1, &idx), "a new epoch draws new crops and flips");
    // The same sample in another batch position gets the same augmentation.
    let single = get(1, 0, &[idx[5]]);
    assert_eq!(single[0], a[5]);
    // Evaluation (no augmentation) is a center crop: deterministic and equal to itself.
    let e1 = src.gather(&idx, &dev).unwrap().x.to_vec2::<f32>().unwrap();
    assert_ne!(e1, a);
}

#[test]
fn text_packs_from_jsonl_and_csv_and_bad_rows_name_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("t.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": \"free money now\", \"label\": \"spam\"}\n{\"text\": \"lunch at noon?\", \"label\": \"ham\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("tj");
    let o = wick()
        .args(["data", "pack", "text"])
        .arg(&jsonl)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    let set = wick::data::ShardSet::open(&out, true).unwrap();
    assert_eq!(set.bytes(0, 1), b"lunch at noon?");
    assert_eq!(set.manifest.classes, ["ham", "spam"]);
    assert_eq!(set.label(1, 0), 1);

    let csv = tmp.path().join("t.csv");
    std::fs::write(&csv, "text,label\n\"hello, world\",a\nbye,b\n").unwrap();
    let o = wick()
        .args(["data", "pack", "text"])
        .arg(&csv)
        .arg("--out")
        .arg(tmp.path().join("tc"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);

    // Invalid UTF-8 on line 2 of a JSONL file.
    let bad = tmp.path().join("bad.jsonl");
    let mut bytes = b"{\"text\": \"ok\", \"label\": 1}\n{\"text\": \"caf".to_vec();
    bytes.extend([0xff, 0xfe]);
    bytes.extend(b"\", \"label\": 0}\n");
    std::fs::write(&bad, bytes).unwrap();
    let o = wick()
        .args(["data", "pack", "text"])
        .arg(&bad)
        .arg("--out")
        .arg(tmp.path().join("tb"))
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("bad.jsonl: line 2: invalid UTF-8"), "{err}");

    let empty = tmp.path().join("empty.csv");
    std::fs::write(&empty, "text,label\nhi,a\n   ,b\n").unwrap();
    let o = wick()
        .args(["data", "pack", "text"])
        .arg(&empty)
        .arg("--out")
        .arg(tmp.path().join("te"))
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(err.contains("row 2: the text is empty"), "{err}");
}

#[test]
fn text_batches_are_tokenized_padded_to_the_longest_and_truncated() {
    use wick::data::text::{load_tokenizer, TextSource};
    use wick::data::{ShardSet, Source};
    let tok_path = root().join("checkpoints/pretrained/all-MiniLM-L6-v2/tokenizer.json");
    if !require_asset(
        tok_path.is_file(),
        "all-MiniLM-L6-v2 tokenizer (scripts/fetch-minilm.sh)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("t.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": \"The cat sits outside\", \"label\": \"a\"}\n{\"text\": \"A man is eating food.\", \"label\": \"b\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("shards");
    wick::data::pack::pack_text(&jsonl, "text", "label", &out, 1 << 20, &|_, _| ()).unwrap();
    let dev = candle_core::Device::Cpu;
    let src = TextSource::new(
        ShardSet::open(&out, true).unwrap(),
        "text",
        "label",
        load_tokenizer(&tok_path, 128).unwrap(),
    )
    .unwrap();
    let b = src.gather(&[0, 1], &dev).unwrap();
    // The tokenizer file pads to a fixed 128; wick pads to the batch's longest (8 tokens).
    assert_eq!(
        b.x.to_vec2::<u32>().unwrap(),
        [
            vec![101, 1996, 4937, 7719, 2648, 102, 0, 0],
            vec![101, 1037, 2158, 2003, 5983, 2833, 1012, 102]
        ]
    );
    assert_eq!(
        b.mask.unwrap().to_vec2::<u32>().unwrap()[0],
        [1, 1, 1, 1, 1, 1, 0, 0]
    );
    assert_eq!(b.y.to_vec1::<u32>().unwrap(), [0, 1]);
    // Alone, the first text is not padded at all.
    assert_eq!(src.gather(&[0], &dev).unwrap().x.dims(), &[1, 6]);
    // Truncation keeps [CLS] … [SEP] within max_len.
    let short = TextSource::new(
        ShardSet::open(&out, true).unwrap(),
        "text",
        "label",
        load_tokenizer(&tok_path, 4).unwrap(),
    )
    .unwrap();
    assert_eq!(
        short
            .gather(&[0], &dev)
            .unwrap()
            .x
            .to_vec2::<u32>()
            .unwrap(),
        [vec![101, 1996, 4937, 102]]
    );

    // Training an MLP on text is refused with a clear message; a missing tokenizer too.
    let cfg = tmp.path().join("t.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\npath = \"{}\"\ntest_fraction = 0.5\n",
            out.display()
        ),
    )
    .unwrap();
    let o = wick()
        .arg("train")
        .arg(&cfg)
        .arg("--run-dir")
        .arg(tmp.path().join("r"))
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(err.contains("holds text; set data.tokenizer"), "{err}");
    let o = wick()
        .arg("train")
        .arg(&cfg)
        .args([
            "--set",
            &format!("data.tokenizer=\"{}\"", tok_path.display()),
        ])
        .arg("--run-dir")
        .arg(tmp.path().join("r2"))
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(err.contains("an MLP needs feature vectors"), "{err}");
}
