//! Property tests: manifest and shard header parsing never panic, whatever the bytes.

use proptest::prelude::*;
use wick::data::shard::{plan_shards, write_shards, Column, Dtype, Field, Manifest};
use wick::data::ShardSet;

fn valid_manifest_text() -> String {
    r#"{"format":"wick-shards","version":1,"num_samples":3,
        "fields":[{"name":"x","dtype":"f32","shape":[2],"kind":"tensor"},
                  {"name":"label","dtype":"i64","shape":[],"kind":"label"}],
        "shards":[{"file":"shard-00000.safetensors","samples":3,"bytes":10,"xxh3":"0"}],
        "label":"label","classes":["a","b"]}"#
        .to_string()
}

/// Statistics that would leave features unnormalized (or unwritten), and a shard listed twice.
#[test]
fn manifests_with_bad_stats_or_repeated_shards_are_refused() {
    let base = valid_manifest_text();
    assert!(Manifest::parse(&base).is_ok());
    let with = |extra: &str| {
        base.replacen(
            "\"label\":\"label\"",
            &format!("{extra},\"label\":\"label\""),
            1,
        )
    };
    for (stats, want) in [
        (
            r#""stats":{"x":{"mean":[1.0],"std":[]}}"#,
            "1 means and 0 standard deviations",
        ),
        (
            r#""stats":{"x":{"mean":[1.0,2.0],"std":[1.0]}}"#,
            "2 means and 1 standard deviations",
        ),
        (
            r#""stats":{"x":{"mean":[1.0,2.0,3.0],"std":[1.0,1.0,1.0]}}"#,
            "one per feature (2)",
        ),
        (r#""stats":{"x":{"mean":[],"std":[]}}"#, "0 means"),
        (
            r#""stats":{"x":{"mean":[0.0],"std":[-1.0]}}"#,
            "negative standard deviation",
        ),
        (
            r#""stats":{"y":{"mean":[0.0],"std":[1.0]}}"#,
            "`y`, which is not a field",
        ),
    ] {
        let err = Manifest::parse(&with(stats)).unwrap_err();
        assert!(err.contains(want), "{stats}: {err}");
    }
    assert!(Manifest::parse(&with(r#""stats":{"x":{"mean":[0.0,1.0],"std":[1.0,2.0]}}"#)).is_ok());
    assert!(Manifest::parse(&with(r#""stats":{"x":{"mean":[0.5],"std":[2.0]}}"#)).is_ok());
    let twice = base.replace(
        r#""shards":[{"file":"shard-00000.safetensors","samples":3,"bytes":10,"xxh3":"0"}]"#,
        r#""shards":[{"file":"s.safetensors","samples":1,"bytes":10,"xxh3":"0"},{"file":"s.safetensors","samples":2,"bytes":10,"xxh3":"0"}]"#,
    );
    let err = Manifest::parse(&twice).unwrap_err();
    assert!(
        err.contains("shard `s.safetensors` is listed twice"),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn manifest_parse_never_panics(s in ".{0,400}") {
        let _ = Manifest::parse(&s);
    }

    #[test]
    fn mutated_manifests_never_panic(pos in 0usize..400, byte in any::<u8>()) {
        let mut b = valid_manifest_text().into_bytes();
        let i = pos % b.len();
        b[i] = byte;
        if let Ok(s) = String::from_utf8(b) {
            let _ = Manifest::parse(&s);
        }
    }

    #[test]
    fn mutated_shards_never_panic(edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let fields = vec![
            Field::fixed("x", Dtype::F32, &[3], "tensor"),
            Field::variable("t", Dtype::U8, "text"),
            Field::fixed("label", Dtype::I64, &[], "label"),
        ];
        let ranges = plan_shards(std::iter::repeat_n(40u64, 5), 1 << 20);
        let shards = write_shards(&dir, &fields, &ranges, |r| {
            let x: Vec<u8> = r.clone().flat_map(|i| [i as f32; 3]).flat_map(f32::to_le_bytes).collect();
            let mut data = Vec::new();
            let mut offsets = vec![0i64];
            for i in r.clone() {
                data.extend(std::iter::repeat_n(b'a', i));
                offsets.push(data.len() as i64);
            }
            let y: Vec<u8> = r.flat_map(|i| (i as i64 % 2).to_le_bytes()).collect();
            Ok(vec![Column::Fixed(x), Column::Var { data, offsets }, Column::Fixed(y)])
        }, &|_, _| ()).unwrap();
        let mut m = Manifest::new(fields, shards.clone(), "test");
        m.label = Some("label".into());
        m.write(&dir).unwrap();
        assert!(ShardSet::open(&dir, true).is_ok());
        let f = dir.join(&shards[0].file);
        let mut bytes = std::fs::read(&f).unwrap();
        for (pos, byte) in edits {
            let i = pos % bytes.len();
            bytes[i] = byte;
        }
        std::fs::write(&f, &bytes).unwrap();
        // Without checksums, the structural checks must catch or tolerate every edit.
        if let Ok(set) = ShardSet::open(&dir, false) {
            for i in 0..set.len() {
                let _ = set.bytes(0, i);
                let _ = set.bytes(1, i);
                let _ = set.label(2, i);
            }
        }
    }
}

#[test]
fn gathering_is_identical_with_1_and_2_threads() {
    use wick::data::{ShardSource, Source};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let d = 300;
    let n = 500;
    let fields = vec![
        Field::fixed("x", Dtype::U8, &[d], "tensor"),
        Field::fixed("label", Dtype::I64, &[], "label"),
    ];
    let ranges = plan_shards(std::iter::repeat_n((d + 8) as u64, n), 20_000);
    assert!(ranges.len() > 3);
    let shards = write_shards(
        &dir,
        &fields,
        &ranges,
        |r| {
            let x: Vec<u8> = r
                .clone()
                .flat_map(|i| (0..d).map(move |j| ((i * 31 + j * 7) % 251) as u8))
                .collect();
            let y: Vec<u8> = r.flat_map(|i| (i as i64 % 3).to_le_bytes()).collect();
            Ok(vec![Column::Fixed(x), Column::Fixed(y)])
        },
        &|_, _| (),
    )
    .unwrap();
    let mut m = Manifest::new(fields, shards, "test");
    m.label = Some("label".into());
    m.stats.insert(
        "x".into(),
        wick::data::shard::Stats {
            mean: vec![100.0],
            std: vec![50.0],
        },
    );
    m.write(&dir).unwrap();
    let src = ShardSource::new(
        ShardSet::open(&dir, true).unwrap(),
        "x",
        "label",
        m.stats.get("x"),
    )
    .unwrap();
    let idx: Vec<u32> = wick::rng::Rng::new(4).permutation(n);
    let run = |t: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
            .install(|| {
                let b = src.gather(&idx, &candle_core::Device::Cpu).unwrap();
                (
                    b.x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    b.y.to_vec1::<u32>().unwrap(),
                )
            })
    };
    let one = run(1);
    assert_eq!(one, run(2));
    // Row k is sample idx[k], normalized.
    let k = 17;
    let i = idx[k] as usize;
    assert_eq!(
        one.0[k * d + 5],
        (((i * 31 + 5 * 7) % 251) as f32 - 100.0) / 50.0
    );
    assert_eq!(one.1[k], (i % 3) as u32);
}
