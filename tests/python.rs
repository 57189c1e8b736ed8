//! The Python package (`python/`, docs/python.md), as a user gets it: `pip
//! install ./python` into a virtual environment under `target/` (maturin builds
//! the extension module in this workspace's target directory, so the library
//! built for these tests is reused), then its pytest suite: the API against the
//! CLI built here (`run_with_cache` against `capture`, hooks against `steer`,
//! `score` against `capture --score`, stores, errors) and docs/python.md's
//! example, executed. Needs `python3` with `venv` and pip's index;
//! `AFPROBE_PYTHON` names another interpreter.

use std::path::Path;
use std::process::Command;

fn run(what: &str, cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{what}: cannot start it: {e}"));
    assert!(
        status.success(),
        "{what} failed ({status}); its output is above"
    );
}

#[test]
fn the_python_package_installs_and_passes_its_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/pyenv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let base = std::env::var("AFPROBE_PYTHON").unwrap_or_else(|_| "python3".into());
        run(
            "python3 -m venv target/pyenv",
            Command::new(base).args(["-m", "venv"]).arg(&venv),
        );
    }
    run(
        "pip install ./python[test]",
        Command::new(&python).current_dir(root).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "./python[test]",
        ]),
    );
    run(
        "pytest (python/tests)",
        Command::new(&python)
            .current_dir(root.join("python/tests"))
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .env("AFPROBE_BIN", env!("CARGO_BIN_EXE_afprobe"))
            .env("MPLBACKEND", "Agg"),
    );
}
