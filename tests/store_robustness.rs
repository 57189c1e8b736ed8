//! Damaged activation stores: the fuzzing campaign's store cases
//! (`tests/fixtures/cases/fuzz/case{03,06,07,14}`), the same stores with a correct
//! `format` (so the deeper checks are reached), shard paths that point outside
//! the store, damaged shard headers, and a bounded mutation loop. Each must give
//! a clean error naming the file and the field, never a panic.

mod common;

use std::path::{Path, PathBuf};

use afprobe::store::{Position, Store};
use candle_core::{Device, Tensor};
use common::{afprobe, assert_fails_with, write_store, StoreShape};
use serde_json::{json, Value};

/// A writable copy of a case's `case/store` in a fresh temporary directory.
fn copy_store(case: &Path) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    for entry in std::fs::read_dir(case.join("case/store")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, store.join(path.file_name().unwrap())).unwrap();
    }
    (tmp, store)
}

fn edit_manifest(store: &Path, edit: impl FnOnce(&mut Value)) {
    let path = store.join("manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, m.to_string()).unwrap();
}

/// The command each case's `cmd.sh` runs, on `store`.
fn case_command(case: &str, store: &Path, out: &Path) -> Vec<String> {
    let (s, o) = (store.display().to_string(), out.display().to_string());
    let args: Vec<&str> = match case {
        "case03" | "case06" => vec!["probe", "--acts", &s, "--label", "tier", "--out", &o],
        "case07" => vec!["plot", &s, "--out", &o],
        _ => vec!["store", "verify", &s],
    };
    args.into_iter().map(String::from).collect()
}

#[test]
fn fuzz_store_cases_fail_cleanly_naming_the_field() {
    let cases = common::cases().join("fuzz");
    // What each case's store gets wrong beyond its shortened `format`.
    let deeper = [
        ("case03", "listed twice"),
        ("case06", "row_count is 23 but the shards hold 24 rows"),
        (
            "case07",
            "shards[0] rows [10, 20) are not its block's rows [0, 10)",
        ),
        ("case14", "must not be empty"),
    ];
    for (case, why) in deeper {
        let (tmp, store) = copy_store(&cases.join(case));
        let args = case_command(case, &store, &tmp.path().join("out"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // As found: the format field is wrong.
        assert_fails_with(&afprobe(&args), &["manifest.json", "format is `af`"]);
        // With the format right, the next fault is named.
        edit_manifest(&store, |m| m["format"] = json!("afprobe-activations/1"));
        assert_fails_with(&afprobe(&args), &["manifest.json", why]);
    }
}

/// A valid one-shard store of 4 rows with `blocks.0.hook_resid_post@last`, d_model 3.
fn valid_store(dir: &Path) -> Store {
    let rows: Vec<Value> = (0..4)
        .map(|i| json!({"id": format!("r{i}"), "tier": if i % 2 == 0 { "free" } else { "paid" }, "request_id": format!("q{}", i / 2)}))
        .collect();
    let shape = StoreShape {
        hooks: vec!["blocks.0.hook_resid_post".into()],
        positions: vec![Position::Last],
        d_model: 3,
        n_layers: 1,
    };
    let acts = Tensor::arange(0f32, 12.0, &Device::Cpu)
        .unwrap()
        .reshape((4, 3))
        .unwrap();
    write_store(
        dir,
        &rows,
        &shape,
        false,
        vec![("blocks.0.hook_resid_post@last".into(), acts)],
    )
}

#[test]
fn shard_paths_must_stay_inside_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("s");
    valid_store(&store);
    // A file outside the store that a malicious manifest could point at.
    let outside = tmp.path().join("secret.safetensors");
    std::fs::copy(store.join("shard-00000.safetensors"), &outside).unwrap();
    let s = store.display().to_string();
    for file in [
        outside.display().to_string(),
        "../secret.safetensors".to_string(),
        "sub/shard-00000.safetensors".to_string(),
        "..".to_string(),
    ] {
        edit_manifest(&store, |m| m["shards"][0]["file"] = json!(file));
        for args in [vec!["store", "verify", &s], vec!["store", "info", &s]] {
            assert_fails_with(
                &afprobe(&args),
                &[
                    "manifest.json",
                    "is not a file name inside the store directory",
                ],
            );
        }
    }
}

#[test]
fn damaged_shard_headers_are_refused_before_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("s");
    valid_store(&store_dir);
    let shard = store_dir.join("shard-00000.safetensors");
    let good = std::fs::read(&shard).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(good[8..8 + header_len].to_vec()).unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..5].to_vec(), "shorter than the 8-byte header length"),
        (
            [&u64::MAX.to_le_bytes()[..], &good[8..]].concat(),
            "does not fit the file",
        ),
        (
            // The activations' shape claims more bytes than the data holds.
            [
                &good[..8],
                header.replacen("[4,3]", "[4,9]", 1).as_bytes(),
                &good[8 + header_len..],
            ]
            .concat(),
            "data_offsets",
        ),
        (
            [
                &good[..8],
                header.replacen("\"F32\"", "\"Q99\"", 1).as_bytes(),
                &good[8 + header_len..],
            ]
            .concat(),
            "unknown dtype",
        ),
    ];
    for (bytes, why) in cases {
        std::fs::write(&shard, &bytes).unwrap();
        let store = Store::open(&store_dir).unwrap();
        let err = store
            .load("blocks.0.hook_resid_post@last")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shard-00000.safetensors") && err.contains(why),
            "{why}: {err}"
        );
    }
}

/// Deterministic xorshift, so a failing mutation can be replayed by its index.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Values a mutated manifest field takes: edge numbers, wrong types, long lists.
fn hostile_value(rng: &mut Rng) -> Value {
    match rng.next() % 9 {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(u64::MAX),
        3 => json!(1u64 << 40),
        4 => json!("../x"),
        5 => json!([]),
        6 => json!([0, u64::MAX]),
        7 => json!(null),
        _ => json!(rng.next() % 50),
    }
}

/// Sets a random leaf (object field or array element) of `v` to a hostile value.
fn mutate(v: &mut Value, rng: &mut Rng) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = &keys[rng.next() as usize % keys.len()];
            let child = map.get_mut(key).unwrap();
            if rng.next().is_multiple_of(3) || !(child.is_object() || child.is_array()) {
                *child = hostile_value(rng);
            } else {
                mutate(child, rng);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let i = rng.next() as usize % items.len();
            if rng.next().is_multiple_of(3) {
                items[i] = hostile_value(rng);
            } else {
                mutate(&mut items[i], rng);
            }
        }
        _ => *v = hostile_value(rng),
    }
}

/// Mutated manifests and shard bytes, read the way `probe`, `plot` and
/// `store verify` read them, in process: every outcome is Ok or Err, never a
/// panic. `AFPROBE_FUZZ_CASES` sets the count (default 300; README gives the
/// longer run).
#[test]
fn mutated_stores_never_panic() {
    let cases: usize = std::env::var("AFPROBE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let tmp = tempfile::tempdir().unwrap();
    let seed_dir = tmp.path().join("seed");
    valid_store(&seed_dir);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(seed_dir.join("manifest.json")).unwrap())
            .unwrap();
    let shard = std::fs::read(seed_dir.join("shard-00000.safetensors")).unwrap();
    let rows = std::fs::read(seed_dir.join("rows.jsonl")).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut refused) = (0, 0);
    for case in 0..cases {
        let dir = tmp.path().join("m");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let mut m = manifest.clone();
        let mut bytes = shard.clone();
        match rng.next() % 3 {
            0 => mutate(&mut m, &mut rng),
            1 => {
                for _ in 0..1 + rng.next() % 4 {
                    let i = rng.next() as usize % bytes.len();
                    bytes[i] = rng.next() as u8;
                }
            }
            _ => bytes.truncate(rng.next() as usize % bytes.len()),
        }
        std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
        std::fs::write(dir.join("shard-00000.safetensors"), &bytes).unwrap();
        std::fs::write(dir.join("rows.jsonl"), &rows).unwrap();
        let outcome = std::panic::catch_unwind(|| -> afprobe::Result<()> {
            let store = Store::open_any(&dir)?;
            for name in store.manifest.tensor_names()? {
                if !name.ends_with("@all") {
                    store.load(&name)?;
                }
            }
            afprobe::store::verify(&dir)?;
            afprobe::store::info(&dir)?;
            Ok(())
        });
        match outcome {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("mutation {case} panicked; manifest {m}"),
        }
    }
    eprintln!("{cases} mutated stores: {ok} read, {refused} refused, 0 panics");
}
