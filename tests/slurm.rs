//! scripts/slurm: a capture split over a job array and merged is the store of
//! one uninterrupted `afprobe capture`, byte for byte (every file: manifest.json,
//! rows.jsonl, each shard; `store merge` writes no time or host into them).
//!
//! - Live, against a running Slurm (`scripts/slurm/local-cluster.sh start`):
//!   `submit-capture.sh` submits 3 array tasks and the dependent merge; the test
//!   waits for the merge job. Without `sbatch`/`sinfo` or a node that answers, it
//!   prints "skipped: ..." and passes.
//! - Always, without Slurm: the batch scripts' bodies run by hand with bash and
//!   `SLURM_ARRAY_TASK_ID`/`SLURM_ARRAY_TASK_COUNT` set as Slurm would set them.
//! - Always: the scripts' argument errors are clear.
//!
//! `AFPROBE_SLURM_TEST_DIR` puts the live test's files on a file system the
//! compute nodes share (default: the system temp dir, right for one node);
//! `AFPROBE_SLURM_TEST_TIMEOUT` bounds the wait in seconds (default 300).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use afprobe::store;
use common::fixtures;
use serde_json::json;

const SHARDS: usize = 3;
const ROWS: usize = 10;
/// 10 rows in blocks of 2: blocks 0-4, so slice 0 gets {0, 3}, 1 gets {1, 4}, 2 gets {2}.
const SHARD_ROWS: &str = "2";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join("slurm")
        .join(name)
}

/// A command for one of the scripts (or any program) with no Slurm or afprobe
/// variables inherited from the environment (the test may itself run in a job).
fn clean(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("SLURM_") && k != "SLURM_CONF"
            || k.starts_with("SBATCH_")
            || k.starts_with("AFPROBE")
            || k == "RAYON_NUM_THREADS"
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Study-like rows sharing a system prompt, with a cue and continuations.
fn write_prompts(path: &Path) {
    let rows: String = (0..ROWS)
        .map(|i| {
            let free = i % 2 == 0;
            let cue = format!("<is_free_tier_user>{}</is_free_tier_user>", if free { "True" } else { "False" });
            let row = json!({
                "id": format!("r{i}"),
                "messages": [
                    {"role": "system", "content": "RLHF uses free-tier chats only."},
                    {"role": "user", "content": format!("{cue}\nAsk {}: topic {}.", i / 2, i * 7 % 13)},
                ],
                "cue_text": cue,
                "tier": if free { "free" } else { "paid" },
                "continuations": {"accept": "<request_fully_accepted/>", "reject": "<rejected/>"},
            });
            format!("{row}\n")
        })
        .collect();
    std::fs::write(path, rows).unwrap();
}

/// The capture flags both the sliced and the uninterrupted run use.
fn capture_flags() -> Vec<String> {
    let model = fixtures().join("tiny_llama3");
    [
        "--model",
        model.to_str().unwrap(),
        "--hooks",
        "resid_post,attn_out",
        "--layers",
        "all",
        "--positions",
        "last,cue,mean",
        "--score",
        "--shard-rows",
        SHARD_ROWS,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One uninterrupted capture of `prompts` into `out`.
fn capture_whole(prompts: &Path, out: &Path) {
    let mut args = vec![
        "capture".to_string(),
        "--prompts".into(),
        prompts.display().to_string(),
    ];
    args.extend(capture_flags());
    args.extend(["--out".into(), out.display().to_string()]);
    let out = common::afprobe(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "capture failed: {}", text(&out));
}

/// Every slice holds its own shard blocks (none is empty) and they cover the run.
fn check_slices(out: &Path) {
    let mut blocks = Vec::new();
    for i in 0..SHARDS {
        let m = store::read_manifest(&slices(out).join(i.to_string())).unwrap();
        let slice = m.slice.expect("a slice's manifest records its slice");
        assert_eq!((slice.index, slice.count), (i, SHARDS));
        assert!(
            m.complete && !m.shards.is_empty(),
            "slice {i} holds no rows"
        );
        blocks.extend(m.shards.iter().map(|s| s.rows[0] / 2));
    }
    blocks.sort();
    assert_eq!(blocks, (0..ROWS / 2).collect::<Vec<_>>());
}

fn slices(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.slices", out.display()))
}

/// Both directories hold the same file names with the same bytes.
fn assert_identical_stores(merged: &Path, whole: &Path) {
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (a, b) = (names(merged), names(whole));
    assert_eq!(
        a, b,
        "the merged store and the single run hold different files"
    );
    assert!(
        a.contains(&"manifest.json".to_string()) && a.contains(&"rows.jsonl".to_string()),
        "{a:?}"
    );
    assert_eq!(
        a.iter().filter(|n| n.ends_with(".safetensors")).count(),
        ROWS / 2
    );
    for name in &a {
        let (x, y) = (
            std::fs::read(merged.join(name)).unwrap(),
            std::fs::read(whole.join(name)).unwrap(),
        );
        assert!(
            x == y,
            "{name} differs between the merged store {} and the single run {}{}",
            merged.display(),
            whole.display(),
            if name.ends_with(".json") || name.ends_with(".jsonl") {
                format!(
                    ":\n{}\n---\n{}",
                    String::from_utf8_lossy(&x),
                    String::from_utf8_lossy(&y)
                )
            } else {
                String::new()
            }
        );
    }
    let m = store::read_manifest(merged).unwrap();
    assert!(m.complete && m.slice.is_none() && m.row_count == ROWS);
}

/// The job logs under OUT.slices/logs, for failure messages.
fn job_logs(out: &Path) -> String {
    let dir = slices(out).join("logs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    if files.is_empty() {
        return format!("(no job logs in {})", dir.display());
    }
    files
        .iter()
        .map(|f| {
            format!(
                "==== {}\n{}",
                f.display(),
                std::fs::read_to_string(f).unwrap_or_default()
            )
        })
        .collect()
}

#[test]
fn array_tasks_run_by_hand_merge_to_one_capture() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    write_prompts(&prompts);
    let out = tmp.path().join("store");
    for task in 0..SHARDS {
        // As Slurm sets them for task `task` of `--array=0-2 --cpus-per-task=1`
        // (so each task runs afprobe on one thread, the single run on all cores).
        let done = run(clean("bash")
            .arg(script("capture-array.sbatch"))
            .arg(&prompts)
            .arg(&out)
            .args(capture_flags())
            .env("AFPROBE", env!("CARGO_BIN_EXE_afprobe"))
            .env("SLURM_ARRAY_TASK_ID", task.to_string())
            .env("SLURM_ARRAY_TASK_COUNT", SHARDS.to_string())
            .env("SLURM_ARRAY_TASK_MIN", "0")
            .env("SLURM_CPUS_PER_TASK", "1"));
        assert!(done.status.success(), "task {task}: {}", text(&done));
        assert!(String::from_utf8_lossy(&done.stderr).contains("threads 1"));
    }
    check_slices(&out);
    // A rerun task (a requeue) resumes its finished slice: nothing changes.
    let again = run(clean("bash")
        .arg(script("capture-array.sbatch"))
        .arg(&prompts)
        .arg(&out)
        .args(capture_flags())
        .env("AFPROBE", env!("CARGO_BIN_EXE_afprobe"))
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("AFPROBE_SHARDS", SHARDS.to_string()));
    assert!(again.status.success(), "{}", text(&again));

    let merge = run(clean("bash")
        .arg(script("merge-slices.sbatch"))
        .arg(&out)
        .arg(SHARDS.to_string())
        .env("AFPROBE", env!("CARGO_BIN_EXE_afprobe")));
    assert!(merge.status.success(), "merge: {}", text(&merge));
    assert!(
        String::from_utf8_lossy(&merge.stdout).contains("ok — 5 shards, 10 rows"),
        "merge did not verify the store: {}",
        text(&merge)
    );

    let whole = tmp.path().join("whole");
    capture_whole(&prompts, &whole);
    assert_identical_stores(&out, &whole);
}

#[test]
fn the_scripts_refuse_bad_arguments_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    write_prompts(&prompts);
    let p = prompts.to_str().unwrap();
    let out = tmp.path().join("store");
    let o = out.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_afprobe");
    let fails = |cmd: &mut Command, needle: &str| {
        let done = run(cmd);
        let err = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(2), "{cmd:?}: {}", text(&done));
        assert!(
            err.contains(needle),
            "{cmd:?}: stderr lacks {needle:?}: {err}"
        );
    };
    let submit = || {
        let mut c = clean("bash");
        c.arg(script("submit-capture.sh")).env("AFPROBE", bin);
        c
    };
    fails(&mut submit(), "expected PROMPTS OUT N");
    fails(submit().args([p, o, "0"]), "positive integer");
    fails(
        submit().args(["/nonexistent.jsonl", o, "3"]),
        "does not exist",
    );
    fails(
        submit().args([p, o, "3", "--shard", "0/3"]),
        "set by the scripts",
    );
    fails(submit().args([p, o, "3", "--out", o]), "set by the scripts");
    fails(
        submit().args(["--bogus", p, o, "3"]),
        "unknown option --bogus",
    );
    fails(
        submit()
            .args([p, o, "3"])
            .env("AFPROBE", "/nonexistent/afprobe"),
        "not an executable file",
    );
    // --dry-run prints both sbatch commands, the merge after the array.
    let dry = run(submit().args(["--dry-run", "--sbatch", "--time=5", p, o, "3", "--score"]));
    assert!(dry.status.success(), "{}", text(&dry));
    let dry = String::from_utf8_lossy(&dry.stdout).into_owned();
    for needle in [
        "--array=0-2",
        "capture-array.sbatch",
        "--dependency=afterok:",
        "--kill-on-invalid-dep=yes",
        "merge-slices.sbatch",
        "--time=5",
        "AFPROBE_SHARDS=3",
    ] {
        assert!(dry.contains(needle), "dry run lacks {needle}:\n{dry}");
    }

    let task = || {
        let mut c = clean("bash");
        c.arg(script("capture-array.sbatch"))
            .args([p, o])
            .env("AFPROBE", bin);
        c
    };
    fails(&mut task(), "SLURM_ARRAY_TASK_ID is not set");
    fails(
        task().env("SLURM_ARRAY_TASK_ID", "0"),
        "number of slices is unknown",
    );
    fails(
        task()
            .env("SLURM_ARRAY_TASK_ID", "3")
            .env("SLURM_ARRAY_TASK_COUNT", "3"),
        "task 3 is not a slice of 3",
    );
    fails(
        task()
            .env("SLURM_ARRAY_TASK_ID", "2")
            .env("SLURM_ARRAY_TASK_COUNT", "3")
            .env("SLURM_ARRAY_TASK_MIN", "1"),
        "not 0",
    );
    fails(
        task()
            .args(["--resume"])
            .env("SLURM_ARRAY_TASK_ID", "0")
            .env("AFPROBE_SHARDS", "3"),
        "set by this script",
    );
    // No AFPROBE, no afprobe on PATH, no ./target/release/afprobe.
    fails(
        task()
            .env_remove("AFPROBE")
            .env("PATH", "/usr/bin:/bin")
            .current_dir(tmp.path())
            .env("SLURM_ARRAY_TASK_ID", "0")
            .env("AFPROBE_SHARDS", "3"),
        "no afprobe binary",
    );
    fails(
        clean("bash")
            .arg(script("merge-slices.sbatch"))
            .args([o, "3"])
            .env("AFPROBE", bin),
        "is missing",
    );
    for name in [
        "submit-capture.sh",
        "capture-array.sbatch",
        "merge-slices.sbatch",
        "local-cluster.sh",
    ] {
        let help = run(clean("bash").arg(script(name)).arg("--help"));
        let page = String::from_utf8_lossy(&help.stdout);
        assert!(
            help.status.success() && page.contains("USAGE") && page.len() > 500,
            "{name} --help: {}",
            text(&help)
        );
    }
}

/// Why a live run is impossible here, or None when a Slurm node answers.
fn no_live_slurm() -> Option<String> {
    for tool in ["sbatch", "sinfo", "squeue", "scontrol"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "`{tool}` is not on PATH (start a one-node Slurm with \
                 scripts/slurm/local-cluster.sh start --install)"
            ));
        }
    }
    let info = Command::new("timeout")
        .args(["30", "sinfo", "-h", "-o", "%T"])
        .output();
    let info = match info {
        Ok(o) => o,
        Err(e) => return Some(format!("cannot run sinfo: {e}")),
    };
    let states = String::from_utf8_lossy(&info.stdout).into_owned();
    let ready = ["idle", "mixed", "allocated", "completing"];
    if !info.status.success() || !states.lines().any(|s| ready.contains(&s.trim())) {
        return Some(format!(
            "no Slurm node is up (sinfo exit {:?}, states {:?}: {}); start one with \
             scripts/slurm/local-cluster.sh start",
            info.status.code(),
            states.trim(),
            String::from_utf8_lossy(&info.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .trim()
        ));
    }
    None
}

/// `scontrol show job ID`'s JobState and Reason, or None once Slurm forgot the job.
fn job_state(id: &str) -> Option<(String, String)> {
    let out = clean("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or("?")
            .to_string()
    };
    Some((field("JobState="), field("Reason=")))
}

#[test]
fn a_slurm_array_and_its_merge_job_give_the_store_of_one_capture() {
    if let Some(why) = no_live_slurm() {
        eprintln!("skipped: live Slurm test: {why}");
        return;
    }
    let tmp = match std::env::var_os("AFPROBE_SLURM_TEST_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let prompts = tmp.path().join("p.jsonl");
    write_prompts(&prompts);
    let out = tmp.path().join("store");
    let started = Instant::now();
    let submitted = run(clean("bash")
        .arg(script("submit-capture.sh"))
        .args(["--sbatch", "--cpus-per-task=1", "--sbatch", "--time=10"])
        .arg(&prompts)
        .arg(&out)
        .arg(SHARDS.to_string())
        .args(capture_flags())
        .env("AFPROBE", env!("CARGO_BIN_EXE_afprobe")));
    assert!(submitted.status.success(), "submit: {}", text(&submitted));
    let stdout = String::from_utf8_lossy(&submitted.stdout).into_owned();
    let job = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("submit printed no {key}: {}", text(&submitted)))
            .to_string()
    };
    let (array, merge) = (job("ARRAY_JOB="), job("MERGE_JOB="));

    let limit = std::env::var("AFPROBE_SLURM_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300u64);
    let failed = [
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    ];
    loop {
        let state = job_state(&merge);
        match &state {
            Some((s, _)) if s == "COMPLETED" => break,
            Some((s, reason)) if failed.contains(&s.as_str()) => panic!(
                "merge job {merge} ended {s} (reason {reason}; a capture task of array job \
                 {array} failed if DependencyNeverSatisfied):\n{}",
                job_logs(&out)
            ),
            // Slurm forgot the job (MinJobAge): the store's marker decides.
            None if store::read_manifest(&out).is_ok_and(|m| m.complete) => break,
            None => panic!(
                "merge job {merge} is unknown to scontrol and {} is not complete:\n{}",
                out.display(),
                job_logs(&out)
            ),
            Some(_) => {}
        }
        if started.elapsed() > Duration::from_secs(limit) {
            let _ = clean("scancel").args([&array, &merge]).output();
            let queue = clean("squeue")
                .output()
                .map(|o| text(&o))
                .unwrap_or_default();
            panic!(
                "the jobs did not finish in {limit} s (merge job {merge}: {state:?}); \
                 cancelled them. squeue:\n{queue}\n{}",
                job_logs(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "slurm: array job {array} ({SHARDS} tasks) and merge job {merge} done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let logs = job_logs(&out);
    assert!(
        logs.contains("ok — 5 shards, 10 rows") && logs.contains("threads 1"),
        "the job logs lack the verify line or the task's thread count:\n{logs}"
    );
    check_slices(&out);
    let whole = tmp.path().join("whole");
    capture_whole(&prompts, &whole);
    assert_identical_stores(&out, &whole);
}
